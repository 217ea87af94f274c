"""Real servers for the tests, started on free loopback ports and stopped at the end."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from teamtrack.servers import LOOPBACK, free_port, start_redis


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    server = start_redis(port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://{LOOPBACK}:{port}/0"
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """The shared test Redis, with a key prefix of this test's own."""
    return f"{redis_server_url}?prefix=test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def output_dir(request: pytest.FixtureRequest) -> Path:
    """A folder under test-output/ for what a test leaves for people to look at."""
    root = Path(__file__).resolve().parents[1] / "test-output"
    folder = root / request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
