"""Readiness probes of a Kafka node in the Kafka protocol itself, on a plain socket (no client
library, so that a node is probed before any client would connect): which brokers the
metadata lists, whether a group coordinator answers, after a SASL/SCRAM-SHA-512 exchange when
the node wants one. Used by `teamtrack.local.kafka_server` and `teamtrack up`'s supervisor.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import socket
import struct
from dataclasses import dataclass, field

SCRAM_MECHANISM = "SCRAM-SHA-512"
SAFE_SASL_TEXT = re.compile(r"[A-Za-z0-9._~-]{1,128}")


def jaas_value(text: str) -> str:
    """`text` quoted for a JAAS line; it must be plain enough for every place it goes (JAAS,
    `--add-scram`'s `[name=...,password=...]`, a Java argument file): URL-safe characters."""
    if not SAFE_SASL_TEXT.fullmatch(text):
        raise ValueError("a Kafka SASL user name or password must be 1-128 characters of "
                         "A-Z a-z 0-9 . _ ~ -")
    return f'"{text}"'


@dataclass(frozen=True)
class SaslUser:
    """A SASL user name and its password (never shown: not in repr, logs or errors)."""

    name: str
    password: str = field(repr=False)



METADATA_API_KEY = 3
METADATA_VERSION = 4  # the oldest version Kafka 4 still serves
FIND_COORDINATOR_API_KEY = 10
FIND_COORDINATOR_VERSION = 1
SASL_HANDSHAKE_API_KEY = 17
SASL_HANDSHAKE_VERSION = 1
SASL_AUTHENTICATE_API_KEY = 36
SASL_AUTHENTICATE_VERSION = 1
PROBE_GROUP = b"teamtrack-probe"
CLIENT_ID = b"teamtrack-probe"


def _string(text: bytes) -> bytes:
    return struct.pack(">h", len(text)) + text


def _exchange(connection: socket.socket, correlation_id: int, api_key: int, version: int,
              body: bytes) -> bytes:
    """One request on `connection`; the response after its correlation id."""
    request = struct.pack(">hhi", api_key, version, correlation_id) + _string(CLIENT_ID) + body
    connection.sendall(struct.pack(">i", len(request)) + request)
    (size,) = struct.unpack(">i", _receive_exactly(connection, 4))
    response = _receive_exactly(connection, size)
    if len(response) < 4 or struct.unpack_from(">i", response)[0] != correlation_id:
        raise ConnectionError("the broker answered another request")
    return response[4:]


def _sasl_step(connection: socket.socket, correlation_id: int, message: bytes) -> bytes:
    """One SaslAuthenticate v1 round: the server's reply, or ConnectionError when refused."""
    response = _exchange(connection, correlation_id, SASL_AUTHENTICATE_API_KEY,
                         SASL_AUTHENTICATE_VERSION, struct.pack(">i", len(message)) + message)
    (error_code,) = struct.unpack_from(">h", response)
    (message_length,) = struct.unpack_from(">h", response, 2)
    at = 4 + max(0, message_length)
    (size,) = struct.unpack_from(">i", response, at)
    if error_code != 0:
        raise ConnectionError(f"SASL authentication refused (error {error_code})")
    return response[at + 4:at + 4 + size]


def _authenticate(connection: socket.socket, user: SaslUser) -> int:
    """SASL/SCRAM-SHA-512 (RFC 5802) on a fresh connection; the next correlation id."""
    response = _exchange(connection, 1, SASL_HANDSHAKE_API_KEY, SASL_HANDSHAKE_VERSION,
                         _string(SCRAM_MECHANISM.encode()))
    if struct.unpack_from(">h", response)[0] != 0:
        raise ConnectionError(f"the broker does not offer {SCRAM_MECHANISM}")
    nonce = secrets.token_urlsafe(18)
    first_bare = f"n={jaas_value(user.name)[1:-1]},r={nonce}"
    server_first = _sasl_step(connection, 2, f"n,,{first_bare}".encode()).decode()
    fields = dict(item.split("=", 1) for item in server_first.split(","))
    if not fields.get("r", "").startswith(nonce):
        raise ConnectionError("the broker's SCRAM nonce does not extend ours")
    salted = hashlib.pbkdf2_hmac(
        "sha512", user.password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha512")
    without_proof = f"c=biws,r={fields['r']}"
    auth_message = f"{first_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(hashlib.sha512(client_key).digest(), auth_message, "sha512")
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
    server_final = _sasl_step(connection, 3, f"{without_proof},p={proof.decode()}".encode())
    server_key = hmac.digest(salted, b"Server Key", "sha512")
    expected = base64.b64encode(hmac.digest(server_key, auth_message, "sha512"))
    if not hmac.compare_digest(server_final, b"v=" + expected):
        raise ConnectionError("the broker did not prove it knows the SCRAM credential")
    return 4


def _request(host: str, port: int, api_key: int, version: int, body: bytes,
             timeout: float, user: SaslUser | None = None) -> bytes | None:
    """One request on a fresh connection (authenticated as `user` first, if given); the
    response after its correlation id, or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.settimeout(timeout)
            correlation_id = 1 if user is None else _authenticate(connection, user)
            return _exchange(connection, correlation_id, api_key, version, body)
    except (OSError, struct.error, ValueError, KeyError, UnicodeDecodeError):
        return None


def broker_answers_metadata(
    host: str, port: int, timeout: float = 2.0, user: SaslUser | None = None
) -> bool:
    """True once the broker serves a Metadata request that lists at least one live broker.

    Spoken on the wire rather than through a client library, so that plain synchronous code
    (the launcher, `teamtrack up`) can wait for readiness without an event loop.
    """
    return broker_count(host, port, timeout, user) > 0


def broker_count(
    host: str, port: int, timeout: float = 2.0, user: SaslUser | None = None
) -> int:
    """How many live (registered, unfenced) brokers the broker at host:port knows; 0 when it
    does not answer."""
    return len(live_brokers(host, port, timeout, user))


def live_brokers(
    host: str, port: int, timeout: float = 2.0, user: SaslUser | None = None
) -> set[int]:
    """The node ids of the live brokers that the broker at host:port lists; empty when it
    does not answer."""
    # No topics, and never create any.
    response = _request(host, port, METADATA_API_KEY, METADATA_VERSION,
                        struct.pack(">ib", 0, 0), timeout, user)
    if response is None or len(response) < 8:
        return set()
    # Metadata v4: throttle_time_ms, then [node_id, host, port, rack] per broker.
    try:
        (count,) = struct.unpack_from(">i", response, 4)
        at = 8
        ids = set()
        for _ in range(count):
            node_id, host_length = struct.unpack_from(">ih", response, at)
            at += 6 + host_length + 4
            (rack_length,) = struct.unpack_from(">h", response, at)
            at += 2 + max(0, rack_length)
            ids.add(node_id)
    except struct.error:
        return set()
    return ids


def broker_serves_groups(
    host: str, port: int, timeout: float = 2.0, user: SaslUser | None = None
) -> bool:
    """True once a group coordinator answers. The first such request makes the broker create
    its group offsets topic, which takes a moment: better here than in a service's first join.
    """
    body = _string(PROBE_GROUP) + struct.pack(">b", 0)
    response = _request(host, port, FIND_COORDINATOR_API_KEY, FIND_COORDINATOR_VERSION,
                        body, timeout, user)
    if response is None or len(response) < 6:
        return False
    _throttle_ms, error_code = struct.unpack_from(">ih", response)
    return bool(error_code == 0)


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = connection.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        chunks += chunk
    return bytes(chunks)
