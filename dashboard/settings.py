"""Settings of `python -m dashboard`: flags first, then `TEAMTRACK_*` environment variables."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, model_validator

from teamtrack.settings import ServiceSettings


class DashboardSettings(ServiceSettings):
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    auth_file: Path = Field(
        description="dashboard-auth.json written by provisioning (manager hashes, no plaintext)"
    )
    session_secret: SecretStr = Field(
        SecretStr(""),
        description=(
            "key that signs session cookies; give every instance the same one, through "
            "TEAMTRACK_SESSION_SECRET rather than a flag (command lines are visible to all "
            "users); empty: a random one, so sessions work on this instance only"
        ),
    )
    session_max_age_s: int = Field(43_200, gt=0, description="how long a login lasts")
    viewer_queue_batches: int = Field(
        256, ge=1, description="batches queued per viewer before it is dropped as too slow"
    )
    instance_id: str = Field("", description="name in /healthz and logs; empty: host:port")

    @model_validator(mode="after")
    def _name_the_instance(self) -> Self:
        if not self.instance_id:
            self.instance_id = f"{socket.gethostname()}:{self.port}"
        return self
