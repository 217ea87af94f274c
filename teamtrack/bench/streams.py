"""A device's NDJSON stream to the device gateway, for the load generator's `http` transport:
one HTTP/1.1 `POST /v1/positions` per device, chunked, each position written as it is due,
acknowledgements read (and counted, not kept) from the same connection as they come."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

OPEN_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 10.0


class StreamRefused(Exception):
    """The gateway answered the stream's request with another status than 200."""


class NdjsonConnection:
    def __init__(self, on_lost: Callable[[], None], on_refused_line: Callable[[], None]) -> None:
        self._on_lost = on_lost
        self._on_refused_line = on_refused_line
        self._writer: asyncio.StreamWriter | None = None
        self._answers: asyncio.Task[None] | None = None
        self.acknowledgements = 0

    async def open(self, url: str, username: str, password: str) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"no host in {url!r}")
        context = ssl.create_default_context() if parts.scheme == "https" else None
        port = parts.port or (443 if context is not None else 80)
        login = base64.b64encode(f"{username}:{password}".encode()).decode()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, port, ssl=context), OPEN_TIMEOUT_S
        )
        writer.write((
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Basic {login}\r\nContent-Type: application/x-ndjson\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), OPEN_TIMEOUT_S)
        status = head.split(b" ", 2)[1]
        if status != b"200":
            writer.close()
            raise StreamRefused(f"HTTP {status.decode(errors='replace')}")
        self._writer = writer
        self._answers = asyncio.create_task(self._read_answers(reader))

    @property
    def open_now(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    def send(self, line: bytes) -> None:
        """One position, as one chunk (written when the socket takes it)."""
        assert self._writer is not None
        self._writer.write(b"%x\r\n%s\n\r\n" % (len(line) + 1, line))

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        """Count the acknowledgements and refusals in the chunked answer until it ends."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                if line.startswith(b'{"ack"'):
                    self.acknowledgements += 1
                elif line.startswith(b'{"line"'):
                    self._on_refused_line()
        self._on_lost()

    async def close(self) -> None:
        """End the body and wait (a while) for the gateway's last acknowledgement."""
        writer = self._writer
        if writer is None:
            return
        with contextlib.suppress(OSError, TimeoutError):
            if not writer.is_closing():
                writer.write(b"0\r\n\r\n")
            if self._answers is not None:
                await asyncio.wait_for(asyncio.shield(self._answers), CLOSE_TIMEOUT_S)
        writer.close()
        if self._answers is not None:
            self._answers.cancel()
            await asyncio.gather(self._answers, return_exceptions=True)
