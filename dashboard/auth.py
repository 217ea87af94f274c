"""Who is asking: managers from dashboard-auth.json, by password, bearer token or session cookie.

Credentials travel only in the `Authorization: Bearer` header or the `tt_session` cookie, never
in a URL: URLs end up in proxy logs, browser history and Referer headers.

A session cookie is `base64url(username|team|expires|session id|generation).base64url(HMAC-SHA256)`,
signed with the session secret that every instance shares, so a login on one instance works on
all of them. The manager and team are looked up again in the directory on every use, so a
manager removed from the auth file is locked out as soon as the instance re-read it; the
generation is a digest of the manager's current token digest, so rotating the manager's secrets
(`teamtrack provision rotate`) ends every session issued before. The session id is random: a
logout records it as revoked (`Authenticator.revoke`, shared through the backend by
dashboard/revocation.py) until the cookie would have expired anyway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import orjson
from fastapi import HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import HTTPConnection

from teamtrack.contract import SLUG_PATTERN, is_slug
from teamtrack.passwords import generate_secret, hash_password, token_digest, verify_password

SESSION_COOKIE: Final = "tt_session"
MAX_COOKIE_CHARS: Final = 1024


SESSION_ID_BYTES: Final = 16
GENERATION_CHARS: Final = 16


class AuthFileError(ValueError):
    """dashboard-auth.json is missing or malformed; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Manager:
    username: str
    team: str

    def may_view(self, team: str) -> bool:
        return team == self.team


class _ManagerEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    username: str = Field(min_length=1, max_length=128)
    team: str = Field(pattern=f"^{SLUG_PATTERN}$")
    password_hash: str = Field(min_length=1)
    token_sha256: str = Field(pattern="^[0-9a-f]{64}$")


class _AuthFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    managers: list[_ManagerEntry]


class ManagerDirectory:
    """The managers allowed in, with their password hashes and token digests."""

    def __init__(self, entries: Iterable[_ManagerEntry]) -> None:
        self._entries: dict[str, _ManagerEntry] = {}
        self._by_token_digest: dict[str, Manager] = {}
        for entry in entries:
            if entry.username in self._entries:
                raise AuthFileError(f"manager {entry.username!r} is listed twice")
            self._entries[entry.username] = entry
            self._by_token_digest[entry.token_sha256] = Manager(entry.username, entry.team)
        # Unknown usernames are checked against this, so that a login attempt takes as long
        # whether or not the name exists: response times must not reveal usernames.
        self._dummy_hash = hash_password(generate_secret())

    @classmethod
    def load(cls, path: Path | str) -> ManagerDirectory:
        source = Path(path)
        try:
            document = _AuthFile.model_validate(orjson.loads(source.read_bytes()))
        except FileNotFoundError:
            raise AuthFileError(f"auth file {source} does not exist (run provisioning)") from None
        except OSError as error:
            raise AuthFileError(f"auth file {source} is unreadable: {error.strerror}") from None
        except orjson.JSONDecodeError as error:
            raise AuthFileError(f"auth file {source} is not JSON: {error}") from None
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise AuthFileError(f"auth file {source}: {where}: {first['msg']}") from None
        return cls(document.managers)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, str]]) -> ManagerDirectory:
        """From dicts shaped like the entries of dashboard-auth.json (tests, tools)."""
        return cls(_ManagerEntry.model_validate(record) for record in records)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, username: str) -> Manager | None:
        entry = self._entries.get(username)
        return Manager(entry.username, entry.team) if entry is not None else None

    def session_generation(self, username: str) -> str | None:
        """What a session cookie of this manager must name: it changes with the token (rotate)."""
        entry = self._entries.get(username)
        if entry is None:
            return None
        digest = hashlib.sha256(b"teamtrack-session:" + entry.token_sha256.encode())
        return digest.hexdigest()[:GENERATION_CHARS]

    def authenticate_password(self, username: str, password: str) -> Manager | None:
        """Slow on purpose (scrypt): call it from a worker thread, not the event loop."""
        entry = self._entries.get(username)
        if entry is None:
            verify_password(password, self._dummy_hash)
            return None
        if not verify_password(password, entry.password_hash):
            return None
        return Manager(entry.username, entry.team)

    def authenticate_token(self, token: str) -> Manager | None:
        # The lookup key is a digest the caller cannot steer, so the dict lookup leaks nothing.
        return self._by_token_digest.get(token_digest(token))


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    """What a valid session cookie says."""

    manager: Manager
    session_id: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated manager and how they proved it (cookies need an Origin check); a
    cookie's session, to revoke at logout."""

    manager: Manager
    by_cookie: bool
    session: Session | None = None


class Authenticator:
    """Passwords, tokens and signed session cookies against one `ManagerDirectory`."""

    def __init__(
        self, directory: ManagerDirectory, session_secret: str, session_max_age_s: int
    ) -> None:
        if not session_secret:
            raise ValueError("session_secret must not be empty")
        # Replaced as a whole when the auth file changes (dashboard/revocation.py).
        self.directory = directory
        self.session_max_age_s = session_max_age_s
        self._key = session_secret.encode()
        # Session id -> when it would have expired: logouts, here and on other instances.
        # Bounded by the logouts of one session life; expired ones are dropped by `prune`.
        self._revoked: dict[str, int] = {}

    def _signature(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def issue_session(self, manager: Manager, now: float | None = None) -> str:
        issued = time.time() if now is None else now
        expires = int(issued) + self.session_max_age_s
        session_id = _encode(secrets.token_bytes(SESSION_ID_BYTES))
        generation = self.directory.session_generation(manager.username) or ""
        payload = f"{manager.username}|{manager.team}|{expires}|{session_id}|{generation}"
        encoded = payload.encode()
        return f"{_encode(encoded)}.{_encode(self._signature(encoded))}"

    def read_session(self, value: str, now: float | None = None) -> Manager | None:
        """The manager of a valid, unexpired, unrevoked cookie who is still in the directory
        with the same secrets, else None."""
        session = self.session_of(value, now)
        return session.manager if session is not None else None

    def session_of(self, value: str, now: float | None = None) -> Session | None:
        if len(value) > MAX_COOKIE_CHARS or value.count(".") != 1:
            return None
        encoded_payload, encoded_signature = value.split(".")
        try:
            payload = _decode(encoded_payload)
            signature = _decode(encoded_signature)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(signature, self._signature(payload)):
            return None
        try:
            # A username may hold "|"; nothing after it does.
            username, team, expires_text, session_id, generation = (
                payload.decode().rsplit("|", 4)
            )
            expires = int(expires_text)
        except ValueError:
            return None  # not ours, or an older format without a session id: log in again
        if expires <= (time.time() if now is None else now):
            return None
        if session_id in self._revoked:
            return None
        manager = self.directory.get(username)
        if manager is None or manager.team != team:
            return None
        current = self.directory.session_generation(username)
        if current is None or not hmac.compare_digest(current, generation):
            return None
        return Session(manager, session_id, expires)

    def revoke(self, session_id: str, expires_at: int) -> bool:
        """Refuse this session from now on; False if it was already."""
        if session_id in self._revoked:
            return False
        self._revoked[session_id] = expires_at
        return True

    def prune(self, now: float | None = None) -> None:
        """Forget revocations of sessions that have expired anyway."""
        moment = time.time() if now is None else now
        self._revoked = {key: until for key, until in self._revoked.items() if until > moment}

    @property
    def revoked_count(self) -> int:
        return len(self._revoked)

    def identify(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> Identity | None:
        """The manager behind a request's bearer header, else its session cookie.

        A request that presents an `Authorization` header is judged by it alone: a bad token
        is an error, not a reason to fall back to whatever cookie the browser also sent.
        """
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            manager = self.directory.authenticate_token(token.strip())
            return Identity(manager, by_cookie=False) if manager is not None else None
        cookie = cookies.get(SESSION_COOKIE)
        if cookie:
            session = self.session_of(cookie)
            if session is not None:
                return Identity(session.manager, by_cookie=True, session=session)
        return None


def authenticator_of(request: Request) -> Authenticator:
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator


def current_manager(request: Request) -> Manager:
    """FastAPI dependency: the manager making the request, or 401."""
    identity = authenticator_of(request).identify(request.headers, request.cookies)
    if identity is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "not authenticated",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return identity.manager


def require_team(manager: Manager, team: str) -> None:
    """403 for any team but the manager's own, existing or not: team names are not revealed."""
    if not (is_slug(team) and manager.may_view(team)):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "not your team")


def live_refusal(
    connection: HTTPConnection, team: str, authenticator: Authenticator
) -> int | None:
    """The HTTP status that refuses a live view of `team` (WebSocket handshake or SSE
    request) before anything is streamed, or None to serve it."""
    identity = authenticator.identify(connection.headers, connection.cookies)
    if identity is None:
        return 401
    # Bearer tokens are never sent by browsers on their own, so only cookie logins can be
    # abused by another site's page (cross-site WebSocket hijacking, a cross-site EventSource).
    if identity.by_cookie and not origin_matches_site(connection.headers, connection.url.scheme):
        return 403
    if not (is_slug(team) and identity.manager.may_view(team)):
        return 403
    return None


_DEFAULT_PORTS: Final = {"http": "80", "https": "443"}
# A WebSocket's scope says ws/wss; the page that opened it was http/https.
_WEB_SCHEMES: Final = {"ws": "http", "wss": "https"}


def _origin(scheme: str, authority: str) -> str:
    """`scheme://host[:port]`, lower case, without the scheme's default port."""
    scheme = _WEB_SCHEMES.get(scheme.lower(), scheme.lower())
    authority = authority.lower()
    default_port = _DEFAULT_PORTS.get(scheme)
    if default_port is not None and authority.endswith(f":{default_port}"):
        authority = authority[: -len(default_port) - 1]
    return f"{scheme}://{authority}"


def _is_own_origin(origin: str, scheme: str, headers: Mapping[str, str]) -> bool:
    origin_scheme, separator, authority = origin.partition("://")
    host = headers.get("host")
    if not separator or not authority or "/" in authority or host is None:
        return False  # "null" (sandboxed frames, privacy redirects) and anything malformed
    return _origin(origin_scheme, authority) == _origin(scheme, host)


def origin_matches_site(headers: Mapping[str, str], scheme: str) -> bool:
    """False when a browser says the page that opened this socket came from another origin.

    Browsers attach cookies to cross-site WebSocket handshakes and the Same-Origin Policy does
    not apply to them, so without this check any web page could read a logged-in manager's team.
    The whole origin counts, scheme included: behind a TLS proxy (`scheme` is then `wss`), a
    page served over plain http on the same host and port is another origin.
    """
    origin = headers.get("origin")
    return origin is None or _is_own_origin(origin, scheme, headers)


def form_post_is_own(headers: Mapping[str, str], scheme: str) -> bool:
    """False for a form posted by another site's page (login or logout CSRF).

    Browsers send `Origin` with every POST (`null` when the page's referrer policy hides it,
    which is why the pages use `same-origin` or `strict-origin-when-cross-origin`); without it,
    `Referer` is checked; with neither the client is not a browser, and cannot be tricked.
    """
    origin = headers.get("origin")
    if origin is None:
        referer = headers.get("referer")
        if referer is None:
            return True
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "null"
    return _is_own_origin(origin, scheme, headers)
