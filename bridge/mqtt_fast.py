"""The bridge's per-message MQTT work without gmqtt's per-message overheads, where gmqtt allows.

Inbound: gmqtt parses every PUBLISH with format strings built per message, parses an empty
property block through a general parser, formats a debug line and checks whether `on_message`
is a coroutine function, ~10 us per message before the bridge sees it. `install_inbound` puts
a step of its own in front: a QoS 0 PUBLISH of MQTT 5 whose property block is empty (what
devices send) is cut into topic and payload with two slices and handed over; anything else
(QoS 1, properties, a topic alias, MQTT 3.1.1, a topic that is not UTF-8) goes on to gmqtt's
own step, unchanged.

Then gmqtt runs `on_message` in a new asyncio Task per message when it is a coroutine
function (which it must be for gmqtt to hold a QoS 1 PUBACK until the handler returns), and
calls it directly when it is a plain function (but then never acknowledges QoS 1 messages when
`optimistic_acknowledgement` is off). Measured on the 2-core development machine, the Task
costs ~15 us per message at 5,000 msg/s, more than validating it. `install_inbound` therefore
gives gmqtt a plain `on_message`, which QoS 0 messages reach directly, and takes over the
package handler's QoS 1 step: the message is accepted at once and its PUBACK is sent when the
backend holds it (the future `accept` returns), exactly what gmqtt does with a coroutine handler,
without a Task per message.

Outbound (mirroring): gmqtt's `Client.publish` builds each PUBLISH in Python and writes it to
the socket on its own (a system call, and a wake-up of the broker, per message).
`PublishWriter` builds the QoS 0 PUBLISH packets of a batch and hands them to the connection in
one write.

Both reach into gmqtt 0.8's private parts (`Client._package_handler`, its
`_handle_qos_1_publish_packet` and `_send_puback`, `Client._connection.send_package`). They
check that these exist with the expected signatures and otherwise change nothing and return
False/None, so the bridge falls back to the public API (a coroutine `on_message`,
`Client.publish`): slower, never wrong. `tests/test_bridge_mqtt_fast.py` fails when a gmqtt
upgrade takes the fast paths away.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import struct
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger(__name__)

Accept = Callable[[str, bytes, int, dict[str, Any]], "asyncio.Future[None] | None"]
"""(topic, payload, qos, properties) -> None when done with, or a future resolved once the
backend holds the message."""

_QOS1_STEP: Final = "_handle_qos_1_publish_packet"
_PUBLISH_STEP: Final = "_handle_publish_packet"
_QOS1_PARAMETERS: Final = ("mid", "packet", "print_topic", "properties")
_PUBACK: Final = "_send_puback"
_USER_PROPERTY: Final = 0x26
_PUBLISH: Final = 0x30
_RETAIN: Final = 0x01
_QOS_BITS: Final = 0x06
_MQTT5: Final = 5
SUCCESS: Final = 0


def _parameters(function: Any) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return ()


def install_inbound(client: Any, accept: Accept) -> bool:
    """Route the client's inbound PUBLISHes to `accept` without a task per message.

    QoS 1 messages are acknowledged (PUBACK) only once the future `accept` returned is done, or
    at once when it returned None (rejected or skipped). Returns False, changing nothing, when
    this gmqtt lacks the hooks; then use an `async` on_message instead.
    """
    handler = getattr(client, "_package_handler", None)
    qos1_step = getattr(handler, _QOS1_STEP, None)
    send_puback = getattr(handler, _PUBACK, None)
    if (
        handler is None
        or not callable(qos1_step)
        or not callable(send_puback)
        or _parameters(qos1_step) != _QOS1_PARAMETERS
        or _parameters(send_puback)[:2] != ("mid", "reason_code")
    ):
        log.warning("this gmqtt has no hook for QoS 1 handling; using a task per message")
        return False

    def on_message(
        _client: Any, topic: str, payload: bytes, qos: int, properties: dict[str, Any]
    ) -> int:
        # Reached for QoS 0 only (QoS 1 goes through `qos1_step` below): nothing to wait for.
        accept(topic, payload, qos, properties)
        return SUCCESS

    def handle_qos_1(mid: int, packet: bytes, print_topic: str, properties: dict[str, Any]) -> None:
        held = accept(print_topic, packet, 1, properties)
        if held is None:
            send_puback(mid, reason_code=SUCCESS)
        else:
            held.add_done_callback(lambda done: _acknowledge(done, send_puback, mid))

    client.on_message = on_message
    setattr(handler, _QOS1_STEP, handle_qos_1)
    _install_qos0_step(handler, accept)
    return True


def _install_qos0_step(handler: Any, accept: Accept) -> None:
    """Put the QoS 0 shortcut (module docstring) in front of gmqtt's PUBLISH step, if it can."""
    gmqtt_step = getattr(handler, _PUBLISH_STEP, None)
    state: Any = getattr(handler, "_connection_state", None)
    cache = getattr(handler, "_handler_cache", None)
    if (
        not callable(gmqtt_step)
        or _parameters(gmqtt_step) != ("cmd", "raw_packet")
        or not hasattr(state, "protocol_version")
        or not isinstance(cache, dict)
    ):
        log.warning("this gmqtt has no hook for QoS 0 parsing; using its own")
        return

    def handle_publish(cmd: int, raw_packet: bytes) -> None:
        if not cmd & _QOS_BITS and state.protocol_version >= _MQTT5 and len(raw_packet) > 2:
            properties_at = 2 + ((raw_packet[0] << 8) | raw_packet[1])
            # One zero byte: an empty property block (its length, a variable byte integer).
            if properties_at < len(raw_packet) and raw_packet[properties_at] == 0:
                try:
                    topic = raw_packet[2:properties_at].decode()
                except UnicodeDecodeError:
                    topic = ""
                if topic:
                    accept(topic, raw_packet[properties_at + 1:], 0,
                           {"dup": 0, "retain": cmd & _RETAIN})
                    return
        gmqtt_step(cmd, raw_packet)

    setattr(handler, _PUBLISH_STEP, handle_publish)
    # gmqtt caches each packet type's step on first use.
    cache.pop(_PUBLISH, None)


def _acknowledge(done: asyncio.Future[None], send_puback: Callable[..., None], mid: int) -> None:
    if done.cancelled() or done.exception() is not None:
        return  # never stored: no PUBACK, the broker delivers it again
    send_puback(mid, reason_code=SUCCESS)


class PublishWriter:
    """QoS 0 PUBLISH packets (MQTT 5) gathered and written to the client's socket in one go."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._packets: list[bytes] = []
        self.written = 0  # packets handed to the connection
        self.writes = 0  # ... in this many writes

    @staticmethod
    def supported(client: Any) -> bool:
        """Whether this gmqtt lets the writer reach the connection (checked before connecting)."""
        connection_type = _connection_type()
        return (
            hasattr(client, "_connection")
            and callable(getattr(connection_type, "is_closing", None))
            and _parameters(getattr(connection_type, "send_package", None))[:2]
            == ("self", "package")
        )

    def add(
        self, topic: str, payload: bytes, *, retain: bool, user_property: tuple[str, str]
    ) -> None:
        self._packets.append(publish_packet(topic, payload, retain, user_property))

    @property
    def pending(self) -> int:
        return len(self._packets)

    def flush(self) -> bool:
        """Write what was added; False (packets dropped) when there is no connection."""
        packets, self._packets = self._packets, []
        if not packets:
            return True
        connection = getattr(self._client, "_connection", None)
        if connection is None or connection.is_closing():
            return False
        connection.send_package(b"".join(packets))
        self.written += len(packets)
        self.writes += 1
        return True


def _connection_type() -> Any:
    try:
        from gmqtt.mqtt.connection import MQTTConnection
    except ImportError:  # pragma: no cover - a gmqtt without the module
        return None
    return MQTTConnection


def _string(value: bytes) -> bytes:
    return struct.pack("!H", len(value)) + value


def _variable_integer(value: int) -> bytes:
    encoded = bytearray()
    while True:
        value, byte = divmod(value, 128)
        if value:
            encoded.append(byte | 0x80)
        else:
            encoded.append(byte)
            return bytes(encoded)


def publish_packet(
    topic: str, payload: bytes, retain: bool, user_property: tuple[str, str]
) -> bytes:
    """One MQTT 5 PUBLISH, QoS 0, with one user property."""
    name, value = user_property
    properties = bytes((_USER_PROPERTY,)) + _string(name.encode()) + _string(value.encode())
    variable = _string(topic.encode()) + _variable_integer(len(properties)) + properties
    header = _PUBLISH | (_RETAIN if retain else 0)
    return (
        bytes((header,))
        + _variable_integer(len(variable) + len(payload))
        + variable
        + payload
    )
