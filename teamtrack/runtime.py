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
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from teamtrack.backends import BackendError
from teamtrack.metrics import CollectorRegistry, MetricsServer

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; kept runnable without it
        return asyncio.run(main)
    return uvloop.run(main)


def settle_heap() -> None:
    """Take what is alive once a service has started out of the cyclic collector's sight.

    Modules, settings, pools and the service's own objects live as long as the process, yet
    every full collection walked all of them again: the ingest, whose rows survive a write
    interval and keep promoting objects to the oldest generation, ran one every 4-5 s at
    10,000 positions/s, each holding a core for 90-180 ms (docs/benchmarks/optimisations.md,
    section 11). Frozen, they are never scanned (nor freed: they would not have been anyway);
    a full collection then walks only what was made since.
    """
    gc.collect()
    gc.freeze()


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


def run_or_exit(main: Coroutine[Any, Any, None], prog: str) -> None:
    """Run a service that reads the backend and writes the history database; its known
    failures end it with one line on stderr: exit 1 (a server) or 2 (a bad setting)."""
    from sqlalchemy.exc import SQLAlchemyError  # here: the bridges never load SQLAlchemy

    try:
        run(main)
    except BackendError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except (SQLAlchemyError, OSError) as error:
        print(f"{prog}: history database: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValueError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
