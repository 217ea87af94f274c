"""MQTT plumbing shared by the services: broker URLs and the origin marker of mirrored messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

ORIGIN_PROPERTY: Final = "teamtrack-origin"
"""MQTT 5 user property a bridge puts on every message it mirrors into its broker.

A bridge drops what carries it, so mirrored traffic never loops back into the backend.
"""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    websockets: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """`mqtt://host:port` (default port 1883) or `ws://host:port` (MQTT over WebSockets)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp", "ws"):
            raise ValueError(f"broker URL {url!r} must start with mqtt:// or ws://")
        if not parts.hostname:
            raise ValueError(f"broker URL {url!r} has no host")
        if parts.username or parts.password:
            raise ValueError("broker URLs must not carry credentials; use the password settings")
        websockets = parts.scheme == "ws"
        return cls(parts.hostname, parts.port or (8080 if websockets else 1883), websockets)

    def __str__(self) -> str:
        return f"{'ws' if self.websockets else 'mqtt'}://{self.host}:{self.port}"
