"""How the harness talks to its generator and receiver processes: JSON lines over stdin/stdout.

The first line the parent writes is the child's configuration (it carries passwords, so it never
goes on a command line); every later line is a command `{"cmd": ...}`. The child answers with
events `{"event": ...}`, one per line; `progress` events may come at any time and only the
newest is kept. A child ends when told `stop` or when its stdin closes, so a harness that dies
takes its children with it. A child's stderr (logs, tracebacks) goes to a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import orjson

from teamtrack.bench.config import BenchError

# A generator's configuration lists thousands of identities on one line.
LINE_LIMIT: Final = 64 * 1024 * 1024
STOP_TIMEOUT_S: Final = 30.0
PROGRESS: Final = "progress"


# Child side ------------------------------------------------------------------------------------
async def stdin_lines() -> AsyncIterator[dict[str, Any]]:
    """The parent's lines as objects, until stdin closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        if line.strip():
            yield orjson.loads(line)


def emit(event: str, **fields: Any) -> None:
    """Send one event to the parent."""
    sys.stdout.buffer.write(orjson.dumps({"event": event, **fields}) + b"\n")
    sys.stdout.buffer.flush()


# Parent side -----------------------------------------------------------------------------------
class ChildProcess:
    """One generator or receiver process, driven by commands and awaited on its events."""

    def __init__(self, role: str, module: str, log_path: Path) -> None:
        self.role = role
        self.module = module
        self.log_path = log_path
        self.progress: dict[str, Any] = {}
        self._process: asyncio.subprocess.Process | None = None
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise BenchError(f"{self.role} is not started")
        return self._process.pid

    async def start(self, config: dict[str, Any]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                limit=LINE_LIMIT,
            )
        self._reader = asyncio.create_task(self._read_events(), name=f"{self.role}-events")
        await self._write(config)

    async def _write(self, message: dict[str, Any]) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise BenchError(f"{self.role} is not started")
        try:
            process.stdin.write(orjson.dumps(message) + b"\n")
            await process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise self._failure("stopped taking commands") from None

    async def _read_events(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        try:
            while line := await stdout.readline():
                event = orjson.loads(line)
                if event.get("event") == PROGRESS:
                    self.progress = event
                else:
                    self._events.put_nowait(event)
        finally:
            self._events.put_nowait(None)

    def _failure(self, what: str) -> BenchError:
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        return BenchError(f"{self.role} {what} (log: {self.log_path})\n{tail}")

    async def command(self, cmd: str, **fields: Any) -> None:
        await self._write({"cmd": cmd, **fields})

    async def expect(self, event: str, wait_s: float) -> dict[str, Any]:
        """Wait for the next event other than progress; it must be `event`."""
        try:
            received = await asyncio.wait_for(self._events.get(), wait_s)
        except TimeoutError:
            raise self._failure(f"sent no {event!r} within {wait_s:.0f} s") from None
        if received is None:
            self._events.put_nowait(None)
            raise self._failure(f"exited while the harness waited for {event!r}")
        if received.get("event") == "error":
            raise self._failure(f"failed: {received.get('message')}")
        if received.get("event") != event:
            raise self._failure(f"sent {received.get('event')!r} instead of {event!r}")
        return received

    async def request(
        self, cmd: str, reply: str, wait_s: float, **fields: Any
    ) -> dict[str, Any]:
        await self.command(cmd, **fields)
        return await self.expect(reply, wait_s)

    async def stop(self, wait_s: float = STOP_TIMEOUT_S) -> None:
        """Ask the child to stop; kill it if it does not exit in time."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(BenchError):
                await self.command("stop")
            if process.stdin is not None:
                process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), wait_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader
