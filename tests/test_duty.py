"""Shifts and the pause switch (`teamtrack.ingress.duty`): the rules on their own, with the
clock given, and the registry's shifts provisioned into duty.json."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest

from teamtrack.backends import Event
from teamtrack.contract import ContractError, Kind, Presence, Reason, decode_status
from teamtrack.ingress.duty import (
    DutyGate,
    DutyRoster,
    RosterFile,
    ShiftError,
    TeamDuty,
    parse_shifts,
)
from teamtrack.provision import provision
from teamtrack.registry import RegistryError, parse_registry

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, zone: ZoneInfo = BERLIN) -> int:
    """Epoch ms of a local time `YYYY-MM-DD HH:MM`."""
    return int(datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=zone).timestamp() * 1000)


# 2026-12-07 is a Monday.
WEEKDAYS = parse_shifts({"tz": "Europe/Berlin", "windows": ["mon-fri 07:00-19:00"]})


@pytest.mark.parametrize(("moment", "on"), [
    ("2026-12-07 06:59", False), ("2026-12-07 07:00", True), ("2026-12-07 18:59", True),
    ("2026-12-07 19:00", False), ("2026-12-11 12:00", True), ("2026-12-12 12:00", False),
    ("2026-12-13 12:00", False),
])
def test_weekday_windows_in_the_teams_time_zone(moment: str, on: bool) -> None:
    assert WEEKDAYS.on_duty(at(moment)) is on


def test_a_window_ending_before_it_starts_runs_into_the_next_day_and_ranges_wrap() -> None:
    nights = parse_shifts({"tz": "UTC", "windows": ["fri-mon 22:00-06:00"]})
    utc = ZoneInfo("UTC")
    assert nights.on_duty(at("2026-12-11 23:00", utc))      # Friday night
    assert nights.on_duty(at("2026-12-12 05:59", utc))      # Saturday morning (from Friday)
    assert nights.on_duty(at("2026-12-15 05:00", utc))      # Tuesday morning (from Monday)
    assert not nights.on_duty(at("2026-12-15 23:00", utc))  # Tuesday night
    assert not nights.on_duty(at("2026-12-16 05:00", utc))  # Wednesday morning
    whole = parse_shifts({"windows": ["daily 00:00-24:00"]})
    assert whole.on_duty(at("2026-12-13 12:00", utc))


def test_summer_time_follows_the_zone() -> None:
    # 07:00 in Berlin is 05:00 UTC in summer, 06:00 UTC in winter.
    summer = int(datetime(2026, 7, 6, 5, 30, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    winter = int(datetime(2026, 12, 7, 5, 30, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    assert WEEKDAYS.on_duty(summer)
    assert not WEEKDAYS.on_duty(winter)


@pytest.mark.parametrize(("shifts", "problem"), [
    ({"tz": "Mars/Olympus", "windows": ["mon 07:00-19:00"]}, "unknown time zone"),
    ({"tz": "UTC", "windows": []}, "non-empty list"),
    ({"tz": "UTC", "windows": ["monday 07:00-19:00"]}, "use mon..sun"),
    ({"tz": "UTC", "windows": ["mon 7-19"]}, "HH:MM"),
    ({"tz": "UTC", "windows": ["mon 07:00-25:00"]}, "time of day"),
    ({"tz": "UTC", "windows": ["mon 07:00"]}, "is not like"),
    ({"tz": "UTC", "windows": ["mon 07:00-19:00"], "days": 1}, "unknown field"),
    (["mon 07:00-19:00"], "mapping"),
])
def test_bad_shifts_are_refused_with_the_rule(shifts: object, problem: str) -> None:
    with pytest.raises(ShiftError, match=problem):
        parse_shifts(shifts)


def position(worker: str, seq: int, now: int) -> Event:
    body = orjson.dumps({"lat": 52.5, "lon": 13.4, "ts": now, "seq": seq})
    return Event("alpha", worker, Kind.POSITION, body, "b1", now, now, 1)


def status(worker: str, word: bytes, now: int) -> Event:
    return Event("alpha", worker, Kind.STATUS, word, "b1", now, now, 1)


def kinds(events: list[Event]) -> list[str]:
    return [event.body.decode() if event.kind is Kind.STATUS else "position" for event in events]


def gate_with_shifts() -> DutyGate:
    return DutyGate(DutyRoster({"alpha": TeamDuty(WEEKDAYS, {"w009": None})}))


def test_outside_the_shift_positions_are_dropped_counted_and_off_duty_said_once() -> None:
    gate = gate_with_shifts()
    sunday = at("2026-12-13 12:00")
    assert kinds(gate.admit([status("w001", b"online", sunday)], sunday)) == ["off_duty"]
    assert gate.admit([position("w001", 0, sunday)], sunday) == []
    assert gate.admit([position("w001", 1, sunday)], sunday) == []
    assert gate.dropped["off_duty"] == 2
    # A worker whose own entry says "always" is on duty whatever the team's default.
    assert kinds(gate.admit([position("w009", 0, sunday)], sunday)) == ["position"]
    # The shift begins: the first position says online again, then passes.
    monday = at("2026-12-14 07:01")
    assert kinds(gate.admit([position("w001", 2, monday)], monday)) == ["online", "position"]
    assert kinds(gate.admit([position("w001", 3, monday)], monday)) == ["position"]


def test_pause_and_resume_and_the_owntracks_modes() -> None:
    gate = DutyGate()
    now = at("2026-12-07 12:00")
    assert gate.idle
    assert kinds(gate.admit([status("w001", b"off_duty", now)], now)) == ["off_duty"]
    assert gate.admit([position("w001", 0, now)], now) == []
    assert gate.dropped["paused"] == 1
    assert kinds(gate.admit([status("w001", b"online", now)], now)) == ["online"]
    assert kinds(gate.admit([position("w001", 1, now)], now)) == ["position"]
    assert gate.idle  # nothing left to remember
    # OwnTracks: quiet mode (-1) pauses, even on the location that states it; move resumes.
    assert kinds(gate.admit([position("w002", 0, now)], now, monitoring=-1)) == ["off_duty"]
    assert kinds(gate.set_mode("alpha", "w002", 0, "b1", 1, now)) == []  # already said
    assert gate.admit([position("w002", 1, now)], now) == []
    assert kinds(gate.admit([position("w002", 2, now)], now, monitoring=2)) == [
        "online", "position"]
    assert gate.dropped["paused"] == 3


def test_a_shift_that_ends_turns_the_worker_off_duty_without_its_next_message() -> None:
    gate = gate_with_shifts()
    before = at("2026-12-07 18:58")
    assert kinds(gate.admit([position("w001", 0, before)], before)) == ["position"]
    assert gate.tick(at("2026-12-07 18:59")) == []
    ended = gate.tick(at("2026-12-07 19:00"))
    assert kinds(ended) == ["off_duty"]
    end = at("2026-12-07 19:00")
    assert (ended[0].team, ended[0].worker, ended[0].ts) == ("alpha", "w001", end)
    assert gate.tick(at("2026-12-07 19:01")) == []  # once
    # An offline worker is not turned off duty: offline says more.
    gate.admit([position("w002", 0, before)], before)
    gate.admit([status("w002", b"offline", before)], before)
    assert gate.tick(at("2026-12-07 19:00")) == []


def test_the_gate_remembers_a_bounded_number_of_workers() -> None:
    gate = DutyGate(capacity=100)
    now = at("2026-12-07 12:00")
    for index in range(1000):
        gate.admit([status(f"w{index:04d}", b"off_duty", now)], now)
    assert len(gate._workers) == 100


def test_devices_say_paused_never_off_duty() -> None:
    assert decode_status("alpha", "w001", b"paused").presence is Presence.OFF_DUTY
    with pytest.raises(ContractError) as refused:
        decode_status("alpha", "w001", b"off_duty")
    assert refused.value.reason is Reason.BAD_STATUS


def test_the_registrys_shifts_are_provisioned_into_duty_json(tmp_path: Path) -> None:
    registry = parse_registry({"teams": [
        {"id": "alpha", "worker_count": 3,
         "shifts": {"tz": "Europe/Berlin", "windows": ["mon-fri 07:00-19:00"]},
         "worker_shifts": {"w002": "always",
                           "w003": {"tz": "UTC", "windows": ["sat-sun 08:00-16:00"]}}},
        {"id": "bravo", "worker_count": 1},
    ]})
    result = provision(registry, tmp_path)
    assert result.duty_file is not None
    assert oct(result.duty_file.stat().st_mode & 0o777) == "0o644"
    document = json.loads(result.duty_file.read_text())
    assert set(document["teams"]) == {"alpha"}
    roster = RosterFile(result.duty_file).roster
    sunday = at("2026-12-13 12:00")
    assert roster.shifts("alpha", "w001") == WEEKDAYS
    assert roster.shifts("alpha", "w002") is None
    shifts = roster.shifts("alpha", "w003")
    assert shifts is not None and shifts.on_duty(sunday)
    assert roster.shifts("bravo", "w001") is None


def test_registry_refuses_bad_shifts_and_strangers(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="unknown time zone"):
        parse_registry({"teams": [{"id": "alpha", "worker_count": 1,
                                   "shifts": {"tz": "Nowhere/X", "windows": ["mon 07:00-08:00"]}}]})
    with pytest.raises(RegistryError, match="not a worker of the team"):
        parse_registry({"teams": [{"id": "alpha", "worker_count": 1,
                                   "worker_shifts": {"w404": "always"}}]})


def test_a_broken_rewrite_of_duty_json_keeps_the_shifts_in_force(tmp_path: Path) -> None:
    path = tmp_path / "duty.json"
    path.write_text(json.dumps(DutyRoster({"alpha": TeamDuty(WEEKDAYS)}).document()))
    watched = RosterFile(path)
    path.write_text("{not json")
    assert not watched.reload_if_changed()
    assert watched.roster.shifts("alpha", "w001") == WEEKDAYS
    path.write_text(json.dumps({"teams": {}}))
    assert watched.reload_if_changed()
    assert watched.roster.shifts("alpha", "w001") is None
