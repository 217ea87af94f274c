"""One device's NDJSON stream: positions in, acknowledgements out, on one HTTP/1.1 request.

The request body is read as it arrives, a line at a time (`\\n`, an optional `\\r` before it):
each line is one position of the contract, validated as on MQTT; the device is the login's,
never the payload's. The response, started at once (200, `application/x-ndjson`, chunked),
carries one line per event of the stream:

    {"ack": 41, "lines": 42}        after each batch the backend holds: the highest `seq` held
                                    so far, and how many lines from the start are settled
                                    (held, or answered with an error): the client may forget
                                    them
    {"line": 7, "error": "out_of_range", "detail": "lat=91.0 outside [-90.0, 90.0]"}
                                    a line refused, with the contract's reason; the stream
                                    goes on
    {"ack": 41, "lines": 42, "end": "complete"}
                                    the last line: why the stream ended (complete: the client
                                    finished its body; idle_timeout, revoked, replaced,
                                    shutdown, slow_client)

A line longer than the contract's 1,024 bytes is answered `too_large` without being held;
blank lines are keep-alives. Bounds per stream: at most `stream_max_unacked` lines read and
not yet held (then the body is not read until the backend catches up: TCP holds the client),
`stream_idle_timeout_s` of silence, `write_timeout_s` for a client that does not read its
acknowledgements. The device's rate limit holds lines back (the stream waits for its next
token) rather than dropping them. A device has one stream: a newer one ends the older
(`replaced`). Presence: the first position of a stream comes with `online`, and a stream that
ends any other way than `replaced` says `offline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import orjson
from starlette.types import Receive, Send

from teamtrack.backends import Event
from teamtrack.contract import MAX_PAYLOAD_BYTES, ContractError, Kind, Reason, validate_position_key
from teamtrack.device_auth import DeviceLogin

if TYPE_CHECKING:
    from .service import GatewayService

log = logging.getLogger(__name__)

# A line of the contract's 1 KiB and its `\r`; anything longer is skipped to its end.
MAX_LINE_BYTES: Final = MAX_PAYLOAD_BYTES + 1
_HEADERS: Final = [
    (b"content-type", b"application/x-ndjson"),
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    # One stream per connection: whatever ends it ends the connection too.
    (b"connection", b"close"),
]


class _Ended(Exception):
    """The client stopped taking acknowledgements; the stream is over."""


class DeviceStream:
    def __init__(
        self, service: GatewayService, login: DeviceLogin, password: str,
        receive: Receive, send: Send,
    ) -> None:
        self.service = service
        self.config = service.config
        self.login = login
        self.password = password
        self._receive = receive
        self._send = send
        self._send_lock = asyncio.Lock()
        self._ended = asyncio.Event()
        # Set once the stream is over (what stopping the gateway waits for).
        self.finished = asyncio.Event()
        self.end_reason: str | None = None
        # (line number, seq, done when the backend holds it), in order of reading.
        self._pending: deque[tuple[int, int, asyncio.Future[None]]] = deque()
        self._has_pending = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._lines_read = 0
        self._highest_seq: int | None = None
        self._online = False

    def end(self, reason: str) -> None:
        """End the stream from outside (revoked, replaced, shutdown); the first reason stays."""
        if self.end_reason is None:
            self.end_reason = reason
        self._ended.set()

    # The whole stream ------------------------------------------------------------------------
    async def run(self) -> None:
        service, username = self.service, self.login.username
        previous = service.streams.get(username)
        if previous is not None:
            previous.end("replaced")
        service.streams[username] = self
        service.counters.streams_open += 1
        reason = "disconnected"
        try:
            await self._send({"type": "http.response.start", "status": 200,
                              "headers": list(_HEADERS)})
            reason = await self._serve()
        finally:
            service.counters.streams_open -= 1
            service.counters.streams_ended[reason] += 1
            if service.streams.get(username) is self:
                del service.streams[username]
            if self._online and reason != "replaced":
                self._presence(b"offline")
            self.finished.set()

    async def _serve(self) -> str:
        reader = asyncio.create_task(self._read(), name="stream-reader")
        ended = asyncio.create_task(self._ended.wait(), name="stream-ended")
        acker = asyncio.create_task(self._acknowledge(), name="stream-acker")
        try:
            await asyncio.wait({reader, ended, acker}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not reader.cancelled() and reader.exception() is None:
                reason = reader.result()
            else:
                reason = self.end_reason or "slow_client"
        finally:
            for task in (reader, ended):
                task.cancel()
            await asyncio.gather(reader, ended, return_exceptions=True)
        if reason in ("disconnected", "slow_client"):
            acker.cancel()
            await asyncio.gather(acker, return_exceptions=True)
            return reason
        # What was read is settled before the last line: held, or the wait is over.
        if self._pending:
            await asyncio.wait([held for _line, _seq, held in self._pending],
                               timeout=self.config.ack_timeout_s)
        acker.cancel()
        await asyncio.gather(acker, return_exceptions=True)
        self._take_held()
        with contextlib.suppress(_Ended):
            await self._write({**self._ack(), "end": reason})
            await self._finish()
        return reason

    async def _finish(self) -> None:
        async with self._send_lock, asyncio.timeout(self.config.write_timeout_s):
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    # Reading ---------------------------------------------------------------------------------
    async def _read(self) -> str:
        """Lines until the body ends ("complete"), the client goes ("disconnected") or stays
        silent ("idle_timeout")."""
        partial = bytearray()
        skipping = False  # inside a line longer than MAX_LINE_BYTES
        while True:
            try:
                async with asyncio.timeout(self.config.stream_idle_timeout_s):
                    message: dict[str, Any] = dict(await self._receive())
            except TimeoutError:
                return "idle_timeout"
            if message["type"] == "http.disconnect":
                return "disconnected"
            chunk: bytes = message.get("body", b"")
            start = 0
            while (newline := chunk.find(b"\n", start)) >= 0:
                piece = chunk[start:newline]
                start = newline + 1
                if skipping:
                    skipping = False
                    await self._too_large()
                elif partial:
                    partial += piece
                    line = bytes(partial)
                    partial.clear()
                    await self._line(line)
                else:
                    await self._line(piece)
            if not skipping:
                partial += chunk[start:]
                if len(partial) > MAX_LINE_BYTES:
                    skipping = True
                    partial.clear()
            if not message.get("more_body", False):
                if skipping:
                    await self._too_large()
                elif partial:
                    await self._line(bytes(partial))
                return "complete"

    async def _too_large(self) -> None:
        self._lines_read += 1
        error = ContractError(Reason.TOO_LARGE, f"a line is at most {MAX_PAYLOAD_BYTES} bytes")
        await self._refuse(error)

    async def _line(self, line: bytes) -> None:
        self._lines_read += 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return  # a keep-alive
        service, login = self.service, self.login
        now = service.now_ms()
        try:
            ts, seq = validate_position_key(line, now)
        except ContractError as error:
            await self._refuse(error)
            return
        limit = service.device_limit
        if limit is not None:
            wait = limit.reserve(login.team, login.worker)
            if wait > 0:
                service.counters.throttled_seconds += wait
                await asyncio.sleep(wait)
        while len(self._pending) >= self.config.stream_max_unacked:
            self._room.clear()
            await self._room.wait()
        await service.batcher.wait_for_room()
        if not self._online:
            self._online = True
            self._presence(b"online")
        event = Event(login.team, login.worker, Kind.POSITION, line, self.config.gateway_id,
                      now, ts, 1)
        held = service.submit([event], "ndjson")
        self._pending.append((self._lines_read, seq, held))
        self._has_pending.set()

    async def _refuse(self, error: ContractError) -> None:
        self.service.reject(error, "a stream line", self.login.username)
        await self._write({"line": self._lines_read, "error": error.reason.value,
                           "detail": error.detail})

    def _presence(self, word: bytes) -> None:
        now = self.service.now_ms()
        login = self.login
        event = Event(login.team, login.worker, Kind.STATUS, word, self.config.gateway_id, now,
                      now, 1)
        self.service.submit([event], "ndjson")

    # Acknowledging ---------------------------------------------------------------------------
    async def _acknowledge(self) -> None:
        """One line per batch held: wait for the oldest line in flight, then take every line
        held with it (a batch resolves its lines at once, in order)."""
        pending = self._pending
        while True:
            if not pending:
                self._has_pending.clear()
                await self._has_pending.wait()
                continue
            await asyncio.shield(pending[0][2])
            self._take_held()
            try:
                await self._write(self._ack())
            except _Ended:
                return

    def _take_held(self) -> None:
        pending = self._pending
        while pending and pending[0][2].done():
            _line, seq, _held = pending.popleft()
            if self._highest_seq is None or seq > self._highest_seq:
                self._highest_seq = seq
        self._room.set()

    def _ack(self) -> dict[str, Any]:
        settled = self._pending[0][0] - 1 if self._pending else self._lines_read
        return {"ack": self._highest_seq, "lines": settled}

    async def _write(self, line: dict[str, Any]) -> None:
        try:
            async with self._send_lock, asyncio.timeout(self.config.write_timeout_s):
                await self._send({
                    "type": "http.response.body",
                    "body": orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE),
                    "more_body": True,
                })
        except TimeoutError:
            self.end("slow_client")
            raise _Ended from None
