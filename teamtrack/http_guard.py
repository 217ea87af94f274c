"""What uvicorn lacks for the open internet: a deadline for request headers, a bound on their
size, a connection cap answered at once (in all, and per address), and access logs without
query strings. For every uvicorn server that faces clients: the dashboards, the device gateway.

uvicorn closes a keep-alive connection left idle after a response (`timeout_keep_alive`), but
not one that never sends a request, nor one that sends its headers a byte at a time
(slowloris): 2,000 idle and 50 slowloris connections stayed open on a dashboard indefinitely.
`guarded_http_protocol` returns uvicorn's httptools protocol with:

* a header deadline: from the moment a connection opens, and from the first byte of each
  further request on it, the headers must be complete within `header_timeout_s`, or the
  connection gets `408` and is closed;
* at most `max_header_bytes` of request line and headers (`431` and closed beyond);
* past `limit_concurrency` open connections (uvicorn's connection cap, which also counts live
  WebSockets and SSE streams), a new connection gets `503` at once and is closed, instead of
  waiting for a request to refuse;
* what a streaming response (an SSE stream) needs of its connection, in each request's scope
  as the `CONNECTION_EXTENSION`: an event set when the server begins a graceful shutdown
  (uvicorn closes WebSockets with 1012 but lets a response still being sent run on, and waits
  for it: forever, for an SSE stream), and a way to drop a connection whose client reads
  nothing (closing it would wait for its unsent bytes to be read);
* with `max_connections_per_address`, past that many open connections from one address (IPv6:
  its /64, `teamtrack.netlimits.address_key`), the same `503`: long-lived requests (the
  gateway's streams) from one host cannot take every slot.

`on_refused`, when given, is told each refusal's reason (`connection_cap`, `address_limit`,
`header_timeout`, `headers_too_large`), for a service's metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from teamtrack.netlimits import address_key, plain_http_response

DEFAULT_HEADER_TIMEOUT_S: Final = 10.0
DEFAULT_MAX_HEADER_BYTES: Final = 64 * 1024

log = logging.getLogger(__name__)


# `scope["extensions"][CONNECTION_EXTENSION]`: {"shutdown": an `asyncio.Event` set when the
# server begins to shut down (it accepts no new connection by then), "abort": a callable that
# drops the connection at once, unsent bytes and all}.
CONNECTION_EXTENSION: Final = "teamtrack.connection"

_TIMED_OUT: Final = plain_http_response(408, "Request Timeout")
_TOO_LARGE: Final = plain_http_response(431, "Request Header Fields Too Large")
_OVER_CAP: Final = plain_http_response(503, "Service Unavailable")


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a header size bound and an
    immediate refusal over the connection cap (see the module's docstring)."""

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_connections_per_address: int | None = None
    on_refused: Callable[[str], None] | None = None
    # Open connections by address key, shared by the connections of one server (one class
    # per `guarded_http_protocol` call).
    open_by_address: ClassVar[Counter[str]] = Counter()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        # Bytes received since the current request began, while its headers are incomplete;
        # None while no headers are being read.
        self._header_bytes: int | None = None
        self._shutting_down = asyncio.Event()
        self._address: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.limit_concurrency is not None and len(self.connections) > self.limit_concurrency:
            self._refuse(_OVER_CAP, "connection_cap")
            return
        if self.max_connections_per_address is not None:
            peer = transport.get_extra_info("peername")
            address = address_key(peer[0] if isinstance(peer, tuple) and peer else None)
            if self.open_by_address[address] >= self.max_connections_per_address:
                self._refuse(_OVER_CAP, "address_limit")
                return
            self._address = address
            self.open_by_address[address] += 1
        self._expect_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        address, self._address = self._address, None
        if address is not None:
            self.open_by_address[address] -= 1
            if self.open_by_address[address] <= 0:
                del self.open_by_address[address]
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions = self.scope.setdefault("extensions", {})
        extensions[CONNECTION_EXTENSION] = {"shutdown": self._shutting_down, "abort": self._abort}

    def shutdown(self) -> None:
        self._shutting_down.set()
        super().shutdown()

    def _abort(self) -> None:
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._header_bytes is None and (self.cycle is None or self.cycle.response_complete):
            # Between requests on a keep-alive connection: this is the next request's start
            # (while a request is in progress, data is its body or a pipelined request).
            self._expect_headers()
        super().data_received(data)
        # Counted after parsing: what completed the headers (and the body after them) is not.
        if self._header_bytes is not None:
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse(_TOO_LARGE, "headers_too_large")

    def on_headers_complete(self) -> None:
        self._stop_deadline()
        super().on_headers_complete()

    def _expect_headers(self) -> None:
        self._header_bytes = 0
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _stop_deadline(self) -> None:
        self._header_bytes = None
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _timed_out(self) -> None:
        self._header_deadline = None
        self._refuse(_TIMED_OUT, "header_timeout")

    def _refuse(self, answer: bytes, reason: str) -> None:
        self._stop_deadline()
        if self.on_refused is not None:
            self.on_refused(reason)
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()


def guarded_http_protocol(
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    *,
    max_connections_per_address: int | None = None,
    on_refused: Callable[[str], None] | None = None,
) -> type[GuardedHttpProtocol]:
    """The protocol class to give uvicorn as `http=`, with these bounds (and a count of open
    connections per address of its own)."""
    return type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "max_header_bytes": max_header_bytes,
            "max_connections_per_address": max_connections_per_address,
            "on_refused": staticmethod(on_refused) if on_refused is not None else None,
            "open_by_address": Counter(),
        },
    )


class RedactQueryStrings(logging.Filter):
    """Cuts the query string out of the paths in uvicorn's access and WebSocket log lines.

    Credentials are never accepted in a URL, but careless clients put them there anyway
    (`?token=`), and a log must not keep what they sent: `/api/me?token=…` is logged as
    `/api/me?<redacted>`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and "?" in arg for arg in record.args
        ):
            record.args = tuple(_redact(arg) for arg in record.args)
        return True


def _redact(arg: object) -> object:
    if isinstance(arg, str) and arg.startswith("/") and "?" in arg:
        return arg.partition("?")[0] + "?<redacted>"
    return arg


def redact_uvicorn_logs() -> None:
    """Installs `RedactQueryStrings` on uvicorn's loggers (after uvicorn set its logging up)."""
    redactor = RedactQueryStrings()
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(redactor)
