"""What every long-running service does around its own work: the event loop, stop signals,
the `/metrics` port.

The loop is uvloop's when it is installed (it is a dependency): the services' work is mostly
small reads and writes on sockets, where uvloop's transports cost a fraction of asyncio's
selector loop (measured in docs/benchmarks/optimisations.md). The dashboard gets the same
loop from uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from teamtrack.metrics import CollectorRegistry, MetricsServer

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; kept runnable without it
        return asyncio.run(main)
    return uvloop.run(main)


@contextlib.asynccontextmanager
async def serving(
    log: logging.Logger, registry: CollectorRegistry, metrics_host: str, metrics_port: int
) -> AsyncIterator[asyncio.Event]:
    """Serve `/metrics` while the block runs; the event it gives is set by SIGINT or SIGTERM."""
    metrics = MetricsServer(registry, metrics_host, metrics_port)
    metrics.start()
    log.info("metrics on http://%s:%d/metrics", metrics_host, metrics.port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        yield stopping
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        metrics.stop()
