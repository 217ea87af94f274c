"""Which broker a device tries next, and how long it waits first: the failover rules.

These are the rules of the device contract (docs/devices.md, "Failover"), kept apart from the
network code so that they can be read, and tested, on their own:

- Each device has an ordered list of brokers: its home broker first, then the others, rotated
  by device, so that the devices of a broker that dies spread evenly over the rest.
- A connection that drops without a DISCONNECT (the broker died, or the device's own network
  blinked) is tried again once on the same broker; a broker restarted by its supervisor, or a
  network that is back, keeps the device at home.
- A DISCONNECT with 0x8B (server shutting down), 0x9C (use another server) or 0x9D (server
  moved) sends the device to another broker at once: the one its Server Reference names, if it
  is one of the list, else the next one.
- A failed attempt (TCP refused or unreachable, no CONNACK in time, a refusing CONNACK) moves
  on to the next broker of the list.
- Every attempt waits first, a random time between 0 and min(maximum, initial x 2^k), k being
  the attempts that failed since the last connection that held ("full jitter"): the devices
  of a dead broker reach the survivors spread out instead of in one burst, and a whole round
  of brokers that fail makes the device back off up to the maximum.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from teamtrack.mqtt import BrokerAddress

SERVER_SHUTTING_DOWN: Final = 0x8B
USE_ANOTHER_SERVER: Final = 0x9C
SERVER_MOVED: Final = 0x9D
# The DISCONNECT reason codes after which a device does not come back to the same broker.
MOVE_REASONS: Final = frozenset({SERVER_SHUTTING_DOWN, USE_ANOTHER_SERVER, SERVER_MOVED})
# A connection that lasted this long counts as one that held: the backoff starts again from
# the initial delay. A broker that accepts and then drops a device at once does not reset it,
# so it cannot pull its devices into a tight reconnect loop.
STABLE_CONNECTION_S: Final = 10.0
# 2^30 x any sensible initial delay is far beyond any maximum; stops the exponent growing.
_MAX_EXPONENT: Final = 30

_SESSION_EXPIRY_INTERVAL: Final = 0x11
_SERVER_REFERENCE: Final = 0x1C
_REASON_STRING: Final = 0x1F
_USER_PROPERTY: Final = 0x26


@dataclass(frozen=True, slots=True)
class Disconnect:
    """What a broker's MQTT 5 DISCONNECT said: its reason code and Server Reference."""

    reason: int
    server_reference: str | None = None

    @property
    def moves(self) -> bool:
        """Whether the broker tells the device to go elsewhere."""
        return self.reason in MOVE_REASONS


def parse_disconnect(body: bytes) -> Disconnect | None:
    """The variable header of a DISCONNECT packet from the broker, or None for no packet.

    gmqtt hands its disconnect callback the packet's body, and an empty body when the
    connection was lost without one; an empty DISCONNECT (reason 0x00, normal) is the same
    thing to a device: the connection is gone, nobody said where to go. Properties other than
    those MQTT 5 allows in a DISCONNECT end the parse (what was read so far stands).
    """
    if not body:
        return None
    reason = body[0]
    reference = None
    length, offset = _variable_byte_integer(body, 1)
    end = min(len(body), offset + length)
    while offset < end:
        identifier = body[offset]
        offset += 1
        if identifier == _SESSION_EXPIRY_INTERVAL:
            offset += 4
        elif identifier in (_SERVER_REFERENCE, _REASON_STRING):
            text, offset = _utf8_string(body, offset)
            if identifier == _SERVER_REFERENCE:
                reference = text
        elif identifier == _USER_PROPERTY:
            _, offset = _utf8_string(body, offset)
            _, offset = _utf8_string(body, offset)
        else:
            break
    return Disconnect(reason, reference)


def _variable_byte_integer(data: bytes, offset: int) -> tuple[int, int]:
    value = 0
    for shift in (0, 7, 14, 21):
        if offset >= len(data):
            break
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    return value, offset


def _utf8_string(data: bytes, offset: int) -> tuple[str, int]:
    if offset + 2 > len(data):
        return "", len(data)
    (length,) = struct.unpack_from("!H", data, offset)
    start = offset + 2
    return data[start : start + length].decode("utf-8", "replace"), start + length


def broker_order(device: int, brokers: int) -> tuple[int, ...]:
    """Indices of the brokers device number `device` tries, in order.

    Its home broker (`device` mod `brokers`, the round-robin spread) first, then the others,
    rotated by `device // brokers`: the devices that share a home broker take turns over which
    other broker comes next, so a broker's death spreads its devices evenly over the rest.
    """
    home = device % brokers
    others = [index for index in range(brokers) if index != home]
    if others:
        shift = (device // brokers) % len(others)
        others = others[shift:] + others[:shift]
    return (home, *others)


class BrokerFailover:
    """One device's brokers, the one it is on or trying, and the delay before its next attempt.

    The caller reports what happened (`connected`, `after_loss`, `after_failure`); each
    `after_*` answers how long to wait before connecting to `broker`.
    """

    __slots__ = ("_initial", "_maximum", "_uniform", "brokers", "connected_at", "failures", "index")

    def __init__(
        self,
        brokers: tuple[BrokerAddress, ...],
        *,
        initial: float,
        maximum: float,
        uniform: Callable[[float, float], float],
    ) -> None:
        if not brokers:
            raise ValueError("a device needs at least one broker")
        self.brokers = brokers
        self.index = 0
        # Attempts that failed (or connections that did not hold) since the last that held.
        self.failures = 0
        self.connected_at: float | None = None
        self._initial = initial
        self._maximum = maximum
        self._uniform = uniform

    @property
    def broker(self) -> BrokerAddress:
        """The broker of the current connection, or of the next attempt."""
        return self.brokers[self.index]

    @property
    def home(self) -> BrokerAddress:
        return self.brokers[0]

    def connected(self, now: float) -> None:
        self.connected_at = now

    def after_loss(self, disconnect: Disconnect | None, now: float) -> float:
        """An established connection ended: with `disconnect` (the broker's DISCONNECT) or
        without one (None). Same broker once, unless told to move."""
        if self.connected_at is not None and now - self.connected_at >= STABLE_CONNECTION_S:
            self.failures = 0
        self.connected_at = None
        if disconnect is not None and disconnect.moves:
            referenced = self._referenced(disconnect.server_reference)
            self.index = referenced if referenced is not None else self._next()
        return self._delay()

    def after_failure(self) -> float:
        """An attempt failed: the next broker of the list."""
        self.connected_at = None
        self.index = self._next()
        return self._delay()

    def _next(self) -> int:
        return (self.index + 1) % len(self.brokers)

    def _delay(self) -> float:
        bound = min(self._maximum, self._initial * 2 ** min(self.failures, _MAX_EXPONENT))
        self.failures += 1
        return self._uniform(0.0, bound)

    def _referenced(self, reference: str | None) -> int | None:
        """The index of a broker of the list that a Server Reference names, other than the
        current one. The format is not fixed by MQTT 5: `host:port`, `host` or a URL, several
        separated by spaces; a name that is not in the list is ignored (a device only goes
        where it was configured to go)."""
        if not reference:
            return None
        current = self.broker
        for token in reference.split():
            url = token if "://" in token else f"{current.scheme}://{token}"
            try:
                named = BrokerAddress.parse(url, allow_tls=True)
            except ValueError:
                continue
            explicit_port = named.port if _has_port(token) else None
            for index, broker in enumerate(self.brokers):
                if index == self.index or broker.host != named.host:
                    continue
                if explicit_port is None or broker.port == explicit_port:
                    return index
        return None


def _has_port(token: str) -> bool:
    authority = token.split("://", 1)[-1]
    return authority.rsplit("]", 1)[-1].count(":") == 1
