"""OwnTracks, the phone app, as a way in: its topics and JSON turned into the contract's events.

The app publishes (MQTT mode) to `owntracks/{user}/{device}`: `_type: "location"` and, as its
Last Will, `_type: "lwt"`; to `owntracks/{user}/{device}/event`: `_type: "transition"` (the
phone's own region events); other leaves and types (cards, waypoints, status, steps...) exist
too. In HTTP mode it POSTs the same JSON objects. docs/contract.md, "OwnTracks", is the
rulebook; this module is the code.

Who a message is from is never read from the payload: over MQTT it is the topic's `{user}`,
which the broker's ACL lets only that account write (`owntracks/{user}/#`), over HTTP the
authenticated account; a device account is `{team}.{worker}` (`teamtrack.registry`).

A location becomes a native position payload: `ts` = `tst` in milliseconds, and `seq` = `tst`,
since OwnTracks numbers nothing. The app resends what the server did not acknowledge, and a
resend carries the same `tst`: so it has the same (ts, seq) as the first copy, and the history
and the live stream drop it like a redelivered native message. Two fixes of one worker in one
second are taken for a resend (the second is dropped). Optional fields the app reports out of
their range (iOS reports `vel: -1` and `cog: -1` while it does not know) are left out, not
refused: the position itself is good.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import orjson

from teamtrack.backends.base import Event
from teamtrack.contract import (
    MAX_AGE_MS,
    MAX_FUTURE_MS,
    ContractError,
    Kind,
    Reason,
)
from teamtrack.registry import parse_device_username

OWNTRACKS_ROOT: Final = "owntracks"
# What a bridge subscribes to: everything the app publishes, so that the types teamtrack does
# not use are counted too (the ACL lets only devices write there, each under its own name).
OWNTRACKS_FILTERS: Final = (f"{OWNTRACKS_ROOT}/#",)
# Locations are a few hundred bytes; `inregions` lists or a waypoint export can take more.
MAX_OWNTRACKS_BYTES: Final = 16 * 1024
# The app's device id (the topic's third level, the HTTP `X-Limit-D` header): informational.
_MAX_DEVICE_ID: Final = 64
# `_type`s the app sends besides the ones used here: counted under their name; others as "other".
KNOWN_IGNORED_TYPES: Final = frozenset({
    "beacon", "card", "cmd", "configuration", "encrypted", "request", "status", "steps",
    "waypoint", "waypoints",
})
# A transition's `desc` (the region's name as typed on the phone) is kept up to this length.
MAX_DESCRIPTION: Final = 200
KMH_PER_MS: Final = 3.6


class OwnTracksKind(StrEnum):
    LOCATION = "location"
    LWT = "lwt"
    TRANSITION = "transition"
    IGNORED = "ignored"


@dataclass(frozen=True, slots=True)
class OwnTracksAddress:
    """Whose message it is (from the account, never from the payload) and the topic's leaf."""

    team: str
    worker: str
    device: str
    leaf: str  # "" for owntracks/{user}/{device}, else the fourth level ("event", ...)


@dataclass(frozen=True, slots=True)
class OwnTracksMessage:
    """One decoded OwnTracks object.

    LOCATION: `position` is the native position payload (contract JSON), `ts` its fix time.
    TRANSITION: `transition` is the event kept for the worker (`transition_body`), `ts` its time.
    LWT: the device is gone (presence offline). IGNORED: `type_name` says what it was.
    """

    kind: OwnTracksKind
    type_name: str
    ts: int = 0
    position: bytes = b""
    transition: bytes = b""
    # The app's monitoring mode (`m`: -1 quiet, 0 manual, 1 significant, 2 move) when a
    # location or status object states it (teamtrack.ingress.duty: quiet and manual pause).
    monitoring: int | None = None


def account_address(username: str, device: str = "") -> tuple[str, str]:
    """(team, worker) of a device account; `ContractError` (bad_topic) for any other account."""
    address = parse_device_username(username)
    if address is None:
        raise ContractError(Reason.BAD_TOPIC, f"{username[:100]!r} is not a device account")
    if len(device) > _MAX_DEVICE_ID:
        raise ContractError(Reason.BAD_TOPIC, "the device id is longer than 64 characters")
    return address


def parse_owntracks_topic(topic: str) -> OwnTracksAddress:
    """`owntracks/{user}/{device}[/{leaf}]` of a device account; `ContractError` otherwise."""
    parts = topic.split("/")
    if not 3 <= len(parts) <= 4 or parts[0] != OWNTRACKS_ROOT or not parts[2]:
        raise ContractError(Reason.BAD_TOPIC, f"unexpected topic {topic[:200]!r}")
    team, worker = account_address(parts[1], parts[2])
    return OwnTracksAddress(team, worker, parts[2], parts[3] if len(parts) == 4 else "")


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    body = dict(pairs)
    if len(body) != len(pairs):
        raise ContractError(Reason.DUPLICATE_KEY, "a field is given more than once")
    return body


def _refuse_constant(name: str) -> Any:
    raise ContractError(Reason.NOT_JSON, f"{name} is not JSON")


def load_object(payload: bytes) -> dict[str, Any]:
    """The payload's JSON object; duplicate keys, NaN/Infinity and nesting too deep refused.

    The standard library's parser, not orjson: it can tell duplicate keys, and OwnTracks
    objects hold strings and lists, where counting quotes (the native decoder's check) cannot.
    Phones report a few times a minute, so its cost does not matter.
    """
    if len(payload) > MAX_OWNTRACKS_BYTES:
        raise ContractError(Reason.TOO_LARGE, f"{len(payload)} bytes > {MAX_OWNTRACKS_BYTES}")
    try:
        body = json.loads(
            payload, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant
        )
    except (ValueError, RecursionError) as error:
        if isinstance(error, ContractError):
            raise
        raise ContractError(Reason.NOT_JSON, "payload is not JSON") from None
    if type(body) is not dict:
        raise ContractError(Reason.NOT_OBJECT, "payload is not a JSON object")
    return body


def _required_number(body: dict[str, Any], name: str, low: float, high: float) -> float:
    if name not in body:
        raise ContractError(Reason.MISSING_FIELD, f"missing {name}")
    value = body[name]
    if type(value) not in (int, float):
        raise ContractError(Reason.BAD_TYPE, f"{name} must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise ContractError(Reason.NOT_FINITE, f"{name} must be finite")
    if not low <= number <= high:
        raise ContractError(Reason.OUT_OF_RANGE, f"{name}={number} outside [{low}, {high}]")
    return number


def _optional_number(
    body: dict[str, Any], name: str, low: float, high: float | None
) -> float | None:
    """The field when it is a number in range; None when absent or not (left out, not refused)."""
    value = body.get(name)
    if value is None or type(value) not in (int, float):
        return None
    number = float(value)
    if not math.isfinite(number) or number < low or (high is not None and number > high):
        return None
    return number


def _fix_time_ms(body: dict[str, Any], now_ms: int) -> int:
    """`tst` (epoch seconds, required) in milliseconds, with the contract's clock rules."""
    if "tst" not in body:
        raise ContractError(Reason.MISSING_FIELD, "missing tst")
    tst = body["tst"]
    if type(tst) is not int:
        raise ContractError(Reason.BAD_TYPE, "tst must be an integer (epoch seconds)")
    if tst < 0:
        raise ContractError(Reason.OUT_OF_RANGE, "tst must not be negative")
    ts = tst * 1000
    if ts > now_ms + MAX_FUTURE_MS:
        raise ContractError(Reason.TS_IN_FUTURE, f"tst is {(ts - now_ms) // 1000} s in the future")
    if ts < now_ms - MAX_AGE_MS:
        raise ContractError(Reason.TS_TOO_OLD, f"tst is {(now_ms - ts) // 86_400_000} days old")
    return ts


def location_position(body: dict[str, Any], now_ms: int) -> tuple[bytes, int]:
    """The native position payload of a location object, and its `ts`."""
    lat = _required_number(body, "lat", -90.0, 90.0)
    lon = _required_number(body, "lon", -180.0, 180.0)
    ts = _fix_time_ms(body, now_ms)
    position: dict[str, Any] = {"lat": lat, "lon": lon, "ts": ts, "seq": ts // 1000}
    acc = _optional_number(body, "acc", 0.0, None)
    if acc is not None:
        position["acc"] = acc
    vel = _optional_number(body, "vel", 0.0, None)
    if vel is not None:
        position["speed"] = round(vel / KMH_PER_MS, 3)
    cog = _optional_number(body, "cog", 0.0, 360.0)
    if cog is not None:
        position["heading"] = cog
    batt = _optional_number(body, "batt", 0.0, 100.0)
    if batt is not None:
        position["battery"] = batt
    return orjson.dumps(position), ts


def transition_body(body: dict[str, Any], now_ms: int) -> tuple[bytes, int]:
    """What is kept of a transition (JSON): `type`, `event` (enter/leave), `ts` (ms), and
    where known `lat`, `lon`, `acc`, `desc` (the region's name, at most 200 characters),
    `rid` (the region's id), `trigger` (the app's `t`)."""
    event = body.get("event")
    if event not in ("enter", "leave"):
        raise ContractError(Reason.BAD_STATUS, "a transition's event must be 'enter' or 'leave'")
    ts = _fix_time_ms(body, now_ms)
    kept: dict[str, Any] = {"type": "transition", "event": event, "ts": ts}
    for name, low, high in (("lat", -90.0, 90.0), ("lon", -180.0, 180.0), ("acc", 0.0, None)):
        value = _optional_number(body, name, low, high)
        if value is not None:
            kept[name] = value
    for source, target, limit in (("desc", "desc", MAX_DESCRIPTION), ("rid", "rid", 64),
                                  ("t", "trigger", 8)):
        value = body.get(source)
        if isinstance(value, str) and value:
            kept[target] = value[:limit]
    return orjson.dumps(kept), ts


def decode_owntracks(payload: bytes, now_ms: int | None = None) -> OwnTracksMessage:
    """Decode one OwnTracks object; `ContractError` with the first broken rule."""
    body = load_object(payload)
    kind = body.get("_type")
    if kind is None:
        raise ContractError(Reason.MISSING_FIELD, "missing _type")
    if type(kind) is not str:
        raise ContractError(Reason.BAD_TYPE, "_type must be a string")
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    if kind == "location":
        position, ts = location_position(body, now)
        return OwnTracksMessage(OwnTracksKind.LOCATION, kind, ts, position=position,
                                monitoring=monitoring_mode(body))
    if kind == "lwt":
        return OwnTracksMessage(OwnTracksKind.LWT, kind, now)
    if kind == "transition":
        transition, ts = transition_body(body, now)
        return OwnTracksMessage(OwnTracksKind.TRANSITION, kind, ts, transition=transition)
    if kind == "status":
        return OwnTracksMessage(OwnTracksKind.IGNORED, kind, monitoring=monitoring_mode(body))
    return OwnTracksMessage(OwnTracksKind.IGNORED, ignored_type_label(kind))


MONITORING_MODES: Final = frozenset({-1, 0, 1, 2})


def monitoring_mode(body: dict[str, Any]) -> int | None:
    """`m` of a location or status object (at its top or in its `android`/`iOS` part); None
    when absent or not one of the app's modes (ignored, not refused)."""
    candidates = [body.get("m")]
    for part in ("android", "iOS"):
        nested = body.get(part)
        if isinstance(nested, dict):
            candidates.append(nested.get("m"))
    for value in candidates:
        if type(value) is int and value in MONITORING_MODES:
            return value
    return None


def ignored_type_label(kind: str) -> str:
    """A bounded label for a counter: the app's known types by name, anything else "other"."""
    return kind if kind in KNOWN_IGNORED_TYPES else "other"


class OnlineRefresh:
    """When a location should also say "online": OwnTracks has no online message (only a Last
    Will), so the first location of a worker says it, and one again every `every_s` seconds
    while locations keep coming, which also repairs an `offline` another bridge (or this one,
    after a restart) knew of and this one did not. A Last Will makes the next location say it
    at once. Bounded: the `capacity` most recent workers are remembered."""

    def __init__(self, every_s: float = 60.0, capacity: int = 100_000) -> None:
        self.every_s = every_s
        self.capacity = capacity
        self._said: OrderedDict[tuple[str, str], float] = OrderedDict()

    def due(self, team: str, worker: str, now: float | None = None) -> bool:
        """Whether a location of (team, worker) now should come with an "online"; if so, it is
        taken as said."""
        moment = time.monotonic() if now is None else now
        key = (team, worker)
        said = self._said.get(key)
        if said is not None and moment - said < self.every_s:
            return False
        self._said[key] = moment
        self._said.move_to_end(key)
        while len(self._said) > self.capacity:
            self._said.popitem(last=False)
        return True

    def gone(self, team: str, worker: str) -> None:
        """The worker's Last Will came: its next location says "online" again."""
        self._said.pop((team, worker), None)


def owntracks_events(
    message: OwnTracksMessage, address: tuple[str, str], origin: str, received_ms: int, qos: int,
    refresh: OnlineRefresh,
) -> list[Event]:
    """The events a decoded message of (team, worker) `address` becomes, in order: a location
    its position (after "online" when `refresh` says so), a Last Will "offline", a transition
    a worker event; nothing for the types teamtrack does not use."""
    team, worker = address
    if message.kind is OwnTracksKind.LOCATION:
        position = Event(team, worker, Kind.POSITION, message.position, origin, received_ms,
                         message.ts, qos)
        if refresh.due(team, worker):
            online = Event(team, worker, Kind.STATUS, b"online", origin, received_ms,
                           received_ms, qos)
            return [online, position]
        return [position]
    if message.kind is OwnTracksKind.LWT:
        refresh.gone(team, worker)
        return [Event(team, worker, Kind.STATUS, b"offline", origin, received_ms, received_ms,
                      qos)]
    if message.kind is OwnTracksKind.TRANSITION:
        return [Event(team, worker, Kind.EVENT, message.transition, origin, received_ms,
                      message.ts, qos)]
    return []
