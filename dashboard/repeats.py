"""Positions the live stream has shown already, so that none is shown twice.

MQTT QoS 1 is at-least-once, and every hop that retries can deliver a position again: a device
that resends after its broker went away before the PUBACK, a broker restarted from a snapshot
that still held messages it had since delivered, a bridge that died between storing a batch
and acknowledging it. The history keeps one row per (worker, ts, seq); the live stream drops
the repeats here, at the dashboard, once per batch for all the viewers of a team.

A position is a repeat when the same worker's same `seq` came with the same `ts` before. Per
worker this keeps the `ts` of the newest `WINDOW` sequence numbers (a ring indexed by `seq`,
their low 31 bits, which tell apart fixes up to 24 days apart): 1.3 KiB per worker, one dict
lookup and one array read per position. Within a device run `seq`
grows by one per message, so the window covers the last `WINDOW` positions of each worker
(four minutes at 1 Hz, 17 s at 15 Hz): longer than redeliveries take (a broker restored from a
snapshot redelivers what it held for a bridge stalled up to then: 8 s of positions in the fault
suite, which a window of 64 let through at 15 Hz). A `seq` older than the window cannot be told
apart and is shown; a `seq` that starts again below it with a newer `ts` is a new run of the
device, and the window starts again with it.
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Final

import orjson

from dashboard.checks import EventCheck
from teamtrack.backends import Batch

WINDOW: Final = 256
_EMPTY: Final = -1
_TS_BITS: Final = 0x7FFFFFFF


class _WorkerFixes:
    """The `ts` of one worker's newest `WINDOW` sequence numbers."""

    __slots__ = ("high", "newest_ts", "slots")

    def __init__(self) -> None:
        self.high = -1
        self.newest_ts = -1
        self.slots = array("i", [_EMPTY]) * WINDOW

    def seen(self, seq: int, ts: int) -> bool:
        """Whether (seq, ts) was seen already; records it if not."""
        slots = self.slots
        if seq > self.high:
            if seq - self.high >= WINDOW:
                self.slots = slots = array("i", [_EMPTY]) * WINDOW
            else:
                for skipped in range(self.high + 1, seq):
                    slots[skipped % WINDOW] = _EMPTY
            self.high = seq
        elif seq <= self.high - WINDOW:
            if ts <= self.newest_ts:
                return False  # older than the window: cannot tell, so it is shown
            # A newer fix under a much lower seq: the device started a new run.
            self.slots = slots = array("i", [_EMPTY]) * WINDOW
            self.high = seq
        index = seq % WINDOW
        stamp = ts & _TS_BITS
        if slots[index] == stamp:
            return True
        slots[index] = stamp
        if ts > self.newest_ts:
            self.newest_ts = ts
        return False


class RepeatFilter:
    """Drops the positions of a team's batches that were seen before (see the module), and,
    on the same decode, the events a bridge could not have written (`dashboard.checks`),
    counted by reason in `rejected`."""

    def __init__(self, rejected: Counter[str] | None = None) -> None:
        self._workers: dict[str, _WorkerFixes] = {}
        self._check = EventCheck()
        self.dropped = 0
        self.rejected: Counter[str] = rejected if rejected is not None else Counter()

    def seen(self, worker: str, seq: int, ts: int) -> bool:
        fixes = self._workers.get(worker)
        if fixes is None:
            fixes = self._workers[worker] = _WorkerFixes()
        return fixes.seen(seq, ts)

    def filter(self, batch: Batch) -> Batch | None:
        """`batch` itself when nothing in it was seen; else a copy without the repeats (the
        same cursor), or None when nothing is left."""
        raw = batch.raw
        try:
            events = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.rejected["bad_batch"] += 1
            return None
        if type(events) is not list:
            self.rejected["bad_batch"] += 1
            return None
        kept = []
        odd = self._check.odd
        rejected = 0
        for event in events:
            reason = odd(event)
            if reason is not None:
                self.rejected[reason] += 1
                rejected += 1
                continue
            if event["k"] == "p":
                position = event["p"]
                if self.seen(event["w"], position["seq"], position["ts"]):
                    continue
            kept.append(event)
        self.dropped += len(events) - len(kept) - rejected
        # Frames embed `raw` without its brackets: only a bare list is passed on as it is.
        if len(kept) == len(events) and raw[:1] == b"[" and raw[-1:] == b"]":
            return batch
        if not kept:
            return None
        return Batch(batch.team, batch.cursor, orjson.dumps(kept))
