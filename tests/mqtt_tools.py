"""The real Mosquitto command-line clients, driven from tests."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Sequence

from teamtrack.local.servers import LOOPBACK

SUBACK_TIMEOUT = 5.0


def _connection(port: int, username: str, password: str) -> list[str]:
    return ["-h", LOOPBACK, "-p", str(port), "-V", "mqttv5", "-u", username, "-P", password]


class MosquittoSub:
    """`mosquitto_sub -V mqttv5` collecting `(topic, payload)` pairs in a background thread.

    Start it with `await MosquittoSub.start(...)`: waiting happens without blocking the event
    loop, where the services under test run.
    """

    def __init__(self, port: int, username: str, password: str, topic_filter: str) -> None:
        self._process = subprocess.Popen(
            # Line-buffered, or the SUBACK line would sit in a pipe buffer.
            [
                "stdbuf",
                "-oL",
                "mosquitto_sub",
                *_connection(port, username, password),
                "-t",
                topic_filter,
                "-F",
                "%t|%p",
                "-d",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.messages: list[tuple[str, str]] = []
        self._subscribed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    async def start(
        cls, port: int, username: str, password: str, topic_filter: str
    ) -> MosquittoSub:
        watcher = cls(port, username, password, topic_filter)
        if not await asyncio.to_thread(watcher._subscribed.wait, SUBACK_TIMEOUT):
            watcher.stop()
            raise RuntimeError("mosquitto_sub got no SUBACK")
        return watcher

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            line = line.rstrip("\n")
            if line.startswith("Client ") or line.startswith("Subscribed"):
                if "SUBACK" in line:
                    self._subscribed.set()
                continue
            topic, sep, payload = line.partition("|")
            if sep and topic.startswith("teams/"):
                self.messages.append((topic, payload))

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return list(self.messages)

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(5)


async def publish_lines(
    port: int,
    username: str,
    password: str,
    topic: str,
    payloads: Sequence[bytes],
    qos: int = 1,
) -> subprocess.CompletedProcess[bytes]:
    """Publish each payload as one message with `mosquitto_pub -l` (one connection)."""
    return await asyncio.to_thread(
        subprocess.run,
        [
            "mosquitto_pub",
            *_connection(port, username, password),
            "-t",
            topic,
            "-q",
            str(qos),
            "-l",
        ],
        input=b"\n".join(payloads) + b"\n",
        capture_output=True,
        timeout=30,
        check=False,
    )
