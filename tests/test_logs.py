"""The services' logging: an outage that every client retries against must not flood the log."""

from __future__ import annotations

import logging
import subprocess
import sys

from teamtrack.logs import RateLimitFilter

FLOOD = """
import logging
from teamtrack.logs import configure_logging
configure_logging("INFO")
retries = logging.getLogger("aiokafka")
for attempt in range(2000):
    retries.error("Unable connect to node with id %s: %s", attempt % 3, "Connection refused")
    retries.error("Unable to update metadata from [%s]", attempt % 3)
for number in range(5):
    logging.getLogger("teamtrack.bridge").info("connected %d", number)
"""


def test_a_service_logs_each_kind_of_retry_error_once_per_period() -> None:
    """2,000 failed retries of two kinds (aiokafka's words during a Kafka outage) give two
    lines; informational lines are never held back."""
    result = subprocess.run(
        [sys.executable, "-c", FLOOD], capture_output=True, text=True, timeout=60, check=True
    )
    lines = result.stderr.splitlines()
    assert sum("Unable connect to node" in line for line in lines) == 1
    assert sum("Unable to update metadata" in line for line in lines) == 1
    assert sum("connected" in line for line in lines) == 5


def test_the_next_line_after_a_period_says_how_many_were_held_back() -> None:
    now = [0.0]
    limiter = RateLimitFilter(period=10.0, clock=lambda: now[0], min_level=logging.WARNING)

    def record(message: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("aiokafka", level, __file__, 1, message, (), None)

    assert limiter.filter(record("lost %s"))
    assert not any(limiter.filter(record("lost %s")) for _ in range(7))
    assert limiter.filter(record("lost %s", logging.INFO))
    now[0] = 10.0
    again = record("lost %s")
    assert limiter.filter(again)
    assert again.msg == "lost %s (and 7 more like it)"
