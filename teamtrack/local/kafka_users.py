"""The Kafka accounts of a cluster that teamtrack starts: one SASL/SCRAM-SHA-512 user per
role, each allowed only what the role does (ACLs of Kafka's `StandardAuthorizer`), the way
`teamtrack.local.redis_users` does it for Redis.

A local user (or a compromised process) that reaches a node's port without a password is
refused at the SASL handshake; the controller port wants the nodes' own password. With a
role's password it may do what that role does and nothing else (`{prefix}` is the backend's
`topic_prefix`, `teamtrack` by default):

* `tt-bridge`: writes `{prefix}.positions` and `{prefix}.last` (the idempotent producer
  needs nothing more since Kafka 3.0), reads `{prefix}.positions` in its mirror groups
  `{prefix}.mirror-*`;
* `tt-dashboard`: reads both topics, without a consumer group (a dashboard assigns itself
  partitions), and writes and reads `{prefix}.revoked-sessions` (logouts every instance must
  refuse; that Write is also what lets it start an idempotent producer): it cannot write a
  position or a last-known record, create, delete or trim a topic, or join anybody's group;
* `tt-ingest`: reads `{prefix}.positions` in its groups `{prefix}.ingest*`, looks up the
  offsets of `{prefix}.last` (Describe) and reads nothing else;
* `tt-rules`: the rules service: reads `{prefix}.positions` in its groups `{prefix}.rules*` and
  writes its alert notices into it;
* `tt-admin`: a super user, for operators and tools; it creates the topics at start
  (`prepare_backend`), so no role needs Create;
* `tt-broker`: the nodes themselves (replication and the controller quorum), a super user.

The passwords live in `{state}/kafka-users.json` (0600); the SCRAM users are written into the
metadata log at format time through a 0600 argument file (`teamtrack.local.kafka_server`), and each
service gets its own URL (`kafka://tt-role:password@host:port,...`) in its environment
(`TEAMTRACK_BACKEND_URL`): never on a command line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from teamtrack.local.kafka_probe import SaslUser
from teamtrack.local.kafka_server import KafkaSasl
from teamtrack.passwords import generate_secret

USERS_FILE: Final = "kafka-users.json"
ROLES: Final = ("admin", "bridge", "dashboard", "ingest", "rules")
# The nodes' own account: not a role any service runs as.
INTERNAL: Final = "broker"

# Kafka's wire codes (org.apache.kafka.common.acl / resource).
TOPIC: Final = 2
GROUP: Final = 3
LITERAL: Final = 3
PREFIXED: Final = 4
READ: Final = 3
WRITE: Final = 4
DESCRIBE: Final = 8
ALLOW: Final = 3


@dataclass(frozen=True, slots=True)
class KafkaUser:
    role: str
    password: str = field(repr=False)

    @property
    def username(self) -> str:
        return f"tt-{self.role}"

    def sasl(self) -> SaslUser:
        return SaslUser(self.username, self.password)

    def url(self, bootstrap: str) -> str:
        return f"kafka://{self.username}:{self.password}@{bootstrap}"


def load_or_create_users(state_dir: Path) -> dict[str, KafkaUser]:
    """The role accounts (and the nodes' own, `INTERNAL`) of `state_dir`, created (0600) on
    first use, kept afterwards."""
    path = state_dir / USERS_FILE
    stored: dict[str, str] = {}
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
    users = {
        role: KafkaUser(role, stored.get(role) or generate_secret(24))
        for role in (*ROLES, INTERNAL)
    }
    passwords = {role: user.password for role, user in users.items()}
    if passwords != stored:
        temporary = path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(passwords, file, indent=2)
        os.replace(temporary, path)
    return users


def sasl_config(users: dict[str, KafkaUser]) -> KafkaSasl:
    """What `start_kafka(sasl=...)` needs: the nodes' user, the role users to create at
    format time, and the admin as the one super user besides the nodes."""
    return KafkaSasl(
        internal=users[INTERNAL].sasl(),
        users=tuple(users[role].sasl() for role in ROLES),
        super_users=(users["admin"].username,),
    )


@dataclass(frozen=True, slots=True)
class AclRule:
    """Allow `principal` to `operation` on a resource (from any host)."""

    principal: str
    resource_type: int
    name: str
    pattern: int
    operation: int


def role_acls(prefix: str = "teamtrack") -> list[AclRule]:
    """The ACLs of the roles (module doc) for the topics and groups of `prefix`."""
    positions, last = f"{prefix}.positions", f"{prefix}.last"
    revocations = f"{prefix}.revoked-sessions"

    def topic(role: str, name: str, operation: int) -> AclRule:
        return AclRule(f"User:tt-{role}", TOPIC, name, LITERAL, operation)

    def groups(role: str, name: str) -> AclRule:
        return AclRule(f"User:tt-{role}", GROUP, name, PREFIXED, READ)

    return [
        topic("bridge", positions, WRITE),
        topic("bridge", last, WRITE),
        topic("bridge", positions, READ),
        groups("bridge", f"{prefix}.mirror-"),
        topic("dashboard", positions, READ),
        topic("dashboard", last, READ),
        topic("dashboard", revocations, WRITE),
        topic("dashboard", revocations, READ),
        topic("dashboard", revocations, DESCRIBE),
        topic("ingest", positions, READ),
        topic("ingest", last, DESCRIBE),
        groups("ingest", f"{prefix}.ingest"),
        # The rules service: reads in its groups, writes its alert notices into the log.
        topic("rules", positions, READ),
        topic("rules", positions, WRITE),
        topic("rules", last, DESCRIBE),
        groups("rules", f"{prefix}.rules"),
    ]


async def prepare_backend(admin_url: str) -> None:
    """As the admin: create the backend's topics (as a backend's `start` does) and grant the
    roles their ACLs. Run once the nodes answer and before any service starts."""
    from aiokafka.protocol.admin import CreateAclsRequest

    from teamtrack.backends.base import BackendError
    from teamtrack.backends.kafka import KafkaBackend

    backend = KafkaBackend.from_url(admin_url)
    await backend.start()
    try:
        admin: Any = backend.admin_client()
        for rule in role_acls(backend.options.topic_prefix):
            request = CreateAclsRequest(
                rule.resource_type, rule.name, rule.pattern, rule.principal, "*",
                rule.operation, ALLOW,
            )
            response = await admin._send_request(request)
            for creation in response.creation_responses:
                if creation[0] != 0:
                    raise BackendError(
                        f"granting {rule.principal} on {rule.name} failed: error {creation[0]}"
                        f" {creation[1] or ''}"
                    )
    finally:
        await backend.close()
