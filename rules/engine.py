"""The rules themselves: a team's events and the clock into alerts, with a state per worker
that is plain JSON (saved with the alerts it led to, in one transaction: `rules.service`).

Deterministic: the same events, in the same order, from the same state give the same alerts
with the same ids, in any process. Ids come from what triggered the alert (the fix, the status
change, the transition), never from the time the rule ran.

Rules (thresholds per team, `TeamRules`):
* zone_enter / zone_exit: a fix inside a zone the previous fix was outside of, or the other
  way round. A worker's first fix (no state yet) only sets the state: no alert.
  Fixes older than the worker's newest are ignored for zones (out of order, e.g. QoS 1 resends).
* battery_low: a fix with `battery` below the threshold after one at or above it (or none);
  armed again once the battery is back at threshold + 5.
* offline: the worker's presence has been `offline` for `offline_after_s` (checked by `tick`).
* idle: online (neither offline nor `off_duty`) and no fix farther than `idle_radius_m` from
  where it last moved, for `idle_after_s` (checked by `tick`).
* transition: an OwnTracks region transition the phone reported (a worker event).
Nothing for an `off_duty` worker but zones, battery and transitions (a later fix or `online`
ends off duty).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from teamtrack.alerts import Alert, alert_id
from teamtrack.zones import Zone, distance_m

BATTERY_REARM = 5.0


@dataclass(frozen=True)
class TeamRules:
    offline_after_s: float = 300.0
    battery_below: float = 15.0
    idle_after_s: float = 900.0
    idle_radius_m: float = 30.0


@dataclass
class TeamState:
    zones: tuple[Zone, ...] = ()
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


class RuleEngine:
    def __init__(self, rules: Mapping[str, TeamRules] | None = None,
                 default: TeamRules | None = None) -> None:
        self.teams: dict[str, TeamState] = {}
        self.rules: dict[str, TeamRules] = dict(rules or {})
        self.default = default or TeamRules()
        # (team, worker) whose state changed since `take_changed`.
        self._changed: set[tuple[str, str]] = set()

    def team(self, team: str) -> TeamState:
        state = self.teams.get(team)
        if state is None:
            state = self.teams[team] = TeamState()
        return state

    def rules_of(self, team: str) -> TeamRules:
        return self.rules.get(team, self.default)

    def load(self, states: Mapping[tuple[str, str], Any]) -> None:
        for (team, worker), state in states.items():
            if isinstance(state, dict):
                self.team(team).workers[worker] = state

    def set_zones(self, team: str, zones: Iterable[Zone]) -> None:
        self.team(team).zones = tuple(zones)

    def forget(self, team: str, worker: str) -> None:
        """Drop what is held of a worker whose data was erased (`teamtrack history erase`):
        nothing of it is stored again unless it reports again."""
        state = self.teams.get(team)
        if state is not None:
            state.workers.pop(worker, None)
        self._changed.discard((team, worker))

    def take_changed(self) -> dict[tuple[str, str], dict[str, Any]]:
        changed = {key: self.teams[key[0]].workers[key[1]] for key in self._changed
                   if key[1] in self.teams[key[0]].workers}
        self._changed.clear()
        return changed

    def _worker(self, team: str, worker: str) -> dict[str, Any]:
        workers = self.team(team).workers
        state = workers.get(worker)
        if state is None:
            state = workers[worker] = {}
        self._changed.add((team, worker))
        return state

    # Events --------------------------------------------------------------------------------
    def event(self, team: str, item: Mapping[str, Any], now_ms: int) -> list[Alert]:
        """One decoded event of a team's batch (`Event.to_json`'s fields) into alerts."""
        kind, worker, payload = item.get("k"), item.get("w"), item.get("p")
        if not isinstance(worker, str):
            return []
        if kind == "p" and isinstance(payload, dict):
            return self._position(team, worker, payload, now_ms)
        if kind == "s" and isinstance(payload, str):
            rx = item.get("rx")
            return self._status(team, worker, payload, rx if isinstance(rx, int) else now_ms)
        if kind == "e" and isinstance(payload, dict) and payload.get("type") == "transition":
            return self._transition(team, worker, payload, now_ms)
        return []

    def _position(self, team: str, worker: str, fix: Mapping[str, Any], now: int) -> list[Alert]:
        ts, seq, lat, lon = fix.get("ts"), fix.get("seq"), fix.get("lat"), fix.get("lon")
        if not (isinstance(ts, int) and isinstance(lat, int | float)
                and isinstance(lon, int | float)):
            return []
        state = self._worker(team, worker)
        rules = self.rules_of(team)
        raised: list[Alert] = []
        if state.get("status") in ("offline", "off_duty"):
            state["status"], state["status_ms"] = "online", ts  # a fix ends them
        last_ts = state.get("last_ts")
        if last_ts is not None and ts <= last_ts:
            return raised
        state["last_ts"] = ts
        inside_now = {zone.id for zone in self.team(team).zones if zone.contains(lat, lon)}
        if "inside" in state:
            before = set(state["inside"])
            for zone in self.team(team).zones:
                if zone.id in inside_now and zone.id not in before:
                    raised.append(self._alert(team, worker, "zone_enter", zone, ts, seq, now,
                                              f"entered {zone.name}"))
                elif zone.id in before and zone.id not in inside_now:
                    raised.append(self._alert(team, worker, "zone_exit", zone, ts, seq, now,
                                              f"left {zone.name}"))
        state["inside"] = sorted(inside_now)
        battery = fix.get("battery")
        if isinstance(battery, int | float):
            if battery < rules.battery_below and not state.get("battery_low"):
                state["battery_low"] = True
                raised.append(self._alert(team, worker, "battery_low", None, ts, seq, now,
                                          f"battery {battery:.0f} % (below "
                                          f"{rules.battery_below:g} %)"))
            elif battery >= rules.battery_below + BATTERY_REARM and state.get("battery_low"):
                state["battery_low"] = False
        anchor = state.get("anchor")
        if anchor is None or distance_m(lat, lon, anchor[0], anchor[1]) > rules.idle_radius_m:
            state["anchor"], state["moved_ms"] = [lat, lon], ts
        return raised

    def _status(self, team: str, worker: str, word: str, rx: int) -> list[Alert]:
        state = self._worker(team, worker)
        if word != state.get("status"):
            state["status"], state["status_ms"] = word, rx
        return []

    def _transition(self, team: str, worker: str, body: Mapping[str, Any],
                    now: int) -> list[Alert]:
        ts = body.get("ts")
        if not isinstance(ts, int):
            return []
        region = str(body.get("rid") or body.get("desc") or "")[:64]
        name = str(body.get("desc") or region)[:200]
        verb = "entered" if body.get("event") == "enter" else "left"
        identity = alert_id(team, worker, "transition", ts, body.get("event"), region)
        return [Alert(identity, team, worker, "transition", None, name or None, ts, now,
                      f"phone: {verb} {name}".strip())]

    def _alert(self, team: str, worker: str, kind: str, zone: Zone | None, ts: int,
               seq: object, now: int, detail: str) -> Alert:
        zone_id = zone.id if zone is not None else None
        identity = alert_id(team, worker, kind, zone_id, ts, seq)
        return Alert(identity, team, worker, kind, zone_id,
                     zone.name if zone is not None else None, ts, now, detail)

    # The clock -----------------------------------------------------------------------------
    def tick(self, now_ms: int) -> list[Alert]:
        """Offline and idle alerts whose time has come (each once per offline spell or per
        stop: the id is that of the status change or of the last movement)."""
        raised: list[Alert] = []
        for team, team_state in self.teams.items():
            rules = self.rules_of(team)
            for worker, state in team_state.workers.items():
                status, status_ms = state.get("status"), state.get("status_ms")
                if (status == "offline" and isinstance(status_ms, int)
                        and now_ms - status_ms >= rules.offline_after_s * 1000
                        and state.get("offline_alerted") != status_ms):
                    state["offline_alerted"] = status_ms
                    self._changed.add((team, worker))
                    raised.append(Alert(
                        alert_id(team, worker, "offline", status_ms), team, worker, "offline",
                        None, None, status_ms, now_ms,
                        f"offline for {_minutes(rules.offline_after_s)}",
                    ))
                moved = state.get("moved_ms")
                if (status not in ("offline", "off_duty") and isinstance(moved, int)
                        and rules.idle_after_s > 0
                        and now_ms - moved >= rules.idle_after_s * 1000
                        and state.get("idle_alerted") != moved):
                    state["idle_alerted"] = moved
                    self._changed.add((team, worker))
                    raised.append(Alert(
                        alert_id(team, worker, "idle", moved), team, worker, "idle", None, None,
                        int(state.get("last_ts") or moved), now_ms,
                        f"no movement for {_minutes(rules.idle_after_s)}",
                    ))
        return raised
