"""`python -m rules`, SIGKILLed while workers cross a zone, then started again: every alert
stored once and announced (a repeated announcement can only carry the same id)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
from sqlalchemy.exc import OperationalError
from test_rules_service import DEPOT, fix, notices

from rules.engine import RuleEngine
from teamtrack.alerts import AlertStore
from teamtrack.backends import Event, from_url
from teamtrack.history import HistoryStore
from teamtrack.zones import parse_zone

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKERS = [f"w{index:03d}" for index in range(12)]
STEPS = 90
WAIT = 20.0


def latitude(worker: int, step: int) -> float:
    """In and out of the depot every few fixes, each worker with its own rhythm."""
    return 52.5 if (step // (3 + worker % 3)) % 2 else 52.49


async def test_a_killed_rules_process_restarts_and_loses_and_repeats_no_alert(
    redis_url: str, tmp_path: Path
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'history.sqlite3'}"
    history = HistoryStore.from_url(database)
    await history.migrate()
    store = AlertStore(history.engine)
    zone = parse_zone(DEPOT, "zdepot")
    await store.put_zone("alpha", zone, "alice", create=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("TEAMTRACK_")}
    argv = [sys.executable, "-m", "rules", "--backend-url", f"{redis_url}&claim_idle_ms=500",
            "--database-url", database, "--metrics-port", "0", "--start", "earliest",
            "--offline-alert-s", "0", "--idle-alert-s", "0", "--tick-ms", "100"]
    log_path = tmp_path / "rules.log"

    def start() -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=PROJECT_ROOT)

    publisher = from_url(redis_url)
    await publisher.start()
    t0 = int(time.time() * 1000) - 600_000
    batches: list[list[Event]] = [
        [fix("alpha", worker, step, latitude(index, step), t0)
         for index, worker in enumerate(WORKERS)]
        for step in range(STEPS)
    ]
    oracle = RuleEngine()
    oracle.set_zones("alpha", [zone])
    expected = Counter(
        (alert.worker, alert.kind, alert.at)
        for batch in batches for event in batch
        for alert in oracle.event("alpha", {"w": event.worker, "k": "p", "o": "b1", "rx": 0,
                                            "p": orjson.loads(event.body)}, 0)
    )
    assert len(expected) > 200

    async def stream() -> None:
        for batch in batches:
            await publisher.publish(batch)
            await asyncio.sleep(0.02)

    async def stored() -> int:
        try:
            return len(await store.alerts("alpha", limit=1000))
        except OperationalError:
            return 0

    process = start()
    try:
        streaming = asyncio.create_task(stream())
        deadline = time.monotonic() + WAIT
        while await stored() < 20:
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(5)
        killed_with = await stored()
        process = start()
        await streaming
        while await stored() < len(expected) or (await store.unpublished())[0]:
            assert time.monotonic() < deadline + WAIT, log_path.read_text()[-3000:]
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        found = await store.alerts("alpha", limit=1000)
        assert killed_with < len(expected)
        assert Counter((alert.worker, alert.kind, alert.at) for alert in found) == expected
        announced = Counter(notice["alert"]["id"] for notice in await notices(publisher,
                                                                              "alpha"))
        assert set(announced) == {alert.id for alert in found}
        repeated = sum(count - 1 for count in announced.values())
        print(f"{len(found)} alerts, killed with {killed_with} stored, {repeated} announced twice")
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        await publisher.close()
        await history.close()
