"""What `teamtrack up` does besides supervising: its state folder made private, its brokers
told to reload, and an external backend probed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
from pathlib import Path

from teamtrack.local.kafka_probe import SaslUser, broker_answers_metadata
from teamtrack.local.servers import LOOPBACK

# role -> pid of every child, rewritten when one is restarted.
PROCESSES_FILE = "processes.json"


def reload_brokers(state_dir: Path) -> list[str]:
    """SIGHUP to the brokers of the `teamtrack up` running in `state_dir` (its processes.json):
    they read the password file and the ACL again, and their subscription plugin too. Only a
    pid that still runs mosquitto is signalled (a stale file's pid may be anybody's now).
    Returns the roles signalled; none when no cluster runs there."""
    try:
        processes = json.loads((state_dir / PROCESSES_FILE).read_text())
    except (OSError, ValueError):
        return []
    signalled = []
    for role, pid in sorted(processes.items()):
        if not (role.startswith("broker-") and isinstance(pid, int) and _runs_mosquitto(pid)):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGHUP)
            signalled.append(role)
    return signalled


def _runs_mosquitto(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and Path(argv[0].decode(errors="replace")).name == "mosquitto"


def make_private(folder: Path) -> None:
    """Take group and other permissions off `folder` and everything in it (0755 -> 0700,
    0644 -> 0600; the owner's bits stay as they are, links are left alone)."""
    for root, folders, files in os.walk(folder):
        for name in (*folders, *files):
            _owner_only(os.path.join(root, name))
    _owner_only(str(folder))


def _owner_only(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # a server's temporary file, gone meanwhile
        status = os.lstat(path)
        if not stat.S_ISLNK(status.st_mode) and status.st_mode & 0o077:
            os.chmod(path, stat.S_IMODE(status.st_mode) & 0o700)


def backend_answers(url: str, timeout: float = 0.5) -> bool:
    """Whether the backend at `url` answers on any of its hosts: Redis (or a Sentinel) a PING
    (an error reply such as NOAUTH is an answer too), Kafka a Metadata request (after SASL,
    as the URL's user, when it names one); over TLS (`rediss://`), a connection that opens."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    kafka_user = None
    if parts.scheme == "kafka" and parts.username and parts.password:
        kafka_user = SaslUser(unquote(parts.username), unquote(parts.password))
    default_port = {"kafka": 9092, "redis+sentinel": 26379}.get(parts.scheme, 6379)
    for server in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = server.rpartition(":") if ":" in server else (server, "", "")
        address = (host.strip("[]") or LOOPBACK, int(port) if port.isdigit() else default_port)
        if parts.scheme == "kafka":
            if broker_answers_metadata(*address, timeout, kafka_user):
                return True
            continue
        try:
            with socket.create_connection(address, timeout=timeout) as connection:
                if parts.scheme == "rediss":
                    return True
                connection.settimeout(timeout)
                connection.sendall(b"PING\r\n")
                if connection.recv(64)[:1] in (b"+", b"-"):
                    return True
        except OSError:
            continue
    return False


def without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
