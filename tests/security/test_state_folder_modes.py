"""Item 9: another local user reads the state folder of a running `teamtrack up` (the history
with every team's track, the logs, the brokers' and Redis' data, the configs and secrets).

The cluster runs in this process as `teamtrack up` runs it (tests/faults/conftest.py does the
same), with its simulator, so the ingest has written the SQLite history (-wal, -shm) and every
server its files. Then the folder is walked: no folder is open to group or others (0700), no
file is (0600), including what an older run had left world-readable.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from teamtrack.local.cluster import ClusterOptions, LocalCluster

pytestmark = pytest.mark.security


def test_the_state_folder_of_a_running_cluster_is_its_owners_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # An older run, from before the fix: a world-readable history and log folder.
    (state / "logs").mkdir(parents=True)
    state.chmod(0o755)
    (state / "logs").chmod(0o755)
    old_history = state / "history.sqlite3"
    old_history.write_bytes(b"")
    old_history.chmod(0o644)
    cluster = LocalCluster(
        ClusterOptions(
            state_dir=state, brokers=1, dashboards=1, teams=1, workers=2, base_port=0,
            simulate=True, interval=0.2,
        )
    )
    try:
        cluster.start()
        deadline = time.monotonic() + 20
        while not (state / "history.sqlite3-wal").exists():
            assert time.monotonic() < deadline, "the ingest wrote no history"
            cluster.supervise_once()
            time.sleep(0.2)
        time.sleep(3)  # a few seconds of traffic: logs, AOF, broker saves
        walked = _modes(state)
    finally:
        cluster.stop()
    names = {path.name for path in walked}
    assert {"history.sqlite3", "history.sqlite3-wal", "history.sqlite3-shm", "bridge-1.log",
            "ingest.log", "registry.yaml", "endpoints.json"} <= names, sorted(names)
    assert any(path.parent.name == "redis" for path in walked), sorted(names)
    open_to_others = {
        str(path.relative_to(state)): oct(mode) for path, mode in walked.items() if mode & 0o077
    }
    assert open_to_others == {}
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def _modes(folder: Path) -> dict[Path, int]:
    found: dict[Path, int] = {}
    for root, folders, files in os.walk(folder):
        for name in (*folders, *files):
            path = Path(root, name)
            try:
                status = path.lstat()
            except FileNotFoundError:
                continue
            if not stat.S_ISLNK(status.st_mode) and not stat.S_ISSOCK(status.st_mode):
                found[path] = stat.S_IMODE(status.st_mode)
    return found
