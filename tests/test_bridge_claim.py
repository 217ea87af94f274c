"""`python -m bridge.claim`: replicas of one compose service each take their own bridge account."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge.claim import ClaimError, claim_instance
from teamtrack.provision import provision
from teamtrack.registry import demo_registry


def test_each_claim_takes_the_next_free_instance_until_none_is_left(tmp_path: Path) -> None:
    first, first_lock = claim_instance(tmp_path, "b1", 2)
    second, second_lock = claim_instance(tmp_path, "b1", 2)
    assert (first, second) == (1, 2)
    with pytest.raises(ClaimError, match="all 2 bridge account"):
        claim_instance(tmp_path, "b1", 2)
    assert claim_instance(tmp_path, "b2", 1)[0] == 1  # another broker's numbers are its own
    os.close(first_lock)
    assert claim_instance(tmp_path, "b1", 2)[0] == 1
    os.close(second_lock)


def test_a_replica_runs_the_bridge_as_the_account_it_claimed(tmp_path: Path) -> None:
    provision(demo_registry(1, 1, brokers=1, bridges_per_broker=2), tmp_path / "state")
    claims = tmp_path / "claims"
    _, held = claim_instance(claims, "b1", 2)  # another replica holds bridge-b1-1
    environment = {
        **os.environ,
        "TEAMTRACK_BROKER_ID": "b1",
        "TEAMTRACK_CREDENTIALS": str(tmp_path / "state"),
        "TEAMTRACK_CLAIMS_DIR": str(claims),
        # Nothing listens there: the bridge keeps trying while the test looks at it.
        "TEAMTRACK_BROKER_URL": "mqtt://127.0.0.1:9",
        "TEAMTRACK_BACKEND_URL": "memory://",
        "TEAMTRACK_METRICS_PORT": "0",
    }
    replica = subprocess.Popen([sys.executable, "-m", "bridge.claim"], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            argv = Path(f"/proc/{replica.pid}/cmdline").read_bytes().split(b"\0")
            if b"bridge" in argv and b"bridge.claim" not in argv:
                break
            time.sleep(0.05)
        variables = dict(
            entry.split(b"=", 1)
            for entry in Path(f"/proc/{replica.pid}/environ").read_bytes().split(b"\0") if entry
        )
        assert variables[b"TEAMTRACK_INSTANCE"] == b"2"
        assert b"TEAMTRACK_MQTT_PASSWORD" in variables
        # Its claim is held by the bridge itself now, and goes with it.
        with pytest.raises(ClaimError):
            claim_instance(claims, "b1", 2)
    finally:
        replica.kill()
        replica.wait(10)
    assert claim_instance(claims, "b1", 2)[0] == 2
    os.close(held)
