"""Off duty: shifts and the pause switch, applied where device messages come in (bridges,
gateways) before anything reaches the backend (docs/privacy.md, "Off duty").

* `Shifts`: weekly windows in a time zone (`{"tz": "Europe/Berlin", "windows":
  ["mon-fri 07:00-19:00", "sat 08:00-12:00", "sun-thu 22:00-06:00"]}`); a window whose end is
  not after its start runs into the next day. A worker without shifts is always on duty.
* `DutyRoster`: each team's default shifts and its workers' overrides, read from the provisioned
  `duty.json` (`roster_document` writes it from the registry).
* `DutyGate`: one per process; turns the events a device message became into those that may
  go on. A position (or a worker event, which carries a place) of a worker that is paused or
  outside its shift is dropped and counted by reason; the worker's presence becomes
  `off_duty`, published once per transition; the next position that passes (or `online`)
  says `online` again. `tick` turns the workers whose shift ended since their last position
  `off_duty` without waiting for their next message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from teamtrack.backends.base import Event
from teamtrack.contract import Kind, Presence, is_slug

log = logging.getLogger(__name__)

DUTY_FILE: Final = "duty.json"
DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MINUTES_PER_DAY: Final = 24 * 60
MAX_WINDOWS: Final = 32
# Drop reasons (labels of the dropped counters).
OFF_DUTY: Final = "off_duty"
PAUSED: Final = "paused"
REASONS: Final = (OFF_DUTY, PAUSED)
# OwnTracks monitoring modes (`m`): quiet and manual pause the worker, significant and move
# resume it.
OWNTRACKS_PAUSING_MODES: Final = frozenset({-1, 0})
OWNTRACKS_MOVING_MODES: Final = frozenset({1, 2})
_ONLINE: Final = Presence.ONLINE.value.encode()
_OFFLINE: Final = Presence.OFFLINE.value.encode()
_OFF_DUTY: Final = Presence.OFF_DUTY.value.encode()


class ShiftError(ValueError):
    """A shift definition breaks a rule; the message says which."""


@dataclass(frozen=True, slots=True)
class Window:
    """Days of the week (0 = Monday) a window starts on, and its minutes of the day; an end
    not after the start runs into the next day."""

    days: frozenset[int]
    start: int
    end: int

    def covers(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        return (weekday in self.days and minute >= self.start) or (
            (weekday - 1) % 7 in self.days and minute < self.end
        )


def _minute(text: str, what: str) -> int:
    hours, colon, minutes = text.partition(":")
    if not colon or not hours.isdigit() or not minutes.isdigit() or len(minutes) != 2:
        raise ShiftError(f"{what} {text!r} is not HH:MM")
    value = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or value > MINUTES_PER_DAY:
        raise ShiftError(f"{what} {text!r} is not a time of day (00:00 .. 24:00)")
    return value


def _days(text: str) -> frozenset[int]:
    if text in ("daily", "every"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if first not in DAYS or (dash and last not in DAYS):
            raise ShiftError(f"days {text!r}: use mon..sun, ranges (mon-fri), lists "
                             "(mon,wed) or daily")
        start = DAYS.index(first)
        stop = DAYS.index(last) if dash else start
        day = start
        while True:  # a range may wrap (fri-mon)
            days.add(day)
            if day == stop:
                break
            day = (day + 1) % 7
    return frozenset(days)


def parse_window(text: object) -> Window:
    """`"mon-fri 07:00-19:00"`."""
    if not isinstance(text, str):
        raise ShiftError("a shift window is a string such as 'mon-fri 07:00-19:00'")
    days, space, hours = text.strip().lower().partition(" ")
    start, dash, end = hours.strip().partition("-")
    if not space or not dash:
        raise ShiftError(f"shift window {text!r} is not like 'mon-fri 07:00-19:00'")
    window = Window(_days(days), _minute(start, "start"), _minute(end, "end"))
    if window.start == MINUTES_PER_DAY:
        raise ShiftError(f"shift window {text!r} starts at 24:00")
    if window.end == window.start == 0:
        return Window(window.days, 0, MINUTES_PER_DAY)  # "00:00-00:00": the whole day
    return window


@dataclass(frozen=True)
class Shifts:
    """When a worker is on duty: weekly windows in one time zone."""

    tz: str
    windows: tuple[Window, ...]
    texts: tuple[str, ...]
    _zone: ZoneInfo = field(repr=False, compare=False)
    # (minute since the epoch, verdict): the windows are minutes, so one answer per minute.
    _cached: list[tuple[int, bool]] = field(default_factory=lambda: [(-1, False)], repr=False,
                                            compare=False)

    def on_duty(self, epoch_ms: int) -> bool:
        minute = epoch_ms // 60_000
        cached_minute, verdict = self._cached[0]
        if cached_minute == minute:
            return verdict
        local = datetime.fromtimestamp(minute * 60, self._zone)
        of_day = local.hour * 60 + local.minute
        verdict = any(window.covers(local.weekday(), of_day) for window in self.windows)
        self._cached[0] = (minute, verdict)
        return verdict

    def document(self) -> dict[str, Any]:
        return {"tz": self.tz, "windows": list(self.texts)}


def parse_shifts(data: object, what: str = "shifts") -> Shifts:
    """`{"tz": "Europe/Berlin", "windows": ["mon-fri 07:00-19:00"]}`; `ShiftError` naming the
    broken rule."""
    if not isinstance(data, Mapping):
        raise ShiftError(f"{what} must be a mapping with 'tz' and 'windows'")
    unknown = set(data) - {"tz", "windows"}
    if unknown:
        raise ShiftError(f"{what}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    tz = data.get("tz", "UTC")
    if not isinstance(tz, str):
        raise ShiftError(f"{what}: tz must be a time zone name such as 'Europe/Berlin'")
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ShiftError(f"{what}: unknown time zone {tz!r}") from None
    texts = data.get("windows")
    if not isinstance(texts, list | tuple) or not texts:
        raise ShiftError(f"{what}: windows must be a non-empty list such as "
                         "['mon-fri 07:00-19:00']")
    if len(texts) > MAX_WINDOWS:
        raise ShiftError(f"{what}: at most {MAX_WINDOWS} windows")
    windows = tuple(parse_window(text) for text in texts)
    return Shifts(tz, windows, tuple(str(text) for text in texts), zone)


@dataclass(frozen=True)
class TeamDuty:
    default: Shifts | None = None
    # A worker's own shifts; None in the mapping: always on duty, whatever the team's default.
    workers: Mapping[str, Shifts | None] = field(default_factory=dict)

    def shifts(self, worker: str) -> Shifts | None:
        if worker in self.workers:
            return self.workers[worker]
        return self.default


@dataclass(frozen=True)
class DutyRoster:
    """Shifts per team and worker; empty: everybody is always on duty."""

    teams: Mapping[str, TeamDuty] = field(default_factory=dict)

    def shifts(self, team: str, worker: str) -> Shifts | None:
        duty = self.teams.get(team)
        return duty.shifts(worker) if duty is not None else None

    def document(self) -> dict[str, Any]:
        teams: dict[str, Any] = {}
        for team, duty in sorted(self.teams.items()):
            teams[team] = {
                "shifts": duty.default.document() if duty.default is not None else None,
                "workers": {worker: shifts.document() if shifts is not None else "always"
                            for worker, shifts in sorted(duty.workers.items())},
            }
        return {"teams": teams}


def parse_roster(data: object, source: str = DUTY_FILE) -> DutyRoster:
    """The `duty.json` document (`DutyRoster.document`)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("teams"), Mapping):
        raise ShiftError(f"{source}: expected {{'teams': {{team: {{'shifts', 'workers'}}}}}}")
    teams: dict[str, TeamDuty] = {}
    for team, entry in data["teams"].items():
        if not isinstance(team, str) or not is_slug(team) or not isinstance(entry, Mapping):
            raise ShiftError(f"{source}: team {team!r} is not a slug with a mapping")
        default = entry.get("shifts")
        workers: dict[str, Shifts | None] = {}
        for worker, shifts in (entry.get("workers") or {}).items():
            workers[str(worker)] = (None if shifts == "always" else
                                    parse_shifts(shifts, f"{source}: {team}/{worker}"))
        teams[team] = TeamDuty(
            parse_shifts(default, f"{source}: {team}") if default is not None else None,
            workers,
        )
    return DutyRoster(teams)


def load_roster(path: Path | str) -> DutyRoster:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ShiftError(f"{path}: cannot read the file ({error.strerror})") from None
    except ValueError as error:
        raise ShiftError(f"{path}: not JSON ({error})") from None
    return parse_roster(data, str(path))


class RosterFile:
    """A `duty.json` read again when it changes (`reload_if_changed`, called every few
    seconds, and on SIGHUP); a broken rewrite keeps the roster in force and is logged."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._stamp = self._stat()
        self.roster = load_roster(self.path)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            status = os.stat(self.path)
        except OSError:
            return None
        return status.st_ino, status.st_size, status.st_mtime_ns

    def reload_if_changed(self) -> bool:
        stamp = self._stat()
        if stamp == self._stamp or stamp is None:
            return False
        self._stamp = stamp
        try:
            self.roster = load_roster(self.path)
        except ShiftError as error:
            log.error("duty file not reloaded, the shifts in force stay: %s", error)
            return False
        log.info("duty file reloaded: shifts for %d team(s)", len(self.roster.teams))
        return True


def refresh_roster(roster_file: RosterFile | None, gate: DutyGate) -> None:
    """`gate` takes `roster_file`'s shifts again if the file changed (also on SIGHUP)."""
    if roster_file is not None and roster_file.reload_if_changed():
        gate.roster = roster_file.roster


async def follow_duty(
    roster_file: RosterFile | None,
    gate: DutyGate,
    every_s: float,
    submit: Callable[[Event], object],
) -> None:
    """Every `every_s`: reload `duty.json` if it changed, and hand `submit` the `off_duty`
    status of each online worker whose shift has ended (a bridge's or gateway's task)."""
    while True:
        await asyncio.sleep(every_s)
        refresh_roster(roster_file, gate)
        for event in gate.tick():
            submit(event)


@dataclass
class _WorkerDuty:
    paused: bool = False
    # Whether `off_duty` was the last presence this gate published for the worker.
    off: bool = False


class DutyGate:
    """Per-process state of the workers this process heard from; bounded (`capacity` most
    recent workers). `dropped[reason]` counts positions and worker events dropped."""

    def __init__(self, roster: DutyRoster | None = None, capacity: int = 200_000) -> None:
        self.roster = roster or DutyRoster()
        self.capacity = capacity
        self.dropped: Counter[str] = Counter()
        self._workers: OrderedDict[tuple[str, str], _WorkerDuty] = OrderedDict()
        # Workers on duty, with shifts, whose last presence was not off_duty: what `tick` checks.
        self._watched: dict[tuple[str, str], Event] = {}

    def _state(self, key: tuple[str, str]) -> _WorkerDuty:
        state = self._workers.get(key)
        if state is None:
            state = self._workers[key] = _WorkerDuty()
            while len(self._workers) > self.capacity:
                gone, _ = self._workers.popitem(last=False)
                self._watched.pop(gone, None)
        return state

    @property
    def idle(self) -> bool:
        """Nothing to do: no shifts anywhere and no worker paused or off duty."""
        return not self.roster.teams and not self._workers

    def admit(self, events: Sequence[Event], now_ms: int | None = None,
              monitoring: int | None = None, *, online_resumes: bool = True) -> list[Event]:
        """The events to forward instead of `events` (all of one device message, in order).
        `monitoring`: the OwnTracks mode the message stated, if any. `online_resumes`: False
        where `online` is not the device's word (OwnTracks: derived from its locations), so
        that it does not end a pause."""
        if not events:
            return []
        if self.idle and monitoring not in OWNTRACKS_PAUSING_MODES and not any(
            event.kind is Kind.STATUS and event.body == _OFF_DUTY for event in events
        ):
            return list(events)
        now = int(time.time() * 1000) if now_ms is None else now_ms
        first = events[0]
        out = self.set_mode(first.team, first.worker, monitoring, first.origin, first.qos, now)
        for event in events:
            self._admit_one(event, now, out, online_resumes)
        return out

    def set_mode(self, team: str, worker: str, monitoring: int | None, origin: str, qos: int,
                 now_ms: int | None = None) -> list[Event]:
        """An OwnTracks monitoring mode (`m`) the worker's app stated: quiet or manual pause
        it (its presence becomes `off_duty`, returned when it changes), significant or move
        resume it (its next position passes again, on shift)."""
        out: list[Event] = []
        if monitoring in OWNTRACKS_PAUSING_MODES:
            now = int(time.time() * 1000) if now_ms is None else now_ms
            state = self._state((team, worker))
            state.paused = True
            self._go_off(state, Event(team, worker, Kind.STATUS, _OFF_DUTY, origin, now, now,
                                      qos), now, out)
        elif monitoring in OWNTRACKS_MOVING_MODES:
            state_or_none = self._workers.get((team, worker))
            if state_or_none is not None:
                state_or_none.paused = False
        return out

    def note_status(self, team: str, worker: str, presence: bytes) -> None:
        """A device's status that another process forwards (and announces): remember the pause
        it states, announce nothing. Every bridge of a broker gets every status this way
        (bridge/service.py), so that a pause holds for the device's positions whichever bridge
        of the share group they reach, and a bridge started later learns it from the retained
        status."""
        key = (team, worker)
        if presence == _OFF_DUTY:
            state = self._state(key)
            state.paused = state.off = True
            self._watched.pop(key, None)
            return
        state_or_none = self._workers.get(key)
        if state_or_none is None:
            return
        # online (a device's own word) resumes, offline ends the pause too; the forwarding
        # process announced it.
        state_or_none.paused = state_or_none.off = False
        if self.roster.shifts(team, worker) is None:
            self._workers.pop(key, None)

    def _admit_one(self, event: Event, now: int, out: list[Event],
                   online_resumes: bool = True) -> None:
        key = (event.team, event.worker)
        shifts = self.roster.shifts(event.team, event.worker)
        state = self._workers.get(key)
        if state is None and shifts is None and (
            event.kind is not Kind.STATUS or event.body != _OFF_DUTY
        ):
            out.append(event)  # always on duty, never paused: nothing to remember
            return
        if state is None:
            state = self._state(key)
        if event.kind is Kind.STATUS:
            if event.body == _OFF_DUTY:  # the device paused (`paused`)
                state.paused = True
                # Announced each time the device says it, also where `note_status` already
                # knew (another copy of this very message came first).
                state.off = False
                self._go_off(state, event, now, out)
            elif event.body == _OFFLINE:
                state.paused = state.off = False
                self._watched.pop(key, None)
                out.append(event)
            else:  # online: resumes; outside its shift it is off duty instead
                if state.paused and not online_resumes:
                    return  # still paused: the app did not say otherwise
                state.paused = False
                if shifts is not None and not shifts.on_duty(now):
                    self._go_off(state, event, now, out)
                else:
                    self._go_on(state, key, shifts, event, out, announce=False)
                    out.append(event)
            return
        reason = PAUSED if state.paused else (
            OFF_DUTY if shifts is not None and not shifts.on_duty(now) else None)
        if reason is not None:
            self.dropped[reason] += 1
            self._go_off(state, event, now, out)
            return
        self._go_on(state, key, shifts, event, out, announce=True)
        out.append(event)

    def _go_off(self, state: _WorkerDuty, event: Event, now: int, out: list[Event]) -> None:
        self._watched.pop((event.team, event.worker), None)
        if state.off:
            return
        state.off = True
        out.append(Event(event.team, event.worker, Kind.STATUS, _OFF_DUTY, event.origin, now,
                         now, event.qos))

    def _go_on(self, state: _WorkerDuty, key: tuple[str, str], shifts: Shifts | None,
               event: Event, out: list[Event], *, announce: bool) -> None:
        if state.off:
            state.off = False
            if announce:
                out.append(Event(event.team, event.worker, Kind.STATUS, _ONLINE, event.origin,
                                 event.received_ms, event.received_ms, event.qos))
        if shifts is not None:
            self._watched[key] = event
        elif not state.paused:
            # Nothing left to remember about this worker.
            self._workers.pop(key, None)

    def tick(self, now_ms: int | None = None) -> list[Event]:
        """`off_duty` for each watched worker whose shift is over now (at most once each)."""
        if not self._watched:
            return []
        now = int(time.time() * 1000) if now_ms is None else now_ms
        ended: list[Event] = []
        for key, last in list(self._watched.items()):
            shifts = self.roster.shifts(*key)
            if shifts is not None and shifts.on_duty(now):
                continue
            del self._watched[key]
            state = self._state(key)
            if shifts is None:
                continue
            self._go_off(state, last, now, ended)
        return ended

    def forget(self, workers: Iterable[tuple[str, str]]) -> None:
        for key in workers:
            self._workers.pop(key, None)
            self._watched.pop(key, None)

