"""Ends a live connection (WebSocket or SSE) whose socket takes nothing at all for too long.

Sending waits while the connection's write buffer is full (uvicorn's flow control), so a viewer
that reads slowly only makes its own queue fill up, and the hub switches it to state-sync. One
that reads nothing would hold its connection, its task and its state forever: the watchdog
cancels its sender once a single send has waited `stuck_after_s`.
"""

from __future__ import annotations

import asyncio
from typing import Final

DEFAULT_STUCK_AFTER_S: Final = 20.0


class Watchdog:
    """Cancels a viewer's sender once one frame has waited `stuck_after_s` for the socket.

    One timer per viewer rather than a timeout around every send: `asyncio.wait_for` costs a
    task, a loop iteration and a `getpid` per frame (Python 3.11), and nearly every frame is
    written without waiting at all. The sender only notes when a send began and ended.
    """

    def __init__(self, stuck_after_s: float) -> None:
        self.stuck_after_s = stuck_after_s
        self.clock = asyncio.get_running_loop().time
        # When the send in progress began; None between sends.
        self.sending_since: float | None = None
        self.fired = False
        self._sender: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, sender: asyncio.Task[None]) -> None:
        self._sender = sender
        self._check_in(self.stuck_after_s)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_in(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check)

    def _check(self) -> None:
        self._timer = None
        since = self.sending_since
        if since is None:
            self._check_in(self.stuck_after_s)
            return
        waited = self.clock() - since
        if waited < self.stuck_after_s:
            self._check_in(self.stuck_after_s - waited)
            return
        self.fired = True
        assert self._sender is not None
        # Cancelling is clean: uvicorn writes nothing of a frame (or an SSE event) until the
        # buffer has room.
        self._sender.cancel()
