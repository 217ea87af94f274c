"""The MQTT fixed headers of a client's byte stream, checked as the bytes stream through.

Nothing is buffered: each packet's type byte and remaining length (a varint of at most four
bytes) are read, the packet's size is checked against the limit before any of its bytes are
forwarded, and its body is skipped by count. The first packet must be a CONNECT; its keep
alive (bytes 9-10 of an MQTT 3.1.1 or 5 CONNECT's variable header, 11-12 of an MQTT 3.1 one)
is kept, so that the gateway can close a client that goes silent for longer than MQTT allows.
"""

from __future__ import annotations

from typing import Final

CONNECT: Final = 1
# The MQTT maximum remaining length (4 varint bytes): 268,435,455 bytes.
MAX_VARINT_BYTES: Final = 4
# Enough of a CONNECT's variable header for its keep alive: protocol name (2 + 4 bytes "MQTT",
# or 2 + 6 bytes "MQIsdp" for MQTT 3.1), level, flags, keep alive (2 bytes).
_KEEPALIVE_PREFIX: Final = 12


class PacketRefused(Exception):
    """The stream broke a rule; `reason` is the metric label, the message says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PacketGuard:
    """Feed it the client's MQTT bytes in order, in chunks of any size; `feed` raises
    `PacketRefused` at the first header that breaks a rule, before the chunk is forwarded."""

    __slots__ = (
        "_connect_head",
        "_first",
        "_length",
        "_multiplier",
        "_remaining",
        "_state",
        "_type_byte",
        "_varint_bytes",
        "connected",
        "keepalive_s",
        "max_packet_bytes",
        "packets",
    )

    _TYPE: Final = 0
    _LENGTH: Final = 1
    _BODY: Final = 2

    def __init__(self, max_packet_bytes: int) -> None:
        self.max_packet_bytes = max_packet_bytes
        # True once the whole first packet (a CONNECT) went through.
        self.connected = False
        # The CONNECT's keep alive in seconds (0: the client asked for none); None before.
        self.keepalive_s: int | None = None
        self.packets = 0
        self._state = self._TYPE
        self._type_byte = 0
        self._length = 0
        self._multiplier = 1
        self._varint_bytes = 0
        self._remaining = 0
        self._first = True
        self._connect_head = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        index, size = 0, len(data)
        while index < size:
            if self._state == self._BODY:
                taken = min(self._remaining, size - index)
                if self._first and len(self._connect_head) < _KEEPALIVE_PREFIX:
                    wanted = _KEEPALIVE_PREFIX - len(self._connect_head)
                    self._connect_head += data[index : index + min(taken, wanted)]
                index += taken
                self._remaining -= taken
                if self._remaining == 0:
                    self._end_packet()
            elif self._state == self._TYPE:
                self._type_byte = data[index]
                index += 1
                if self._first and self._type_byte >> 4 != CONNECT:
                    raise PacketRefused(
                        "not_connect", f"first packet of type {self._type_byte >> 4}, not CONNECT"
                    )
                self._state = self._LENGTH
                self._length, self._multiplier, self._varint_bytes = 0, 1, 0
            else:
                byte = data[index]
                index += 1
                self._length += (byte & 0x7F) * self._multiplier
                self._multiplier *= 128
                self._varint_bytes += 1
                # Checked at every byte: an announced length is refused as soon as it is
                # known to be too large, whatever follows.
                if 1 + self._varint_bytes + self._length > self.max_packet_bytes:
                    raise PacketRefused(
                        "packet_too_large",
                        f"a packet of type {self._type_byte >> 4} announces at least "
                        f"{self._length:,} bytes (limit {self.max_packet_bytes:,} in all)",
                    )
                if byte & 0x80:
                    if self._varint_bytes == MAX_VARINT_BYTES:
                        raise PacketRefused("malformed_packet", "remaining length over 4 bytes")
                    continue
                self._remaining = self._length
                self._state = self._BODY
                if self._remaining == 0:
                    self._end_packet()

    def _end_packet(self) -> None:
        self.packets += 1
        self._state = self._TYPE
        if self._first:
            self._first = False
            self.connected = True
            self.keepalive_s = _keepalive(bytes(self._connect_head))
            self._connect_head = bytearray()


def _keepalive(head: bytes) -> int:
    """The keep alive of a CONNECT's variable header (0 when it cannot be read: the broker
    refuses such a CONNECT anyway)."""
    if len(head) < 2:
        return 0
    name_length = int.from_bytes(head[:2], "big")
    at = 2 + name_length + 2
    if name_length > 6 or len(head) < at + 2:
        return 0
    return int.from_bytes(head[at : at + 2], "big")
