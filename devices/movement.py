"""How a simulated worker moves through a city: smooth headings, bounded speeds, stops.

Each worker follows a street-like pattern: it holds a desired heading for a while (a street),
then picks a new one (a corner) and turns towards it at a bounded rate, so consecutive headings
never jump. It cruises at a speed drawn from its profile, changes speed with bounded
acceleration, and now and then slows down to a stop (a delivery, a traffic light), waits a few
seconds and goes on. Near the edge of the bounding box it steers back towards the centre.

Everything random comes from the worker's own `random.Random`, so a run is reproducible from a
seed whatever order the scheduler happens to step workers in.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Final

METRES_PER_DEGREE_LAT: Final = 111_320.0
# Above this latitude the equirectangular step (1 / cos(lat)) stops being a good approximation.
MAX_ABS_LATITUDE: Final = 85.0
ACCURACY_RANGE_M: Final = (3.0, 15.0)
# A full battery lasts between 8 and 14 hours of tracking.
BATTERY_DRAIN_PER_SECOND: Final = (100.0 / (14 * 3600), 100.0 / (8 * 3600))
# Steering back starts this far from an edge (or at a fifth of the box, if the box is small).
EDGE_MARGIN_M: Final = 400.0
# Workers of one team start around a common base, as teams work a district.
TEAM_START_RADIUS_M: Final = 1500.0


@dataclass(frozen=True, slots=True)
class BoundingBox:
    """The area workers move in, in WGS84 degrees; it does not cross the antimeridian."""

    south: float
    west: float
    north: float
    east: float

    def __post_init__(self) -> None:
        values = (self.south, self.west, self.north, self.east)
        if not all(math.isfinite(value) for value in values):
            raise ValueError("bounding box values must be finite numbers")
        if not -MAX_ABS_LATITUDE <= self.south < self.north <= MAX_ABS_LATITUDE:
            raise ValueError(
                f"bounding box needs -{MAX_ABS_LATITUDE} <= south < north <= {MAX_ABS_LATITUDE}"
            )
        if not -180.0 <= self.west < self.east <= 180.0:
            raise ValueError("bounding box needs -180 <= west < east <= 180")

    @classmethod
    def parse(cls, text: str) -> BoundingBox:
        """Parse `south,west,north,east`."""
        parts = [part.strip() for part in text.split(",")]
        if len(parts) != 4:
            raise ValueError(f"bbox {text!r} must be south,west,north,east")
        try:
            south, west, north, east = (float(part) for part in parts)
        except ValueError:
            raise ValueError(f"bbox {text!r} must be four numbers") from None
        return cls(south, west, north, east)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.south + self.north) / 2, (self.west + self.east) / 2

    def contains(self, lat: float, lon: float) -> bool:
        return self.south <= lat <= self.north and self.west <= lon <= self.east

    def clamp(self, lat: float, lon: float) -> tuple[float, float]:
        return min(max(lat, self.south), self.north), min(max(lon, self.west), self.east)

    def height_m(self) -> float:
        return (self.north - self.south) * METRES_PER_DEGREE_LAT

    def width_m(self) -> float:
        lat = math.radians(max(abs(self.south), abs(self.north)))
        return (self.east - self.west) * METRES_PER_DEGREE_LAT * math.cos(lat)

    def __str__(self) -> str:
        return f"{self.south},{self.west},{self.north},{self.east}"


CENTRAL_BERLIN: Final = BoundingBox(52.46, 13.28, 52.56, 13.48)


@dataclass(frozen=True, slots=True)
class MovementProfile:
    """How one kind of worker moves; speeds in m/s, turn rate in degrees per second."""

    name: str
    min_cruise_speed: float
    max_speed: float
    max_acceleration: float
    max_turn_rate: float
    mean_seconds_per_street: float
    mean_seconds_between_stops: float
    stop_seconds: tuple[float, float]


WALKING: Final = MovementProfile(
    name="walking",
    min_cruise_speed=1.0,
    max_speed=1.8,
    max_acceleration=0.5,
    max_turn_rate=45.0,
    mean_seconds_per_street=90.0,
    mean_seconds_between_stops=180.0,
    stop_seconds=(5.0, 40.0),
)
CYCLING: Final = MovementProfile(
    name="cycling",
    min_cruise_speed=3.0,
    max_speed=7.0,
    max_acceleration=1.0,
    max_turn_rate=30.0,
    mean_seconds_per_street=60.0,
    mean_seconds_between_stops=120.0,
    stop_seconds=(5.0, 30.0),
)
DRIVING: Final = MovementProfile(
    name="driving",
    min_cruise_speed=5.0,
    max_speed=14.0,
    max_acceleration=2.0,
    max_turn_rate=20.0,
    mean_seconds_per_street=45.0,
    mean_seconds_between_stops=60.0,
    stop_seconds=(10.0, 45.0),
)
PROFILES: Final = {profile.name: profile for profile in (WALKING, CYCLING, DRIVING)}


@dataclass(frozen=True, slots=True)
class ProfileMix:
    """Shares of workers per profile, in percent or any other relative weights."""

    walking: float = 50.0
    cycling: float = 30.0
    driving: float = 20.0

    def __post_init__(self) -> None:
        weights = (self.walking, self.cycling, self.driving)
        if any(not math.isfinite(weight) or weight < 0 for weight in weights):
            raise ValueError("profile shares must be finite and not negative")
        if sum(weights) <= 0:
            raise ValueError("at least one profile share must be positive")

    @classmethod
    def parse(cls, text: str) -> ProfileMix:
        """Parse `walking=50,cycling=30,driving=20`; a profile left out gets share 0."""
        shares = dict.fromkeys(PROFILES, 0.0)
        for item in text.split(","):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in shares:
                raise ValueError(f"mix item {item.strip()!r} must be one of {', '.join(shares)}=N")
            try:
                shares[name] = float(value)
            except ValueError:
                raise ValueError(f"mix share {value.strip()!r} is not a number") from None
        return cls(**shares)

    def assign(self, count: int, rng: random.Random) -> list[MovementProfile]:
        """Profiles for `count` workers: exact shares (largest remainder), shuffled."""
        weights = {"walking": self.walking, "cycling": self.cycling, "driving": self.driving}
        total = sum(weights.values())
        exact = {name: count * weight / total for name, weight in weights.items()}
        counts = {name: math.floor(value) for name, value in exact.items()}
        by_remainder = sorted(exact, key=lambda name: exact[name] - counts[name], reverse=True)
        for name in by_remainder[: count - sum(counts.values())]:
            counts[name] += 1
        profiles = [PROFILES[name] for name, number in counts.items() for _ in range(number)]
        rng.shuffle(profiles)
        return profiles

    def __str__(self) -> str:
        return f"walking={self.walking:g},cycling={self.cycling:g},driving={self.driving:g}"


def move(lat: float, lon: float, distance_m: float, heading_deg: float) -> tuple[float, float]:
    """The point `distance_m` metres from (lat, lon) on `heading_deg` (local equirectangular).

    At city scale (a few km, away from the poles) the error is far below GPS accuracy.
    """
    heading = math.radians(heading_deg)
    dlat = distance_m * math.cos(heading) / METRES_PER_DEGREE_LAT
    dlon = distance_m * math.sin(heading) / (METRES_PER_DEGREE_LAT * math.cos(math.radians(lat)))
    return lat + dlat, lon + dlon


def bearing(from_lat: float, from_lon: float, to_lat: float, to_lon: float) -> float:
    """Initial heading in degrees [0, 360) from one point to another (local equirectangular)."""
    north = to_lat - from_lat
    east = (to_lon - from_lon) * math.cos(math.radians(from_lat))
    return math.degrees(math.atan2(east, north)) % 360.0


def heading_difference(from_deg: float, to_deg: float) -> float:
    """The signed smallest turn in degrees (-180, 180] that takes one heading to the other."""
    difference = (to_deg - from_deg) % 360.0
    return difference - 360.0 if difference > 180.0 else difference


@dataclass(frozen=True, slots=True)
class Fix:
    """One position report, rounded for the wire and always valid under the contract."""

    lat: float
    lon: float
    speed: float
    heading: float
    acc: float
    battery: float


def _round_inside(value: float, low: float, high: float, digits: int) -> float:
    rounded = round(value, digits)
    return rounded if low <= rounded <= high else min(max(value, low), high)


class Mover:
    """The state of one worker moving inside a bounding box; `step(dt)` advances it."""

    __slots__ = (
        "_acc",
        "_battery",
        "_battery_drain",
        "_clock",
        "_desired_heading",
        "_edge_margin_m",
        "_paused_until",
        "_rng",
        "_steering_home",
        "_stopping",
        "_target_speed",
        "bbox",
        "heading",
        "lat",
        "lon",
        "profile",
        "speed",
    )

    def __init__(
        self,
        profile: MovementProfile,
        bbox: BoundingBox,
        rng: random.Random,
        start: tuple[float, float] | None = None,
    ) -> None:
        self.profile = profile
        self.bbox = bbox
        self._rng = rng
        self._edge_margin_m = min(EDGE_MARGIN_M, bbox.height_m() / 5, bbox.width_m() / 5)
        if start is None:
            start = (rng.uniform(bbox.south, bbox.north), rng.uniform(bbox.west, bbox.east))
        self.lat, self.lon = bbox.clamp(*start)
        self.heading = rng.uniform(0.0, 360.0)
        self._desired_heading = self.heading
        self._target_speed = self._cruise_speed()
        self.speed = self._target_speed
        self._stopping = False
        self._paused_until = 0.0
        self._steering_home = False
        self._clock = 0.0
        self._acc = rng.uniform(4.0, 8.0)
        self._battery = rng.uniform(60.0, 100.0)
        self._battery_drain = rng.uniform(*BATTERY_DRAIN_PER_SECOND)

    def _cruise_speed(self) -> float:
        return self._rng.uniform(self.profile.min_cruise_speed, self.profile.max_speed)

    def _happens(self, mean_seconds: float, dt: float) -> bool:
        """Whether an event with this mean spacing (a Poisson process) happens within `dt`."""
        return self._rng.random() < 1.0 - math.exp(-dt / mean_seconds)

    def _distance_to_edge_m(self) -> float:
        box = self.bbox
        metres_per_degree_lon = METRES_PER_DEGREE_LAT * math.cos(math.radians(self.lat))
        return min(
            (self.lat - box.south) * METRES_PER_DEGREE_LAT,
            (box.north - self.lat) * METRES_PER_DEGREE_LAT,
            (self.lon - box.west) * metres_per_degree_lon,
            (box.east - self.lon) * metres_per_degree_lon,
        )

    def _update_speed(self, dt: float) -> None:
        profile = self.profile
        if self._paused_until > self._clock:
            return
        if self._stopping and self.speed == 0.0:
            self._stopping = False
            self._paused_until = self._clock + self._rng.uniform(*profile.stop_seconds)
            return
        if not self._stopping:
            if self._paused_until > 0.0:
                self._paused_until = 0.0
                self._target_speed = self._cruise_speed()
            elif self._happens(profile.mean_seconds_between_stops, dt):
                self._stopping = True
                self._target_speed = 0.0
            elif self._happens(20.0, dt):
                self._target_speed = self._cruise_speed()
        change = self._target_speed - self.speed
        limit = profile.max_acceleration * dt
        self.speed = min(max(self.speed + min(max(change, -limit), limit), 0.0), profile.max_speed)

    def _update_heading(self, dt: float) -> None:
        distance_to_edge = self._distance_to_edge_m()
        if distance_to_edge < self._edge_margin_m:
            self._steering_home = True
        elif self._steering_home and distance_to_edge > 1.5 * self._edge_margin_m:
            self._steering_home = False
        if self._steering_home:
            self._desired_heading = bearing(self.lat, self.lon, *self.bbox.centre)
        elif self._happens(self.profile.mean_seconds_per_street, dt):
            # Mostly corners of a street grid, sometimes a bend or a U-turn.
            turn = self._rng.choice((-90.0, 90.0, -90.0, 90.0, -45.0, 45.0, 180.0))
            self._desired_heading = (self.heading + turn + self._rng.gauss(0.0, 10.0)) % 360.0
        else:
            # Streets are not ruler-straight.
            self._desired_heading = (self._desired_heading + self._rng.gauss(0.0, 0.5)) % 360.0
        turn = heading_difference(self.heading, self._desired_heading)
        limit = self.profile.max_turn_rate * dt
        self.heading = (self.heading + min(max(turn, -limit), limit)) % 360.0

    def step(self, dt: float) -> Fix:
        """Advance by `dt` seconds (negative or non-finite counts as 0) and report a fix."""
        if not math.isfinite(dt) or dt < 0.0:
            dt = 0.0
        self._clock += dt
        previous_speed = self.speed
        self._update_speed(dt)
        self._update_heading(dt)
        distance = (previous_speed + self.speed) / 2.0 * dt
        lat, lon = move(self.lat, self.lon, distance, self.heading)
        self.lat, self.lon = self.bbox.clamp(lat, lon)
        low_acc, high_acc = ACCURACY_RANGE_M
        self._acc = min(
            max(self._acc + self._rng.gauss(0.0, 0.5) * math.sqrt(dt), low_acc), high_acc
        )
        self._battery = max(self._battery - self._battery_drain * dt, 0.0)
        box = self.bbox
        return Fix(
            lat=_round_inside(self.lat, box.south, box.north, 6),
            lon=_round_inside(self.lon, box.west, box.east, 6),
            speed=_round_inside(self.speed, 0.0, self.profile.max_speed, 2),
            heading=round(self.heading, 1) % 360.0,
            acc=round(self._acc, 1),
            battery=round(self._battery, 1),
        )


def team_base(bbox: BoundingBox, rng: random.Random) -> tuple[float, float]:
    """A random point well inside the box where a team's workers start."""
    lat_margin = (bbox.north - bbox.south) / 5
    lon_margin = (bbox.east - bbox.west) / 5
    return (
        rng.uniform(bbox.south + lat_margin, bbox.north - lat_margin),
        rng.uniform(bbox.west + lon_margin, bbox.east - lon_margin),
    )


def start_near(
    base: tuple[float, float], bbox: BoundingBox, rng: random.Random
) -> tuple[float, float]:
    """A start point within `TEAM_START_RADIUS_M` of a team base, inside the box."""
    distance = TEAM_START_RADIUS_M * math.sqrt(rng.random())
    return bbox.clamp(*move(base[0], base[1], distance, rng.uniform(0.0, 360.0)))
