"""The Redis accounts of a cluster that teamtrack starts: one per role, each allowed only what
the role does (Redis 7 ACL rules, written as an `--aclfile` with hashed passwords).

A local user (or a compromised process) that reaches the port without a password gets
`NOAUTH`: the `default` user has a password. With a role's password it may do what that role
does and nothing else:

* `tt-bridge`: reads and writes `{prefix}:*` with the publish script (EVALSHA) and the
  mirror's consumer group (XREADGROUP, XGROUP CREATE, XINFO, XACK);
* `tt-dashboard`: reads `{prefix}:*` (XREAD, XRANGE, XREVRANGE, HGETALL/HGET/HMGET in a
  MULTI) and writes only its own wake streams `{prefix}:wake:*` (XADD, EXPIRE, DEL) and the
  logouts every dashboard reads, `{prefix}:revoked-sessions` (XADD);
* `tt-ingest`: reads and writes `{prefix}:*` with its consumer group, EXISTS/SET of the
  last-known marker and the restore script;
* `tt-rules`: the rules service: its consumer group (as the ingest) and the publish script
  (as a bridge: the alert notices it writes into the teams' logs);
* `default`: everything, for operators and tools (`redis-cli --askpass`). It is the admin
  account rather than an account switched off because Redis 7.0 replays its append-only file
  with the default user's rights: with `default` off, a restart refused every MULTI/EXEC in
  the file (a publish script's effects) and came back empty.

So a dashboard's password, the one most exposed (it runs next to the managers' web traffic),
reads every team (as a dashboard must) but cannot write a position, a last-known entry or a
log entry: it cannot inject a worker. SCRIPT LOAD is allowed to every role (the backend loads
its scripts at start); it loads a script without running it.

The passwords live in `{state}/redis-users.json` (0600) and reach each service in its
environment (`TEAMTRACK_BACKEND_URL`), never on a command line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from teamtrack.passwords import generate_secret

USERS_FILE: Final = "redis-users.json"
ACL_FILE: Final = "users.acl"
ROLES: Final = ("admin", "bridge", "dashboard", "ingest", "rules")
_CONNECTION: Final = "-@all +@connection +ping +script|load"
_GROUP: Final = "+xreadgroup +xgroup|create +xinfo|stream +xinfo|groups +xack +xautoclaim"


@dataclass(frozen=True, slots=True)
class RedisUser:
    role: str
    password: str

    @property
    def username(self) -> str:
        return "default" if self.role == "admin" else f"tt-{self.role}"

    def url(self, host: str, port: int, db: int = 0) -> str:
        return f"redis://{self.username}:{self.password}@{host}:{port}/{db}"


def load_or_create_users(state_dir: Path) -> dict[str, RedisUser]:
    """The role accounts of `state_dir`, created (0600) on first use, kept afterwards."""
    path = state_dir / USERS_FILE
    stored: dict[str, str] = {}
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
    users = {role: RedisUser(role, stored.get(role) or generate_secret(24)) for role in ROLES}
    if {role: user.password for role, user in users.items()} != stored:
        temporary = path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump({role: user.password for role, user in users.items()}, file, indent=2)
        os.replace(temporary, path)
    return users


def acl_text(users: dict[str, RedisUser], prefix: str = "tt") -> str:
    """The `--aclfile` for `users`: the default user off, each role its rules (module doc)."""
    keys = f"~{prefix}:*"
    rules = {
        "admin": "~* &* +@all",
        # What the publish script does with the keys it is given, and the mirror's group.
        "bridge": (
            f"{keys} resetchannels {_CONNECTION} +evalsha +eval +wait +xadd +xtrim +xrevrange"
            f" +hmget +hset {_GROUP}"
        ),
        "dashboard": (
            f"%R~{prefix}:* %RW~{prefix}:wake:* %RW~{prefix}:revoked-sessions resetchannels"
            f" {_CONNECTION} +xread +xrange"
            " +xrevrange +hgetall +hget +hmget +multi +exec +discard +xadd +expire +del"
        ),
        "ingest": (
            f"{keys} resetchannels {_CONNECTION} {_GROUP} +exists +set +evalsha +eval +hget"
            " +hset"
        ),
        # Its consumer group, like the ingest, and the publish script, like a bridge (the
        # notices of alerts it writes into the teams' logs).
        "rules": (
            f"{keys} resetchannels {_CONNECTION} {_GROUP} +evalsha +eval +wait +xadd +xtrim"
            " +xrevrange +hmget +hget +hset +exists"
        ),
    }
    lines = []
    for role, user in users.items():
        digest = hashlib.sha256(user.password.encode()).hexdigest()
        lines.append(f"user {user.username} on #{digest} {rules[role]}")
    return "\n".join(lines) + "\n"


def write_acl_file(users: dict[str, RedisUser], directory: Path, prefix: str = "tt") -> Path:
    """The ACL file (0600, hashes only) in `directory`, for `redis-server --aclfile`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ACL_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(acl_text(users, prefix))
    return path
