"""No position is shown twice: repeats of at-least-once delivery are dropped before viewers."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from backend_contract import position, status
from test_dashboard_hub import OpenBackend, OpenHub, backend_url, next_frame, open_backend, open_hub

from dashboard.repeats import WINDOW, RepeatFilter
from teamtrack.backends import Batch
from teamtrack.backends.base import encode_events

__all__ = ["backend_url", "open_backend", "open_hub"]  # the fixtures, shared


def test_a_repeat_is_seen_and_a_new_fix_is_not() -> None:
    repeats = RepeatFilter()
    assert not repeats.seen("w1", 5, 1000)
    assert repeats.seen("w1", 5, 1000)
    assert not repeats.seen("w2", 5, 1000)  # another worker
    assert not repeats.seen("w1", 7, 1020)
    assert not repeats.seen("w1", 6, 1010)  # late, but new: shown
    assert repeats.seen("w1", 6, 1010)
    assert not repeats.seen("w1", 5, 2000)  # same seq, another fix: another run of the device


def test_a_new_run_of_the_device_starts_the_window_again() -> None:
    repeats = RepeatFilter()
    for seq in range(WINDOW * 3):
        assert not repeats.seen("w1", seq, 1000 + seq)
    assert not repeats.seen("w1", 0, 5000)  # restarted device: seq 0, newer fix
    assert repeats.seen("w1", 0, 5000)
    assert not repeats.seen("w1", 1, 5001)
    # Older than the window of the first run: cannot be told apart, so it is shown.
    assert not repeats.seen("w1", 10, 1010)


def test_fixes_further_apart_than_the_stamps_tell_are_not_repeats() -> None:
    repeats = RepeatFilter()
    assert not repeats.seen("w1", 3, 1_795_000_000_000)
    assert repeats.seen("w1", 3, 1_795_000_000_000)
    assert not repeats.seen("w1", 3, 1_795_000_000_001)


def test_the_window_holds_the_newest_positions_of_each_worker() -> None:
    repeats = RepeatFilter()
    for seq in range(WINDOW * 3):
        repeats.seen("w1", seq, 1000 + seq)
    newest = WINDOW * 3 - 1
    assert all(repeats.seen("w1", seq, 1000 + seq) for seq in range(newest - WINDOW + 1, newest))


def test_a_batch_keeps_its_cursor_and_everything_but_the_repeats() -> None:
    repeats = RepeatFilter()
    first = Batch("alpha", "1-0", encode_events([position("alpha", "w1", 1, ts=1000)]))
    assert repeats.filter(first) is first
    again = [
        position("alpha", "w1", 1, ts=1000),
        status("alpha", "w1", "online"),
        position("alpha", "w1", 2, ts=1100),
    ]
    filtered = repeats.filter(Batch("alpha", "2-0", encode_events(again)))
    assert filtered is not None and filtered.cursor == "2-0"
    assert [(e["k"], e["p"] if e["k"] == "s" else e["p"]["seq"])
            for e in orjson.loads(filtered.raw)] == [("s", "online"), ("p", 2)]
    assert repeats.filter(Batch("alpha", "3-0", encode_events(again[:1]))) is None
    assert repeats.dropped == 2


async def test_a_position_delivered_twice_is_shown_once(
    open_backend: OpenBackend, open_hub: OpenHub
) -> None:
    """A bridge that stored a batch and died before acknowledging it, or a broker restored
    from a snapshot older than its deliveries, makes the backend hold a position twice."""
    backend = await open_backend()
    hub = await open_hub(backend)
    viewer = await hub.join("alpha")
    await next_frame(viewer)
    original = position("alpha", "w1", 7)
    await backend.publish([original, position("alpha", "w2", 3)])
    first = await next_frame(viewer)
    assert [e["p"]["seq"] for e in first["events"]] == [7, 3]
    await backend.publish([original])  # nothing but a repeat: no frame at all
    await backend.publish([original, position("alpha", "w1", 8)])
    second = await next_frame(viewer)
    assert [(e["w"], e["p"]["seq"]) for e in second["events"]] == [("w1", 8)]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(viewer.next_frame(), 0.3)
    dropped = hub.metrics.registry.get_sample_value(
        "teamtrack_dashboard_repeated_positions_total", {"team": "alpha"}
    )
    assert dropped == 2
