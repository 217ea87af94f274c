"""An ASGI app served by a real uvicorn on a free loopback port, for tests that talk to it
over HTTP and WebSocket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn

from teamtrack.local.servers import LOOPBACK, free_port

STOP_WAIT_S = 10.0


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[int]:
    """Serve `app` until the block ends; yields its port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=port,
                                           ws="websockets-sansio", log_level="warning"))
    serving_task = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving_task.done(), "uvicorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving_task, STOP_WAIT_S)
