from __future__ import annotations

from backend_contract import BackendContract

from teamtrack.backends import Backend, from_url


class TestMemoryBackend(BackendContract):
    def make_backend(self, history: int) -> Backend:
        return from_url(f"memory://?history={history}")
