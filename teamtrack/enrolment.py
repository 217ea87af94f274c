"""Enrolment of real phones running OwnTracks: a worker's phone gets its own login by scanning.

For one provisioned device (`teamtrack.provision`, credentials.json) this writes

    enrol/<team>/<worker>.otrc   (0600) the OwnTracks configuration, `_type: configuration`
    enrol/<team>/<worker>.png    (0600) a QR code of `owntracks:///config?inline=...`
    enrol/<team>/sheet.html      (0600, per team) one QR code per worker, to print or show

in the provisioned folder (folders 0700): both carry the device's password, which is the point.

The inline URL is the one the apps import (booklet: features/remoteconfig, "URL config"): the
JSON in standard base64 with padding, which iOS (`NSData initWithBase64EncodedString`) and
Android (Kotlin's `Base64.Default`) both require, then percent-encoded, because Android
URL-decodes the query first and would turn a `+` of the base64 into a space.

Where the phones connect (`resolve_destinations`): the brokers' MQTT over TLS listeners listed in
endpoints.json, or the device gateway's `POST .../v1/owntracks` in HTTP mode, under the public
host name the phones use; phones cannot reach a loopback address. Each device gets one broker,
chosen by a hash of its username, so enrolling again keeps it where it was.
"""

from __future__ import annotations

import base64
import binascii
import html
import ipaddress
import json
import os
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import SplitResult, quote, unquote_plus, urlsplit, urlunsplit

import segno

from teamtrack.contract import is_slug
from teamtrack.provision import Credentials, DeviceCredential
from teamtrack.registry import device_username
from teamtrack.tls import SERVER_CERT, TLS_DIR, TlsError, certificate_hosts, normalize_hosts

ENROL_DIR: Final = "enrol"
SHEET_FILE: Final = "sheet.html"
ENDPOINTS_FILE: Final = "endpoints.json"
CONFIG_SUFFIX: Final = ".otrc"
QR_SUFFIX: Final = ".png"
PRIVATE_MODE: Final = 0o600
PRIVATE_DIR_MODE: Final = 0o700
CONFIG_URL_PREFIX: Final = "owntracks:///config?inline="
HTTPS_PORT: Final = 443

# OwnTracks' numbers (booklet: tech/json, `_type=configuration`).
OWNTRACKS_MODES: Final = {"mqtt": 0, "http": 3}
MONITORING_MODES: Final = {"significant": 1, "move": 2}
# owntracks/{username}/{device}: the topic the brokers accept from a device account.
PUB_TOPIC_BASE: Final = "owntracks/%u/%d"
MQTT_3_1_1: Final = 4
# Reporting, for a team watched live (docs/devices.md, "What each setting does").
KEEPALIVE_S: Final = 120
LOCATOR_INTERVAL_S: Final = 60
LOCATOR_DISPLACEMENT_M: Final = 100
MOVE_MODE_INTERVAL_S: Final = 15
IGNORE_INACCURATE_M: Final = 200
DOWNGRADE_BATTERY_PERCENT: Final = 20

# The QR code: error correction M survives a crease or a smudge on a printed sheet; 8 pixels a
# module print sharply and scan from a phone screen too.
QR_ERROR: Final = "m"
QR_SCALE: Final = 8
QR_BORDER: Final = 4

Mode = Literal["mqtt", "http"]


class EnrolmentError(ValueError):
    """Enrolment cannot proceed; the message says which option or file to fix."""


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a phone sends its positions: a broker's MQTT over TLS listener, or (HTTP mode)
    the device gateway's OwnTracks URL."""

    mode: Mode
    host: str
    port: int
    tls: bool
    url: str | None = None

    def describe(self) -> str:
        if self.url is not None:
            return self.url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class EnrolledDevice:
    team: str
    worker: str
    username: str
    destination: Destination
    otrc: Path
    png: Path


@dataclass(frozen=True, slots=True)
class TeamEnrolment:
    team: str
    devices: tuple[EnrolledDevice, ...]
    sheet: Path
    # Workers whose files were there but who are no longer provisioned (removed or revoked).
    removed: tuple[str, ...] = ()


# The configuration ------------------------------------------------------------------------------


def tracker_id(worker: str) -> str:
    """The two characters OwnTracks shows on a map pin: the worker id's last two letters or
    digits, upper-cased (the apps' own default takes the device id's last two)."""
    return "".join(character for character in worker if character.isalnum())[-2:].upper()


def owntracks_configuration(
    device: DeviceCredential, destination: Destination, *, monitoring: str = "move"
) -> dict[str, Any]:
    """The `_type: configuration` a phone imports: its login and where it reports, and the
    reporting settings documented in docs/devices.md (`monitoring`: move or significant)."""
    if monitoring not in MONITORING_MODES:
        raise EnrolmentError(f"--monitoring must be move or significant, not {monitoring!r}")
    config: dict[str, Any] = {
        "_type": "configuration",
        # First: the apps switch mode, then import the rest for that mode.
        "mode": OWNTRACKS_MODES[destination.mode],
        "auth": True,
        "username": device.username,
        "password": device.password,
        "deviceId": device.worker,
        "tid": tracker_id(device.worker),
        "monitoring": MONITORING_MODES[monitoring],
        "locatorInterval": LOCATOR_INTERVAL_S,
        "locatorDisplacement": LOCATOR_DISPLACEMENT_M,
        "moveModeLocatorInterval": MOVE_MODE_INTERVAL_S,
        "ignoreInaccurateLocations": IGNORE_INACCURATE_M,
        "downgrade": DOWNGRADE_BATTERY_PERCENT,
        "extendedData": True,
        "autostartOnBoot": True,
        # The phone takes no orders and no configuration over the wire.
        "cmd": False,
        "remoteConfiguration": False,
        "allowRemoteLocation": False,
        "ranging": False,
    }
    if destination.mode == "http":
        config["url"] = destination.url
        return config
    own_topic = PUB_TOPIC_BASE.replace("%u", device.username).replace("%d", device.worker)
    config.update(
        {
            "host": destination.host,
            "port": destination.port,
            "tls": destination.tls,
            "ws": False,
            "clientId": device.username,
            "pubTopicBase": PUB_TOPIC_BASE,
            "pubQos": 1,
            "pubRetain": False,
            "cleanSession": False,
            "keepalive": KEEPALIVE_S,
            "mqttProtocolLevel": MQTT_3_1_1,
            # No friends to read (iOS honours `sub`); Android subscribes to `subTopic` anyway,
            # so it is the device's own command topic rather than every account's.
            "sub": False,
            "subTopic": f"{own_topic}/cmd",
        }
    )
    return config


def config_url(configuration: dict[str, Any]) -> str:
    """`owntracks:///config?inline=...` for a configuration (see the module's docstring)."""
    payload = json.dumps(configuration, separators=(",", ":"), ensure_ascii=False)
    encoded = base64.b64encode(payload.encode("utf-8")).decode("ascii")
    return CONFIG_URL_PREFIX + quote(encoded, safe="")


def read_config_url(url: str) -> dict[str, Any]:
    """The configuration in an inline config URL, decoded the way the Android app does it
    (the stricter of the two): URL-decoding with `+` as a space, then strict base64."""
    parts = urlsplit(url)
    if (parts.scheme, parts.netloc, parts.path) != ("owntracks", "", "/config"):
        raise EnrolmentError(f"not an OwnTracks config URL: {url[:40]!r}...")
    values = [
        unquote_plus(value)
        for name, _, value in (item.partition("=") for item in parts.query.split("&"))
        if unquote_plus(name) == "inline"
    ]
    if len(values) != 1:
        raise EnrolmentError("an OwnTracks config URL carries exactly one inline= parameter")
    try:
        document = json.loads(base64.b64decode(values[0], validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError) as error:
        raise EnrolmentError(f"the inline configuration does not decode: {error}") from None
    if not isinstance(document, dict) or document.get("_type") != "configuration":
        raise EnrolmentError('the inline configuration is not a {"_type": "configuration"}')
    return document


def qr_png(text: str) -> bytes:
    """A QR code of `text`, as PNG bytes."""
    buffer = BytesIO()
    segno.make_qr(text, error=QR_ERROR).save(
        buffer, kind="png", scale=QR_SCALE, border=QR_BORDER
    )
    return buffer.getvalue()


# Where the phones connect -----------------------------------------------------------------------


def destination_for(destinations: Sequence[Destination], username: str) -> Destination:
    """The device's broker (or gateway): stable for a username while the list stays the same,
    and spread evenly over the list."""
    if not destinations:
        raise EnrolmentError("no broker or gateway to enrol devices at")
    return destinations[zlib.crc32(username.encode("utf-8")) % len(destinations)]


def _is_unreachable(host: str) -> bool:
    """A name or address a phone cannot reach this machine at."""
    if host in ("localhost", ""):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.endswith(".localhost")
    return address.is_loopback or address.is_unspecified


def _public_host(raw: str) -> str:
    """`raw` as the phones' host name (lower-cased, an address in canonical form)."""
    candidate = raw.strip().lower().strip("[]")
    if _is_unreachable(candidate):
        raise EnrolmentError(
            f"phones cannot reach {raw!r}: give --host the name or address the phones reach "
            "this machine at"
        )
    try:
        normalized = normalize_hosts([candidate])
    except TlsError as error:
        raise EnrolmentError(f"--host: {error}") from None
    return normalized[-1]


def _load_endpoints(state_dir: Path) -> dict[str, Any]:
    """endpoints.json of `teamtrack up`, or {} when there is none."""
    path = state_dir / ENDPOINTS_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise EnrolmentError(f"{path}: unreadable ({error})") from None
    if not isinstance(document, dict):
        raise EnrolmentError(f"{path}: not a JSON object")
    return document


def _listed_urls(endpoints: dict[str, Any], section: str, key: str) -> list[SplitResult]:
    """The `key` URLs of endpoints.json's `section` list, split (ports checked)."""
    entries = endpoints.get(section)
    if not isinstance(entries, list):
        return []
    listed = []
    for entry in entries:
        url = entry.get(key) if isinstance(entry, dict) else None
        if isinstance(url, str):
            try:
                parts = urlsplit(url)
                _ = parts.port  # raises on a bad port
            except ValueError as error:
                raise EnrolmentError(f"{ENDPOINTS_FILE}: bad URL {url!r} ({error})") from None
            listed.append(parts)
    return listed


def _netloc(host: str, port: int | None) -> str:
    bracketed = f"[{host}]" if ":" in host else host
    return bracketed if port is None else f"{bracketed}:{port}"


def _check_certificate(out_dir: Path, host: str) -> None:
    """The host must be one the servers' certificate names, or every phone fails its TLS check;
    without a certificate in OUT/tls (servers with one of their own) there is nothing to check."""
    path = out_dir / TLS_DIR / SERVER_CERT
    if not path.exists():
        return
    from cryptography import x509

    try:
        names = certificate_hosts(x509.load_pem_x509_certificate(path.read_bytes()))
    except (OSError, ValueError) as error:
        raise EnrolmentError(f"{path}: unreadable certificate ({error})") from None
    if host not in names:
        raise EnrolmentError(
            f"the servers' certificate ({path}) does not name {host!r} (it names "
            f"{', '.join(names)}): phones would refuse it. Provision with --tls-hosts {host} "
            "(and restart the brokers), or pass --no-certificate-check when the servers "
            "phones reach have a certificate of their own"
        )


def resolve_destinations(
    out_dir: Path | str,
    *,
    mode: str = "mqtt",
    host: str | None = None,
    port: int | None = None,
    tls: bool = True,
    http_url: str | None = None,
    state_dir: Path | str | None = None,
    check_certificate: bool = True,
) -> tuple[Destination, ...]:
    """Where phones connect: `host` (or the endpoints' own host when it is not loopback), with
    each broker's mqtts port from `state_dir`/endpoints.json, or `port`; in HTTP mode the
    gateways' OwnTracks URLs there under `host`, or `http_url` as it is."""
    out = Path(out_dir)
    endpoints = _load_endpoints(Path(state_dir) if state_dir is not None else out)
    public = _public_host(host) if host is not None else None
    if mode == "http":
        destinations = _http_destinations(endpoints, public, port, http_url)
        if http_url is not None:
            return destinations
    elif mode == "mqtt":
        destinations = _mqtt_destinations(endpoints, public, port, tls)
    else:
        raise EnrolmentError(f"--mode must be mqtt or http, not {mode!r}")
    if check_certificate and destinations[0].tls:
        for name in {destination.host for destination in destinations}:
            _check_certificate(out, name)
    return destinations


def _mqtt_destinations(
    endpoints: dict[str, Any], host: str | None, port: int | None, tls: bool
) -> tuple[Destination, ...]:
    listed = _listed_urls(endpoints, "brokers", "mqtts")
    if port is not None:
        ports = [port]
    elif not tls:
        raise EnrolmentError(
            "--no-tls needs --port: the brokers' plain MQTT listeners are on loopback only"
        )
    elif listed:
        ports = [parts.port or 8883 for parts in listed]
    else:
        raise EnrolmentError(
            "no brokers' MQTT over TLS listeners listed (no endpoints.json from `teamtrack up` "
            "there, or TLS off): pass --port, the port phones reach the brokers at"
        )
    if host is None:
        listed_hosts = {parts.hostname or "" for parts in listed}
        if not listed_hosts or any(_is_unreachable(name) for name in listed_hosts):
            raise EnrolmentError(
                "the brokers listen on loopback only (or none is listed): pass --host, the name "
                "or address phones reach them at (and start them with --mqtts-host 0.0.0.0)"
            )
        hosts = [_public_host(parts.hostname or "") for parts in listed]
    else:
        hosts = [host] * len(ports)
    if len(hosts) != len(ports):
        hosts = hosts[:1] * len(ports)
    return tuple(
        Destination(mode="mqtt", host=name, port=number, tls=tls)
        for name, number in zip(hosts, ports, strict=True)
    )


def _http_destinations(
    endpoints: dict[str, Any], host: str | None, port: int | None, http_url: str | None
) -> tuple[Destination, ...]:
    if http_url is not None:
        if host is not None or port is not None:
            raise EnrolmentError("--http-url is the whole address: leave out --host and --port")
        return (_http_destination(http_url, explicit=True),)
    listed = _listed_urls(endpoints, "device_http", "owntracks")
    if not listed:
        raise EnrolmentError(
            "no device gateway listed (device_http in endpoints.json): pass --http-url, the "
            "https:// URL of its OwnTracks endpoint (.../v1/owntracks) as phones reach it"
        )
    destinations = []
    for parts in listed:
        if host is None and _is_unreachable(parts.hostname or ""):
            raise EnrolmentError(
                f"the device gateway is listed at {parts.geturl()} (loopback): pass --host, the "
                "name or address phones reach it at, or --http-url"
            )
        name = host if host is not None else parts.hostname or ""
        netloc = _netloc(name, port if port is not None else parts.port)
        destinations.append(_http_destination(urlunsplit(parts._replace(netloc=netloc))))
    return tuple(destinations)


def _http_destination(url: str, *, explicit: bool = False) -> Destination:
    try:
        parts = urlsplit(url)
        url_port = parts.port
    except ValueError as error:
        raise EnrolmentError(f"bad URL {url!r}: {error}") from None
    what = "--http-url" if explicit else "the device gateway's URL"
    if parts.scheme != "https":
        raise EnrolmentError(
            f"{what} must be https://: phones reach it over the network, and every link that "
            "leaves the host is encrypted (put a TLS proxy in front of a plain HTTP gateway)"
        )
    if parts.username is not None or parts.password is not None:
        raise EnrolmentError(f"{what} must not carry a login: each phone has its own")
    host = _public_host(parts.hostname or "")
    return Destination(
        mode="http", host=host, port=url_port or HTTPS_PORT, tls=True, url=url
    )


# The files ---------------------------------------------------------------------------------------


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR_MODE)
    return path


def _write_private(target: Path, content: bytes) -> None:
    """Written under a temporary name (0600 from the start) and renamed into place."""
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            os.fchmod(stream.fileno(), PRIVATE_MODE)
            stream.write(content)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def team_folder(out_dir: Path | str, team: str) -> Path:
    if not is_slug(team):
        raise EnrolmentError(f"{team!r} is not a team id")
    return Path(out_dir) / ENROL_DIR / team


def enrol_device(
    out_dir: Path | str,
    device: DeviceCredential,
    destination: Destination,
    *,
    monitoring: str = "move",
) -> EnrolledDevice:
    """Write the device's .otrc and QR code into OUT/enrol/<team>/."""
    if not is_slug(device.worker):
        raise EnrolmentError(f"{device.worker!r} is not a worker id")
    config = owntracks_configuration(device, destination, monitoring=monitoring)
    folder = _private_dir(team_folder(out_dir, device.team))
    _private_dir(folder.parent)
    otrc = folder / f"{device.worker}{CONFIG_SUFFIX}"
    png = folder / f"{device.worker}{QR_SUFFIX}"
    _write_private(otrc, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())
    _write_private(png, qr_png(config_url(config)))
    return EnrolledDevice(
        team=device.team, worker=device.worker, username=device.username,
        destination=destination, otrc=otrc, png=png,
    )


def find_device(credentials: Credentials, team: str, worker: str) -> DeviceCredential:
    """The provisioned device, or an EnrolmentError that says why there is none."""
    for what, value in (("team", team), ("worker", worker)):
        if not is_slug(value):
            raise EnrolmentError(f"{value!r} is not a {what} id")
    try:
        return credentials.device(team, worker)
    except KeyError:
        pass
    _team_devices(credentials, team)  # the team itself is known
    if device_username(team, worker) in credentials.revoked:
        raise EnrolmentError(
            f"{team}/{worker} is revoked: `teamtrack provision reinstate "
            f"{device_username(team, worker)}` first"
        )
    raise EnrolmentError(f"no worker {worker!r} in team {team!r} (not provisioned)")


def _team_devices(credentials: Credentials, team: str) -> list[DeviceCredential]:
    devices = [device for device in credentials.devices if device.team == team]
    if not devices and not any(
        username.startswith(device_username(team, "")) for username in credentials.revoked
    ):
        teams = sorted({device.team for device in credentials.devices})
        raise EnrolmentError(
            f"no team {team!r} provisioned (teams: {', '.join(teams) or 'none'})"
        )
    return devices


def enrol_team(
    out_dir: Path | str,
    credentials: Credentials,
    team: str,
    destinations: Sequence[Destination],
    *,
    monitoring: str = "move",
) -> TeamEnrolment:
    """Every provisioned worker of the team, and the printable sheet; the files of workers no
    longer provisioned (their passwords no longer work) are removed."""
    folder = team_folder(out_dir, team)
    devices = _team_devices(credentials, team)
    enrolled = tuple(
        enrol_device(out_dir, device, destination_for(destinations, device.username),
                     monitoring=monitoring)
        for device in devices
    )
    _private_dir(folder)
    current = {device.worker for device in enrolled}
    removed = set()
    for path in folder.iterdir():
        if path.suffix in (CONFIG_SUFFIX, QR_SUFFIX) and path.stem not in current:
            path.unlink()
            removed.add(path.stem)
    sheet = folder / SHEET_FILE
    _write_private(sheet, team_sheet_html(team, enrolled).encode("utf-8"))
    return TeamEnrolment(team=team, devices=enrolled, sheet=sheet, removed=tuple(sorted(removed)))


_SHEET_STYLE: Final = """
body { font-family: sans-serif; margin: 1.5em; color: #111; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
.note { max-width: 52em; font-size: 0.9em; }
.warning { border: 2px solid #b00; padding: 0.5em 0.8em; max-width: 52em; }
.cards { display: flex; flex-wrap: wrap; gap: 1em; margin-top: 1em; }
.card { border: 1px solid #999; padding: 0.6em; width: 18em; text-align: center;
        break-inside: avoid; page-break-inside: avoid; }
.card img { width: 17em; height: 17em; image-rendering: pixelated; }
.worker { font-size: 1.3em; font-weight: bold; }
.detail { font-size: 0.8em; color: #444; overflow-wrap: anywhere; }
@media print { .cards { gap: 0.5em; } }
"""


def team_sheet_html(team: str, devices: Sequence[EnrolledDevice]) -> str:
    """One self-contained page: a QR code per worker (inline PNG), the worker's id and account,
    where the phone reports; the passwords are in the QR codes only."""
    escape = html.escape
    cards = []
    for device in devices:
        image = base64.b64encode(device.png.read_bytes()).decode("ascii")
        cards.append(
            '<div class="card">'
            f'<div class="worker">{escape(device.worker)}</div>'
            f'<img alt="OwnTracks configuration of {escape(device.worker)}" '
            f'src="data:image/png;base64,{image}">'
            f'<div class="detail">account {escape(device.username)}<br>'
            f"{escape(device.destination.mode.upper())} {escape(device.destination.describe())}"
            "</div></div>"
        )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>OwnTracks enrolment: team {escape(team)}</title>"
        f"<style>{_SHEET_STYLE}</style></head><body>\n"
        f"<h1>OwnTracks enrolment: team {escape(team)}</h1>\n"
        '<p class="warning"><strong>Each code holds that worker\'s password.</strong> Show or '
        "hand each worker their own code only; keep this sheet like a key and shred it once "
        "the phones are enrolled.</p>\n"
        '<p class="note">On the phone: install OwnTracks; install and trust the teamtrack '
        "certificate authority (ca.crt) your manager sends; in OwnTracks allow external "
        "configuration (Android: Preferences, Remote Control; iOS: Settings); scan your code "
        "with the camera and "
        "open it in OwnTracks; review and apply. Allow location access "
        '"always".</p>\n'
        f'<div class="cards">\n{chr(10).join(cards)}\n</div>\n'
        "</body></html>\n"
    )
