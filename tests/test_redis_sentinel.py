"""`redis+sentinel://` against real servers: a primary, a replica and three Sentinels.

The contract suite over Sentinel and the URL's strict parsing.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from backend_contract import BackendContract
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.sentinel import SentinelConnectionPool

from teamtrack.backends import Backend, BackendError, from_url
from teamtrack.backends.redis import RedisBackend
from teamtrack.backends.redis_connect import SentinelTarget, parse_backend_url, safe_url
from teamtrack.servers import SentinelGroup, free_port, start_sentinel_group

PASSWORD = "sentinel-test-secret"


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """One group for the tests that do not kill anything; password-protected throughout."""
    group = start_sentinel_group(tmp_path_factory.mktemp("sentinel"), password=PASSWORD)
    try:
        yield group
    finally:
        group.stop()


def _prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


class TestRedisSentinelBackend(BackendContract):
    """The whole contract through the Sentinels."""

    @pytest.fixture(autouse=True)
    def _server(self, sentinel_group: SentinelGroup) -> None:
        self.group = sentinel_group

    def make_backend(self, history: int) -> Backend:
        query = (f"prefix={_prefix()}&history={history}&claim_idle_ms=300"
                 "&sentinel_auth=same")
        return from_url(self.group.url(query=query))


# URL ------------------------------------------------------------------------------------------
def test_a_sentinel_url_names_sentinels_service_and_db() -> None:
    target = SentinelTarget.parse("redis+sentinel://app:p%40ss@s1:26380,[::1]:26381,s3/main/2")
    assert target.sentinels == (("s1", 26380), ("::1", 26381), ("s3", 26379))
    assert (target.service, target.db) == ("main", 2)
    assert (target.username, target.password) == ("app", "p@ss")
    assert SentinelTarget.parse("redis+sentinel://s1/main").db == 0
    server, options = parse_backend_url(
        "redis+sentinel://:pw@s1:26379/main/0?prefix=tt&history=5&sentinel_auth=same"
    )
    assert server == "redis+sentinel://:pw@s1:26379/main/0"
    assert options == {"prefix": "tt", "history": 5, "sentinel_auth": True}
    backend = from_url(server)
    assert isinstance(backend, RedisBackend)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "service name"),
        ("redis+sentinel://s1:26379/", "service name"),
        ("redis+sentinel://s1:26379/main/0/extra", "service name"),
        ("redis+sentinel://s1:26379/main/zero", "db must be a number"),
        ("redis+sentinel://s1:26379,,s2/main", "empty Sentinel address"),
        ("redis+sentinel://s1:port/main", "bad Sentinel port"),
        ("redis+sentinel://s1:70000/main", "bad Sentinel port"),
        ("redis+sentinel://[::1/main", "Invalid IPv6 URL"),
        ("redis+sentinel://[::1]x/main", "bad Sentinel address"),
        ("redis+sentinel://s1/main?histroy=5", "unknown redis URL option 'histroy'"),
        ("redis+sentinel://s1/main?history=ten", "history must be an integer"),
        ("redis+sentinel://s1/main?history=1&history=2", "exactly one value"),
        ("redis+sentinel://s1/main?sentinel_auth=yes", "sentinel_auth is one of"),
        ("redis://127.0.0.1:6379/0?sentinel_auth=same", "redis+sentinel:// URLs only"),
        ("redis://127.0.0.1:6379/0?claim_idle=5", "unknown redis URL option 'claim_idle'"),
    ],
)
def test_a_bad_url_is_refused_with_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        from_url(url)


def test_errors_about_credentials_never_show_the_password() -> None:
    # A password written without its colon would be taken for a user name: refused, unechoed.
    with pytest.raises(ValueError, match="user:password@") as refused:
        from_url("redis+sentinel://hunter2@s1/main")
    assert "hunter2" not in str(refused.value)
    assert safe_url("redis+sentinel://app:hunter2@s1:1,s2:2/main/0?prefix=x") == (
        "redis+sentinel://app:***@s1:1,s2:2/main/0?prefix=x"
    )
    assert safe_url("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"


async def test_unreachable_sentinels_are_a_clear_error_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis+sentinel://app:{PASSWORD}@127.0.0.1:{free_port()},127.0.0.1:{free_port()}/main"
    backend = from_url(url)
    with pytest.raises(BackendError, match="unreachable") as failed:
        await backend.start()
    await backend.close()
    assert "app:***@" in str(failed.value)
    assert "No master found for 'main'" in str(failed.value)
    assert PASSWORD not in str(failed.value)
    assert PASSWORD not in caplog.text


async def test_the_backend_follows_the_primary_the_sentinels_name(
    sentinel_group: SentinelGroup,
) -> None:
    """The pool and the blocking readers go where the Sentinels say, not to a fixed host."""
    backend = from_url(sentinel_group.url(query=f"prefix={_prefix()}&sentinel_auth=same"))
    await backend.start()
    assert isinstance(backend, RedisBackend)
    pool = backend.client.connection_pool
    # Sentinel-managed, and still a pool where a command waits for a free connection.
    assert isinstance(pool, SentinelConnectionPool)
    assert isinstance(pool, BlockingConnectionPool)
    info: Any = await backend.client.info("server")
    assert int(info["tcp_port"]) == sentinel_group.primary_port()
    reader = backend.new_client()
    assert isinstance(reader.connection_pool, SentinelConnectionPool)
    role: Any = await reader.execute_command("ROLE")
    assert role[0] == b"master"
    await reader.aclose()
    await backend.close()
