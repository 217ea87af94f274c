from __future__ import annotations

import pytest
from backend_contract import BackendContract

from teamtrack.backends import Backend, BackendError, from_url


class TestRedisBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _server(self, redis_url: str) -> None:
        self.url = redis_url

    def make_backend(self, history: int) -> Backend:
        return from_url(f"{self.url}&history={history}")


async def test_unreachable_redis_is_a_clear_error() -> None:
    from teamtrack.servers import free_port

    backend = from_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(BackendError, match="unreachable"):
        await backend.start()
    await backend.close()


def test_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"memory://, redis://"):
        from_url("mongodb://localhost")
