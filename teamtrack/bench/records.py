"""Per-message records that generators and receivers keep, and the files they hand over.

A message is identified by its worker (a run-wide index) and its `seq`; the pair is packed into
one 64-bit key. Each record is that key and a time in nanoseconds of `time.monotonic_ns()`:
CLOCK_MONOTONIC is one clock for every process of a Linux machine, and unlike the wall clock it
never jumps when NTP corrects the time. Generators record when they published a message,
receivers when they got it; joining the two after a step gives exact latencies without putting
anything into the payload that the message contract does not allow.

A record file is the records as native 64-bit integers, key and time alternating.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Final

SEQ_BITS: Final = 32
SEQ_MASK: Final = (1 << SEQ_BITS) - 1
MAX_WORKER_INDEX: Final = (1 << 31) - 1


def message_key(worker_index: int, seq: int) -> int:
    """One 64-bit number for (worker, seq)."""
    return (worker_index << SEQ_BITS) | (seq & SEQ_MASK)


def split_key(key: int) -> tuple[int, int]:
    """(worker index, seq) of a key."""
    return key >> SEQ_BITS, key & SEQ_MASK


class RecordLog:
    """Records appended in memory, written out and cleared at the end of each step."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values = array("q")

    def __len__(self) -> int:
        return len(self._values) // 2

    def add(self, key: int, time_ns: int) -> None:
        values = self._values
        values.append(key)
        values.append(time_ns)

    def write(self, path: Path) -> int:
        """Write the records to `path`, clear them, and return how many there were."""
        count = len(self)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            self._values.tofile(handle)
        self._values = array("q")
        return count


def read_records(path: Path) -> tuple[array[int], array[int]]:
    """(keys, times) of a record file."""
    values = array("q")
    size = path.stat().st_size
    with path.open("rb") as handle:
        values.fromfile(handle, size // values.itemsize)
    return values[0::2], values[1::2]


def iter_records(paths: list[Path]) -> Iterator[tuple[int, int]]:
    for path in paths:
        keys, times = read_records(path)
        yield from zip(keys, times, strict=True)
