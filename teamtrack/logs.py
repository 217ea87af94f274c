"""Logging set-up and rate limiters, so that neither a flood of bad messages nor an outage of
a server that every client retries against can flood the log."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

# During an outage, each client library logs every failed retry: a 30 s Kafka outage wrote
# 4,300 ERROR lines (aiokafka, five templates) across one cluster's bridges and ingest.
OUTAGE_LOG_PERIOD_S = 10.0


def configure_logging(level: str) -> None:
    """The services' logging: one line per record, warnings and errors of one kind at most
    once per `OUTAGE_LOG_PERIOD_S` (then with the number held back)."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level.upper() != "DEBUG":
        # gmqtt logs every packet type at INFO; our services log connects and losses themselves.
        logging.getLogger("gmqtt").setLevel(logging.WARNING)
    limiter = RateLimitFilter(period=OUTAGE_LOG_PERIOD_S, min_level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(limiter)


class RateLimitFilter(logging.Filter):
    """Lets each message template through at most once per `period` seconds.

    Keyed by the logger, the level and the unformatted message, so that `"failed to reconnect:
    %s"` from a thousand clients is one line per period whatever the arguments; the next line
    that passes says how many were held back. Records below `min_level` always pass.
    """

    def __init__(
        self,
        period: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        min_level: int = logging.NOTSET,
    ) -> None:
        super().__init__()
        self._period = period
        self._clock = clock
        self._min_level = min_level
        self._last: dict[tuple[str, int, str], float] = {}
        self._held_back: dict[tuple[str, int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self._min_level:
            return True
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


class RateLimitedLog:
    """Logs at most one line per key every `interval` seconds, then says how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last_logged: dict[str, float] = {}
        self._held_back: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last_logged.get(key)
        if last is not None and now - last < self._interval:
            self._held_back[key] = self._held_back.get(key, 0) + 1
            return
        held_back = self._held_back.pop(key, 0)
        self._last_logged[key] = now
        if held_back:
            message += f" (and {held_back} more like it in the last {self._interval:.0f}s)"
        self._logger.warning(message, *args)
