"""Track exports read back with real parsers (gpxpy, json, csv); summaries on known tracks."""

from __future__ import annotations

import csv
import io
import json

import gpxpy
import pytest

from teamtrack.history import StoredPosition
from teamtrack.history_export import (
    CSV_COLUMNS,
    ExportFormat,
    export,
    haversine_m,
    iso_time,
    summarize,
)

T0 = 1_795_000_000_000


def fix(seq: int, ts: int, lat: float, lon: float, speed: float | None = None) -> StoredPosition:
    return StoredPosition("alpha", "w1", ts, seq, lat, lon, 4.0, speed, None, 80.0)


# Along a meridian, 0.001 degree of latitude is 111.195 m on the mean-radius sphere.
STEP_M = haversine_m(0.0, 0.0, 0.001, 0.0)
TRACK = [
    fix(0, T0, 52.000, 13.0, speed=1.0),
    fix(1, T0 + 10_000, 52.001, 13.0, speed=12.5),
    fix(2, T0 + 20_000, 52.002, 13.0),
    # The device restarted: seq begins again at 0.
    fix(0, T0 + 80_000, 52.003, 13.0),
    fix(1, T0 + 90_000, 52.004, 13.0),
]


def test_haversine_matches_known_distances() -> None:
    assert pytest.approx(111.195, abs=0.001) == STEP_M
    # Berlin Brandenburg Gate to Paris Eiffel Tower: about 878 km.
    assert haversine_m(52.5163, 13.3777, 48.8584, 2.2945) == pytest.approx(878_000, rel=0.005)


def test_summary_distance_duration_speeds_and_runs() -> None:
    summary = summarize(TRACK)
    assert summary.points == 5
    assert summary.runs == 2
    assert summary.duration_s == 90.0
    assert summary.distance_m == pytest.approx(4 * STEP_M, rel=1e-6)
    assert summary.max_speed_mps == 12.5
    assert summary.max_segment_speed_mps == pytest.approx(STEP_M / 10, rel=1e-3)
    empty = summarize([])
    assert (empty.points, empty.distance_m, empty.max_speed_mps) == (0, 0.0, None)


def test_gpx_parses_with_one_segment_per_run() -> None:
    parsed = gpxpy.parse(export(ExportFormat.GPX, "alpha", "w1", TRACK).decode())
    assert len(parsed.tracks) == 1
    segments = parsed.tracks[0].segments
    assert [len(segment.points) for segment in segments] == [3, 2]
    first = segments[0].points[0]
    assert (first.latitude, first.longitude) == (52.0, 13.0)
    assert first.time is not None and int(first.time.timestamp() * 1000) == T0
    assert parsed.length_2d() == pytest.approx(3 * STEP_M, rel=0.01)  # within segments


def test_geojson_has_a_line_and_every_point() -> None:
    document = json.loads(export(ExportFormat.GEOJSON, "alpha", "w1", TRACK))
    assert document["type"] == "FeatureCollection"
    line, *points = document["features"]
    assert line["geometry"]["type"] == "LineString"
    assert line["geometry"]["coordinates"][0] == [13.0, 52.0]  # GeoJSON is lon, lat
    assert line["properties"]["distance_m"] == pytest.approx(4 * STEP_M, rel=1e-6)
    assert [p["geometry"]["type"] for p in points] == ["Point"] * 5
    assert [p["properties"]["run"] for p in points] == [0, 0, 0, 1, 1]
    assert points[0]["properties"]["time"] == iso_time(T0)
    single = json.loads(export(ExportFormat.GEOJSON, "alpha", "w1", TRACK[:1]))
    assert [f["geometry"]["type"] for f in single["features"]] == ["Point"]


def test_csv_has_a_header_and_a_row_per_fix() -> None:
    text = export(ExportFormat.CSV, "alpha", "w1", TRACK).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [int(row["seq"]) for row in rows] == [0, 1, 2, 0, 1]
    assert [int(row["run"]) for row in rows] == [0, 0, 0, 1, 1]
    assert float(rows[1]["speed"]) == 12.5 and rows[2]["speed"] == ""
    assert rows[0]["time"] == "2026-11-18T11:06:40.000Z" == iso_time(T0)
