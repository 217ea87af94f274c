"""The movement model: bounded speed and turns, always inside the box, reproducible."""

from __future__ import annotations

import math
import random

import pytest

from devices.movement import (
    CENTRAL_BERLIN,
    PROFILES,
    BoundingBox,
    Fix,
    MovementProfile,
    Mover,
    ProfileMix,
    bearing,
    heading_difference,
    move,
)

STEPS = 10_000


def _walk(profile: MovementProfile, seed: int, bbox: BoundingBox = CENTRAL_BERLIN) -> list[Fix]:
    mover = Mover(profile, bbox, random.Random(seed))
    step_rng = random.Random(seed + 1)
    return [mover.step(step_rng.uniform(0.9, 1.1)) for _ in range(STEPS)]


@pytest.mark.parametrize("profile", PROFILES.values(), ids=list(PROFILES))
def test_fixes_stay_valid_inside_the_box(profile: MovementProfile) -> None:
    box = CENTRAL_BERLIN
    for fix in _walk(profile, seed=7):
        assert all(math.isfinite(value) for value in (fix.lat, fix.lon, fix.speed, fix.heading))
        assert box.south <= fix.lat <= box.north
        assert box.west <= fix.lon <= box.east
        assert 0.0 <= fix.speed <= profile.max_speed
        assert 0.0 <= fix.heading <= 360.0
        assert 3.0 <= fix.acc <= 15.0
        assert 0.0 <= fix.battery <= 100.0


@pytest.mark.parametrize("profile", PROFILES.values(), ids=list(PROFILES))
def test_speed_and_heading_change_smoothly(profile: MovementProfile) -> None:
    mover = Mover(profile, CENTRAL_BERLIN, random.Random(3))
    step_rng = random.Random(4)
    stopped_steps = 0
    speeds = []
    for _ in range(STEPS):
        dt = step_rng.uniform(0.9, 1.1)
        heading, speed = mover.heading, mover.speed
        mover.step(dt)
        assert abs(heading_difference(heading, mover.heading)) <= profile.max_turn_rate * dt + 1e-9
        assert abs(mover.speed - speed) <= profile.max_acceleration * dt + 1e-9
        assert mover.speed <= profile.max_speed
        stopped_steps += mover.speed == 0.0
        speeds.append(mover.speed)
    # Workers do pause at stops, but spend most of their time moving at their profile's pace.
    assert 0 < stopped_steps < STEPS * 0.4
    moving = [speed for speed in speeds if speed > 0]
    assert profile.min_cruise_speed * 0.8 <= sum(moving) / len(moving) <= profile.max_speed


@pytest.mark.parametrize("profile", PROFILES.values(), ids=list(PROFILES))
def test_movement_covers_ground_but_keeps_away_from_a_small_box_edge(
    profile: MovementProfile,
) -> None:
    # About 1.1 km x 0.7 km: drivers reach the edge region all the time and must turn back.
    small = BoundingBox(52.50, 13.39, 52.51, 13.40)
    fixes = _walk(profile, seed=11, bbox=small)
    assert all(small.contains(fix.lat, fix.lon) for fix in fixes)
    # Steering, not the clamp that guards the box, keeps them inside: no fix sits on the edge.
    on_edge = [
        fix
        for fix in fixes
        if fix.lat in (small.south, small.north) or fix.lon in (small.west, small.east)
    ]
    assert on_edge == []
    latitudes = [fix.lat for fix in fixes]
    assert max(latitudes) - min(latitudes) > 0.003


def test_same_seed_same_path_other_seed_other_path() -> None:
    for profile in PROFILES.values():
        assert _walk(profile, seed=5)[-100:] == _walk(profile, seed=5)[-100:]
        assert _walk(profile, seed=5)[-1] != _walk(profile, seed=6)[-1]


def test_bad_time_steps_do_not_move_or_break_the_worker() -> None:
    mover = Mover(PROFILES["driving"], CENTRAL_BERLIN, random.Random(1))
    before = (mover.lat, mover.lon)
    for dt in (math.nan, math.inf, -1.0, 0.0):
        fix = mover.step(dt)
        assert (mover.lat, mover.lon) == before
        assert CENTRAL_BERLIN.contains(fix.lat, fix.lon)


def test_move_and_bearing_agree_with_local_geodesy() -> None:
    lat, lon = 52.52, 13.405
    north_lat, north_lon = move(lat, lon, 1000.0, 0.0)
    assert north_lon == lon
    assert north_lat - lat == pytest.approx(1000.0 / 111_320)
    east_lat, east_lon = move(lat, lon, 1000.0, 90.0)
    assert east_lat == pytest.approx(lat)
    assert (east_lon - lon) * 111_320 * math.cos(math.radians(lat)) == pytest.approx(1000.0)
    assert bearing(lat, lon, east_lat, east_lon) == pytest.approx(90.0)
    assert bearing(lat, lon, *move(lat, lon, 500.0, 225.0)) == pytest.approx(225.0)
    assert heading_difference(350.0, 10.0) == pytest.approx(20.0)
    assert heading_difference(10.0, 350.0) == pytest.approx(-20.0)


def test_profile_mix_assigns_exact_shares() -> None:
    profiles = ProfileMix().assign(10, random.Random(0))
    names = [profile.name for profile in profiles]
    assert (names.count("walking"), names.count("cycling"), names.count("driving")) == (5, 3, 2)
    assert ProfileMix.parse("driving=1") == ProfileMix(0.0, 0.0, 1.0)
    assert {p.name for p in ProfileMix.parse("driving=1").assign(4, random.Random(0))} == {
        "driving"
    }


@pytest.mark.parametrize(
    "text", ["1,2,3", "52.56,13.28,52.46,13.48", "a,b,c,d", "95,0,96,1", "52,13,53,nan"]
)
def test_bad_bounding_boxes_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        BoundingBox.parse(text)


@pytest.mark.parametrize("text", ["walking=-1", "running=5", "walking", "walking=0,driving=0"])
def test_bad_profile_mixes_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        ProfileMix.parse(text)
