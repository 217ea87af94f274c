"""The message contract between devices and teamtrack, as code.

Topics:
    teams/{team}/workers/{worker}/position   JSON object, see `decode_position`
    teams/{team}/workers/{worker}/status     retained "online" / "offline"
    teams/{team}/workers/{worker}/event      JSON object, see `check_worker_event`: what
                                             happened to a worker (an OwnTracks phone's region
                                             transition); written by the bridges only

Everything that crosses a service boundary is decoded and validated here, once, so that a
malformed payload is rejected with a reason that can be counted, and never reaches a manager
or the database.
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import orjson

SLUG_PATTERN: Final = r"[a-z0-9][a-z0-9_-]{0,63}"
_SLUG = re.compile(SLUG_PATTERN)
MAX_PAYLOAD_BYTES: Final = 1024
MAX_FUTURE_MS: Final = 5 * 60 * 1000
MAX_AGE_MS: Final = 7 * 24 * 3600 * 1000
# The history stores `ts` and `seq` as signed 64-bit integers: the live path refuses what the
# history would refuse, so that what a manager saw live is what the replay shows.
MAX_INTEGER: Final = 2**63 - 1
TOPIC_ROOT: Final = "teams"
WORKER_TOPIC_FILTER: Final = "teams/+/workers/+/+"


class Kind(StrEnum):
    POSITION = "position"
    STATUS = "status"
    EVENT = "event"


class Presence(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    # Outside the worker's shift, or paused by its device (docs/privacy.md, "Off duty"): set by
    # the bridges and gateways, never a word a device sends (it sends `paused`).
    OFF_DUTY = "off_duty"


# What a device publishes on its status topic to pause: it becomes presence `off_duty`.
PAUSED_WORD: Final = "paused"
DEVICE_STATUS_WORDS: Final = frozenset({Presence.ONLINE.value, Presence.OFFLINE.value, PAUSED_WORD})


class Reason(StrEnum):
    """Why a message was rejected; each value is a label of the `rejected` counter."""

    BAD_TOPIC = "bad_topic"
    TOO_LARGE = "too_large"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    BAD_TYPE = "bad_type"
    NOT_FINITE = "not_finite"
    OUT_OF_RANGE = "out_of_range"
    TS_IN_FUTURE = "ts_in_future"
    TS_TOO_OLD = "ts_too_old"
    BAD_STATUS = "bad_status"
    DUPLICATE_KEY = "duplicate_key"
    RATE_LIMITED = "rate_limited"


class ContractError(ValueError):
    """A message that breaks the contract; `reason` is the counter label, `detail` the log text."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def is_slug(value: str) -> bool:
    return _SLUG.fullmatch(value) is not None


def require_slug(value: str, what: str = "id") -> str:
    if not is_slug(value):
        raise ValueError(f"{what} {value!r} is not a slug ({SLUG_PATTERN})")
    return value


@dataclass(frozen=True, slots=True)
class TopicAddress:
    team: str
    worker: str
    kind: Kind


def position_topic(team: str, worker: str) -> str:
    return f"{TOPIC_ROOT}/{team}/workers/{worker}/{Kind.POSITION.value}"


def status_topic(team: str, worker: str) -> str:
    return f"{TOPIC_ROOT}/{team}/workers/{worker}/{Kind.STATUS.value}"


def event_topic(team: str, worker: str) -> str:
    return f"{TOPIC_ROOT}/{team}/workers/{worker}/{Kind.EVENT.value}"


def team_topic_filter(team: str) -> str:
    return f"{TOPIC_ROOT}/{team}/#"


def parse_topic(topic: str) -> TopicAddress:
    """The team, worker and kind of a device topic; `ContractError` (bad_topic) otherwise.

    Valid topics are remembered (a worker's topics recur with every message); invalid ones are
    not, so junk never fills the cache.
    """
    return _parse_topic_cached(topic)


def _parse_topic(topic: str) -> TopicAddress:
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != TOPIC_ROOT or parts[2] != "workers":
        raise ContractError(Reason.BAD_TOPIC, f"unexpected topic {topic[:200]!r}")
    _, team, _, worker, kind = parts
    if not (is_slug(team) and is_slug(worker)):
        raise ContractError(Reason.BAD_TOPIC, f"team or worker is not a slug in {topic[:200]!r}")
    try:
        return TopicAddress(team, worker, Kind(kind))
    except ValueError:
        raise ContractError(Reason.BAD_TOPIC, f"unknown message kind {kind[:40]!r}") from None


# Two topics per worker: room for 32,768 workers per process before entries are evicted.
_parse_topic_cached = functools.lru_cache(maxsize=65_536)(_parse_topic)


@dataclass(frozen=True, slots=True)
class Position:
    """One validated position fix of one worker."""

    team: str
    worker: str
    lat: float
    lon: float
    ts: int
    seq: int
    acc: float | None = None
    speed: float | None = None
    heading: float | None = None
    battery: float | None = None

    def payload(self) -> dict[str, Any]:
        """The device payload (what travels on the MQTT topic), without absent optionals."""
        body: dict[str, Any] = {"lat": self.lat, "lon": self.lon, "ts": self.ts, "seq": self.seq}
        for name in _OPTIONAL_NAMES:
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return body


@dataclass(frozen=True, slots=True)
class Status:
    """A presence change of one worker (retained on the broker, Last Will for `offline`)."""

    team: str
    worker: str
    presence: Presence


# (name, low, high) for each numeric field; None bounds are open. Public: the history's decoder
# checks stored events against the same ranges.
REQUIRED_NUMBERS: Final = (("lat", -90.0, 90.0), ("lon", -180.0, 180.0))
OPTIONAL_RANGES: Final[dict[str, tuple[float, float | None]]] = {
    "acc": (0.0, None),
    "speed": (0.0, None),
    "heading": (0.0, 360.0),
    "battery": (0.0, 100.0),
}
_OPTIONAL_NAMES: Final = tuple(OPTIONAL_RANGES)
_OPTIONAL_CHECKS: Final = tuple((name, low, high) for name, (low, high) in OPTIONAL_RANGES.items())
_REQUIRED_NAMES: Final = ("lat", "lon", "ts", "seq")
_REQUIRED_FIELDS: Final = frozenset(_REQUIRED_NAMES)
_KNOWN_FIELDS: Final = frozenset({*_REQUIRED_NAMES, *_OPTIONAL_NAMES})


def _number(value: Any, name: str, low: float, high: float | None) -> float:
    # orjson returns exact types: a bool is never taken for a number.
    kind = type(value)
    if kind is float:
        number: float = value
    elif kind is int:
        number = float(value)
    else:
        raise ContractError(Reason.BAD_TYPE, f"{name} must be a number")
    if not math.isfinite(number):
        raise ContractError(Reason.NOT_FINITE, f"{name} must be finite")
    if number < low or (high is not None and number > high):
        raise ContractError(Reason.OUT_OF_RANGE, f"{name}={number} outside [{low}, {high}]")
    return number


def _integer(value: Any, name: str) -> int:
    if type(value) is not int:
        raise ContractError(Reason.BAD_TYPE, f"{name} must be an integer")
    return value


def _check_fields(body: dict[str, Any]) -> int:
    """Every rule on the fields of a decoded position object except the clock's; its `ts`."""
    names = body.keys()
    if not names >= _REQUIRED_FIELDS:
        missing = [name for name in _REQUIRED_NAMES if name not in body]
        raise ContractError(Reason.MISSING_FIELD, f"missing {', '.join(missing)}")
    if not names <= _KNOWN_FIELDS:
        unknown = names - _KNOWN_FIELDS
        raise ContractError(Reason.UNKNOWN_FIELD, f"unknown {', '.join(sorted(unknown))[:100]}")
    for name, low, high in REQUIRED_NUMBERS:
        _number(body[name], name, low, high)
    ts = _integer(body["ts"], "ts")
    if not 0 <= ts <= MAX_INTEGER:
        raise ContractError(Reason.OUT_OF_RANGE, f"ts must be in [0, {MAX_INTEGER}]")
    if not 0 <= _integer(body["seq"], "seq") <= MAX_INTEGER:
        raise ContractError(Reason.OUT_OF_RANGE, f"seq must be in [0, {MAX_INTEGER}]")
    for name, least, most in _OPTIONAL_CHECKS:
        value = body.get(name)
        if value is not None:
            _number(value, name, least, most)
    return ts


def check_position_object(body: object) -> int:
    """The rules of a position payload on an already decoded object (no clock rule); its `ts`.

    For readers of the backend (the dashboard) that re-check what a bridge forwarded: an
    attacker who can write to the backend bypasses the bridge.
    """
    if type(body) is not dict:
        raise ContractError(Reason.NOT_OBJECT, "payload is not a JSON object")
    return _check_fields(body)


def _checked_position(payload: bytes, now_ms: int | None) -> dict[str, Any]:
    """The payload's JSON object once every rule holds; `ContractError` with the first broken."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError(Reason.TOO_LARGE, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ContractError(Reason.NOT_JSON, "payload is not JSON") from None
    if type(body) is not dict:
        raise ContractError(Reason.NOT_OBJECT, "payload is not a JSON object")
    ts = _check_fields(body)
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    if ts > now + MAX_FUTURE_MS:
        raise ContractError(Reason.TS_IN_FUTURE, f"ts is {(ts - now) // 1000} s in the future")
    if ts < now - MAX_AGE_MS:
        raise ContractError(Reason.TS_TOO_OLD, f"ts is {(now - ts) // 86_400_000} days old")
    # Duplicate keys: orjson keeps the last, other readers of the raw payload (which is
    # forwarded byte for byte) may take the first. Once the rules above hold, every key is a
    # known name (no quote in it) and every value a number or null, so the payload holds
    # exactly two quotes per distinct key unless a key is repeated: one C-speed count.
    if payload.count(b'"') != 2 * len(body):
        raise ContractError(Reason.DUPLICATE_KEY, "a field is given more than once")
    return body


def validate_position(payload: bytes, now_ms: int | None = None) -> int:
    """Check a position payload against every rule of `decode_position`; its `ts`.

    For whoever forwards the payload as it is (the bridge): no `Position` is built.
    """
    ts: int = _checked_position(payload, now_ms)["ts"]
    return ts


def validate_position_key(payload: bytes, now_ms: int | None = None) -> tuple[int, int]:
    """`validate_position`, and the position's (`ts`, `seq`): for the device gateway, whose
    acknowledgements name the highest `seq` held."""
    body = _checked_position(payload, now_ms)
    return body["ts"], body["seq"]


def decode_position(
    team: str, worker: str, payload: bytes, now_ms: int | None = None
) -> Position:
    """Validate a device's position payload; raise `ContractError` with the first broken rule."""
    body = _checked_position(payload, now_ms)
    optional = {name: body.get(name) for name in _OPTIONAL_NAMES}
    return Position(
        team,
        worker,
        float(body["lat"]),
        float(body["lon"]),
        body["ts"],
        body["seq"],
        **{name: float(value) if value is not None else None for name, value in optional.items()},
    )


def decode_status(team: str, worker: str, payload: bytes) -> Status:
    """A device's status word: `online`, `offline`, or `paused` (presence `off_duty`)."""
    try:
        word = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        word = ""
    if word not in DEVICE_STATUS_WORDS:
        raise ContractError(
            Reason.BAD_STATUS, "status must be 'online', 'offline' or 'paused'"
        ) from None
    return Status(team, worker, Presence.OFF_DUTY if word == PAUSED_WORD else Presence(word))


def decode_message(topic: str, payload: bytes, now_ms: int | None = None) -> Position | Status:
    """Decode one MQTT message from a device topic."""
    address = parse_topic(topic)
    if address.kind is Kind.POSITION:
        return decode_position(address.team, address.worker, payload, now_ms)
    return decode_status(address.team, address.worker, payload)


def encode_position(position: Position) -> bytes:
    return orjson.dumps(position.payload())


# A worker event (Kind.EVENT): what the platform keeps of something that happened to a worker.
# Today one type: an OwnTracks region transition (teamtrack.ingress.owntracks.transition_body).
EVENT_TYPES: Final = frozenset({"transition"})
TRANSITION_EVENTS: Final = frozenset({"enter", "leave"})
MAX_EVENT_BYTES: Final = 1024
_EVENT_STRINGS: Final = {"desc": 200, "rid": 64, "trigger": 8}
_EVENT_NUMBERS: Final = {"lat": (-90.0, 90.0), "lon": (-180.0, 180.0), "acc": (0.0, None)}
_EVENT_FIELDS: Final = frozenset({"type", "event", "ts", *_EVENT_STRINGS, *_EVENT_NUMBERS})


def check_worker_event(body: object) -> int:
    """The rules of a worker event on a decoded object; its `ts`. For the readers of the
    backend (dashboards, the ingest), which re-check what a bridge wrote."""
    if type(body) is not dict:
        raise ContractError(Reason.NOT_OBJECT, "event is not a JSON object")
    if not body.keys() <= _EVENT_FIELDS:
        unknown = ", ".join(sorted(body.keys() - _EVENT_FIELDS))[:100]
        raise ContractError(Reason.UNKNOWN_FIELD, f"unknown {unknown}")
    if body.get("type") not in EVENT_TYPES or body.get("event") not in TRANSITION_EVENTS:
        raise ContractError(Reason.BAD_STATUS, "not a known event type")
    ts = _integer(body.get("ts"), "ts")
    if not 0 <= ts <= MAX_INTEGER:
        raise ContractError(Reason.OUT_OF_RANGE, f"ts must be in [0, {MAX_INTEGER}]")
    for name, (low, high) in _EVENT_NUMBERS.items():
        if body.get(name) is not None:
            _number(body[name], name, low, high)
    for name, limit in _EVENT_STRINGS.items():
        value = body.get(name)
        if value is not None and (type(value) is not str or len(value) > limit):
            raise ContractError(Reason.BAD_TYPE, f"{name} must be a string of <= {limit}")
    return ts


def decode_worker_event(payload: bytes) -> int:
    """Check an encoded worker event (`check_worker_event`); its `ts`."""
    if len(payload) > MAX_EVENT_BYTES:
        raise ContractError(Reason.TOO_LARGE, f"{len(payload)} bytes > {MAX_EVENT_BYTES}")
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ContractError(Reason.NOT_JSON, "event is not JSON") from None
    return check_worker_event(body)


# Notices: worker events (Kind.EVENT) that the rules service writes into a team's log so that
# every dashboard instance turns them into `alert`, `alert_ack` and `zones` frames
# (teamtrack.alerts). Never written by a bridge (they refuse device event topics and make
# only `transition` events); the history does not store them as worker events.
NOTICE_TYPES: Final = frozenset({"alert", "alert_ack", "zones"})
NOTICE_ORIGIN: Final = "rules"
MAX_NOTICE_BYTES: Final = 4096
_NOTICE_FIELDS: Final = {
    "alert": frozenset({"type", "ts", "alert"}),
    "alert_ack": frozenset({"type", "ts", "id", "by"}),
    "zones": frozenset({"type", "ts"}),
}


def is_notice(body: object) -> bool:
    return type(body) is dict and body.get("type") in NOTICE_TYPES


def check_notice(body: object) -> int:
    """The shape of a notice (`is_notice`) on a decoded object; its `ts`."""
    if type(body) is not dict or body.get("type") not in NOTICE_TYPES:
        raise ContractError(Reason.BAD_TYPE, "not a notice")
    if body.keys() != _NOTICE_FIELDS[body["type"]]:
        raise ContractError(Reason.UNKNOWN_FIELD, "notice fields")
    ts = _integer(body["ts"], "ts")
    if not 0 <= ts <= MAX_INTEGER:
        raise ContractError(Reason.OUT_OF_RANGE, f"ts must be in [0, {MAX_INTEGER}]")
    if body["type"] == "alert" and type(body["alert"]) is not dict:
        raise ContractError(Reason.BAD_TYPE, "alert must be an object")
    if body["type"] == "alert_ack" and not (
        type(body["id"]) is str and len(body["id"]) <= 64 and type(body["by"]) is str
        and is_slug(body["by"])
    ):
        raise ContractError(Reason.BAD_TYPE, "alert_ack needs an id and a manager")
    return ts
