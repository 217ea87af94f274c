"""`teamtrack up --backend kafka`: the whole product on a real Kafka broker it starts itself.

A worker publishes on broker 1; the manager on dashboard 2 and an observer on broker 2 get
every position once, in order, across instances that share nothing but Kafka.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import orjson
import websockets
from mqtt_tools import MosquittoSub, publish_lines
from test_end_to_end import (
    WAIT,
    RunningCluster,
    _alive,
    payload,
    read_positions,
    start_cluster,
    stop_cluster,
    wait_until_up,
)

from teamtrack.contract import position_topic
from teamtrack.provision import load_credentials


async def test_kafka_cluster_delivers_across_instances_once_in_order_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    process = start_cluster(tmp_path, "--no-simulate", "--backend", "kafka")
    pids: dict[str, int] = {}
    try:
        endpoints = await asyncio.to_thread(wait_until_up, process, tmp_path)
        running = RunningCluster(
            process, tmp_path, endpoints, load_credentials(tmp_path / "credentials.json")
        )
        assert endpoints["backend"].startswith("kafka://")
        pids = json.loads((tmp_path / "processes.json").read_text())
        assert "kafka" in pids and "redis" not in pids

        observer = running.credentials.observer
        assert observer is not None
        watcher = await MosquittoSub.start(
            running.broker_port(1), observer.username, observer.password, "teams/alpha/#"
        )
        headers = {"Authorization": f"Bearer {running.token_of('alpha')}"}
        async with websockets.connect(
            running.dashboard_ws(1, "alpha"), additional_headers=headers, open_timeout=WAIT
        ) as socket:
            reading = asyncio.create_task(read_positions(socket, "w001", 30))
            await asyncio.sleep(0.3)
            device = running.credentials.device("alpha", "w001")
            result = await publish_lines(
                running.broker_port(0),
                device.username,
                device.password,
                position_topic("alpha", "w001"),
                [payload(seq) for seq in range(30)],
            )
            assert result.returncode == 0, result.stderr
            _, seqs = await reading
        await watcher.wait_for(30)
        await asyncio.sleep(0.5)  # a duplicate or a mirror loop would show up now
        watcher.stop()
        assert seqs == list(range(30))  # on dashboard 2, in order, exactly once
        observed = [
            orjson.loads(body)["seq"]
            for topic, body in watcher.messages
            if topic == position_topic("alpha", "w001")
        ]
        assert observed == list(range(30))  # mirrored through Kafka into broker 2, once
    finally:
        code, output = await asyncio.to_thread(stop_cluster, process)
    assert code == 0, output
    assert "all cleanly" in output, output
    for role, pid in pids.items():
        assert not _alive(pid), f"{role} (pid {pid}) survived teamtrack up"
