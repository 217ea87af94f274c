"""MQTT plumbing shared by the services: broker URLs and the origin marker of mirrored messages."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final
from urllib.parse import urlsplit

ORIGIN_PROPERTY: Final = "teamtrack-origin"
"""MQTT 5 user property a bridge puts on every message it mirrors into its broker.

A bridge drops what carries it, so mirrored traffic never loops back into the backend.
"""

BRIDGE_SHARE_GROUP: Final = "teamtrack"
"""The shared-subscription group in which the bridges of one broker split its traffic.

Only bridge accounts may join it: the ACL grants them `$share/teamtrack/teams/#` and the
brokers' subscription check (mosquitto/plugin/) refuses it to every other account.
"""


SUBSCRIPTION_COUNT_TOPIC: Final = "$SYS/broker/subscriptions/count"
"""Mosquitto's count of the subscriptions it holds (shared ones not counted), published
retained every `sys_interval` when it changed: how an on-demand mirror knows someone reads."""


class MirrorMode(StrEnum):
    """What a bridge republishes into its broker of the other brokers' traffic."""

    ALL = "all"  # everything, always
    OFF = "off"  # nothing
    # Presence and worker events always (retained: a later subscriber sees who is online);
    # positions only while the broker has a subscriber other than its bridges (a manager over
    # MQTT over WebSockets, `mosquitto_sub`), from its `$SYS` subscription count.
    ON_DEMAND = "on-demand"


def bridge_username(broker_id: str, instance: int = 1) -> str:
    """The MQTT account of bridge `instance` of broker `broker_id`: `bridge-b1-1`.

    Brokers take the username as the client id (`use_username_as_clientid`), so each bridge
    process needs an account of its own: two processes on one account would take each other's
    session over, again and again.
    """
    if isinstance(instance, bool) or instance < 1:
        raise ValueError(f"bridge instance {instance!r} must be a positive integer")
    return f"bridge-{broker_id}-{instance}"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    websockets: bool = False
    # MQTT over TLS (mqtts://): the client verifies the broker's certificate.
    tls: bool = False

    @classmethod
    def parse(cls, url: str, *, allow_tls: bool = False) -> BrokerAddress:
        """`mqtt://host[:port]` (1883 by default), `ws://host[:port]` (MQTT over WebSockets)
        or, with `allow_tls` (clients that can verify a certificate), `mqtts://host[:port]`
        (MQTT over TLS, 8883 by default).

        IPv6 hosts go in brackets. Credentials never go in the URL: they would end up in logs.
        """
        parts = urlsplit(url)
        schemes = ("mqtt", "ws", "mqtts") if allow_tls else ("mqtt", "ws")
        if parts.scheme not in schemes:
            raise ValueError(
                f"broker URL {url!r} must start with {', '.join(s + '://' for s in schemes)}"
                + ("" if allow_tls else " (this client speaks no TLS: use it on loopback)")
            )
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"broker URL {url!r} has an invalid port") from None
        if parts.username or parts.password:
            raise ValueError(f"broker URL {url!r} must not carry credentials")
        if not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ValueError(f"broker URL {url!r} must be {parts.scheme}://host:port and no more")
        default_port = {"mqtt": 1883, "ws": 8080, "mqtts": 8883}[parts.scheme]
        return cls(
            parts.hostname, port or default_port, parts.scheme == "ws", parts.scheme == "mqtts"
        )

    @property
    def scheme(self) -> str:
        return "ws" if self.websockets else "mqtts" if self.tls else "mqtt"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"
