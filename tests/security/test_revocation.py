"""Revocation and rotation against a running `teamtrack up` (issue 13, item 8; docs/security.md).

One cluster for the module, started in this process as `teamtrack up` starts it (2 brokers with
the subscription plugin, Redis, bridges, 2 `python -m dashboard`, the ingest). The commands are
the real CLI (`teamtrack provision revoke|rotate ACCOUNT --out STATE`), which rewrites the files
and sends SIGHUP to the brokers named in STATE/processes.json; the dashboards notice the new
auth file by themselves. Each test prints the time from the command (or the logout) to the
refusal, and each failed before this change: the cookie after logout still worked on the other
instance, and `provision revoke|rotate` did not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import httpx
import pytest
import websockets
from typer.testing import CliRunner

from teamtrack.cli import app
from teamtrack.contract import position_topic
from teamtrack.local.cluster import ClusterOptions, LocalCluster
from teamtrack.provision import Credentials, load_credentials

from .conftest import Client

pytestmark = pytest.mark.security

# The dashboards check every second (--revocation-poll-s); the brokers reload at once.
WITHIN_S: Final = 5.0
BAD_CREDENTIALS: Final = (0x86, 0x87)
CLOSE_REVOKED: Final = 4401


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    running = LocalCluster(
        ClusterOptions(
            state_dir=tmp_path_factory.mktemp("revocation"), brokers=2, dashboards=2, teams=2,
            workers=3, base_port=0, simulate=False,
        )
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()


def credentials(cluster: LocalCluster) -> Credentials:
    return load_credentials(cluster.state_dir)


def provision(cluster: LocalCluster, action: str, account: str) -> float:
    """Run `teamtrack provision ACTION ACCOUNT --out STATE`; when it was started."""
    started = time.monotonic()
    result = CliRunner().invoke(
        app, ["provision", action, account, "--out", str(cluster.state_dir)]
    )
    assert result.exit_code == 0, result.output
    assert "reloaded broker-1, broker-2 (SIGHUP)" in result.output, result.output
    return started


def dashboard_url(cluster: LocalCluster, index: int) -> str:
    return f"http://127.0.0.1:{cluster.ports.dashboards[index]}"


def until(check: Callable[[], bool], what: str, timeout: float = WITHIN_S) -> float:
    """Poll `check()` until it is true; when it first was."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.monotonic()
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def log_in(cluster: LocalCluster, index: int, username: str, password: str) -> str:
    response = httpx.post(
        f"{dashboard_url(cluster, index)}/login",
        data={"username": username, "password": password},
    )
    assert response.status_code == 303, response.text
    cookie = response.cookies.get("tt_session")
    assert cookie
    return cookie


def status_of(cluster: LocalCluster, index: int, headers: dict[str, str]) -> int:
    return httpx.get(f"{dashboard_url(cluster, index)}/api/me", headers=headers).status_code


async def close_code_of(socket: websockets.ClientConnection, timeout: float = WITHIN_S) -> int:
    """Reads frames until the server closes the socket; the close code."""
    async def drain() -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await socket.recv()

    await asyncio.wait_for(drain(), timeout)
    assert socket.close_code is not None
    return socket.close_code


def ws_url(cluster: LocalCluster, index: int, team: str) -> str:
    return f"ws://127.0.0.1:{cluster.ports.dashboards[index]}/ws/teams/{team}"


async def assert_a_logout_holds_everywhere(cluster: LocalCluster, label: str = "") -> None:
    """Log in on instance 0, open the live map on both, log out on 0: the cookie is refused
    on 0 at once and on 1 within the poll interval, both sockets close with 4401, and a
    fresh login still works."""
    manager = credentials(cluster).managers_of("alpha")[0]
    cookie = log_in(cluster, 0, manager.username, manager.password)
    headers = {"Cookie": f"tt_session={cookie}"}
    assert status_of(cluster, 1, headers) == 200
    # The same session's live map on the other instance, and on the one that logs out.
    other = await websockets.connect(ws_url(cluster, 1, "alpha"), additional_headers=headers)
    same = await websockets.connect(ws_url(cluster, 0, "alpha"), additional_headers=headers)
    started = time.monotonic()
    response = await asyncio.to_thread(
        httpx.post, f"{dashboard_url(cluster, 0)}/logout", headers=headers
    )
    assert response.status_code == 303
    # The instance that answered refuses it at once; the other within its poll interval.
    assert await asyncio.to_thread(status_of, cluster, 0, headers) == 401
    refused = await asyncio.to_thread(
        until, lambda: status_of(cluster, 1, headers) == 401, "refused on the other instance"
    )
    print(f"\n{label}logout -> cookie refused on the other instance: {refused - started:.2f} s")
    assert await close_code_of(same) == CLOSE_REVOKED
    assert await close_code_of(other) == CLOSE_REVOKED
    print(f"{label}logout -> its socket on the other instance closed: "
          f"{time.monotonic() - started:.2f} s")
    # A fresh login still works.
    fresh = log_in(cluster, 1, manager.username, manager.password)
    assert status_of(cluster, 0, {"Cookie": f"tt_session={fresh}"}) == 200


async def test_a_cookie_after_logout_is_refused_on_the_other_instance(
    cluster: LocalCluster,
) -> None:
    await assert_a_logout_holds_everywhere(cluster)


async def test_a_revoked_manager_is_refused_and_disconnected_everywhere(
    cluster: LocalCluster,
) -> None:
    manager = credentials(cluster).managers_of("bravo")[0]
    bearer = {"Authorization": f"Bearer {manager.token}"}
    cookie = {"Cookie": f"tt_session={log_in(cluster, 0, manager.username, manager.password)}"}
    assert status_of(cluster, 0, bearer) == 200 and status_of(cluster, 1, cookie) == 200
    by_token = await websockets.connect(ws_url(cluster, 1, "bravo"), additional_headers=bearer)
    by_cookie = await websockets.connect(ws_url(cluster, 0, "bravo"), additional_headers=cookie)
    mqtt = Client(cluster.ports.broker_mqtt[0], manager.username, manager.mqtt_password)
    assert mqtt.connect() == 0

    started = await asyncio.to_thread(provision, cluster, "revoke", manager.username)
    refused = await asyncio.to_thread(
        until,
        lambda: all(status_of(cluster, index, headers) == 401
                    for index in (0, 1) for headers in (bearer, cookie)),
        "token and cookie refused on both instances",
    )
    assert await close_code_of(by_token) == CLOSE_REVOKED
    assert await close_code_of(by_cookie) == CLOSE_REVOKED
    closed = time.monotonic()
    dropped = await asyncio.to_thread(until, lambda: bool(mqtt.disconnects), "MQTT dropped")
    mqtt.close()
    print(f"\nrevoke -> token and cookie refused on both dashboards: {refused - started:.2f} s; "
          f"sockets closed (4401): {closed - started:.2f} s; MQTT dropped: "
          f"{dropped - started:.2f} s")
    again = Client(cluster.ports.broker_mqtt[0], manager.username, manager.mqtt_password)
    assert again.connect() in BAD_CREDENTIALS
    again.close()
    # Nothing to log in with any more, and provisioning again does not bring it back.
    assert manager.username in credentials(cluster).revoked
    assert all(other.username != manager.username for other in credentials(cluster).managers)


async def test_a_revoked_device_is_disconnected_and_cannot_reconnect(
    cluster: LocalCluster,
) -> None:
    device = credentials(cluster).device("alpha", "w001")
    # On the second broker: the command must reach every broker of the cluster.
    port = cluster.ports.broker_mqtt[1]
    client = Client(port, device.username, device.password)
    assert client.connect() == 0
    topic = position_topic("alpha", "w001")
    assert client.publish(topic, b'{"lat":1,"lon":2,"ts":1,"seq":1}') in (0, 0x10)

    started = await asyncio.to_thread(provision, cluster, "revoke", device.username)
    dropped = await asyncio.to_thread(until, lambda: bool(client.disconnects), "disconnected")
    client.close()
    print(f"\nrevoke -> device disconnected by the broker: {dropped - started:.2f} s")
    again = Client(port, device.username, device.password)
    assert again.connect() in BAD_CREDENTIALS
    again.close()


async def test_a_rotated_device_works_with_the_new_password_only(cluster: LocalCluster) -> None:
    before = credentials(cluster)
    old = before.device("alpha", "w002")
    port = cluster.ports.broker_mqtt[0]
    client = Client(port, old.username, old.password)
    assert client.connect() == 0

    started = await asyncio.to_thread(provision, cluster, "rotate", old.username)
    dropped = await asyncio.to_thread(until, lambda: bool(client.disconnects), "disconnected")
    client.close()
    print(f"\nrotate -> device on the old password disconnected: {dropped - started:.2f} s")
    new = credentials(cluster).device("alpha", "w002")
    assert new.password != old.password
    stale = Client(port, old.username, old.password)
    assert stale.connect() in BAD_CREDENTIALS
    stale.close()
    fresh = Client(port, new.username, new.password)
    assert fresh.connect() == 0
    topic = position_topic("alpha", "w002")
    assert fresh.publish(topic, b'{"lat":1,"lon":2,"ts":1,"seq":1}') in (0, 0x10)
    fresh.close()
    # Every other account kept its secrets.
    assert credentials(cluster).device("bravo", "w001") == before.device("bravo", "w001")


def test_files_stay_private_and_no_secret_is_printed(cluster: LocalCluster) -> None:
    before = credentials(cluster)
    result = CliRunner().invoke(
        app, ["provision", "rotate", "bravo.w003", "--out", str(cluster.state_dir)]
    )
    assert result.exit_code == 0, result.output
    after = credentials(cluster)
    secrets = [d.password for d in (*before.devices, *after.devices)]
    secrets += [m.password for m in (*before.managers, *after.managers)]
    secrets += [m.token for m in (*before.managers, *after.managers)]
    assert not any(secret in result.output for secret in secrets)
    for name in ("credentials.json", "mosquitto.passwd", "dashboard-auth.json"):
        assert (Path(cluster.state_dir) / name).stat().st_mode & 0o777 == 0o600


async def test_an_account_whose_acl_changed_is_disconnected_by_the_plugin(
    tmp_path: Path,
) -> None:
    """A manager moved to another team keeps its password, so Mosquitto's own reload keeps the
    connection (and the subscription granted under the old rules); the subscription plugin
    disconnects it, and it subscribes again under the new rules."""
    from conftest import start_broker

    from teamtrack.provision import provision as provision_files
    from teamtrack.registry import parse_registry

    def registry(alpha_managers: list[str], bravo_managers: list[str]) -> object:
        return parse_registry({"teams": [
            {"id": "alpha", "worker_count": 1, "managers": alpha_managers},
            {"id": "bravo", "worker_count": 1, "managers": bravo_managers},
        ]})

    first = provision_files(registry(["mover"], []), tmp_path)  # type: ignore[arg-type]
    broker = start_broker(tmp_path, first, "broker-1", "b1")
    try:
        mover = first.credentials.manager("mover")
        client = Client(broker.mqtt_port, mover.username, mover.mqtt_password)
        assert client.connect() == 0
        assert client.subscribe("teams/alpha/#") == [1]
        moved = provision_files(registry([], ["mover"]), tmp_path)  # type: ignore[arg-type]
        assert moved.credentials.manager("mover").mqtt_password == mover.mqtt_password
        started = time.monotonic()
        broker.process.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        dropped = await asyncio.to_thread(until, lambda: bool(client.disconnects), "kicked")
        client.close()
        print(f"\nACL changed -> disconnected by the plugin: {dropped - started:.2f} s")
        again = Client(broker.mqtt_port, mover.username, mover.mqtt_password)
        assert again.connect() == 0
        assert again.subscribe("teams/alpha/#") == [0x87]
        assert again.subscribe("teams/bravo/#") == [1]
        again.close()
    finally:
        broker.process.stop()
