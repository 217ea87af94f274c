"""The backend a cluster starts is not open to whoever reaches its port.

Found: Redis had no password; a local user read every team's live positions and injected a
fake worker whose id reached the page. Now the Redis that `teamtrack up` starts refuses
unauthenticated clients, and each service has its own user allowed only what it does
(`teamtrack.local.redis_users`): the dashboards' (the most exposed) reads but cannot write a log,
a last-known entry or run the publish script.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import NoPermissionError

from teamtrack.backends import Event, from_url
from teamtrack.contract import Kind
from teamtrack.local.cluster import ClusterOptions, LocalCluster
from teamtrack.local.redis_users import USERS_FILE
from teamtrack.local.servers import LOOPBACK

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(ClusterOptions(
        state_dir=tmp_path_factory.mktemp("backend-auth"), brokers=1, dashboards=1, teams=1,
        workers=2, base_port=0, simulate=False,
    ))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def client(cluster: LocalCluster, role: str | None) -> redis.Redis:
    options: dict[str, Any] = {}
    if role is not None:
        passwords = json.loads((cluster.state_dir / USERS_FILE).read_text())
        options = {"username": "default" if role == "admin" else f"tt-{role}",
                   "password": passwords[role]}
    return redis.Redis(host=LOOPBACK, port=cluster.ports.redis, socket_timeout=5, **options)


def test_an_outsider_without_a_password_gets_nothing(cluster: LocalCluster) -> None:
    """A local user's `redis-cli`: every command answered NOAUTH (it used to be obeyed)."""
    with socket.create_connection((LOOPBACK, cluster.ports.redis), timeout=5) as outsider:
        for command in (b"XADD tt:log:alpha * b ghost p 0-0", b"HGETALL tt:last:alpha",
                        b"KEYS *"):
            outsider.sendall(command + b"\r\n")
            assert outsider.recv(256).startswith(b"-NOAUTH"), command


def test_the_dashboards_user_reads_but_cannot_inject_a_worker(cluster: LocalCluster) -> None:
    bridge = client(cluster, "bridge")
    dashboard = client(cluster, "dashboard")
    now = int(time.time() * 1000)
    event = Event("alpha", "w001", Kind.POSITION,
                  b'{"lat":52.5,"lon":13.4,"ts":%d,"seq":1}' % now, "b1", now, now, 1)
    # The bridge's user publishes (through the backend, as the bridge does).
    import asyncio

    async def publish() -> None:
        backend = from_url(f"redis://tt-bridge:{bridge.connection_pool.connection_kwargs['password']}"
                           f"@{LOOPBACK}:{cluster.ports.redis}/0")
        await backend.start()
        try:
            await backend.publish([event])
        finally:
            await backend.close()

    asyncio.run(publish())
    assert dashboard.xrange("tt:log:alpha")  # reads every team, as a dashboard must
    assert dashboard.hgetall("tt:last:alpha")
    for attack in (
        lambda: dashboard.xadd("tt:log:alpha", {"b": b'[{"w":"ghost","k":"p"}]', "p": b"0-0"}),
        lambda: dashboard.hset("tt:last:alpha", "ghost", b"{}"),
        lambda: dashboard.xadd("tt:all", {"alpha": b"[]"}),
        lambda: dashboard.delete("tt:log:alpha"),
        lambda: dashboard.eval("return redis.call('HSET', KEYS[1], 'ghost', '{}')", 1,
                               "tt:last:alpha"),
        lambda: dashboard.config_get("*"),
        lambda: dashboard.flushall(),
    ):
        with pytest.raises(NoPermissionError):
            attack()
    # Its own wake streams it may write: that is how a dashboard wakes its blocked reader.
    dashboard.xadd("tt:wake:test", {"w": b"1"})
    assert b"ghost" not in client(cluster, "admin").hkeys("tt:last:alpha")


def test_the_passwords_are_in_a_private_file_and_on_no_command_line(
    cluster: LocalCluster,
) -> None:
    users = cluster.state_dir / USERS_FILE
    assert users.stat().st_mode & 0o777 == 0o600
    passwords = json.loads(users.read_text()).values()
    for role, pid in json.loads((cluster.state_dir / "processes.json").read_text()).items():
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert not any(password.encode() in command_line for password in passwords), role
    acl = (cluster.state_dir / "redis" / "users.acl").read_text()
    assert not any(password in acl for password in passwords)  # hashes only
