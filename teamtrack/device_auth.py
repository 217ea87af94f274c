"""Device logins over HTTP, checked against the brokers' own password file.

The device gateway must accept exactly the devices the brokers accept, with the same
passwords, and stop accepting one as soon as the brokers do. So it reads no secret of its own
(credentials.json, which holds every secret in plaintext, is never opened): it reads the
hashes `mosquitto_passwd` wrote (`mosquitto.passwd`, `teamtrack.passwords`), keeps the lines of
device accounts (`{team}.{worker}`) only, and reloads the file when its inode, size or mtime
change, as `teamtrack provision rotate|revoke` rewrite it.

A successful check is remembered by a SHA-256 of (username, password, hash line), so a phone
posting every few seconds or a device reconnecting costs one PBKDF2 per account and password
file; a rewritten file (new salts, whatever changed) costs one again. Failures are never
remembered (a wrong password always costs a check: rate limit them per address,
`teamtrack.netlimits.RateLimiter`). Checks on a cache miss run on a worker thread, so a file
with a high iteration count never holds the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from teamtrack.passwords import verify_mosquitto_password
from teamtrack.registry import parse_device_username

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE: Final = 100_000


@dataclass(frozen=True, slots=True)
class DeviceLogin:
    """An authenticated device: its account, (team, worker), and the hash line it was checked
    against (what a later reload compares, to tell whether it still holds)."""

    username: str
    team: str
    worker: str
    hash_line: str = field(repr=False)


class PasswordFileError(ValueError):
    """The password file cannot be read."""


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def read_device_hashes(path: Path) -> dict[str, str]:
    """`username -> hash` of the device accounts in a Mosquitto password file; every other
    line (managers, bridges, the observer, comments) is left out."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PasswordFileError(f"{path}: {error}") from None
    hashes: dict[str, str] = {}
    for line in text.splitlines():
        username, separator, encoded = line.strip().partition(":")
        if separator and encoded and parse_device_username(username) is not None:
            hashes[username] = encoded
    return hashes


def _cache_key(username: str, password: str, hash_line: str) -> bytes:
    return hashlib.sha256(
        b"\0".join((username.encode(), password.encode("utf-8", "surrogatepass"),
                    hash_line.encode()))
    ).digest()


class DeviceAccounts:
    """The device accounts of a password file, kept current by `reload_if_changed()`."""

    def __init__(self, path: Path, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.path = path
        self.cache_size = cache_size
        self._signature = _signature(path)
        self._hashes = read_device_hashes(path)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        # Bumped by every reload that changed something.
        self.generation = 0

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, username: object) -> bool:
        return username in self._hashes

    async def authenticate(self, username: str, password: str) -> DeviceLogin | None:
        """The device, or None: not a device account, unknown, revoked or a wrong password."""
        address = parse_device_username(username)
        hash_line = self._hashes.get(username)
        if address is None or hash_line is None:
            return None
        if not await self._matches(username, password, hash_line):
            return None
        return DeviceLogin(username, address[0], address[1], hash_line)

    async def still_valid(self, login: DeviceLogin, password: str) -> bool:
        """Whether `login` (made with `password`) holds under the file as it is now: the same
        hash line, or a new one (the file was written again) that the password still matches."""
        hash_line = self._hashes.get(login.username)
        if hash_line is None:
            return False
        if hash_line == login.hash_line:
            return True
        return await self._matches(login.username, password, hash_line)

    async def _matches(self, username: str, password: str, hash_line: str) -> bool:
        key = _cache_key(username, password, hash_line)
        if key in self._verified:
            self._verified.move_to_end(key)
            return True
        if not await asyncio.to_thread(verify_mosquitto_password, password, hash_line):
            return False
        self._verified[key] = None
        while len(self._verified) > self.cache_size:
            self._verified.popitem(last=False)
        return True

    async def reload_if_changed(self) -> bool:
        """Read the file again if it changed (one `stat` otherwise); True when it was. A file
        that cannot be read keeps the accounts in force, and is logged."""
        signature = _signature(self.path)
        if signature is None or signature == self._signature:
            return False
        self._signature = signature
        try:
            hashes = await asyncio.to_thread(read_device_hashes, self.path)
        except PasswordFileError as error:
            log.error("password file changed but cannot be read (%s); the accounts in force "
                      "stay", error)
            return False
        if hashes == self._hashes:
            return False
        self._hashes = hashes
        self.generation += 1
        log.info("password file reloaded: %d device account(s)", len(hashes))
        return True
