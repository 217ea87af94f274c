"""The JSON documents the dashboard sends: the team snapshot and the live frames (WebSocket
messages, SSE events).

Device payloads are embedded byte for byte (they were validated by the bridge), so a frame of
a thousand events costs a few concatenations, not a thousand decodes and encodes.

Every frame built here begins `{"type":…,"team":…,"cursor":…` (but `pong`, which is only
`{"type":"pong"}`), so `frame_head` can read those two without parsing the rest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

import orjson

from teamtrack.backends import Batch, Snapshot
from teamtrack.contract import NOTICE_ORIGIN

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


def notice_frames(team: str, batch: Batch) -> list[str]:
    """The `alert`, `alert_ack` and `zones` frames of a batch of the rules service's notices
    (checked by `dashboard.checks` on the way in; see `teamtrack.alerts`)."""
    frames = []
    for event in orjson.loads(batch.raw):
        body = event["p"]
        kind = body["type"]
        head: dict[str, Any] = {"type": kind, "team": team, "cursor": batch.cursor}
        if kind == "alert":
            head["alert"] = body["alert"]
        elif kind == "alert_ack":
            head.update(id=body["id"], by=body["by"], at=body["ts"])
        frames.append(orjson.dumps(head).decode())
    return frames


def live_frames(team: str, batches: Sequence[Batch]) -> list[str]:
    """`events` frames for runs of device batches, notice frames for the rules service's
    batches, in log order."""
    frames: list[str] = []
    run: list[Batch] = []
    for batch in batches:
        if batch.all_from(NOTICE_ORIGIN):
            if run:
                frames.append(events_frame(team, run))
                run = []
            frames += notice_frames(team, batch)
        else:
            run.append(batch)
    if run:
        frames.append(events_frame(team, run))
    return frames


def gap_frame(team: str, cursor: str) -> str:
    return orjson.dumps({"type": "gap", "team": team, "cursor": cursor}).decode()


PONG_FRAME = '{"type":"pong"}'


def close_frame(code: int, reason: str) -> str:
    """The last event of an SSE stream the server ends: the WebSocket's close code and reason."""
    return orjson.dumps({"type": "close", "code": code, "reason": reason}).decode()


_TYPE_PREFIX: Final = '{"type":"'
_CURSOR_KEY: Final = ',"cursor":'
# The cursor key comes after a type word and a team slug (64 characters at most).
_HEAD_CHARS: Final = 128
_DECODER: Final = json.JSONDecoder()


def frame_head(frame: str) -> tuple[str, str | None]:
    """The `type` and `cursor` (None for a pong) of a frame built here, read from its first
    characters: a frame may be 512 KiB, and only its head is needed to label it."""
    if not frame.startswith(_TYPE_PREFIX):
        raise ValueError("not a frame of dashboard.frames")
    kind = frame[len(_TYPE_PREFIX) : frame.index('"', len(_TYPE_PREFIX))]
    start = frame.find(_CURSOR_KEY, 0, _HEAD_CHARS)
    if start < 0:
        return kind, None
    cursor, _ = _DECODER.raw_decode(frame, start + len(_CURSOR_KEY))
    return kind, cursor if isinstance(cursor, str) else None


def count_events(raw: bytes) -> int:
    return raw.count(EVENT_START)
