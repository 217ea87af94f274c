"""What the dashboard re-checks of what it reads from the backend, before any viewer gets it.

The bridges validate every device message, but whoever can write to the backend (Redis, Kafka)
bypasses them. Defence in depth: the dashboard drops, and counts by reason, every event whose
worker id is not a slug, whose fields are not the ones a bridge writes, or whose position
payload breaks the contract (`teamtrack.contract.check_position_object`, the clock rule
aside). The events are checked on the decode the repeat filter does anyway (one per batch
for all viewers of a team), so the check costs a few dict lookups and comparisons per event.
Snapshots are checked when taken (once per joining viewer).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

import orjson

from teamtrack.backends import Snapshot
from teamtrack.contract import (
    MAX_INTEGER,
    NOTICE_ORIGIN,
    OPTIONAL_RANGES,
    ContractError,
    Presence,
    check_notice,
    check_position_object,
    check_worker_event,
    is_notice,
    is_slug,
)

# The fields of an event as `Event.to_json` writes them.
EVENT_FIELDS: Final = frozenset({"w", "k", "o", "rx", "q", "p"})
_STATUS_WORDS: Final = frozenset(presence.value for presence in Presence)
_STATUS_BODIES: Final = frozenset(word.encode() for word in _STATUS_WORDS)
_REQUIRED: Final = frozenset({"lat", "lon", "ts", "seq"})
_KNOWN: Final = _REQUIRED | frozenset(OPTIONAL_RANGES)
_OPTIONAL: Final = tuple(
    (name, low, float("inf") if high is None else high)
    for name, (low, high) in OPTIONAL_RANGES.items()
)


class EventCheck:
    """Checks decoded events; remembers the ids it found to be slugs (they recur per event),
    a set bounded by the team's workers and brokers, since only slugs are ever added."""

    __slots__ = ("_slugs",)

    def __init__(self) -> None:
        self._slugs: set[str] = set()

    def _slug(self, value: object) -> bool:
        if type(value) is not str:
            return False
        if value in self._slugs:
            return True
        if not is_slug(value):
            return False
        self._slugs.add(value)
        return True

    def odd(self, event: Any) -> str | None:
        """None for an event fit for viewers; else the reason (a counter label)."""
        if type(event) is not dict or not event.keys() <= EVENT_FIELDS:
            return "bad_event"
        if not self._slug(event.get("w")):
            return "bad_worker"
        if not self._slug(event.get("o")) or type(event.get("rx")) is not int:
            return "bad_event"
        qos = event.get("q", 0)
        if type(qos) is not int or not 0 <= qos <= 2:
            return "bad_event"
        kind = event.get("k")
        if kind == "p":
            position = event.get("p")
            if _plainly_valid(position):
                return None
            try:  # the contract's own check, for the reason (or a rare valid shape)
                check_position_object(position)
            except ContractError as error:
                return f"position_{error.reason.value}"
            return None
        if kind == "s":
            payload = event.get("p")
            return None if type(payload) is str and payload in _STATUS_WORDS else "bad_status"
        if kind == "e":
            payload = event.get("p")
            try:
                if is_notice(payload):
                    if event.get("o") != NOTICE_ORIGIN:
                        return "bad_notice"
                    check_notice(payload)
                else:
                    check_worker_event(payload)
            except ContractError as error:
                return f"event_{error.reason.value}"
            return None
        return "bad_event"


def _plainly_valid(position: Any) -> bool:
    """True for a position that holds every rule of `check_position_object`, tested inline
    (about a third of its cost); False sends it to that check, which names the reason."""
    if type(position) is not dict:
        return False
    names = position.keys()
    if not (names >= _REQUIRED and names <= _KNOWN):
        return False
    lat, lon, ts, seq = position["lat"], position["lon"], position["ts"], position["seq"]
    # NaN fails every comparison; a bool is neither float nor int by type.
    if not (
        (type(lat) is float or type(lat) is int) and -90.0 <= lat <= 90.0
        and (type(lon) is float or type(lon) is int) and -180.0 <= lon <= 180.0
        and type(ts) is int and 0 <= ts <= MAX_INTEGER
        and type(seq) is int and 0 <= seq <= MAX_INTEGER
    ):
        return False
    if len(position) == 4:
        return True
    for name, low, high in _OPTIONAL:
        value = position.get(name)
        if value is not None and not (
            (type(value) is float or type(value) is int) and low <= value <= high
        ):
            return False
    return True


def checked_snapshot(snapshot: Snapshot, rejected: Counter[str]) -> Snapshot:
    """`snapshot` without the entries a bridge could not have written; counted in `rejected`
    (with those the backend could not decode at all, as `unreadable`)."""
    if snapshot.unreadable:
        rejected["unreadable"] += snapshot.unreadable
    positions = {}
    for worker, event in snapshot.positions.items():
        reason = None
        if not is_slug(worker) or not is_slug(event.origin):
            reason = "bad_worker" if not is_slug(worker) else "bad_event"
        else:
            try:
                check_position_object(orjson.loads(event.body))
            except orjson.JSONDecodeError:
                reason = "position_not_json"
            except ContractError as error:
                reason = f"position_{error.reason.value}"
        if reason is None:
            positions[worker] = event
        else:
            rejected[reason] += 1
    presence = {}
    for worker, event in snapshot.presence.items():
        if is_slug(worker) and is_slug(event.origin) and event.body in _STATUS_BODIES:
            presence[worker] = event
        else:
            rejected["bad_worker" if not is_slug(worker) else "bad_status"] += 1
    if len(positions) == len(snapshot.positions) and len(presence) == len(snapshot.presence):
        return snapshot
    return Snapshot(snapshot.team, snapshot.cursor, positions, presence)
