"""`python -m teamtrack.bench.generator`: one load-generator process of the harness.

It holds its share of the workers' MQTT connections (gmqtt, one asyncio loop), or with the
`http` transport one NDJSON stream per worker to the device gateway
(`teamtrack.bench.streams`), and, per step, publishes at the rate it is told. A scheduler tick
publishes what the clock says is due (rate x elapsed, round-robin over the workers), so
thousands of workers cost one timer, not one sleep per message. Each payload obeys the message
contract: `ts` is the send time in epoch milliseconds and `seq` counts up per worker. The
exact send time of every message in the measured window is recorded in nanoseconds
(CLOCK_MONOTONIC), keyed by (worker, seq), and written to a file the harness joins with what
the receivers recorded.

Driven over stdin/stdout (see `teamtrack.bench.control`):

    config   {"broker_url", "devices": [[index, team, worker, username, password], ...],
              "qos", "client_id_prefix", "faults": {"drop_every", "duplicate_every"},
              "transport": "mqtt" (default) or "http", "gateway_url" (http: the NDJSON URL)}
    connect  -> connected {"connected", "failed", "errors", "seconds", "rss_before", "rss_after"}
    run      {"step", "rate", "warmup_s", "measure_s", "records"} -> step_done {...}
    stop     -> stopped
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gmqtt import Client
from gmqtt.mqtt.handler import MQTTConnectError

from teamtrack.bench.config import FaultInjection
from teamtrack.bench.control import emit, stdin_lines
from teamtrack.bench.records import RecordLog, message_key
from teamtrack.bench.streams import NdjsonConnection, StreamRefused
from teamtrack.bench.system import raise_open_file_limit, rss_bytes
from teamtrack.contract import position_topic
from teamtrack.mqtt import BrokerAddress
from teamtrack.runtime import run

log = logging.getLogger("teamtrack.bench.generator")

# The scheduler never sleeps less than this; what falls due meanwhile goes out in one burst.
TICK_S: Final = 0.001
# A loop that fell further behind than this does not catch up in one burst: the rest is
# counted as shortfall (the offered rate was not reached), so a starved generator shows.
MAX_CATCH_UP_S: Final = 0.1
PROGRESS_INTERVAL_S: Final = 0.5
CONNECT_CONCURRENCY: Final = 100
CONNECT_TIMEOUT_S: Final = 30.0
CONNECT_ATTEMPTS: Final = 3
DISCONNECT_TIMEOUT_S: Final = 10.0
KEEPALIVE_S: Final = 60
RECONNECT_DELAY_S: Final = 1


@dataclass(slots=True)
class _Device:
    index: int
    topic: bytes
    # Everything of the payload but `ts` and `seq`, which change with every message.
    payload_prefix: bytes
    username: str
    password: str
    client: Client | None = None
    stream: NdjsonConnection | None = None
    connected: bool = False
    seq: int = 0


def _payload_prefix(index: int) -> bytes:
    """A fixed position per worker, spread over a few kilometres; ~130 bytes with ts and seq."""
    lat = 52.45 + (index % 997) * 0.0001
    lon = 13.30 + (index % 991) * 0.0002
    return (
        b'{"lat":%.6f,"lon":%.6f,"acc":4.5,"speed":1.4,"heading":187.5,"battery":87,'
        % (lat, lon)
    )


@dataclass
class _StepCounters:
    published: int = 0  # publish calls, duplicates and warm-up included
    measured_sent: int = 0  # messages of the measured window, injected drops included
    injected_drops: int = 0
    injected_duplicates: int = 0
    skipped_disconnected: int = 0
    shortfall: float = 0.0
    publish_errors: Counter[str] = field(default_factory=Counter)


class Generator:
    def __init__(self, config: dict[str, Any]) -> None:
        self.broker = BrokerAddress.parse(config["broker_url"])
        self.qos = int(config.get("qos", 0))
        self.client_id_prefix = str(config.get("client_id_prefix", "bench"))
        # "http": positions go as lines of an NDJSON stream per worker to the device gateway.
        self.gateway_url = str(config.get("gateway_url", "")) if config.get(
            "transport") == "http" else ""
        faults = config.get("faults") or {}
        self.faults = FaultInjection(
            drop_every=int(faults.get("drop_every", 0)),
            duplicate_every=int(faults.get("duplicate_every", 0)),
        )
        self.devices = [
            _Device(
                index=int(index),
                topic=position_topic(team, worker).encode(),
                payload_prefix=_payload_prefix(int(index)),
                username=username,
                password=password,
            )
            for index, team, worker, username, password in config["devices"]
        ]
        self.disconnects = 0
        self._cursor = 0
        self._counters = _StepCounters()
        self._records = RecordLog()
        self._measured_number = 0

    # Connections ---------------------------------------------------------------------------
    async def connect_all(self) -> dict[str, Any]:
        errors: Counter[str] = Counter()
        slots = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def connect(device: _Device) -> None:
            async with slots:
                error = await self._connect(device)
            if error is not None:
                errors[error] += 1

        started = time.monotonic()
        rss_before = rss_bytes(os.getpid())
        await asyncio.gather(*(connect(device) for device in self.devices))
        rss_after = rss_bytes(os.getpid())
        connected = sum(1 for device in self.devices if device.connected)
        return {
            "connected": connected,
            "failed": len(self.devices) - connected,
            "errors": dict(errors),
            "seconds": round(time.monotonic() - started, 3),
            "rss_before": rss_before,
            "rss_after": rss_after,
        }

    async def _connect(self, device: _Device) -> str | None:
        if self.gateway_url:
            return await self._open_stream(device)
        error = "unknown"
        for attempt in range(CONNECT_ATTEMPTS):
            client = Client(f"{self.client_id_prefix}-{device.index}", clean_session=True)
            client.set_auth_credentials(device.username, device.password)
            client.set_config({"reconnect_delay": RECONNECT_DELAY_S})
            client.on_connect = lambda *_args, device=device: self._on_connect(device)
            client.on_disconnect = lambda *_args, device=device: self._on_disconnect(device)
            try:
                await asyncio.wait_for(
                    client.connect(self.broker.host, self.broker.port, keepalive=KEEPALIVE_S),
                    CONNECT_TIMEOUT_S,
                )
            except MQTTConnectError as exc:
                error = f"refused: {exc}"
            except TimeoutError:
                error = "timeout"
            except OSError as exc:
                error = f"os error: {exc.strerror or exc}"
            else:
                device.client = client
                return None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT_S)
            await asyncio.sleep(0.2 * (attempt + 1))
        return error

    async def _open_stream(self, device: _Device) -> str | None:
        error = "unknown"
        for attempt in range(CONNECT_ATTEMPTS):
            stream = NdjsonConnection(
                on_lost=functools.partial(self._on_disconnect, device),
                on_refused_line=self._count_refused_line,
            )
            try:
                await stream.open(self.gateway_url, device.username, device.password)
            except StreamRefused as exc:
                error = f"refused: {exc}"
            except TimeoutError:
                error = "timeout"
            except OSError as exc:
                error = f"os error: {exc.strerror or exc}"
            else:
                device.stream = stream
                device.connected = True
                return None
            await asyncio.sleep(0.2 * (attempt + 1))
        return error

    def _count_refused_line(self) -> None:
        self._counters.publish_errors["refused_line"] += 1

    def _on_connect(self, device: _Device) -> None:
        device.connected = True

    def _on_disconnect(self, device: _Device) -> None:
        if device.connected:
            self.disconnects += 1
        device.connected = False

    async def disconnect_all(self) -> None:
        slots = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def disconnect(device: _Device) -> None:
            client = device.client
            if device.stream is not None:
                device.connected = False
                async with slots:
                    await device.stream.close()
                return
            if client is None:
                return
            device.connected = False
            async with slots:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), DISCONNECT_TIMEOUT_S)

        await asyncio.gather(*(disconnect(device) for device in self.devices))

    # Load ----------------------------------------------------------------------------------
    async def run_step(
        self, rate: float, warmup_s: float, measure_s: float, records: Path
    ) -> dict[str, Any]:
        self._counters = counters = _StepCounters()
        self._measured_number = 0
        loop = asyncio.get_running_loop()
        progress = asyncio.create_task(self._report_progress())
        started = last = loop.time()
        measure_from = started + warmup_s
        end = measure_from + measure_s
        max_credit = max(1.0, rate * MAX_CATCH_UP_S)
        credit = 0.0
        try:
            while (now := loop.time()) < end:
                credit += (now - last) * rate
                last = now
                if credit > max_credit:
                    counters.shortfall += credit - max_credit
                    credit = max_credit
                due = int(credit)
                credit -= due
                if due:
                    self._publish(due, measuring=now >= measure_from)
                until_next = (1.0 - credit) / rate if rate > 0 else end - now
                await asyncio.sleep(max(TICK_S, min(until_next, end - now)))
        finally:
            progress.cancel()
        recorded = self._records.write(records)
        return {
            "published": counters.published,
            "measured_sent": counters.measured_sent,
            "recorded": recorded,
            "achieved_rate": counters.measured_sent / measure_s if measure_s > 0 else 0.0,
            "injected_drops": counters.injected_drops,
            "injected_duplicates": counters.injected_duplicates,
            "skipped_disconnected": counters.skipped_disconnected,
            "shortfall": int(counters.shortfall),
            "publish_errors": dict(counters.publish_errors),
            "disconnects": self.disconnects,
            "connected": sum(1 for device in self.devices if device.connected),
        }

    def _publish(self, count: int, *, measuring: bool) -> None:
        devices = self.devices
        total = len(devices)
        counters = self._counters
        records = self._records
        drop_every = self.faults.drop_every if measuring else 0
        duplicate_every = self.faults.duplicate_every if measuring else 0
        qos = self.qos
        cursor = self._cursor
        clock_ns = time.monotonic_ns
        epoch_ns = time.time_ns
        for _ in range(count):
            device = devices[cursor]
            cursor += 1
            if cursor == total:
                cursor = 0
            client = device.client
            stream = device.stream
            if not device.connected or (client is None and stream is None):
                counters.skipped_disconnected += 1
                continue
            seq = device.seq
            device.seq = seq + 1
            sent_ns = clock_ns()
            payload = device.payload_prefix + b'"ts":%d,"seq":%d}' % (epoch_ns() // 1_000_000, seq)
            number = 0
            if measuring:
                self._measured_number += 1
                number = self._measured_number
                counters.measured_sent += 1
                records.add(message_key(device.index, seq), sent_ns)
                if drop_every and number % drop_every == 0:
                    counters.injected_drops += 1
                    continue
            copies = 2 if duplicate_every and number and number % duplicate_every == 0 else 1
            try:
                for _copy in range(copies):
                    if stream is not None:
                        stream.send(payload)
                    else:
                        assert client is not None
                        client.publish(device.topic, payload, qos=qos)
                    counters.published += 1
                counters.injected_duplicates += copies - 1
            except Exception as exc:
                counters.publish_errors[type(exc).__name__] += 1
        self._cursor = cursor

    async def _report_progress(self) -> None:
        while True:
            emit("progress", published=self._counters.published)
            await asyncio.sleep(PROGRESS_INTERVAL_S)


async def serve() -> None:
    commands = stdin_lines()
    config = await anext(commands)
    generator = Generator(config)
    try:
        async for command in commands:
            match command["cmd"]:
                case "connect":
                    emit("connected", **await generator.connect_all())
                case "run":
                    result = await generator.run_step(
                        float(command["rate"]),
                        float(command["warmup_s"]),
                        float(command["measure_s"]),
                        Path(command["records"]),
                    )
                    emit("step_done", step=command.get("step"), **result)
                case "stop":
                    break
                case other:
                    emit("error", message=f"unknown command {other!r}")
    except Exception as error:
        emit("error", message=f"{type(error).__name__}: {error}")
        raise
    finally:
        await generator.disconnect_all()
    emit("stopped")


def main() -> int:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    raise_open_file_limit()
    run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
