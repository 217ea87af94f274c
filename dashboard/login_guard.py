"""What stands between the login form and scrypt: rate limits and a bounded password checker.

One scrypt check costs ~16 MB and tens of milliseconds of a core. Unguarded, 200 parallel bad
logins ran 40 at once in Starlette's thread pool and took a dashboard from 73 MB to 721 MB,
its /healthz to seconds. Here:

* every failed attempt is charged to its client address (IPv6: its /64) and to the account it
  names (existing or not, so that a `429` never tells which names exist); an empty bucket
  answers `429` with `Retry-After`, without any password check;
* checks run on a pool of `concurrency` threads of their own (so at most that many scrypt
  buffers exist, ever: glibc keeps a freed buffer in the arena of the thread that used it, and
  a big shared pool keeps one per thread), with at most `queue` more waiting; beyond that the
  answer is `503` with `Retry-After` at once;
* the limiters' state is a bounded LRU: an attacker cycling through names or addresses costs a
  fixed amount of memory, and evicts nothing useful sooner than `max_keys` attempts later.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dashboard.auth import Manager, ManagerDirectory
from teamtrack.netlimits import DEFAULT_MAX_KEYS, RateLimiter, address_key


@dataclass(frozen=True, slots=True)
class LoginLimits:
    """How many password checks may run, wait, and be asked for per address and account."""

    concurrency: int = 2
    queue: int = 32
    per_address_per_minute: int = 10
    per_account_per_minute: int = 5
    max_keys: int = DEFAULT_MAX_KEYS

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.queue < 0:
            raise ValueError("login concurrency must be at least 1 and the queue not negative")


class LoginRefused(Exception):
    """The attempt was not checked: `status` 429 (a rate limit) or 503 (checks busy)."""

    def __init__(self, status: int, retry_after_s: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after_s = retry_after_s
        self.reason = reason


def _yield_to_the_event_loop() -> None:
    """Lowers this checker thread's scheduling priority (Linux: a thread's own nice value), so
    that on a busy machine the event loop (/healthz, live frames) runs first."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def release_large_buffers() -> None:
    """Makes glibc hand every allocation of 1 MiB or more back to the system when it is freed.

    By default glibc raises that threshold after the first such buffer is freed (up to 32 MiB),
    so each thread's arena would keep a 16 MB scrypt buffer for good. Call it once, at start;
    nothing happens where the C library is not glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1024 * 1024)


class LoginGuard:
    """Checks a login form's password within `LoginLimits`; call from the event loop."""

    def __init__(
        self,
        directory: ManagerDirectory,
        limits: LoginLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.limits = limits if limits is not None else LoginLimits()
        self.by_address = RateLimiter(
            self.limits.per_address_per_minute, self.limits.max_keys, clock
        )
        self.by_account = RateLimiter(
            self.limits.per_account_per_minute, self.limits.max_keys, clock
        )
        self._in_flight = 0
        self._executor: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stops the checker threads (a later check starts new ones)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def check(self, address: str | None, username: str, password: str) -> Manager | None:
        """The manager, None for a wrong name or password; raises `LoginRefused` unchecked."""
        address_id = address_key(address)
        wait = self.by_address.take(address_id)
        if wait:
            raise LoginRefused(429, math.ceil(wait), "Too many sign-in attempts from here.")
        wait = self.by_account.take(username)
        if wait:
            raise LoginRefused(429, math.ceil(wait), "Too many sign-in attempts for this user.")
        if self._in_flight >= self.limits.concurrency + self.limits.queue:
            self.by_address.give_back(address_id)
            self.by_account.give_back(username)
            raise LoginRefused(503, 1, "Too many sign-ins right now.")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.limits.concurrency,
                thread_name_prefix="password-check",
                initializer=_yield_to_the_event_loop,
            )
        self._in_flight += 1
        try:
            manager = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.directory.authenticate_password, username, password
            )
        finally:
            self._in_flight -= 1
        if manager is not None:
            # Only failures count: a manager signing in often is not an attack.
            self.by_address.give_back(address_id)
            self.by_account.give_back(username)
        return manager
