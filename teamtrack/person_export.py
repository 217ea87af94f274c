"""Everything stored about one worker, as one zip archive (`teamtrack history export-person`).

    manifest.json       team, worker, when, what each file holds, row counts
    positions.geojson   every stored fix as a GeoJSON Point (`teamtrack.history_export`'s fields)
    positions.csv       the same fixes, the columns of the history's CSV export
    presence.csv        online/offline changes
    events.csv          worker events (region transitions), each the contract's JSON
    alerts.csv          alerts raised about the worker (zones, offline, battery, idle, ...)
    last-known.json     what the live backend holds now (newest position and presence), if reached
    erasures.csv        earlier erasures of this worker's data (counts only: no positions)

Written a page at a time (a worker's 90 days at one fix a second are millions of rows), into
a file only its owner may read, moved into place once complete.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from teamtrack.alerts import AlertStore
from teamtrack.backends import Snapshot
from teamtrack.history import HistoryStore, StoredPosition
from teamtrack.history_export import CSV_COLUMNS, iso_time
from teamtrack.history_privacy import (
    erasure_log,
    person_events,
    person_positions,
    person_presence,
)

ARCHIVE_FILES: dict[str, str] = {
    "positions.geojson": "every stored position (GeoJSON Points, WGS84)",
    "positions.csv": "every stored position (CSV)",
    "presence.csv": "online/offline changes",
    "events.csv": "worker events (region transitions)",
    "alerts.csv": "alerts raised about the worker, and who acknowledged them",
    "last-known.json": "the live backend's newest position and presence, if it was reached",
    "erasures.csv": "earlier erasures of this worker's data (counts, no positions)",
}


@dataclass
class ExportSummary:
    path: Path
    counts: dict[str, int] = field(default_factory=dict)


class _Runs:
    """Device runs across pages (`history_export.runs`): a new run where seq does not grow."""

    def __init__(self) -> None:
        self.run = 0
        self.previous: int | None = None

    def of(self, point: StoredPosition) -> int:
        if self.previous is not None and point.seq <= self.previous:
            self.run += 1
        self.previous = point.seq
        return self.run


def _csv_line(values: Sequence[Any]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(values)
    return buffer.getvalue().encode()


async def _write_positions(
    archive: zipfile.ZipFile, store: HistoryStore, team: str, worker: str
) -> int:
    """positions.csv, then positions.geojson: two reads of the history, as a zip archive
    takes one file at a time."""
    count = 0
    runs = _Runs()
    with archive.open("positions.csv", "w") as table:
        table.write(_csv_line(CSV_COLUMNS))
        async for page in person_positions(store, team, worker):
            for point in page:
                table.write(_csv_line((
                    team, worker, iso_time(point.ts), point.ts, point.seq, runs.of(point),
                    point.lat, point.lon,
                    *("" if value is None else value
                      for value in (point.acc, point.speed, point.heading, point.battery)),
                )))
                count += 1
    written = 0
    runs = _Runs()
    with archive.open("positions.geojson", "w") as geojson:
        geojson.write(b'{"type":"FeatureCollection","features":[')
        async for page in person_positions(store, team, worker):
            for point in page:
                properties = point.document()
                properties.update(team=team, time=iso_time(point.ts), run=runs.of(point))
                feature = {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [point.lon, point.lat]},
                    "properties": properties,
                }
                geojson.write((b"," if written else b"") + orjson.dumps(feature))
                written += 1
        geojson.write(b"]}")
    return count


async def _write_presence(
    archive: zipfile.ZipFile, store: HistoryStore, team: str, worker: str
) -> int:
    count = 0
    with archive.open("presence.csv", "w") as table:
        table.write(_csv_line(("team", "worker", "time", "ts", "status")))
        async for page in person_presence(store, team, worker):
            for change in page:
                table.write(_csv_line((team, worker, iso_time(change.ts), change.ts,
                                       change.status)))
                count += 1
    return count


async def _write_events(
    archive: zipfile.ZipFile, store: HistoryStore, team: str, worker: str
) -> int:
    count = 0
    with archive.open("events.csv", "w") as table:
        table.write(_csv_line(("team", "worker", "time", "ts", "event")))
        async for page in person_events(store, team, worker):
            for event in page:
                body = {key: value for key, value in event.items() if key != "worker"}
                ts = int(body.get("ts", 0))
                table.write(_csv_line((team, worker, iso_time(ts), ts,
                                       orjson.dumps(body).decode())))
                count += 1
    return count


async def _write_alerts(
    archive: zipfile.ZipFile, store: HistoryStore, team: str, worker: str
) -> int:
    found = await AlertStore(store.engine).worker_alerts(team, worker)
    with archive.open("alerts.csv", "w") as table:
        table.write(_csv_line(("team", "worker", "time", "at", "kind", "zone", "zone_name",
                               "detail", "acked_by", "acked_ms")))
        for alert in found:
            table.write(_csv_line((team, worker, iso_time(alert.at), alert.at, alert.kind,
                                   alert.zone or "", alert.zone_name or "", alert.detail,
                                   alert.acked_by or "", alert.acked_ms or "")))
    return len(found)


def _last_known_document(snapshot: Snapshot | None, worker: str) -> dict[str, Any]:
    if snapshot is None:
        return {"reached": False}
    position = snapshot.positions.get(worker)
    presence = snapshot.presence.get(worker)
    return {
        "reached": True,
        "position": orjson.loads(position.body) if position is not None else None,
        "presence": (
            {"status": presence.body.decode(), "ts": presence.ts}
            if presence is not None else None
        ),
    }


async def write_person_archive(
    out: Path, store: HistoryStore, team: str, worker: str, *, snapshot: Snapshot | None,
    exported_at_ms: int, retention: Mapping[str, Any],
) -> ExportSummary:
    """The archive at `out` (0600, replaced atomically); the rows written per file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    summary = ExportSummary(out)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "wb") as raw, zipfile.ZipFile(
            raw, "w", compression=zipfile.ZIP_DEFLATED
        ) as archive:
            summary.counts["positions"] = await _write_positions(archive, store, team, worker)
            summary.counts["presence"] = await _write_presence(archive, store, team, worker)
            summary.counts["events"] = await _write_events(archive, store, team, worker)
            summary.counts["alerts"] = await _write_alerts(archive, store, team, worker)
            last_known = _last_known_document(snapshot, worker)
            archive.writestr(
                "last-known.json", orjson.dumps(last_known, option=orjson.OPT_INDENT_2)
            )
            erasures = [row for row in await erasure_log(store, team) if row["worker"] == worker]
            summary.counts["erasures"] = len(erasures)
            archive.writestr("erasures.csv", _erasures_csv(erasures))
            archive.writestr("manifest.json", orjson.dumps({
                "team": team, "worker": worker, "exported_at": iso_time(exported_at_ms),
                "files": ARCHIVE_FILES, "counts": summary.counts, "retention": retention,
            }, option=orjson.OPT_INDENT_2))
        os.replace(temporary, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return summary


def _erasures_csv(rows: list[dict[str, Any]]) -> bytes:
    columns = ("time", "operator", "before", "positions", "presence", "events", "last_known")
    lines = [_csv_line(columns)]
    for row in rows:
        before = iso_time(row["before_ms"]) if row["before_ms"] is not None else ""
        last_known = "" if row["last_known"] is None else row["last_known"]
        lines.append(_csv_line((iso_time(row["at_ms"]), row["operator"], before,
                                row["positions"], row["presence"], row["events"], last_known)))
    return b"".join(lines)


def read_archive(path: Path) -> dict[str, bytes]:
    """The files of an archive (tests, and operators checking one)."""
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}
