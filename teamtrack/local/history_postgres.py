"""A throwaway PostgreSQL server for the history's tests and benchmark: `initdb` into a temporary
folder, `postgres` on a free loopback port, everything removed on stop.

The binaries come from PATH or from Debian's `postgresql` package, which keeps them under
`/usr/lib/postgresql/{version}/bin` (the newest version wins). PostgreSQL refuses to run as
root, so under root the server runs as the `postgres` user that package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from teamtrack.local.servers import LOOPBACK, ServerError, free_port, port_is_open

DEBIAN_BINARIES = "/usr/lib/postgresql/*/bin"
SERVER_USER = "postgres"
SUPERUSER = "teamtrack"


def find_postgres_binaries() -> Path:
    """The folder holding both `initdb` and `postgres`; ServerError naming the fix if none."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
        candidates.append(Path(on_path).parent)
    versioned = glob.glob(DEBIAN_BINARIES)
    versioned.sort(key=lambda folder: _version_key(Path(folder).parent.name), reverse=True)
    candidates += [Path(folder) for folder in versioned]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise ServerError(
        "PostgreSQL server binaries (initdb, postgres) not found on PATH or in "
        f"{DEBIAN_BINARIES}; install Debian's `postgresql` package (make test does)"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


@dataclass
class PostgresServer:
    """A running server; `url(database)` gives SQLAlchemy URLs for the asyncpg driver."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes]
    host: str = LOOPBACK
    user: str = SUPERUSER
    databases: list[str] = field(default_factory=list)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{database}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.folder / "postgres.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import asyncpg  # type: ignore[import-untyped]

        connection = await asyncpg.connect(
            host=self.host, port=self.port, user=self.user, database="postgres"
        )
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        self.databases.append(name)
        return self.url(name)

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT: sessions are ended), then remove the folder."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.folder, ignore_errors=True)


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise ServerError(
            f"PostgreSQL does not run as root and there is no {SERVER_USER!r} user; "
            "install Debian's `postgresql` package, or run as another user"
        ) from None


def start_postgres(
    port: int | None = None, *, durable: bool = False, timeout: float = 30.0
) -> PostgresServer:
    """A fresh cluster on loopback. `durable=False` turns fsync off (tests); True keeps the
    defaults a production server has (benchmarks)."""
    binaries = find_postgres_binaries()
    account = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="teamtrack-postgres-"))
    data = folder / "data"
    if account is not None:
        os.chown(folder, account.pw_uid, account.pw_gid)
    uid = account.pw_uid if account is not None else None
    gid = account.pw_gid if account is not None else None
    extra_groups: list[int] | None = [] if account is not None else None
    initdb = subprocess.run(
        [
            str(binaries / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust",
            "-E", "UTF8", "--locale", "C", "--no-sync",
        ],
        capture_output=True,
        check=False,
        user=uid,
        group=gid,
        extra_groups=extra_groups,
    )
    if initdb.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise ServerError(f"initdb failed:\n{initdb.stderr.decode(errors='replace')[-2000:]}")
    port = port if port is not None else free_port()
    argv = [
        str(binaries / "postgres"), "-D", str(data), "-p", str(port),
        "-c", f"listen_addresses={LOOPBACK}",
        "-c", f"unix_socket_directories={folder}",
        "-c", "max_connections=50",
    ]
    if not durable:
        argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    log_file = (folder / "postgres.log").open("ab")
    process = subprocess.Popen(
        argv,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        user=uid,
        group=gid,
        extra_groups=extra_groups,
    )
    log_file.close()
    server = PostgresServer(port, folder, process)
    deadline = time.monotonic() + timeout
    # The port opens before startup ends; this line says the server takes sessions.
    while not (port_is_open(LOOPBACK, port) and "ready to accept connections" in server.log_tail()):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise ServerError(f"postgres did not start on {port}:\n{server.log_tail()}")
        time.sleep(0.05)
    return server


__all__ = ["PostgresServer", "find_postgres_binaries", "start_postgres"]
