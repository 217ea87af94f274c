"""No secret on a command line: the process list shows every user every argument."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import Cluster
from paho.mqtt.enums import CallbackAPIVersion

from teamtrack.contract import status_topic
from teamtrack.local.servers import LOOPBACK
from teamtrack.provision import OBSERVER_CONFIG_DIR

pytestmark = pytest.mark.security


def test_the_observer_recipe_keeps_its_password_off_the_process_list(
    cluster: Cluster,
) -> None:
    """`teamtrack up` prints `XDG_CONFIG_HOME=state/observer mosquitto_sub ...`: the login
    comes from a 0600 options file (the README's recipe put it in `-P`, for anyone's `ps`)."""
    observer = cluster.credentials.observer
    assert observer is not None
    config_dir = Path(cluster.provisioned.out_dir) / OBSERVER_CONFIG_DIR
    options = config_dir / "mosquitto_sub"
    assert options.stat().st_mode & 0o777 == 0o600
    assert config_dir.stat().st_mode & 0o777 == 0o700
    broker = cluster.brokers[0]
    watcher = subprocess.Popen(
        ["mosquitto_sub", "-h", LOOPBACK, "-p", str(broker.mqtt_port), "-C", "1", "-W", "10",
         "-t", "teams/alpha/#", "-v"],
        env={**os.environ, "XDG_CONFIG_HOME": str(config_dir)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        command_line = Path(f"/proc/{watcher.pid}/cmdline").read_bytes()
        assert observer.password.encode() not in command_line
        device = cluster.device("alpha", "w001")
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        publisher.username_pw_set(device.username, device.password)
        publisher.connect(LOOPBACK, broker.mqtt_port)
        publisher.loop_start()
        deadline = time.monotonic() + 10
        while watcher.poll() is None and time.monotonic() < deadline:
            publisher.publish(status_topic("alpha", "w001"), b"online", qos=1)
            time.sleep(0.2)
        publisher.loop_stop()
        output, _ = watcher.communicate(timeout=10)
    finally:
        watcher.kill()
    assert f"{status_topic('alpha', 'w001')} online" in output
