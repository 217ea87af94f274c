"""The device gateway faces the open internet: attacks on its limits, each shown refused, with
what a refusal cost (docs/security.md, "The device gateway")."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson
import pytest
from gateway_tools import NdjsonStream, basic
from test_gateway import PASSWORDS, position, running_gateway, write_password_file

pytestmark = pytest.mark.security


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "mosquitto.passwd"
    write_password_file(path, PASSWORDS)
    return path


async def _answer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """The status line and headers of the answer."""
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)


async def test_slow_headers_are_answered_408_and_closed(password_file: Path) -> None:
    async with running_gateway(password_file, header_timeout_s=0.5) as (service, _backend):
        connections = [await asyncio.open_connection("127.0.0.1", service.port)
                       for _ in range(50)]
        started = time.monotonic()
        for _reader, writer in connections:
            writer.write(b"POST /v1/positions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        answers = await asyncio.gather(*(_answer(reader) for reader, _writer in connections))
        elapsed = time.monotonic() - started
        for _reader, writer in connections:
            writer.close()
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers)
    assert service.counters.refused["header_timeout"] == 50
    print(f"50 slowloris connections closed {elapsed:.2f} s after their first bytes")


async def test_connections_beyond_the_caps_are_refused_at_once(password_file: Path) -> None:
    async with running_gateway(password_file, max_connections=4,
                               max_connections_per_address=2) as (service, _backend):
        url = f"{service.url}/v1/positions"
        held = [await NdjsonStream.open(url, name, PASSWORDS[name])
                for name in ("alpha.w001", "alpha.w002")]
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        assert (await _answer(reader)).startswith(b"HTTP/1.1 503")  # a third from 127.0.0.1
        writer.close()
        others = []
        for source in ("127.0.0.2", "127.0.0.3"):
            others.append(await asyncio.open_connection(
                "127.0.0.1", service.port, local_addr=(source, 0)))
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port,
                                                       local_addr=("127.0.0.4", 0))
        assert (await _answer(reader)).startswith(b"HTTP/1.1 503")  # a fifth in all
        writer.close()
        for _reader, other in others:
            other.close()
        for stream in held:  # the streams held were not disturbed
            stream.send_lines([position(1)])
            await stream.drain()
            assert await stream.read_line() == {"ack": 1, "lines": 1}
            await stream.close()
    assert service.counters.refused["address_limit"] == 1
    assert service.counters.refused["connection_cap"] == 1


async def test_failed_logins_from_one_address_are_answered_429_without_a_check(
    password_file: Path,
) -> None:
    async with running_gateway(password_file, auth_failures_per_minute=3) as (service, _backend):
        url = f"{service.url}/v1/owntracks"
        body = orjson.dumps({"_type": "location", "lat": 1.0, "lon": 2.0,
                             "tst": int(time.time())})
        right = {"Authorization": basic("alpha.w001", PASSWORDS["alpha.w001"])}
        wrong = {"Authorization": basic("alpha.w001", "guess")}
        async with httpx.AsyncClient() as http:
            assert (await http.post(url, content=body, headers=right)).status_code == 200
            codes = [(await http.post(url, content=body, headers=wrong)).status_code
                     for _ in range(5)]
            blocked = await http.post(url, content=body, headers=right)
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        ) as elsewhere:
            assert (await elsewhere.post(url, content=body, headers=right)).status_code == 200
    assert codes == [401, 401, 401, 429, 429]
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
    assert service.counters.auth_failures["rate_limited"] == 3


async def test_oversized_bodies_lines_and_headers_are_refused_before_they_are_held(
    password_file: Path,
) -> None:
    async with running_gateway(password_file) as (service, backend):
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(b"POST /v1/owntracks HTTP/1.1\r\nHost: x\r\nContent-Length: 200000000\r\n"
                     b"Authorization: " + basic("alpha.w001", "x").encode() + b"\r\n\r\n")
        assert (await _answer(reader)).startswith(b"HTTP/1.1 413")  # nothing of it was read
        sent = 0
        with pytest.raises(OSError):  # going on with the body: cut after the next 64 KiB
            while sent < 50_000_000:
                writer.write(b"x" * 65_536)
                sent += 65_536
                await asyncio.wait_for(writer.drain(), 5.0)
        writer.close()
        print(f"after the 413, {sent // 1024} KiB written before the connection was closed "
              "(socket buffers included)")
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                     + b"X-Filler: " + b"a" * 70_000)  # still not complete
        assert (await _answer(reader)).startswith(b"HTTP/1.1 431")
        writer.close()
        stream = await NdjsonStream.open(f"{service.url}/v1/positions", "alpha.w001",
                                         PASSWORDS["alpha.w001"])
        for _ in range(80):  # an 8 MB line, no newline: skipped as it comes, never held
            stream.send(b"7" * 100_000)
        stream.send(b"\n" + position(5) + b"\n")
        stream.finish()
        answers = await stream.read_all()
        await stream.close()
    assert answers[0] == {"line": 1, "error": "too_large",
                          "detail": "a line is at most 1024 bytes"}
    assert answers[-1] == {"ack": 5, "lines": 2, "end": "complete"}
    assert backend.positions("w001") == [5]
