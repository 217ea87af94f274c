"""Child processes of real servers (Mosquitto, Redis, our own services) on loopback ports.

Used by `teamtrack up` and by the test fixtures, so that both run the same servers the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A child server failed to start; the message ends with the tail of its log."""


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the parent dies, so a killed supervisor leaves no orphans.

    Linux sends it when the *thread* that started the child ends, not only the process: start
    children (and restart them) from a thread that lives as long as they should, such as the
    main thread or an event loop's.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_is_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


@dataclass
class ManagedProcess:
    """A child process whose output goes to a log file, stopped with SIGTERM then SIGKILL."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                # A process group of its own: Ctrl-C in the terminal reaches the supervisor,
                # which then stops children in order instead of all at once.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_for_port(self, host: str, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise ServerError(f"{self.name} exited early:\n{self.log_tail()}")
            if port_is_open(host, port):
                return
            time.sleep(0.05)
        raise ServerError(
            f"{self.name} did not open {host}:{port} in {timeout}s:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode


# Redis' append-only file, written before each reply and fsynced once a second: a Redis process
# that is killed loses nothing it acknowledged (the kernel has it); a host that loses power loses
# at most the last second or two. "always" fsyncs before every reply (docs/architecture.md has
# what each costs, measured).
APPENDFSYNC_POLICIES = ("everysec", "always", "no")


def redis_argv(
    port: int, data_dir: Path, host: str = LOOPBACK, *, appendfsync: str = "everysec"
) -> list[str]:
    """A loopback Redis whose data survives a crash of its process (AOF in `data_dir`)."""
    if appendfsync not in APPENDFSYNC_POLICIES:
        raise ValueError(f"appendfsync must be one of {', '.join(APPENDFSYNC_POLICIES)}")
    return [
        "redis-server",
        "--port", str(port),
        "--bind", host,
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", appendfsync,
        "--dir", str(data_dir),
        "--protected-mode", "yes",
    ]


def start_redis(
    port: int, data_dir: Path, host: str = LOOPBACK, *, appendfsync: str = "everysec"
) -> ManagedProcess:
    """A Redis on loopback with its append-only file in `data_dir`; started again on the same
    folder, it comes back with everything it had acknowledged."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = redis_argv(port, data_dir, host, appendfsync=appendfsync)
    server = ManagedProcess("redis", argv, data_dir / "redis.log").start()
    server.wait_for_port(host, port)
    return server


def start_mosquitto(config_path: Path, port: int, host: str = LOOPBACK) -> ManagedProcess:
    server = ManagedProcess(
        f"mosquitto:{port}", ["mosquitto", "-c", str(config_path)], config_path.with_suffix(".log")
    ).start()
    server.wait_for_port(host, port)
    return server
