from __future__ import annotations

from backend_contract import BackendContract

from teamtrack.backends import Backend, from_url


class TestMemoryBackend(BackendContract):
    instances_share = False

    def make_backend(self, history: int) -> Backend:
        return from_url(f"memory://?history={history}")
