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
        """`mqtt://host[:port]` (1883 by default) or `ws://host[:port]` (MQTT over WebSockets).

        IPv6 hosts go in brackets. Credentials never go in the URL: they would end up in logs.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "ws"):
            raise ValueError(
                f"broker URL {url!r} must start with mqtt:// or ws:// (TLS is not supported)"
            )
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"broker URL {url!r} has an invalid port") from None
        if parts.username or parts.password:
            raise ValueError(f"broker URL {url!r} must not carry credentials")
        if not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ValueError(f"broker URL {url!r} must be {parts.scheme}://host:port and no more")
        websockets = parts.scheme == "ws"
        return cls(parts.hostname, port or (8080 if websockets else 1883), websockets)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'ws' if self.websockets else 'mqtt'}://{host}:{self.port}"
