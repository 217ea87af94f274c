"""The device gateway in-process (`gateway.service`), over real sockets, against a memory
backend that records what it holds and can be held back: what is answered when, what is
stored, what a stream acknowledges, how it ends."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from gateway_tools import NdjsonStream, basic
from prometheus_client import CollectorRegistry, generate_latest

from gateway.service import GatewayConfig, GatewayService
from gateway.settings import GatewaySettings
from teamtrack.backends import Event
from teamtrack.backends.memory import MemoryBackend
from teamtrack.contract import Kind
from teamtrack.local.cluster import ClusterOptions, LocalCluster
from teamtrack.passwords import hash_mosquitto_password
from teamtrack.provision import ProvisionResult
from teamtrack.tls import client_ssl_context

PASSWORDS = {"alpha.w001": "secret-1", "alpha.w002": "secret-2", "bravo.w001": "secret-3"}
# Accounts of the same file that are not devices: never a way in.
OTHERS = {"manager-alpha": "manager-secret", "bridge-b1-1": "bridge-secret"}


class HeldBackend(MemoryBackend):
    """A memory backend that records every event it holds, and holds none while `open` is
    clear (a backend that stalls)."""

    def __init__(self) -> None:
        super().__init__()
        self.stored: list[Event] = []
        self.open = asyncio.Event()
        self.open.set()

    async def publish(self, events: Sequence[Event]) -> None:
        await self.open.wait()
        await super().publish(events)
        self.stored.extend(events)

    def positions(self, worker: str) -> list[int]:
        """The `seq` of every position of `worker` held, in order."""
        return [orjson.loads(event.body)["seq"] for event in self.stored
                if event.worker == worker and event.kind is Kind.POSITION]


def write_password_file(path: Path, passwords: dict[str, str]) -> None:
    lines = [f"{name}:{hash_mosquitto_password(secret)}" for name, secret in passwords.items()]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "mosquitto.passwd"
    write_password_file(path, {**PASSWORDS, **OTHERS})
    return path


@asynccontextmanager
async def running_gateway(
    password_file: Path, **overrides: Any
) -> AsyncIterator[tuple[GatewayService, HeldBackend]]:
    config = replace(GatewayConfig(password_file=password_file, device_rate_per_s=0),
                     **overrides)
    backend = HeldBackend()
    service = GatewayService(config, backend, CollectorRegistry())
    await service.start()
    try:
        yield service, backend
    finally:
        backend.open.set()
        await service.stop()


def location(tst: int | None = None, lat: float = 52.5) -> bytes:
    return orjson.dumps({"_type": "location", "lat": lat, "lon": 13.4,
                         "tst": tst if tst is not None else int(time.time())})


def position(seq: int, lat: float = 52.5) -> bytes:
    return orjson.dumps({"lat": lat, "lon": 13.4, "ts": int(time.time() * 1000), "seq": seq})


def device_headers(username: str = "alpha.w001") -> dict[str, str]:
    return {"Authorization": basic(username, PASSWORDS[username]), "X-Limit-U": username,
            "X-Limit-D": "phone"}


# OwnTracks over HTTP -----------------------------------------------------------------------------
async def test_an_owntracks_location_is_answered_once_the_backend_holds_it(
    password_file: Path,
) -> None:
    async with running_gateway(password_file) as (service, backend), httpx.AsyncClient() as http:
        backend.open.clear()
        posting = asyncio.create_task(http.post(
            f"{service.url}/v1/owntracks", content=location(), headers=device_headers()
        ))
        await asyncio.sleep(0.3)
        assert not posting.done()  # nothing answered while the backend holds nothing
        backend.open.set()
        response = await posting
        assert (response.status_code, response.json()) == (200, [])
        assert [(e.kind, e.worker, e.origin) for e in backend.stored] == [
            (Kind.STATUS, "w001", "g1"), (Kind.POSITION, "w001", "g1")]


async def test_an_owntracks_post_the_backend_does_not_hold_in_time_is_answered_503(
    password_file: Path,
) -> None:
    async with running_gateway(password_file, ack_timeout_s=0.3) as (service, backend):
        backend.open.clear()
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{service.url}/v1/owntracks", content=location(),
                                       headers=device_headers())
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        backend.open.set()
        await service.batcher.wait_idle()
        assert len(backend.positions("w001")) == 1  # still stored: the resend is a repeat
        assert service.counters.ack_timeouts == 1


async def test_owntracks_requests_that_cannot_be_taken(password_file: Path) -> None:
    async with running_gateway(password_file) as (service, backend), httpx.AsyncClient() as http:
        url = f"{service.url}/v1/owntracks"
        big = b'{"_type":"waypoints","waypoints":[' + b" " * 17_000 + b"]}"
        refused = await http.post(url, content=big, headers=device_headers())
        assert refused.status_code == 413

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b" " * 1024

        chunked = await http.post(url, content=chunks(), headers=device_headers())
        assert chunked.status_code == 413  # no Content-Length: refused once it is too long
        assert (await http.get(url, headers=device_headers())).status_code == 405
        assert (await http.post(f"{service.url}/pub", content=location())).status_code == 404
        long_device = {**device_headers(), "X-Limit-D": "d" * 65}
        assert (await http.post(url, content=location(), headers=long_device)).status_code == 400
        empty = await http.post(url, content=b"", headers=device_headers())
        assert (empty.status_code, empty.json()) == (200, [])
        malformed = await http.post(url, content=b'{"_type":"location","lat":91}',
                                    headers=device_headers())
        assert (malformed.status_code, malformed.json()) == (200, [])
        health = await http.get(f"{service.url}/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert service.counters.owntracks_ignored["empty"] == 1
    assert service.counters.rejected["out_of_range"] == 1
    assert backend.stored == []


async def test_owntracks_objects_beyond_the_devices_rate_are_counted_and_answered(
    password_file: Path,
) -> None:
    async with running_gateway(password_file, device_rate_per_s=1.0, device_burst=2) as (
        service, backend,
    ), httpx.AsyncClient() as http:
        now = int(time.time())
        answers = [
            (await http.post(f"{service.url}/v1/owntracks", content=location(now - offset),
                             headers=device_headers())).status_code
            for offset in range(4)
        ]
    assert answers == [200] * 4
    assert len(backend.positions("w001")) == 2
    assert service.counters.rejected["rate_limited"] == 2


# NDJSON streams ----------------------------------------------------------------------------------
BAD_LINES: dict[int, tuple[bytes, str]] = {
    17: (b"not json", "not_json"),
    1_000: (b'{"lat": 91, "lon": 0, "ts": 1, "seq": 1}', "out_of_range"),
    2_500: (b"[1, 2]", "not_object"),
    4_000: (b'{"lat": 1, "lon": 2, "ts": 1, "seq": 1, "latitude": 1}', "unknown_field"),
    6_000: (b'{"lat": 1, "lon": 2, "seq": 3}', "missing_field"),
    8_000: (b'{"lat": 1, "lon": 2, "ts": 1, "seq": 1, "acc": "' + b"x" * 2_000 + b'"}',
            "too_large"),
    9_999: (b'{"lat": 1, "lat": 2, "lon": 2, "ts": ' + str(int(time.time() * 1000)).encode()
            + b', "seq": 1}', "duplicate_key"),
}


async def test_ten_thousand_lines_over_one_connection_every_good_one_stored_once(
    password_file: Path,
) -> None:
    async with running_gateway(password_file) as (service, backend):
        stream = await NdjsonStream.open(f"{service.url}/v1/positions", "alpha.w001",
                                         PASSWORDS["alpha.w001"])
        assert stream.status == 200
        assert stream.headers["content-type"] == "application/x-ndjson"
        now = int(time.time() * 1000)
        lines, good = [], []
        for number in range(1, 10_001):
            if number in BAD_LINES:
                lines.append(BAD_LINES[number][0])
            else:
                seq = len(good)
                good.append(seq)
                lines.append(orjson.dumps({"lat": 52.5, "lon": 13.4, "ts": now, "seq": seq}))
        reading = asyncio.create_task(stream.read_all())
        body = b"".join(line + b"\n" for line in lines)
        for start in range(0, len(body), 7_777):  # chunks that cut lines anywhere
            stream.send(body[start:start + 7_777])
            await stream.drain()
        stream.finish()
        answers = await reading
        await stream.close()
    errors = {answer["line"]: answer["error"] for answer in answers if "error" in answer}
    assert errors == {number: reason for number, (_, reason) in BAD_LINES.items()}
    assert all(answer["detail"] for answer in answers if "error" in answer)
    acks = [answer for answer in answers if "ack" in answer]
    assert acks[-1] == {"ack": good[-1], "lines": 10_000, "end": "complete"}
    assert [ack["lines"] for ack in acks] == sorted(ack["lines"] for ack in acks)
    assert backend.positions("w001") == good  # each once, in order
    assert service.counters.rejected == Counter(reason for _, reason in BAD_LINES.values())


async def test_a_cut_stream_loses_nothing_it_had_acknowledged(password_file: Path) -> None:
    async with running_gateway(password_file, batch_max_events=50) as (service, backend):
        stream = await NdjsonStream.open(f"{service.url}/v1/positions", "alpha.w002",
                                         PASSWORDS["alpha.w002"])
        stream.send_lines([position(seq) for seq in range(2_000)])
        await stream.drain()
        acknowledged = 0
        while acknowledged < 300:
            answer = await stream.read_line()
            assert answer is not None and "error" not in answer
            acknowledged = answer["lines"]
            assert answer["ack"] == acknowledged - 1
        stream.cut()  # mid-stream: lines in flight, more in the socket
        await asyncio.sleep(0.5)
        await service.batcher.wait_idle()
        stored = backend.positions("w002")
        assert stored[:acknowledged] == list(range(acknowledged))  # all of them, in order
        assert len(stored) == len(set(stored))
        assert service.counters.streams_ended["disconnected"] == 1
        # The device's next stream starts with what was not acknowledged: repeats are fine.
        again = await NdjsonStream.open(f"{service.url}/v1/positions", "alpha.w002",
                                        PASSWORDS["alpha.w002"])
        again.send_lines([position(seq) for seq in range(acknowledged, 2_000)])
        again.finish()
        assert (await again.read_all())[-1] == {"ack": 1_999, "lines": 2_000 - acknowledged,
                                                "end": "complete"}
        await again.close()
    assert set(backend.positions("w002")) == set(range(2_000))


async def test_a_stream_reads_no_further_than_its_unacknowledged_bound(
    password_file: Path,
) -> None:
    async with running_gateway(password_file, stream_max_unacked=50) as (service, backend):
        backend.open.clear()
        stream = await NdjsonStream.open(f"{service.url}/v1/positions", "alpha.w001",
                                         PASSWORDS["alpha.w001"])
        stream.send_lines([position(seq) for seq in range(3_000)])
        await asyncio.sleep(0.5)
        # The first batch is out (and stuck), 50 lines wait behind it, the rest is not read.
        assert service.batcher.pending <= 50
        backend.open.set()
        stream.finish()
        assert (await stream.read_all())[-1]["lines"] == 3_000
        await stream.close()
    assert backend.positions("w001") == list(range(3_000))


async def test_streams_end_idle_replaced_and_their_device_goes_offline(
    password_file: Path,
) -> None:
    async with running_gateway(password_file, stream_idle_timeout_s=0.5) as (service, backend):
        url = f"{service.url}/v1/positions"
        first = await NdjsonStream.open(url, "alpha.w001", PASSWORDS["alpha.w001"])
        first.send_lines([position(1)])
        await first.drain()
        assert await first.read_line() == {"ack": 1, "lines": 1}
        second = await NdjsonStream.open(url, "alpha.w001", PASSWORDS["alpha.w001"])
        assert await first.read_all() == [{"ack": 1, "lines": 1, "end": "replaced"}]
        second.send_lines([b"", position(2), b""])  # blank lines: keep-alives
        await second.drain()
        assert await second.read_line() == {"ack": 2, "lines": 3}
        assert await second.read_all(timeout=3.0) == [{"ack": 2, "lines": 3,
                                                       "end": "idle_timeout"}]
        await service.batcher.wait_idle()
    presence = [event.body for event in backend.stored if event.kind is Kind.STATUS]
    # online with each stream's first position, offline when the second one ended alone
    assert presence == [b"online", b"online", b"offline"]


async def test_a_stream_outlives_a_rewritten_password_file_but_not_a_new_password(
    password_file: Path,
) -> None:
    async with running_gateway(password_file, password_poll_s=0.05) as (service, _backend):
        stream = await NdjsonStream.open(f"{service.url}/v1/positions", "bravo.w001",
                                         PASSWORDS["bravo.w001"])
        stream.send_lines([position(1)])
        await stream.drain()
        assert await stream.read_line() == {"ack": 1, "lines": 1}
        # Provisioning again hashes every password anew (new salts): the stream holds.
        write_password_file(password_file, {**PASSWORDS, **OTHERS})
        await asyncio.sleep(0.3)
        stream.send_lines([position(2)])
        await stream.drain()
        assert await stream.read_line() == {"ack": 2, "lines": 2}
        # Rotated: ended within the poll interval.
        write_password_file(password_file, {**PASSWORDS, "bravo.w001": "rotated", **OTHERS})
        assert await stream.read_all(timeout=2.0) == [{"ack": 2, "lines": 2, "end": "revoked"}]
        await stream.close()
        refused = await NdjsonStream.open(f"{service.url}/v1/positions", "bravo.w001",
                                          PASSWORDS["bravo.w001"])
        assert refused.status == 401
        await refused.close()


async def test_a_stream_over_its_devices_rate_waits_instead_of_dropping(
    password_file: Path,
) -> None:
    async with running_gateway(password_file, device_rate_per_s=20.0, device_burst=5) as (
        service, backend,
    ):
        started = time.monotonic()
        stream = await NdjsonStream.open(f"{service.url}/v1/positions", "alpha.w001",
                                         PASSWORDS["alpha.w001"])
        stream.send_lines([position(seq) for seq in range(25)])
        stream.finish()
        answers = await stream.read_all()
        await stream.close()
    assert answers[-1] == {"ack": 24, "lines": 25, "end": "complete"}
    print(f"25 lines at 20/s, burst 5: {time.monotonic() - started:.2f} s")
    assert backend.positions("w001") == list(range(25))
    assert service.counters.rejected["rate_limited"] == 0
    assert service.counters.throttled_seconds > 0.5  # 20 beyond the burst waited their turn


async def test_a_stream_needs_device_credentials_and_ndjson(password_file: Path) -> None:
    async with running_gateway(password_file) as (service, backend):
        url = f"{service.url}/v1/positions"
        for username, password, status in (
            ("alpha.w001", "wrong", 401),
            ("manager-alpha", OTHERS["manager-alpha"], 401),
            ("bridge-b1-1", OTHERS["bridge-b1-1"], 401),
            ("alpha.w999", "secret-1", 401),
        ):
            stream = await NdjsonStream.open(url, username, password)
            assert stream.status == status, username
            assert orjson.loads(stream.body)["error"]
            await stream.close()
        wrong_type = await NdjsonStream.open(url, "alpha.w001", PASSWORDS["alpha.w001"],
                                             content_type="application/json")
        assert wrong_type.status == 415
        await wrong_type.close()
        spoof = await NdjsonStream.open(url, "alpha.w001", PASSWORDS["alpha.w001"],
                                        extra={"X-Limit-U": "alpha.w002"})
        assert spoof.status == 403
        await spoof.close()
    assert backend.stored == []
    assert service.counters.auth_failures == Counter(
        {"bad_credentials": 1, "not_device": 3, "user_mismatch": 1})


# Settings and metrics ----------------------------------------------------------------------------
def test_plain_http_is_for_loopback_only(password_file: Path) -> None:
    GatewayConfig(password_file=password_file, host="::1")
    with pytest.raises(ValueError, match="in the clear"):
        GatewayConfig(password_file=password_file, host="0.0.0.0")
    GatewayConfig(password_file=password_file, host="0.0.0.0", allow_plain_http=True)
    with pytest.raises(ValueError, match="go together"):
        GatewayConfig(password_file=password_file, tls_cert=password_file)


def test_settings_read_flags_and_environment(
    password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEAMTRACK_STREAM_MAX_UNACKED", "77")
    settings = GatewaySettings(_cli_parse_args=[  # type: ignore[call-arg]
        "--password-file", str(password_file), "--gateway-id", "g2", "--port", "0",
        "--batch-interval-ms", "5",
    ])
    config = settings.gateway_config()
    assert (config.gateway_id, config.stream_max_unacked, config.batch_interval_s) == (
        "g2", 77, 0.005)
    with pytest.raises(ValueError, match="gateway id"):
        replace(config, gateway_id="G 1")
    # An empty variable (a compose file's `TEAMTRACK_TLS_CERT=`) is no file, not the folder ".".
    monkeypatch.setenv("TEAMTRACK_TLS_CERT", "")
    monkeypatch.setenv("TEAMTRACK_TLS_KEY", "")
    plain = GatewaySettings(_cli_parse_args=[])  # type: ignore[call-arg]
    assert (plain.gateway_config().tls_cert, plain.gateway_config().tls_key) == (None, None)


async def test_metrics_name_every_counter(password_file: Path) -> None:
    registry = CollectorRegistry()
    service = GatewayService(GatewayConfig(password_file=password_file), HeldBackend(), registry)
    service.counters.rejected["not_json"] += 1
    service.counters.auth_failures["not_device"] += 1
    service.counters.received[("position", "ndjson")] += 2
    text = generate_latest(registry).decode()
    for line in (
        'teamtrack_gateway_rejected_total{gateway="g1",reason="not_json"} 1.0',
        'teamtrack_gateway_auth_failures_total{gateway="g1",reason="not_device"} 1.0',
        'teamtrack_gateway_received_total{gateway="g1",kind="position",via="ndjson"} 2.0',
        'teamtrack_gateway_streams{gateway="g1"} 0.0',
    ):
        assert line in text


async def test_https_with_the_clusters_certificate(provisioned: ProvisionResult) -> None:
    """What `teamtrack up --https` runs: the provisioned server certificate, verified by a
    device against the cluster's CA, with a device's real (mosquitto_passwd) password."""
    tls = provisioned.tls
    assert tls is not None
    device = provisioned.credentials.device("alpha", "w001")
    async with running_gateway(provisioned.password_file, tls_cert=tls.server_cert,
                               tls_key=tls.server_key) as (service, backend):
        assert service.url.startswith("https://")
        context = client_ssl_context(tls.ca_cert)
        async with httpx.AsyncClient(verify=context) as http:
            response = await http.post(
                f"{service.url}/v1/owntracks", content=location(),
                headers={"Authorization": basic(device.username, device.password)},
            )
        assert (response.status_code, response.json()) == (200, [])
        stream = await NdjsonStream.open(f"{service.url}/v1/positions", device.username,
                                         device.password, ssl_context=context)
        stream.send_lines([position(3)])
        stream.finish()
        assert (await stream.read_all())[-1] == {"ack": 3, "lines": 1, "end": "complete"}
        await stream.close()
        async with httpx.AsyncClient() as plain:  # no plain HTTP on the TLS port
            with pytest.raises(httpx.TransportError):
                await plain.post(f"http://127.0.0.1:{service.port}/v1/owntracks")
    assert len(backend.positions("w001")) == 2


def test_up_with_https_lists_https_gateways(provisioned: ProvisionResult, tmp_path: Path) -> None:
    cluster = LocalCluster(ClusterOptions(state_dir=tmp_path, https=True, base_port=18830))
    cluster.provisioned = provisioned
    [first, second] = cluster.endpoints()["device_http"]  # type: ignore[misc]
    assert first == {"owntracks": "https://127.0.0.1:19330/v1/owntracks",
                     "ndjson": "https://127.0.0.1:19330/v1/positions"}
    assert second["owntracks"] == "https://127.0.0.1:19331/v1/owntracks"
    plain = LocalCluster(ClusterOptions(state_dir=tmp_path, base_port=18830))
    plain.provisioned = provisioned
    assert plain.endpoints()["gateway_metrics"] == [
        "http://127.0.0.1:19430/metrics", "http://127.0.0.1:19431/metrics"]
