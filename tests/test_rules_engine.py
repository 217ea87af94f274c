"""The rules on their own: events and the clock into alerts, deterministically."""

from __future__ import annotations

from typing import Any

from rules.engine import RuleEngine, TeamRules
from teamtrack.zones import parse_zone

T0 = 1_795_000_000_000
ZONE = parse_zone({"type": "Feature",
                   "geometry": {"type": "Point", "coordinates": [13.4, 52.5]},
                   "properties": {"name": "Depot <b>", "radius_m": 100}}, "zdepot")


def fix(worker: str, seq: int, lat: float, battery: float | None = None,
        lon: float = 13.4) -> dict[str, Any]:
    body: dict[str, Any] = {"lat": lat, "lon": lon, "ts": T0 + seq * 1000, "seq": seq}
    if battery is not None:
        body["battery"] = battery
    return {"w": worker, "k": "p", "o": "b1", "rx": T0 + seq * 1000, "q": 1, "p": body}


def status(worker: str, word: str, rx: int) -> dict[str, Any]:
    return {"w": worker, "k": "s", "o": "b1", "rx": rx, "q": 1, "p": word}


def crossing(engine: RuleEngine) -> list[Any]:
    raised = []
    # Outside (1 km south), in, in, out.
    for seq, lat in enumerate((52.49, 52.5, 52.5002, 52.49)):
        raised += engine.event("alpha", fix("w001", seq, lat), T0 + 10_000)
    return raised


def test_a_crossing_raises_enter_then_exit_and_the_first_fix_only_sets_state() -> None:
    engine = RuleEngine()
    engine.set_zones("alpha", [ZONE])
    raised = crossing(engine)
    assert [(alert.kind, alert.zone, alert.zone_name, alert.at) for alert in raised] == [
        ("zone_enter", "zdepot", "Depot <b>", T0 + 1000),
        ("zone_exit", "zdepot", "Depot <b>", T0 + 3000),
    ]
    # Another engine (another process) given the same events: the same ids.
    again = RuleEngine()
    again.set_zones("alpha", [ZONE])
    assert [alert.id for alert in crossing(again)] == [alert.id for alert in raised]
    # A fix already seen (QoS 1 resend) changes nothing.
    assert engine.event("alpha", fix("w001", 1, 52.5), T0) == []


def test_state_saved_and_loaded_continues_where_it_was() -> None:
    engine = RuleEngine()
    engine.set_zones("alpha", [ZONE])
    engine.event("alpha", fix("w001", 0, 52.49), T0)
    engine.event("alpha", fix("w001", 1, 52.5), T0)
    saved = engine.take_changed()
    restored = RuleEngine()
    restored.set_zones("alpha", [ZONE])
    restored.load(saved)
    assert [alert.kind for alert in restored.event("alpha", fix("w001", 2, 52.49), T0)] == [
        "zone_exit"
    ]


def test_battery_low_once_until_recharged() -> None:
    engine = RuleEngine(default=TeamRules(battery_below=20))
    kinds = [alert.kind for seq, battery in enumerate((50, 19, 18, 22, 26, 10))
             for alert in engine.event("alpha", fix("w001", seq, 52.4, battery), T0)]
    assert kinds == ["battery_low", "battery_low"]


def test_offline_after_the_team_setting_once_per_spell() -> None:
    engine = RuleEngine({"alpha": TeamRules(offline_after_s=60)})
    engine.event("alpha", status("w001", "offline", T0), T0)
    assert engine.tick(T0 + 59_000) == []
    raised = engine.tick(T0 + 60_000)
    assert [(alert.kind, alert.at) for alert in raised] == [("offline", T0)]
    assert engine.tick(T0 + 120_000) == []
    engine.event("alpha", status("w001", "online", T0 + 200_000), T0)
    engine.event("alpha", status("w001", "offline", T0 + 300_000), T0)
    assert [alert.kind for alert in engine.tick(T0 + 360_000)] == ["offline"]


def test_idle_when_not_moving_and_never_when_off_duty() -> None:
    rules = TeamRules(idle_after_s=120, idle_radius_m=30, offline_after_s=60)
    engine = RuleEngine(default=rules)
    engine.event("alpha", status("w001", "online", T0), T0)
    engine.event("alpha", status("w002", "online", T0), T0)
    for seq in range(5):  # w001 stays within metres, w002 too but goes off duty
        engine.event("alpha", fix("w001", seq, 52.4 + seq * 1e-5), T0)
        engine.event("alpha", fix("w002", seq, 52.4 + seq * 1e-5), T0)
    engine.event("alpha", status("w002", "off_duty", T0 + 5000), T0)
    raised = engine.tick(T0 + 121_000)
    assert [(alert.kind, alert.worker) for alert in raised] == [("idle", "w001")]
    assert engine.tick(T0 + 999_000) == []  # once per stop; off duty: never offline either
    engine.event("alpha", fix("w001", 10, 52.41), T0)  # moved ~1 km
    assert [alert.kind for alert in engine.tick(T0 + 10_000 + 121_000)] == ["idle"]


def test_a_phones_transition_is_an_alert() -> None:
    engine = RuleEngine()
    event = {"w": "w001", "k": "e", "o": "b1", "rx": T0, "q": 1,
             "p": {"type": "transition", "event": "enter", "ts": T0, "rid": "r1",
                   "desc": "<img src=x onerror=alert(1)>"}}
    raised = engine.event("alpha", event, T0)
    assert [(alert.kind, alert.zone_name) for alert in raised] == [
        ("transition", "<img src=x onerror=alert(1)>")
    ]
    assert engine.event("alpha", event, T0)[0].id == raised[0].id
