"""A rate-limiting logging filter: a thousand devices losing one broker must not print a
thousand lines. `teamtrack.logs.RateLimitedLog` does this for our own log calls; this filter is
for gmqtt, whose log calls we cannot change, only the logger we hand it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable


class RateLimitFilter(logging.Filter):
    """Lets each message template through at most once per `period` seconds.

    Keyed by the unformatted message, so `"failed to reconnect: %s"` from a thousand clients is
    one line per period whatever the arguments; the next line says how many were held back.
    """

    def __init__(self, period: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._period = period
        self._clock = clock
        self._last: dict[tuple[str, int, str], float] = {}
        self._held_back: dict[tuple[str, int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        if now - self._last.get(key, -math.inf) < self._period:
            self._held_back[key] = self._held_back.get(key, 0) + 1
            return False
        self._last[key] = now
        held_back = self._held_back.pop(key, 0)
        if held_back:
            record.msg = f"{record.msg} (and {held_back} more like it)"
        return True
