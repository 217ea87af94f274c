"""Turn the registry into secrets and the files that enforce them.

`provision(registry, out_dir)` writes:

    credentials.json     (0600) every secret in plaintext, for the processes that log in with them
    mosquitto.passwd     (0600) the brokers' password file, hashed by `mosquitto_passwd -U`
    mosquitto.acl        (0644) who may read and write which topics; contains no secret
    dashboard-auth.json  (0600) manager password hashes and token digests, no plaintext
    duty.json            (0644) the teams' and workers' shifts (teamtrack.ingress.duty), for the
                         bridges and device gateways (they read it again when it changes)
    tls/                 (0700) a local certificate authority and the servers' certificate
                         (`teamtrack.tls`): ca.crt, ca.key, server.crt, server.key, all 0600

A manager has two secrets besides the API token: the dashboard login password and an MQTT
password of its own (`mqtt_password`), so that the password typed into the dashboard's login
form is never one a broker accepts, and an MQTT client's stored password opens no dashboard.

Secrets already present in an existing credentials.json are kept, so re-provisioning after adding
workers (a seasonal peak) does not log out anybody already in the field; identities removed from
the registry lose their secrets.

One account at a time (docs/security.md, "Revocation and rotation"):

    rotate_account(registry, out_dir, username)   new secrets for it; the old ones stop working
    revoke_account(registry, out_dir, username)   no secrets, no password line, no ACL entry and
                                                  no dashboard login, until reinstate_account;
                                                  the registry keeps listing it (credentials.json
                                                  records it under `revoked`)

Every file is written to a temporary name and renamed into place, with its final mode from the
start, so that a broker reloading on SIGHUP or a dashboard reading the auth file never sees a
half-written file, and a plaintext password file never exists under a name a broker reads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from teamtrack.contract import TOPIC_ROOT, position_topic, status_topic, team_topic_filter
from teamtrack.files import temporary_sibling, write_atomically
from teamtrack.ingress.duty import DUTY_FILE
from teamtrack.ingress.owntracks import OWNTRACKS_ROOT
from teamtrack.mqtt import BRIDGE_SHARE_GROUP, SUBSCRIPTION_COUNT_TOPIC
from teamtrack.passwords import generate_secret, hash_password, token_digest
from teamtrack.registry import Registry
from teamtrack.tls import TLS_DIR, TlsError, TlsFiles, ensure_tls, normalize_hosts

CREDENTIALS_FILE: Final = "credentials.json"
PASSWORD_FILE: Final = "mosquitto.passwd"  # noqa: S105 (a file name, not a secret)
ACL_FILE: Final = "mosquitto.acl"
DASHBOARD_AUTH_FILE: Final = "dashboard-auth.json"
# The observer's login for the Mosquitto command-line clients, as an options file that they
# read from `$XDG_CONFIG_HOME/mosquitto_sub`: no password on a command line (the process list).
OBSERVER_CONFIG_DIR: Final = "observer"
PRIVATE_MODE: Final = 0o600
PUBLIC_MODE: Final = 0o644
# The program that hashes a plaintext mosquitto password file in place (`-U`).
HASH_TOOL: Final = "mosquitto_passwd"
HASH_TOOL_TIMEOUT_S: Final = 120.0
ALL_TEAMS_FILTER: Final = f"{TOPIC_ROOT}/#"
# The bridges' shared subscription. Mosquitto itself never checks a `$share/` line (it grants
# every subscription, and delivers by the plain topic); the brokers' subscription plugin does:
# only accounts with this line may join the group.
BRIDGE_SHARE_FILTER: Final = f"$share/{BRIDGE_SHARE_GROUP}/{ALL_TEAMS_FILTER}"
# What the OwnTracks app publishes (teamtrack.ingress.owntracks): only bridges read it, as a group.
OWNTRACKS_FILTER: Final = f"{OWNTRACKS_ROOT}/#"
BRIDGE_OWNTRACKS_SHARE_FILTER: Final = f"$share/{BRIDGE_SHARE_GROUP}/{OWNTRACKS_FILTER}"


class ProvisionError(RuntimeError):
    """Provisioning could not complete; nothing already in place was replaced by a broken file."""


class DeviceCredential(BaseModel):
    model_config = ConfigDict(frozen=True)

    team: str
    worker: str
    username: str
    # Secrets stay out of reprs, so they never end up in logs or tracebacks.
    password: str = Field(repr=False)


class ManagerCredential(BaseModel):
    model_config = ConfigDict(frozen=True)

    team: str
    username: str
    # The dashboard login; the brokers never see it.
    password: str = Field(repr=False)
    token: str = Field(repr=False)
    # The MQTT login (read-only, own team). Empty in a credentials.json from before it existed:
    # provisioning again issues one.
    mqtt_password: str = Field("", repr=False)


class ServiceCredential(BaseModel):
    """A bridge or observer login."""

    model_config = ConfigDict(frozen=True)

    username: str
    password: str = Field(repr=False)


class Credentials(BaseModel):
    """The content of credentials.json.

    The file also carries `observer`, the first observer, as a shortcut for the common case of
    one debugging login; it is derived on writing and ignored on reading.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    devices: tuple[DeviceCredential, ...] = ()
    managers: tuple[ManagerCredential, ...] = ()
    observers: tuple[ServiceCredential, ...] = ()
    bridges: tuple[ServiceCredential, ...] = ()
    # Accounts of the registry that `revoke_account` cut off: provisioning issues them nothing.
    revoked: tuple[str, ...] = ()

    @property
    def observer(self) -> ServiceCredential | None:
        return self.observers[0] if self.observers else None

    @cached_property
    def _devices_by_address(self) -> dict[tuple[str, str], DeviceCredential]:
        return {(credential.team, credential.worker): credential for credential in self.devices}

    @cached_property
    def _managers_by_username(self) -> dict[str, ManagerCredential]:
        return {credential.username: credential for credential in self.managers}

    def device(self, team: str, worker: str) -> DeviceCredential:
        """The device login of one worker; KeyError if it is not provisioned."""
        try:
            return self._devices_by_address[team, worker]
        except KeyError:
            raise KeyError(f"no device credential for {team}/{worker}") from None

    def manager(self, username: str) -> ManagerCredential:
        try:
            return self._managers_by_username[username]
        except KeyError:
            raise KeyError(f"no manager credential for {username!r}") from None

    def managers_of(self, team: str) -> tuple[ManagerCredential, ...]:
        return tuple(credential for credential in self.managers if credential.team == team)

    def bridge(self, username: str | None = None) -> ServiceCredential:
        """The named bridge login, or the first one when no name is given."""
        for credential in self.bridges:
            if username is None or credential.username == username:
                return credential
        raise KeyError(f"no bridge credential for {username!r}")

    def document(self) -> dict[str, Any]:
        document = self.model_dump(mode="json")
        observer = self.observer
        return {
            "devices": document["devices"],
            "managers": document["managers"],
            "observer": observer.model_dump(mode="json") if observer is not None else None,
            "observers": document["observers"],
            "bridges": document["bridges"],
            "revoked": document["revoked"],
        }

    def usernames(self) -> set[str]:
        """Every account that holds secrets."""
        return set(_existing_secrets(self))


@dataclass(frozen=True, slots=True)
class ProvisionResult:
    out_dir: Path
    credentials: Credentials
    credentials_path: Path
    password_file: Path
    acl_file: Path
    dashboard_auth_path: Path
    added_usernames: tuple[str, ...]
    removed_usernames: tuple[str, ...]
    # The local authority and the servers' certificate and key: the brokers' mqtts listeners,
    # the dashboards' HTTPS and any other TLS server of the cluster take them from here
    # (`tls.server_cert`, `tls.server_key`; clients trust `tls.ca_cert`). None: not made.
    tls: TlsFiles | None = None
    revoked_usernames: tuple[str, ...] = ()
    # The shifts (duty.json), for the bridges and gateways (`--duty-file`).
    duty_file: Path | None = None


@dataclass(frozen=True, slots=True)
class _Secret:
    password: str
    token: str | None = None
    mqtt_password: str | None = None


def load_credentials(path: Path | str) -> Credentials:
    """Read a credentials.json (or the one inside a provisioned directory)."""
    source = Path(path)
    if source.is_dir():
        source = source / CREDENTIALS_FILE
    try:
        return Credentials.model_validate_json(source.read_bytes())
    except OSError as error:
        raise ProvisionError(f"{source}: cannot read credentials ({error.strerror})") from None
    except ValidationError as error:
        raise ProvisionError(
            f"{source}: not a valid credentials file ({error.error_count()} problems, first: "
            f"{error.errors()[0]['msg']}); fix it, or delete it to issue new secrets to everyone"
        ) from None


def _existing_secrets(credentials: Credentials) -> dict[str, _Secret]:
    secrets: dict[str, _Secret] = {}
    for device in credentials.devices:
        secrets[device.username] = _Secret(device.password)
    for manager in credentials.managers:
        secrets[manager.username] = _Secret(
            manager.password, manager.token, manager.mqtt_password or None
        )
    for service in (*credentials.observers, *credentials.bridges):
        secrets[service.username] = _Secret(service.password)
    return secrets


class _SecretIssuer:
    """Hands out the kept secret of a known username, or a fresh one, and records which."""

    def __init__(self, existing: dict[str, _Secret]) -> None:
        self._existing = existing
        self.issued: list[str] = []
        self.added: list[str] = []

    def password(self, username: str) -> str:
        self.issued.append(username)
        kept = self._existing.get(username)
        if kept is not None:
            return kept.password
        self.added.append(username)
        return generate_secret()

    def token(self, username: str) -> str:
        kept = self._existing.get(username)
        if kept is not None and kept.token is not None:
            return kept.token
        # 32 bytes: a bearer token is a long-lived credential presented on every request.
        return generate_secret(32)

    def mqtt_password(self, username: str) -> str:
        """A manager's MQTT password: kept, or new (also for a manager of an older file)."""
        kept = self._existing.get(username)
        if kept is not None and kept.mqtt_password is not None:
            return kept.mqtt_password
        return generate_secret()

    def removed(self) -> tuple[str, ...]:
        return tuple(sorted(self._existing.keys() - set(self.issued)))


def issue_credentials(registry: Registry, existing: Credentials | None = None) -> Credentials:
    """Credentials for every identity in the registry, keeping those found in `existing`."""
    existing = existing or Credentials()
    return _issue(
        registry, _SecretIssuer(_existing_secrets(existing)), frozenset(existing.revoked)
    )


def registry_usernames(registry: Registry) -> set[str]:
    """Every account the registry names: devices, managers, observers, bridges."""
    return {
        *(device.username for device in registry.devices()),
        *(manager.username for manager in registry.managers()),
        *registry.observers,
        *registry.bridges,
    }


def _issue(registry: Registry, issuer: _SecretIssuer, revoked: frozenset[str]) -> Credentials:
    devices = tuple(
        DeviceCredential(
            team=device.team,
            worker=device.worker,
            username=device.username,
            password=issuer.password(device.username),
        )
        for device in registry.devices()
        if device.username not in revoked
    )
    managers = tuple(
        ManagerCredential(
            team=manager.team,
            username=manager.username,
            password=issuer.password(manager.username),
            token=issuer.token(manager.username),
            mqtt_password=issuer.mqtt_password(manager.username),
        )
        for manager in registry.managers()
        if manager.username not in revoked
    )
    observers = tuple(
        ServiceCredential(username=username, password=issuer.password(username))
        for username in registry.observers
        if username not in revoked
    )
    bridges = tuple(
        ServiceCredential(username=username, password=issuer.password(username))
        for username in registry.bridges
        if username not in revoked
    )
    # Only names the registry still lists stay revoked: one removed from it is gone anyway.
    still_listed = sorted(revoked & registry_usernames(registry))
    return Credentials(
        devices=devices, managers=managers, observers=observers, bridges=bridges,
        revoked=tuple(still_listed),
    )


def acl_text(registry: Registry, revoked: frozenset[str] = frozenset()) -> str:
    """The mosquitto acl_file: each user gets exactly the topics of its role, nothing by pattern."""
    lines = [
        "# Generated by `teamtrack provision` from the registry. Do not edit: changes are lost",
        "# on the next provisioning. Edit the registry and provision again, then send SIGHUP to",
        "# the brokers to reload it.",
        "#",
        "# bridges: read and write every team, join the bridges' share group, and read the",
        "# broker's subscription count (on-demand mirroring);",
        "# observers: read every team (debugging);",
        "# managers: read their own team only (MQTT over WebSockets);",
        "# devices: write their own position and status, and OwnTracks under owntracks/<own",
        "# account>/; read nothing but their OwnTracks command topic (nobody writes there).",
        "# A subscription is granted only where a read line covers it (mosquitto/plugin/).",
        "",
    ]
    for username in registry.bridges:
        if username in revoked:
            continue
        lines += [
            f"user {username}",
            f"topic readwrite {ALL_TEAMS_FILTER}",
            f"topic read {BRIDGE_SHARE_FILTER}",
            f"topic read {BRIDGE_OWNTRACKS_SHARE_FILTER}",
            f"topic read {OWNTRACKS_FILTER}",
            f"topic read {SUBSCRIPTION_COUNT_TOPIC}",
            "",
        ]
    for username in registry.observers:
        if username in revoked:
            continue
        lines += [f"user {username}", f"topic read {ALL_TEAMS_FILTER}", ""]
    for manager in registry.managers():
        if manager.username in revoked:
            continue
        lines += [f"user {manager.username}", f"topic read {team_topic_filter(manager.team)}", ""]
    for device in registry.devices():
        if device.username in revoked:
            continue
        lines += [
            f"user {device.username}",
            f"topic write {position_topic(device.team, device.worker)}",
            f"topic write {status_topic(device.team, device.worker)}",
            # The OwnTracks app's own topics, under its account's name only.
            f"topic write {OWNTRACKS_ROOT}/{device.username}/#",
            # The app subscribes to its own command topic (Android even with `sub` off);
            # nothing writes there, but a refused subscription may count as a failed login.
            f"topic read {OWNTRACKS_ROOT}/{device.username}/+/cmd",
            "",
        ]
    return "\n".join(lines)


def dashboard_auth_document(credentials: Credentials) -> dict[str, Any]:
    return {
        "managers": [
            {
                "username": manager.username,
                "team": manager.team,
                "password_hash": hash_password(manager.password),
                "token_sha256": token_digest(manager.token),
            }
            for manager in credentials.managers
        ]
    }


def _mqtt_logins(credentials: Credentials) -> Iterator[tuple[str, str]]:
    for device in credentials.devices:
        yield device.username, device.password
    for manager in credentials.managers:
        # Never the dashboard password (see the module's docstring).
        yield manager.username, manager.mqtt_password
    for service in (*credentials.observers, *credentials.bridges):
        yield service.username, service.password


def write_password_file(
    target: Path, logins: Iterable[tuple[str, str]], hash_tool: str = HASH_TOOL
) -> None:
    """Write a mosquitto password file with one `mosquitto_passwd -U` run over all logins.

    Passwords reach mosquitto_passwd only through a 0600 file, never its command line, where any
    local user could read them from the process list.
    """
    executable = shutil.which(hash_tool)
    if executable is None:
        raise ProvisionError(
            f"{hash_tool} not found on PATH; it comes with the mosquitto package "
            "(`make system-deps` installs it)"
        )
    plaintext = "".join(f"{username}:{password}\n" for username, password in logins)
    temporary = temporary_sibling(target, PRIVATE_MODE)
    try:
        temporary.write_text(plaintext, encoding="utf-8")
        completed = subprocess.run(
            [executable, "-U", str(temporary)],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=HASH_TOOL_TIMEOUT_S,
            check=False,
        )
        if completed.returncode != 0:
            output = (completed.stderr or completed.stdout).decode(errors="replace").strip()
            raise ProvisionError(f"mosquitto_passwd -U failed ({completed.returncode}): {output}")
        # mosquitto_passwd rewrites the file; make sure the result is still private.
        temporary.chmod(PRIVATE_MODE)
        os.replace(temporary, target)
    except subprocess.TimeoutExpired:
        raise ProvisionError(
            f"mosquitto_passwd -U did not finish in {HASH_TOOL_TIMEOUT_S:.0f} s"
        ) from None
    finally:
        temporary.unlink(missing_ok=True)


def _json_bytes(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)


def write_observer_options(credentials: Credentials, config_dir: Path) -> Path | None:
    """`{config_dir}/mosquitto_sub` (0600, in a 0700 folder): the observer's login for
    `XDG_CONFIG_HOME={config_dir} mosquitto_sub -h HOST -p PORT -t FILTER`."""
    observer = credentials.observer
    if observer is None:
        (config_dir / "mosquitto_sub").unlink(missing_ok=True)  # an observer revoked since
        return None
    config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    config_dir.chmod(0o700)
    path = config_dir / "mosquitto_sub"
    text = f"-V mqttv5\n-u {observer.username}\n-P {observer.password}\n"
    write_atomically(path, text.encode("utf-8"), PRIVATE_MODE)
    return path


def provision(
    registry: Registry,
    out_dir: Path | str,
    *,
    reuse_existing: bool = True,
    hash_tool: str = HASH_TOOL,
    tls: bool = True,
    tls_hosts: Iterable[str] = (),
    rotate_tls: bool = False,
) -> ProvisionResult:
    """Issue credentials for `registry` and write the four files into `out_dir`, and with
    `tls` (the default) the certificate authority and server certificate into `out_dir/tls/`.

    With `reuse_existing` (the default) the secrets in an existing `out_dir/credentials.json`
    are kept for identities still in the registry; without it every secret is replaced.
    `hash_tool` is the mosquitto_passwd program, by name on PATH or as a path. The server
    certificate names localhost, 127.0.0.1, ::1, the registry's `tls_hosts` and `tls_hosts`;
    an existing authority and certificate are reused unless `rotate_tls` (see `teamtrack.tls`).
    Accounts revoked earlier stay revoked either way.
    """
    hosts = (*registry.tls_hosts, *tls_hosts)
    try:
        normalize_hosts(hosts)  # a bad name fails before anything is written
    except TlsError as error:
        raise ProvisionError(str(error)) from None
    directory = Path(out_dir)
    existing = _existing_credentials(directory)
    secrets = _existing_secrets(existing) if reuse_existing else {}
    return _provision(
        registry, directory, secrets, frozenset(existing.revoked), hash_tool,
        tls_hosts=hosts if tls else None, rotate_tls=rotate_tls,
    )


def rotate_account(
    registry: Registry, out_dir: Path | str, username: str, *, hash_tool: str = HASH_TOOL
) -> ProvisionResult:
    """New secrets for one account (a manager: password, API token and MQTT password; any other:
    its MQTT password); every other account keeps its own. The old secrets stop working once
    the brokers reloaded (SIGHUP) and the dashboards re-read their auth file (on their own)."""
    directory = Path(out_dir)
    existing = _existing_credentials(directory)
    _require_account(registry, existing, username, held=True)
    secrets = _existing_secrets(existing)
    del secrets[username]
    return _provision(registry, directory, secrets, frozenset(existing.revoked), hash_tool)


def revoke_account(
    registry: Registry, out_dir: Path | str, username: str, *, hash_tool: str = HASH_TOOL
) -> ProvisionResult:
    """Cut one account off: its secrets, password line, ACL entry and dashboard login go, and
    it is recorded as revoked in credentials.json, so that provisioning again does not bring it
    back while the registry still lists it (`reinstate_account` does, with new secrets)."""
    directory = Path(out_dir)
    existing = _existing_credentials(directory)
    _require_account(registry, existing, username, held=True)
    secrets = _existing_secrets(existing)
    del secrets[username]
    revoked = frozenset({*existing.revoked, username})
    return _provision(registry, directory, secrets, revoked, hash_tool)


def reinstate_account(
    registry: Registry, out_dir: Path | str, username: str, *, hash_tool: str = HASH_TOOL
) -> ProvisionResult:
    """Undo `revoke_account`: the account gets new secrets (never the revoked ones)."""
    directory = Path(out_dir)
    existing = _existing_credentials(directory)
    if username not in existing.revoked:
        raise ProvisionError(f"account {username!r} is not revoked")
    revoked = frozenset(existing.revoked) - {username}
    return _provision(registry, directory, _existing_secrets(existing), revoked, hash_tool)


def _existing_credentials(directory: Path) -> Credentials:
    credentials_path = directory / CREDENTIALS_FILE
    return load_credentials(credentials_path) if credentials_path.exists() else Credentials()


def _require_account(
    registry: Registry, existing: Credentials, username: str, *, held: bool
) -> None:
    if username in existing.revoked:
        raise ProvisionError(f"account {username!r} is already revoked")
    if username not in registry_usernames(registry):
        raise ProvisionError(f"no account {username!r} in the registry")
    if held and username not in existing.usernames():
        raise ProvisionError(f"account {username!r} has no credentials yet: provision first")


def _provision(
    registry: Registry,
    directory: Path,
    secrets: dict[str, _Secret],
    revoked: frozenset[str],
    hash_tool: str,
    tls_hosts: tuple[str, ...] | None = None,
    rotate_tls: bool = False,
) -> ProvisionResult:
    """Write every file for `registry`; with `tls_hosts` (not None) also the authority and
    server certificate (`ensure_tls`); None leaves the TLS folder as it is (one account's
    rotation or revocation has nothing to do with certificates)."""
    directory.mkdir(parents=True, exist_ok=True)
    credentials_path = directory / CREDENTIALS_FILE
    issuer = _SecretIssuer(secrets)
    credentials = _issue(registry, issuer, revoked)

    # credentials.json first: it is the source of truth, so if a later step fails, running
    # provisioning again reuses these secrets and produces matching files.
    write_atomically(credentials_path, _json_bytes(credentials.document()), PRIVATE_MODE)
    password_file = directory / PASSWORD_FILE
    write_password_file(password_file, _mqtt_logins(credentials), hash_tool)
    acl_file = directory / ACL_FILE
    acl = acl_text(registry, frozenset(credentials.revoked))
    write_atomically(acl_file, acl.encode("utf-8"), PUBLIC_MODE)
    dashboard_auth_path = directory / DASHBOARD_AUTH_FILE
    write_atomically(
        dashboard_auth_path, _json_bytes(dashboard_auth_document(credentials)), PRIVATE_MODE
    )
    write_observer_options(credentials, directory / OBSERVER_CONFIG_DIR)
    duty_file = directory / DUTY_FILE
    write_atomically(duty_file, _json_bytes(registry.duty_roster().document()), PUBLIC_MODE)
    tls_files = None
    if tls_hosts is not None:
        try:
            tls_files = ensure_tls(directory / TLS_DIR, tls_hosts, rotate=rotate_tls)
        except TlsError as error:
            raise ProvisionError(str(error)) from None
    return ProvisionResult(
        out_dir=directory,
        credentials=credentials,
        credentials_path=credentials_path,
        password_file=password_file,
        acl_file=acl_file,
        dashboard_auth_path=dashboard_auth_path,
        added_usernames=tuple(issuer.added),
        removed_usernames=issuer.removed(),
        tls=tls_files,
        revoked_usernames=credentials.revoked,
        duty_file=duty_file,
    )
