"""The gateway's HTTP surface, a plain ASGI app (no framework: the NDJSON stream reads its
request and writes its response at once, which a framework's streaming response would not let
it do).

    GET  /healthz          200 {"status": "ok"}
    POST /v1/owntracks     the OwnTracks app's HTTP mode: one JSON object, answered `[]`
    POST /v1/positions     an NDJSON stream of native positions (`gateway.stream`)

Logins (both POSTs): HTTP Basic with a device account (`{team}.{worker}`) and its MQTT
password. No credentials: 401. A wrong password, an unknown or revoked account, or an account
that is not a device's (a manager's, a bridge's: never checked at all): 401 and a failure
charged to the client's address; past `auth_failures_per_minute` failures, 429 with
`Retry-After` before any check. `X-Limit-U` (the app's user header), when sent, must name the
logged-in account: 403 otherwise.

The OwnTracks app sends again whatever was not answered 2xx, from the head of its queue, and
forever (owntracks/android `HttpMessageProcessorEndpoint`: any other status re-queues the
message). So an object that can never be taken (it breaks the contract, or is of a type
teamtrack does not use) is answered `200 []` and counted, like a rejected MQTT message that is
still acknowledged; only what may succeed later gets another status: 401/403/429 (the
login), 413 (a body over 16 KiB, refused before it is read), 503 (the backend did not hold
the events within `ack_timeout_s`: the app sends them again, and the repeat is recognised).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

import orjson
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from teamtrack.contract import ContractError, Reason
from teamtrack.device_auth import DeviceLogin
from teamtrack.ingress.owntracks import (
    MAX_OWNTRACKS_BYTES,
    account_address,
    decode_owntracks,
    owntracks_events,
)
from teamtrack.netlimits import address_key

if TYPE_CHECKING:
    from .service import GatewayService

OWNTRACKS_PATH: Final = "/v1/owntracks"
STREAM_PATH: Final = "/v1/positions"
NDJSON: Final = "application/x-ndjson"
REALM: Final = b'Basic realm="teamtrack", charset="UTF-8"'
# Longer credentials than any account's are refused unchecked.
MAX_USERNAME: Final = 129
MAX_PASSWORD_BYTES: Final = 256
_JSON: Final = b"application/json"
_COMMON_HEADERS: Final = (
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
)
_EMPTY_ARRAY: Final = b"[]"
# For a client too slow to send its body. (A body too large is answered while the connection
# stays open: what follows is discarded as it comes, and the connection guard counts it against
# the next request's header bound, so at most 64 KiB more are taken before it is closed;
# closing at once would make the kernel reset the connection under a client still sending,
# and lose the answer.)
_CLOSE: Final = ((b"connection", b"close"),)


class Refused(Exception):
    """An answer other than the route's own: its status, a reason for the body and headers."""

    def __init__(
        self, status: int, reason: str, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = tuple(headers)


async def respond(
    send: Send, status: int, body: bytes, content_type: bytes = _JSON,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type), (b"content-length", str(len(body)).encode()),
            *_COMMON_HEADERS, *headers,
        ],
    })
    await send({"type": "http.response.body", "body": body})


def basic_credentials(headers: Headers) -> tuple[str, str] | None:
    """(username, password) of an `Authorization: Basic` header; None when there is none."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")
    username, separator, password = decoded.partition(":")
    return (username, password) if separator else ("", "")


class GatewayApp:
    def __init__(self, service: GatewayService) -> None:
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        route = {OWNTRACKS_PATH: "owntracks", STREAM_PATH: "ndjson"}.get(path)
        if path == "/healthz" and method in ("GET", "HEAD"):
            await respond(send, 200, b'{"status":"ok"}')
            return
        if route is None:
            await self._refuse(send, "other", Refused(404, "not found"))
            return
        if method != "POST":
            await self._refuse(send, route, Refused(405, "POST only", [(b"allow", b"POST")]))
            return
        try:
            if route == "owntracks":
                await self._owntracks(scope, receive, send)
            else:
                await self._stream(scope, receive, send)
        except Refused as refused:
            await self._refuse(send, route, refused)

    async def _refuse(self, send: Send, route: str, refused: Refused) -> None:
        self.service.counters.requests[(route, refused.status)] += 1
        body = orjson.dumps({"error": refused.reason})
        await respond(send, refused.status, body, headers=refused.headers)

    # Logins ----------------------------------------------------------------------------------
    async def login(self, scope: Scope, headers: Headers) -> tuple[DeviceLogin, str]:
        """The device that sent the request, and its password (a stream checks it again after
        the password file changes); `Refused` otherwise."""
        service = self.service
        credentials = basic_credentials(headers)
        if credentials is None:
            raise Refused(401, "device credentials required (HTTP Basic)",
                          [(b"www-authenticate", REALM)])
        client = scope.get("client")
        address = address_key(client[0] if client else None)
        wait = service.auth_failures.take(address)
        if wait:
            service.counters.auth_failures["rate_limited"] += 1
            raise Refused(429, "too many failed logins from this address",
                          [(b"retry-after", str(math.ceil(wait)).encode())])
        username, password = credentials
        login = None
        if len(username) <= MAX_USERNAME and len(password.encode()) <= MAX_PASSWORD_BYTES:
            login = await service.accounts.authenticate(username, password)
        if login is None:
            reason = "bad_credentials" if username in service.accounts else "not_device"
            service.counters.auth_failures[reason] += 1
            raise Refused(401, "wrong device credentials", [(b"www-authenticate", REALM)])
        service.auth_failures.give_back(address)
        limit_user = headers.get("x-limit-u")
        if limit_user is not None and limit_user != username:
            service.counters.auth_failures["user_mismatch"] += 1
            raise Refused(403, "X-Limit-U names another account than the login")
        device = headers.get("x-limit-d", "")
        try:
            account_address(username, device)
        except ContractError as error:
            raise Refused(400, error.detail) from None
        return login, password

    # OwnTracks -------------------------------------------------------------------------------
    async def _owntracks(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self.service
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_OWNTRACKS_BYTES):
            raise Refused(413, f"an OwnTracks object is at most {MAX_OWNTRACKS_BYTES} bytes")
        login, _password = await self.login(scope, headers)
        payload = await self._body(receive)
        who = login.username
        if not payload.strip():
            # The app posts an empty body when a friend is deleted (its MQTT mode publishes
            # an empty retained message): nothing to take.
            service.counters.owntracks_ignored["empty"] += 1
            await self._answer_owntracks(send, 200)
            return
        now = service.now_ms()
        try:
            limit = service.device_limit
            if limit is not None and not limit.allow(login.team, login.worker):
                raise ContractError(Reason.RATE_LIMITED, f"{who} over its rate")
            message = decode_owntracks(payload, now)
        except ContractError as error:
            service.reject(error, "an OwnTracks object", who)
            await self._answer_owntracks(send, 200)
            return
        events = owntracks_events(
            message, (login.team, login.worker), service.config.gateway_id, now, 1,
            service.online_refresh,
        )
        if not events:
            service.counters.owntracks_ignored[message.type_name] += 1
            if message.monitoring is not None:
                # A status object stating the app's monitoring mode: quiet/manual pause.
                service.set_mode(login.team, login.worker, message.monitoring, now)
            await self._answer_owntracks(send, 200)
            return
        if service.backend_lagging or service.stopping:
            await self._answer_owntracks(send, 503)
            return
        held = service.submit(events, "owntracks", message.monitoring, online_resumes=False)
        try:
            async with asyncio.timeout(service.config.ack_timeout_s):
                await held
        except TimeoutError:
            # Still queued, and stored once the backend is back: the app's resend is then a
            # repeat, recognised by its (ts, seq).
            service.counters.ack_timeouts += 1
            await self._answer_owntracks(send, 503)
            return
        await self._answer_owntracks(send, 200)

    async def _answer_owntracks(self, send: Send, status: int) -> None:
        self.service.counters.requests[("owntracks", status)] += 1
        if status == 200:
            await respond(send, 200, _EMPTY_ARRAY)
        else:
            await respond(send, status, b'{"error":"the backend is not answering"}',
                          headers=[(b"retry-after", b"5")])

    async def _body(self, receive: Receive) -> bytes:
        """The request body, at most MAX_OWNTRACKS_BYTES (413 beyond, as soon as it is), within
        `body_timeout_s` (408)."""
        body = bytearray()
        try:
            async with asyncio.timeout(self.service.config.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise Refused(400, "the client went away")
                    body += message.get("body", b"")
                    if len(body) > MAX_OWNTRACKS_BYTES:
                        raise Refused(
                            413, f"an OwnTracks object is at most {MAX_OWNTRACKS_BYTES} bytes"
                        )
                    if not message.get("more_body", False):
                        return bytes(body)
        except TimeoutError:
            raise Refused(408, "the body did not arrive in time", _CLOSE) from None

    # NDJSON ----------------------------------------------------------------------------------
    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        from .stream import DeviceStream

        headers = Headers(scope=scope)
        login, password = await self.login(scope, headers)
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != NDJSON:
            raise Refused(415, f"the body must be {NDJSON}")
        if self.service.stopping:
            raise Refused(503, "the gateway is stopping")
        self.service.counters.requests[("ndjson", 200)] += 1
        await DeviceStream(self.service, login, password, receive, send).run()
