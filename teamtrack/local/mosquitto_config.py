"""Broker configuration files rendered from `mosquitto/broker.conf.template`.

Every broker of a cluster gets the same security files (password file and ACL written by
`teamtrack.provision`) and differs only in its ports, its name and its persistence directory.
"""

from __future__ import annotations

import getpass
import hashlib
import ipaddress
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Final

from teamtrack.contract import is_slug
from teamtrack.provision import ACL_FILE, PASSWORD_FILE

# The template lives at the repository root next to its README, found from this module; this
# holds for a source checkout and for the editable install the project is developed with.
TEMPLATE_DIR: Final = Path(__file__).resolve().parents[2] / "mosquitto"
BROKER_TEMPLATE: Final = TEMPLATE_DIR / "broker.conf.template"
MQTTS_TEMPLATE: Final = TEMPLATE_DIR / "mqtts-listener.conf.template"
LOOPBACK: Final = "127.0.0.1"
# IANA's port for MQTT over TLS.
MQTTS_PORT: Final = 8883
# The brokers' subscription check (see the source): built on first use into the git-ignored var/.
PLUGIN_SOURCE: Final = TEMPLATE_DIR / "plugin" / "teamtrack_subscribe_acl.c"
PLUGIN_BUILD_DIR: Final = TEMPLATE_DIR.parent / "var" / "mosquitto-plugin"
PLUGIN_COMPILERS: Final = ("cc", "gcc", "clang")
PLUGIN_BUILD_TIMEOUT_S: Final = 120.0

# Paths inside the eclipse-mosquitto image used by docker-compose.yml.
COMPOSE_CONFIG_DIR: Final = Path("/mosquitto/config")
COMPOSE_DATA_DIR: Final = Path("/mosquitto/data")
COMPOSE_MQTT_PORT: Final = 1883
COMPOSE_BROKERS: Final = ("mosquitto-1", "mosquitto-2")
# Where mosquitto/Dockerfile installs the plugin in the broker image.
COMPOSE_PLUGIN: Final = Path("/usr/lib/mosquitto/teamtrack_subscribe_acl.so")


class BrokerConfigError(ValueError):
    """A value that would produce a broken or ambiguous broker configuration."""


@dataclass(frozen=True, slots=True)
class MqttsListener:
    """A broker's MQTT over TLS listener: its port, address ("" for every interface) and the
    server certificate, its key and the authority that signed it (`ProvisionResult.tls`)."""

    port: int
    certfile: Path
    keyfile: Path
    cafile: Path
    host: str = LOOPBACK


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only: localhost, 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def subscribe_acl_plugin(build_dir: Path = PLUGIN_BUILD_DIR) -> Path:
    """The brokers' subscription-check plugin, compiled from its C source if not yet built.

    The file name carries a digest of the source, so an edited source is built again and a
    running broker keeps the file it loaded.
    """
    try:
        source = PLUGIN_SOURCE.read_bytes()
    except FileNotFoundError:
        raise BrokerConfigError(
            f"plugin source not found at {PLUGIN_SOURCE}; teamtrack must run from a source "
            "checkout or an editable install (pip install -e .)"
        ) from None
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = Path(build_dir) / f"teamtrack_subscribe_acl-{digest}.so"
    if target.exists():
        return target
    compiler = next((found for name in PLUGIN_COMPILERS if (found := shutil.which(name))), None)
    if compiler is None:
        raise BrokerConfigError(
            "no C compiler (cc) to build the brokers' subscription check "
            f"({PLUGIN_SOURCE.name}); install gcc (`make system-deps` does)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(descriptor)
    try:
        completed = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-std=c11", "-D_GNU_SOURCE", "-Wall",
             "-o", name, str(PLUGIN_SOURCE)],
            capture_output=True, stdin=subprocess.DEVNULL, timeout=PLUGIN_BUILD_TIMEOUT_S,
            check=False,
        )
        if completed.returncode != 0:
            output = (completed.stderr or completed.stdout).decode(errors="replace").strip()
            raise BrokerConfigError(f"building {PLUGIN_SOURCE.name} failed: {output}")
        os.chmod(name, 0o755)  # noqa: S103 (a shared library mosquitto loads: no secret)
        os.replace(name, target)
    finally:
        Path(name).unlink(missing_ok=True)
    return target


def _load_template(path: Path = BROKER_TEMPLATE) -> Template:
    try:
        return Template(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BrokerConfigError(
            f"broker config template not found at {path}; teamtrack must run from a "
            "source checkout or an editable install (pip install -e .)"
        ) from None


def _mqtts_listener_text(listener: MqttsListener | None) -> str:
    if listener is None:
        return "# (no MQTT over TLS listener: this broker is reached from this host only)\n"
    address = f" {_config_value(listener.host, 'mqtts host')}" if listener.host else ""
    return _load_template(MQTTS_TEMPLATE).substitute(
        mqtts_port=_port(listener.port, "MQTTS port"),
        mqtts_address=address,
        certfile=_config_value(str(listener.certfile), "certificate file"),
        keyfile=_config_value(str(listener.keyfile), "key file"),
        cafile=_config_value(str(listener.cafile), "CA file"),
    )


def _config_value(value: str, what: str) -> str:
    # A line break would end the option and start another one chosen by whoever controls
    # the value; mosquitto has no quoting to prevent that.
    if not value or any(character in value for character in "\r\n\0"):
        raise BrokerConfigError(f"{what} {value!r} cannot be written into a mosquitto config")
    return value


def _port(value: int, what: str) -> str:
    if isinstance(value, bool) or not 0 < value < 65536:
        raise BrokerConfigError(f"{what} {value!r} is not a TCP port")
    return str(value)


def current_user_name() -> str:
    """The account this process runs as (not $USER, which sudo and su may leave unchanged)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        # A uid without a passwd entry (common in containers) is never root, and mosquitto
        # only switches users when started as root, so any name serves.
        return getpass.getuser()


def broker_config_text(
    *,
    mqtt_port: int,
    password_file: Path,
    acl_file: Path,
    persistence_location: Path,
    broker_name: str,
    host: str = LOOPBACK,
    run_as_user: str,
    subscribe_acl_plugin: Path,
    mqtts: MqttsListener | None = None,
) -> str:
    """The configuration of one broker, as text; paths are written as given.

    Its one listener is plain MQTT: MQTT over WebSockets is `python -m wsgate`'s, in front of
    it (mosquitto/README.md says why)."""
    if not is_slug(broker_name):
        raise BrokerConfigError(f"broker name {broker_name!r} is not a slug")
    ports = [mqtt_port, *([mqtts.port] if mqtts is not None else [])]
    if len(set(ports)) < len(ports):
        raise BrokerConfigError(f"two listeners both on port {max(ports, key=ports.count)}")
    return _load_template().substitute(
        broker_name=broker_name,
        mqtt_port=_port(mqtt_port, "MQTT port"),
        host=_config_value(host, "host"),
        password_file=_config_value(str(password_file), "password file"),
        acl_file=_config_value(str(acl_file), "ACL file"),
        subscribe_acl_plugin=_config_value(str(subscribe_acl_plugin), "plugin"),
        # mosquitto appends the database file name to this verbatim, so it needs the slash.
        persistence_location=_config_value(f"{str(persistence_location).rstrip('/')}/", "path"),
        run_as_user=_config_value(run_as_user, "user"),
        mqtts_listener=_mqtts_listener_text(mqtts),
    )


def render_broker_config(
    *,
    mqtt_port: int,
    state_dir: Path,
    password_file: Path,
    acl_file: Path,
    broker_name: str,
    host: str = LOOPBACK,
    run_as_user: str | None = None,
    plugin: Path | None = None,
    mqtts: MqttsListener | None = None,
) -> Path:
    """Write `{state_dir}/{broker_name}.conf` and create the broker's persistence directory.

    The plain MQTT listener (`host`) must be a loopback address: whatever reaches the broker
    from another host comes through the MQTT over TLS listener (`mqtts`), on any address.

    `run_as_user` defaults to the current user: a broker started as root then keeps running as
    root instead of switching to the `mosquitto` account, which could not read the 0600 secrets
    that provisioning wrote as the current user. `plugin` defaults to the subscription check
    built by `subscribe_acl_plugin()`.
    """
    if not is_loopback(host):
        raise BrokerConfigError(
            f"the plain MQTT listener must stay on loopback, not {host!r}: give other hosts "
            "the MQTT over TLS listener (mqtts) instead"
        )
    if mqtts is not None:
        mqtts = MqttsListener(
            mqtts.port, Path(mqtts.certfile).resolve(), Path(mqtts.keyfile).resolve(),
            Path(mqtts.cafile).resolve(), mqtts.host,
        )
    state = Path(state_dir).resolve()
    persistence = state / broker_name
    text = broker_config_text(
        mqtt_port=mqtt_port,
        password_file=Path(password_file).resolve(),
        acl_file=Path(acl_file).resolve(),
        persistence_location=persistence,
        broker_name=broker_name,
        host=host,
        run_as_user=run_as_user if run_as_user is not None else current_user_name(),
        subscribe_acl_plugin=Path(plugin if plugin is not None else subscribe_acl_plugin()),
        mqtts=mqtts,
    )
    persistence.mkdir(parents=True, exist_ok=True)
    config_path = state / f"{broker_name}.conf"
    config_path.write_text(text, encoding="utf-8")
    return config_path


def render_compose_broker_configs(
    out_dir: Path, broker_names: Sequence[str] = COMPOSE_BROKERS
) -> list[Path]:
    """Write the broker configs used by docker-compose.yml into `out_dir`.

    Paths are those inside the container, where the entrypoint installs the provisioned files
    owned by the image's `mosquitto` user, so that the broker can drop root privileges.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in broker_names:
        text = broker_config_text(
            mqtt_port=COMPOSE_MQTT_PORT,
            password_file=COMPOSE_CONFIG_DIR / PASSWORD_FILE,
            acl_file=COMPOSE_CONFIG_DIR / ACL_FILE,
            persistence_location=COMPOSE_DATA_DIR,
            broker_name=name,
            # Inside a container, the other services reach the broker over the compose network.
            host="0.0.0.0",
            run_as_user="mosquitto",
            subscribe_acl_plugin=COMPOSE_PLUGIN,
        )
        path = directory / f"{name}.conf"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
