"""Every request's first stop: its Host, its body size, the headers of its answer; and who may
read `/metrics`.

* `Host` must name this site (`allowed_hosts`): otherwise `400`, before any route runs. A page
  of another site whose name was made to resolve to a dashboard (DNS rebinding) reads nothing,
  not even `/healthz`.
* A request body may hold `max_body_bytes` (the login form is the only body the dashboard
  reads): `413` beyond.
* Every HTTP answer carries `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`, a
  `Referrer-Policy` and a `Content-Security-Policy` (`default-src 'none'` unless the route set
  the page's own), and `Strict-Transport-Security` when the request came over https.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketClose

DEFAULT_MAX_BODY_BYTES: Final = 64 * 1024
# A year; no includeSubDomains: other services may share the domain.
HSTS: Final = "max-age=31536000"
RESPONSE_HEADERS: Final = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'"),
)
# Headers a proxy adds; a request carrying one came through a proxy, not from this host.
FORWARDING_HEADERS: Final = ("forwarded", "x-forwarded-for", "x-real-ip")


@dataclass(frozen=True, slots=True)
class SiteSecurity:
    """Who may reach the instance and how (the settings of docs/protocol.md, parsed).

    allowed_hosts: names the `Host` header may carry (`*.example.org` for its subdomains,
      `*` for any); trusted_proxies: addresses or networks whose `X-Forwarded-Proto` and
      `X-Forwarded-For` are believed; metrics_token: the bearer token `/metrics` asks for
      (empty: loopback clients only, and not through a proxy).
    """

    allowed_hosts: tuple[str, ...] = ("*",)
    trusted_proxies: tuple[str, ...] = ()
    metrics_token: str = field(default="", repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def split_list(text: str) -> tuple[str, ...]:
    """`"a, b,,c"` -> `("a", "b", "c")`: the comma-separated settings."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def host_name(host_header: str) -> str:
    """The name in a `Host` header: no port, no IPv6 brackets, no trailing dot, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def host_allowed(host_header: str | None, allowed: Sequence[str]) -> bool:
    if "*" in allowed:
        return True
    if not host_header:
        return False
    name = host_name(host_header)
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
        if name == host_name(pattern):
            return True
    return False


def is_local_client(client_host: str | None) -> bool:
    """True for loopback addresses and for clients that are no network peer at all (a Unix
    socket, an in-process test client)."""
    if client_host is None:
        return True
    try:
        return ipaddress.ip_address(client_host).is_loopback
    except ValueError:
        return True


def metrics_allowed(request: Request, metrics_token: str) -> bool:
    """With a token: whoever presents it as a bearer token. Without: loopback clients that
    came through no proxy (behind a proxy on the same host, everyone looks local)."""
    if metrics_token:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), metrics_token.encode()
        )
    if any(name in request.headers for name in FORWARDING_HEADERS):
        return False
    return is_local_client(request.client.host if request.client else None)


class _BodyTooLarge(Exception):
    pass


class SiteGuard:
    """Pure ASGI middleware (no per-request task, WebSockets untouched once admitted)."""

    def __init__(
        self,
        app: ASGIApp,
        allowed_hosts: Sequence[str] = ("*",),
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not host_allowed(headers.get("host"), self.allowed_hosts):
            await self._refuse_host(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        await self._http(scope, receive, send, headers)

    async def _refuse_host(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = PlainTextResponse("unknown host", 400, headers=_header_dict(scope))
        if scope["type"] == "http":
            await answer(scope, receive, send)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await WebSocket(scope, receive, send).send_denial_response(answer)
        else:
            await WebSocketClose(1008)(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        declared = headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            await PlainTextResponse(
                "request body too large", 413, headers=_header_dict(scope)
            )(scope, receive, send)
            return
        received = 0
        too_large = False
        started = False
        extra = _extra_headers(scope)

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:
                return  # the app's answer to a body it could not read: replaced by the 413
            if message["type"] == "http.response.start":
                started = True
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *((name, value) for name, value in extra if name not in present),
                ]
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await PlainTextResponse(
                "request body too large", 413, headers=_header_dict(scope)
            )(scope, receive, send)


def _extra_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    extra = list(RESPONSE_HEADERS)
    if scope.get("scheme") == "https":
        extra.append((b"strict-transport-security", HSTS.encode()))
    return extra


def _header_dict(scope: Scope) -> Mapping[str, str]:
    return {name.decode(): value.decode() for name, value in _extra_headers(scope)}
