"""Logging set-up and a rate limiter, so a flood of bad messages cannot flood the log."""

from __future__ import annotations

import logging
import time


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level.upper() != "DEBUG":
        # gmqtt logs every packet type at INFO; our services log connects and losses themselves.
        logging.getLogger("gmqtt").setLevel(logging.WARNING)


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
