"""A device's NDJSON stream, as a device maker would write it: raw HTTP/1.1 over asyncio
streams, the body sent in chunks while acknowledgements are read from the same connection
(httpx and most HTTP client libraries send the whole body before they read the answer)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from typing import Any
from urllib.parse import urlsplit

import orjson

WAIT = 15.0


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class NdjsonStream:
    """One `POST /v1/positions`, chunked, full duplex."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self._body = b""
        self._buffer = b""
        self.ended = False

    @classmethod
    async def open(
        cls, url: str, username: str, password: str, *,
        content_type: str = "application/x-ndjson", extra: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> NdjsonStream:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port, ssl=ssl_context), WAIT
        )
        headers = {
            "Host": f"{parts.hostname}:{parts.port}",
            "Authorization": basic(username, password),
            "Content-Type": content_type,
            "Transfer-Encoding": "chunked",
            **(extra or {}),
        }
        head = f"POST {parts.path or '/'} HTTP/1.1\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        ) + "\r\n"
        writer.write(head.encode())
        await writer.drain()
        stream = cls(reader, writer)
        await stream._read_head()
        return stream

    async def _read_head(self) -> None:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), WAIT)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
        if "content-length" in self.headers:
            length = int(self.headers["content-length"])
            self._body = await asyncio.wait_for(self.reader.readexactly(length), WAIT)
            self.ended = True

    @property
    def body(self) -> bytes:
        """The whole body of a refusal (a response with a Content-Length)."""
        return self._body

    def send(self, data: bytes) -> None:
        """One chunk of the request body."""
        if data:
            self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    def send_lines(self, lines: list[bytes]) -> None:
        self.send(b"".join(line + b"\n" for line in lines))

    async def drain(self) -> None:
        await asyncio.wait_for(self.writer.drain(), WAIT)

    def finish(self) -> None:
        """The body's last chunk: the client has nothing more to send."""
        self.writer.write(b"0\r\n\r\n")

    async def read_line(self, timeout: float = WAIT) -> dict[str, Any] | None:
        """The next response line, None at its end."""
        while b"\n" not in self._buffer:
            if self.ended:
                return None
            chunk = await asyncio.wait_for(self._read_chunk(), timeout)
            if chunk is None:
                self.ended = True
                if not self._buffer:
                    return None
                break
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return dict(orjson.loads(line))

    async def read_all(self, timeout: float = WAIT) -> list[dict[str, Any]]:
        lines = []
        while (line := await self.read_line(timeout)) is not None:
            lines.append(line)
        return lines

    async def _read_chunk(self) -> bytes | None:
        size_line = await self.reader.readline()
        if not size_line:
            return None
        size = int(size_line.strip().split(b";")[0], 16)
        if size == 0:
            await self.reader.readline()
            return None
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    def cut(self) -> None:
        """The network goes away: the socket is closed without ending the body."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
