"""Zone documents (GeoJSON Features): strict validation with clear errors, and containment."""

from __future__ import annotations

from typing import Any

import pytest

from teamtrack.zones import MAX_RING_POINTS, ZoneError, distance_m, parse_zone


def circle(lon: float = 13.4, lat: float = 52.5, radius: Any = 100.0, name: Any = "Depot"
           ) -> dict[str, Any]:
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [lon, lat]},
            "properties": {"name": name, "radius_m": radius}}


def square(name: str = "Yard", size: float = 0.01) -> dict[str, Any]:
    ring = [[13.4, 52.5], [13.4 + size, 52.5], [13.4 + size, 52.5 + size], [13.4, 52.5 + size],
            [13.4, 52.5]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"name": name}}


def test_a_circle_contains_what_is_within_its_radius() -> None:
    zone = parse_zone(circle(radius=100), "z1")
    assert zone.kind == "circle" and zone.name == "Depot"
    assert zone.contains(52.5, 13.4)
    assert zone.contains(52.5 + 0.0008, 13.4)  # ~89 m north
    assert not zone.contains(52.5 + 0.0010, 13.4)  # ~111 m north
    assert round(distance_m(52.5, 13.4, 52.501, 13.4)) == 111


def test_a_polygon_contains_its_inside_only() -> None:
    zone = parse_zone(square(), "z2")
    assert zone.contains(52.505, 13.405)
    assert not zone.contains(52.505, 13.395)
    assert not zone.contains(52.515, 13.405)
    feature = zone.feature()
    assert feature["properties"] == {"id": "z2", "name": "Yard"}
    assert parse_zone(feature, "z2") == zone


def test_the_server_id_wins_over_the_documents() -> None:
    document = circle()
    document["properties"]["id"] = "someone-elses"
    assert parse_zone(document, "z9").id == "z9"


@pytest.mark.parametrize(("document", "message"), [
    ([], "Feature"),
    ({"type": "FeatureCollection"}, "Feature"),
    (circle(name=""), "1 to 80"),
    (circle(name="x" * 81), "1 to 80"),
    (circle(name=5), "must be a string"),
    (circle(name="a\x00b"), "control"),
    (circle(radius=None), "radius_m"),
    (circle(radius=1), "between"),
    (circle(radius=10**7), "between"),
    (circle(radius=float("nan")), "radius_m"),
    (circle(radius=True), "radius_m"),
    (circle(lon=200), "out of range"),
    (circle(lat=-91), "out of range"),
    ({"type": "Feature", "geometry": {"type": "LineString", "coordinates": []},
      "properties": {"name": "x"}}, "Polygon"),
    ({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1],
                                                                          [0, 0]]]},
      "properties": {"name": "x"}}, "4 to"),
    ({"type": "Feature", "geometry": {"type": "Polygon",
                                      "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]},
      "properties": {"name": "x"}}, "closed"),
    ({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[0, 0], [1, 0], [1, 1], [0, 0]], [[0, 0], [1, 0], [1, 1], [0, 0]]]},
      "properties": {"name": "x"}}, "one ring"),
    ({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[0, index / 1000] for index in range(MAX_RING_POINTS)] + [[0, 0]]]},
      "properties": {"name": "x"}}, "4 to"),
    ({"type": "Feature", "geometry": None, "properties": {"name": "x"}}, "geometry"),
])
def test_bad_zones_are_refused_with_the_reason(document: Any, message: str) -> None:
    with pytest.raises(ZoneError, match=message):
        parse_zone(document, "z1")
