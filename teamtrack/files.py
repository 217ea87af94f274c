"""Files replaced in one step (a reader sees the old content or the new, never a part), and the
lock a running `teamtrack up` holds on its state folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import IO

PRIVATE_MODE = 0o600


def temporary_sibling(target: Path, mode: int = PRIVATE_MODE) -> Path:
    """An empty file of `mode` beside `target` (same file system: `os.replace` is atomic)."""
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(descriptor)
    temporary = Path(name)
    temporary.chmod(mode)
    return temporary


def write_atomically(target: Path, content: bytes, mode: int = PRIVATE_MODE) -> None:
    temporary = temporary_sibling(target, mode)
    try:
        temporary.write_bytes(content)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomically(target: Path, data: object, mode: int = PRIVATE_MODE) -> None:
    write_atomically(target, (json.dumps(data, indent=2) + "\n").encode(), mode)


SUPERVISOR_LOCK = "supervisor.lock"


def hold_supervisor_lock(state_dir: Path) -> IO[bytes] | None:
    """The state folder's lock, held until the file returned is closed (or the process ends,
    however it ends); None when another process holds it."""
    lock = (state_dir / SUPERVISOR_LOCK).open("ab")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def supervisor_running(state_dir: Path) -> bool:
    """Whether a `teamtrack up` holds the state folder's lock now."""
    try:
        lock = (state_dir / SUPERVISOR_LOCK).open("rb")
    except FileNotFoundError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_UN)
        return False
