"""Zones: a team's circles and polygons, as GeoJSON Features, validated strictly.

A zone is a GeoJSON Feature whose geometry is a `Point` with `properties.radius_m` (a circle)
or a `Polygon` (its outer ring only; holes are refused). `properties.name` is free text for
people (shown with `textContent`, never as HTML), `properties.id` a slug given by the server.

Bounds: a name of 1..80 characters (no control characters), a radius of 5 m .. 100 km, a ring
of 4..500 points (closed: the last equals the first), coordinates finite and in range, a
document of at most `MAX_ZONE_BYTES`. Anything else is a `ZoneError` naming the problem.
"""

from __future__ import annotations

import itertools
import math
import secrets
from dataclasses import dataclass
from typing import Any, Final

from teamtrack.contract import is_slug

MAX_ZONE_BYTES: Final = 32 * 1024
MAX_NAME_CHARS: Final = 80
MIN_RADIUS_M: Final = 5.0
MAX_RADIUS_M: Final = 100_000.0
MIN_RING_POINTS: Final = 4
MAX_RING_POINTS: Final = 500
MAX_ZONES_PER_TEAM: Final = 200
EARTH_RADIUS_M: Final = 6_371_008.8


class ZoneError(ValueError):
    """A zone document that breaks a rule; the message says which, for a 4xx answer."""


@dataclass(frozen=True, slots=True)
class Zone:
    id: str
    name: str
    # A circle: center (lon, lat) and radius; a polygon: its closed ring of (lon, lat).
    center: tuple[float, float] | None = None
    radius_m: float | None = None
    ring: tuple[tuple[float, float], ...] = ()

    @property
    def kind(self) -> str:
        return "circle" if self.center is not None else "polygon"

    def contains(self, lat: float, lon: float) -> bool:
        if self.center is not None:
            assert self.radius_m is not None
            return distance_m(lat, lon, self.center[1], self.center[0]) <= self.radius_m
        return _in_ring(self.ring, lon, lat)

    def feature(self) -> dict[str, Any]:
        """The zone as the GeoJSON Feature the API returns."""
        properties: dict[str, Any] = {"id": self.id, "name": self.name}
        if self.center is not None:
            properties["radius_m"] = self.radius_m
            geometry: dict[str, Any] = {"type": "Point", "coordinates": list(self.center)}
        else:
            geometry = {"type": "Polygon", "coordinates": [[list(point) for point in self.ring]]}
        return {"type": "Feature", "geometry": geometry, "properties": properties}


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine) in metres."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi, dlambda = phi2 - phi1, math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def _in_ring(ring: tuple[tuple[float, float], ...], x: float, y: float) -> bool:
    """Even-odd ray casting on (lon, lat): fine for zones of a city's size."""
    inside = False
    for (x1, y1), (x2, y2) in itertools.pairwise(ring):
        if (y1 > y) != (y2 > y):
            cross = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            if x < cross:
                inside = not inside
    return inside


def new_zone_id() -> str:
    return "z" + secrets.token_hex(6)


def _coordinate(value: object, what: str) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise ZoneError(f"{what} must be [lon, lat]")
    lon, lat = value[0], value[1]
    for number, name, bound in ((lon, "longitude", 180.0), (lat, "latitude", 90.0)):
        if type(number) not in (int, float) or not math.isfinite(number):
            raise ZoneError(f"{what}: {name} must be a finite number")
        if not -bound <= number <= bound:
            raise ZoneError(f"{what}: {name} {number} out of range")
    return float(lon), float(lat)


def check_name(value: object) -> str:
    if type(value) is not str:
        raise ZoneError("properties.name must be a string")
    name = value.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise ZoneError(f"properties.name must have 1 to {MAX_NAME_CHARS} characters")
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise ZoneError("properties.name must not hold control characters")
    return name


def parse_zone(document: object, zone_id: str) -> Zone:
    """A zone from a decoded GeoJSON Feature (`zone_id` is the server's; a `properties.id` in
    the document is ignored, so a client cannot pick or overwrite another zone's id)."""
    if not is_slug(zone_id):
        raise ZoneError("zone id must be a slug")
    if type(document) is not dict or document.get("type") != "Feature":
        raise ZoneError('expected a GeoJSON object with "type": "Feature"')
    geometry, properties = document.get("geometry"), document.get("properties")
    if type(properties) is not dict:
        raise ZoneError("properties must be an object with a name")
    if type(geometry) is not dict:
        raise ZoneError("geometry must be an object")
    name = check_name(properties.get("name"))
    kind, coordinates = geometry.get("type"), geometry.get("coordinates")
    if kind == "Point":
        center = _coordinate(coordinates, "Point coordinates")
        radius: Any = properties.get("radius_m")
        if type(radius) not in (int, float) or not math.isfinite(radius):
            raise ZoneError("a circle (Point) needs properties.radius_m, a number of metres")
        if not MIN_RADIUS_M <= radius <= MAX_RADIUS_M:
            raise ZoneError(f"radius_m must be between {MIN_RADIUS_M:g} and {MAX_RADIUS_M:g}")
        return Zone(zone_id, name, center=center, radius_m=float(radius))
    if kind == "Polygon":
        if not isinstance(coordinates, list) or len(coordinates) != 1:
            raise ZoneError("a Polygon must have exactly one ring (holes are not supported)")
        ring = coordinates[0]
        if not isinstance(ring, list) or not MIN_RING_POINTS <= len(ring) <= MAX_RING_POINTS:
            raise ZoneError(
                f"a Polygon ring must have {MIN_RING_POINTS} to {MAX_RING_POINTS} points"
            )
        points = tuple(_coordinate(point, f"ring point {index}")
                       for index, point in enumerate(ring))
        if points[0] != points[-1]:
            raise ZoneError("a Polygon ring must be closed (last point equal to the first)")
        if len(set(points)) < 3:
            raise ZoneError("a Polygon ring needs at least 3 distinct points")
        return Zone(zone_id, name, ring=points)
    raise ZoneError('geometry.type must be "Point" (with properties.radius_m) or "Polygon"')
