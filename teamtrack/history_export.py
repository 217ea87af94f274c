"""A worker's track as GeoJSON, CSV or GPX, and its summary (distance, duration, max speed).

Input: positions ordered by fix time then seq (what `HistoryStore.whole_track` returns).
Device runs are recovered here: a run starts where seq does not increase (the device restarted
and began again at 0); GPX gets one track segment per run, CSV and GeoJSON a `run` number.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final
from xml.sax.saxutils import escape, quoteattr

import orjson

from teamtrack.history import StoredPosition

EARTH_RADIUS_M: Final = 6_371_008.8
MIN_SEGMENT_SECONDS: Final = 1.0
"""Fixes closer in time than this are left out of the computed speed: GPS jitter over a few
milliseconds would read as absurd speeds."""

CSV_COLUMNS: Final = (
    "team", "worker", "time", "ts", "seq", "run", "lat", "lon", "acc", "speed", "heading",
    "battery",
)


class ExportFormat(StrEnum):
    GEOJSON = "geojson"
    CSV = "csv"
    GPX = "gpx"

    @property
    def media_type(self) -> str:
        return _MEDIA_TYPES[self]

    @property
    def extension(self) -> str:
        return self.value


_MEDIA_TYPES: Final = {
    ExportFormat.GEOJSON: "application/geo+json",
    ExportFormat.CSV: "text/csv; charset=utf-8",
    ExportFormat.GPX: "application/gpx+xml",
}


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres on a spherical Earth of the mean radius."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    half_dphi = (phi2 - phi1) / 2
    half_dlambda = math.radians(lon2 - lon1) / 2
    a = math.sin(half_dphi) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(half_dlambda) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def runs(points: Sequence[StoredPosition]) -> list[int]:
    """The device run (0, 1, ...) of each point: a new one wherever seq does not increase."""
    numbers: list[int] = []
    run = 0
    previous: StoredPosition | None = None
    for point in points:
        if previous is not None and point.seq <= previous.seq:
            run += 1
        numbers.append(run)
        previous = point
    return numbers


@dataclass(frozen=True, slots=True)
class TrackSummary:
    points: int
    runs: int
    started_ms: int | None
    ended_ms: int | None
    duration_s: float
    distance_m: float
    max_speed_mps: float | None
    """The highest speed the device reported (its `speed` field); None if it never did."""
    max_segment_speed_mps: float | None
    """The highest speed between consecutive fixes at least `MIN_SEGMENT_SECONDS` apart."""

    def document(self) -> dict[str, Any]:
        return asdict(self)


def summarize(points: Sequence[StoredPosition]) -> TrackSummary:
    """Distance is the sum of straight (great-circle) lines between consecutive fixes, across
    device runs too: a restart does not move the worker. Duration is last fix minus first."""
    distance = 0.0
    max_segment: float | None = None
    for before, after in itertools.pairwise(points):
        step = haversine_m(before.lat, before.lon, after.lat, after.lon)
        distance += step
        seconds = (after.ts - before.ts) / 1000
        if seconds >= MIN_SEGMENT_SECONDS:
            speed = step / seconds
            max_segment = speed if max_segment is None else max(max_segment, speed)
    reported = [point.speed for point in points if point.speed is not None]
    run_numbers = runs(points)
    return TrackSummary(
        points=len(points),
        runs=run_numbers[-1] + 1 if run_numbers else 0,
        started_ms=points[0].ts if points else None,
        ended_ms=points[-1].ts if points else None,
        duration_s=(points[-1].ts - points[0].ts) / 1000 if points else 0.0,
        distance_m=round(distance, 3),
        max_speed_mps=max(reported) if reported else None,
        max_segment_speed_mps=round(max_segment, 3) if max_segment is not None else None,
    )


def iso_time(ts_ms: int) -> str:
    """Epoch ms as ISO-8601 UTC with milliseconds: 2026-11-28T10:40:00.123Z."""
    moment = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def to_geojson(team: str, worker: str, points: Sequence[StoredPosition]) -> bytes:
    """A FeatureCollection: the track as a LineString (when it has two points or more, as
    GeoJSON requires) carrying the summary, then every fix as a Point with its fields."""
    features: list[dict[str, Any]] = []
    if len(points) >= 2:
        features.append({
            "type": "Feature",
            "geometry": {
                "type": "LineString",
                "coordinates": [[point.lon, point.lat] for point in points],
            },
            "properties": {"team": team, "worker": worker, **summarize(points).document()},
        })
    for point, run in zip(points, runs(points), strict=True):
        properties = point.document()
        properties.update(team=team, time=iso_time(point.ts), run=run)
        features.append({
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [point.lon, point.lat]},
            "properties": properties,
        })
    return orjson.dumps({"type": "FeatureCollection", "features": features})


def to_csv(team: str, worker: str, points: Sequence[StoredPosition]) -> bytes:
    """One header line, then one line per fix; empty cells for fields the device left out."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for point, run in zip(points, runs(points), strict=True):
        writer.writerow((
            team, worker, iso_time(point.ts), point.ts, point.seq, run, point.lat, point.lon,
            *("" if value is None else value
              for value in (point.acc, point.speed, point.heading, point.battery)),
        ))
    return buffer.getvalue().encode()


def _gpx_lines(team: str, worker: str, points: Sequence[StoredPosition]) -> Iterator[str]:
    name = escape(f"{team}/{worker}")
    yield '<?xml version="1.0" encoding="UTF-8"?>'
    yield (
        '<gpx version="1.1" creator="teamtrack" xmlns="http://www.topografix.com/GPX/1/1">'
    )
    yield f"<metadata><name>{name}</name></metadata>"
    yield f"<trk><name>{name}</name>"
    current_run: int | None = None
    for point, run in zip(points, runs(points), strict=True):
        if run != current_run:
            if current_run is not None:
                yield "</trkseg>"
            yield "<trkseg>"
            current_run = run
        yield (
            f"<trkpt lat={quoteattr(repr(point.lat))} lon={quoteattr(repr(point.lon))}>"
            f"<time>{iso_time(point.ts)}</time></trkpt>"
        )
    if current_run is not None:
        yield "</trkseg>"
    yield "</trk>"
    yield "</gpx>"


def to_gpx(team: str, worker: str, points: Sequence[StoredPosition]) -> bytes:
    """GPX 1.1: one track, one segment per device run."""
    return ("\n".join(_gpx_lines(team, worker, points)) + "\n").encode()


def export(
    export_format: ExportFormat, team: str, worker: str, points: Sequence[StoredPosition]
) -> bytes:
    writers = {
        ExportFormat.GEOJSON: to_geojson,
        ExportFormat.CSV: to_csv,
        ExportFormat.GPX: to_gpx,
    }
    return writers[export_format](team, worker, points)


__all__ = [
    "CSV_COLUMNS",
    "ExportFormat",
    "TrackSummary",
    "export",
    "haversine_m",
    "iso_time",
    "runs",
    "summarize",
    "to_csv",
    "to_geojson",
    "to_gpx",
]
