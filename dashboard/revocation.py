"""Credentials that end before their time, on every instance (docs/security.md, "Revocation").

Two sources, both read by one loop every `poll_s` (default 1 s), bounded work per turn:

* the auth file (`teamtrack provision rotate|revoke` rewrites it atomically): one `stat`; when
  its inode, size or mtime changed, it is parsed again on a worker thread and replaces the
  directory as a whole. A file that does not parse is logged and the managers in force stay.
* logouts: each instance records a logged-out session id in the shared backend
  (`Backend.revoke_session`) and reads the others' (`Backend.session_revocations`, only what is
  new since its last read). A revocation is kept until the cookie would have expired anyway.

After either changed, every open live connection (WebSocket or SSE stream) is checked again
with the credentials it was opened with, and those no longer valid are ended with 4401
(`LiveSessions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Final

from starlette.requests import HTTPConnection

from dashboard.auth import Authenticator, AuthFileError, ManagerDirectory, Session
from dashboard.login_guard import LoginGuard
from teamtrack.backends import Backend, BackendError, SessionRevocation

log = logging.getLogger(__name__)

DEFAULT_POLL_S: Final = 1.0
# Revocations read at most per turn (each call returns up to the backend's page size).
MAX_READS_PER_TURN: Final = 10


class LiveSessions:
    """The open live connections (WebSockets and SSE requests), each with the team it shows and
    the event that ends it."""

    def __init__(self) -> None:
        self._open: dict[HTTPConnection, tuple[str, asyncio.Event]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def add(self, connection: HTTPConnection, team: str) -> asyncio.Event:
        ended = asyncio.Event()
        self._open[connection] = (team, ended)
        return ended

    def discard(self, connection: HTTPConnection) -> None:
        self._open.pop(connection, None)

    def recheck(self, authenticator: Authenticator) -> int:
        """End every connection whose bearer token or cookie no longer lets it see its team;
        the number ended. One token lookup or cookie check (an HMAC) per open connection."""
        ended_now = 0
        for connection, (team, ended) in self._open.items():
            if ended.is_set():
                continue
            identity = authenticator.identify(connection.headers, connection.cookies)
            if identity is None or not identity.manager.may_view(team):
                ended.set()
                ended_now += 1
        return ended_now


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


class CredentialWatch:
    """Keeps an `Authenticator` current: the auth file's managers and every instance's logouts."""

    def __init__(
        self,
        authenticator: Authenticator,
        backend: Backend,
        live: LiveSessions,
        *,
        auth_file: Path | None = None,
        login_guard: LoginGuard | None = None,
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        self.authenticator = authenticator
        self.backend = backend
        self.live = live
        self.auth_file = auth_file
        self.login_guard = login_guard
        self.poll_s = poll_s
        self._signature = _file_signature(auth_file) if auth_file is not None else None
        self._after = ""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the logouts recorded so far (a restarted instance must refuse them too), then
        watch in the background."""
        await self._read_revocations()
        self._task = asyncio.create_task(self._run(), name="credential-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.check_now()
            except Exception:  # the watch must outlive any one bad turn
                log.exception("checking credentials failed; trying again in %ss", self.poll_s)
            # A cancellation that the backend's driver lost (Python 3.11's `wait_for`, see
            # teamtrack.backends.redis_connect.raise_if_cancelled) must still end the loop, or
            # `stop`, and with it the dashboard's shutdown, waits forever.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError

    async def check_now(self) -> int:
        """One turn: reload the auth file if it changed, read new logouts, end the sockets
        that lost their credentials (returns how many)."""
        changed = await self._reload_if_changed()
        changed = await self._read_revocations() or changed
        if not changed:
            return 0
        self.authenticator.prune()
        ended = self.live.recheck(self.authenticator)
        if ended:
            log.info("closed %d live connection(s) whose credentials were revoked", ended)
        return ended

    async def logout(self, session: Session) -> None:
        """Refuse `session` here at once, end its sockets here, and tell the other instances."""
        self.authenticator.revoke(session.session_id, session.expires_at)
        self.live.recheck(self.authenticator)
        revocation = SessionRevocation(session.session_id, session.expires_at)
        try:
            await self.backend.revoke_session(revocation, self.authenticator.session_max_age_s)
        except Exception as error:  # BackendError, or a driver's own
            log.error(
                "logout of %s is refused on this instance only: the backend did not record "
                "it (%s: %s)", session.manager.username, type(error).__name__, error,
            )

    async def _reload_if_changed(self) -> bool:
        if self.auth_file is None:
            return False
        signature = _file_signature(self.auth_file)
        if signature is None or signature == self._signature:
            return False
        self._signature = signature
        try:
            directory = await asyncio.to_thread(ManagerDirectory.load, self.auth_file)
        except AuthFileError as error:
            log.error("auth file changed but cannot be used (%s); the managers in force stay",
                      error)
            return False
        self.authenticator.directory = directory
        if self.login_guard is not None:
            self.login_guard.directory = directory
        log.info("auth file reloaded: %d manager(s)", len(directory))
        return True

    async def _read_revocations(self) -> bool:
        found = False
        try:
            for _ in range(MAX_READS_PER_TURN):
                revocations, self._after = await self.backend.session_revocations(self._after)
                for revocation in revocations:
                    found = self.authenticator.revoke(
                        revocation.session_id, revocation.expires_at
                    ) or found
                if not revocations:
                    break
        except (BackendError, OSError) as error:
            log.warning("reading logouts from the backend failed: %s", error)
        return found
