"""The JSON documents the dashboard sends: the team snapshot and the live WebSocket frames.

Device payloads are embedded byte for byte (they were validated by the bridge), so a frame of
a thousand events costs a few concatenations, not a thousand decodes and encodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from teamtrack.backends import Batch, Snapshot

EVENT_START = b'{"w":'
"""How every event object in `Batch.raw` begins (see `Event.to_json`); used to count events."""


def snapshot_document(snapshot: Snapshot) -> dict[str, Any]:
    """`{"team","cursor","workers":[...]}`, one entry per worker known by position or presence."""
    workers = []
    for worker in sorted(snapshot.positions.keys() | snapshot.presence.keys()):
        position = snapshot.positions.get(worker)
        presence = snapshot.presence.get(worker)
        # A worker that has said "online" but sent no fix yet is still worth listing.
        latest = position if position is not None else presence
        assert latest is not None
        workers.append(
            {
                "worker": worker,
                "position": orjson.Fragment(position.body) if position is not None else None,
                "received_ms": latest.received_ms,
                "origin": latest.origin,
                "status": presence.body.decode() if presence is not None else None,
                # Tells whether the presence is older than the last fix ("offline", then moved).
                "status_ms": presence.received_ms if presence is not None else None,
            }
        )
    return {"team": snapshot.team, "cursor": snapshot.cursor, "workers": workers}


def snapshot_json(snapshot: Snapshot) -> bytes:
    return orjson.dumps(snapshot_document(snapshot))


def snapshot_frame(snapshot: Snapshot, now_ms: int) -> str:
    document = {"type": "snapshot", **snapshot_document(snapshot), "now": now_ms}
    return orjson.dumps(document).decode()


def resume_frame(team: str, cursor: str, now_ms: int) -> str:
    """The first frame of a resumed connection: the view is kept, events after `cursor` follow."""
    return orjson.dumps({"type": "resume", "team": team, "cursor": cursor, "now": now_ms}).decode()


def sync_frame(team: str, cursor: str, events: Sequence[str], now_ms: int) -> str:
    """Latest event of each kind of each worker that changed, for a viewer that fell behind."""
    head = orjson.dumps({"type": "sync", "team": team, "cursor": cursor, "now": now_ms})
    return head[:-1].decode() + ',"events":[' + ",".join(events) + "]}"


def events_frame(team: str, batches: Sequence[Batch]) -> str:
    """One frame for consecutive batches of a team; `cursor` is the last batch's."""
    inner = b",".join(batch.raw[1:-1] for batch in batches if len(batch.raw) > 2)
    return (
        b'{"type":"events","team":' + orjson.dumps(team)
        + b',"cursor":' + orjson.dumps(batches[-1].cursor)
        + b',"events":[' + inner + b"]}"
    ).decode()


def gap_frame(team: str, cursor: str) -> str:
    return orjson.dumps({"type": "gap", "team": team, "cursor": cursor}).decode()


PONG_FRAME = '{"type":"pong"}'


def count_events(raw: bytes) -> int:
    return raw.count(EVENT_START)
