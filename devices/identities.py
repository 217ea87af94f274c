"""Who the simulated workers are: their team, worker id and MQTT credentials."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teamtrack.contract import require_slug


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    team: str
    worker: str
    username: str
    password: str

    @property
    def client_id(self) -> str:
        """The username: brokers take it as the client id whatever a client sends
        (`use_username_as_clientid`), so a device can only ever hold its own session."""
        return self.username

    def __repr__(self) -> str:
        # Keeps passwords out of logs and tracebacks.
        return (
            f"DeviceIdentity(team={self.team!r}, worker={self.worker!r},"
            f" username={self.username!r})"
        )


def _identity(entry: Any, where: str) -> DeviceIdentity:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object with team, worker, username, password")
    values: dict[str, str] = {}
    for key in ("team", "worker", "username", "password"):
        value = entry.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}.{key} must be a non-empty string")
        values[key] = value
    require_slug(values["team"], f"{where}.team")
    require_slug(values["worker"], f"{where}.worker")
    return DeviceIdentity(**values)


def load_device_identities(path: Path | str) -> list[DeviceIdentity]:
    """The `devices` entries of a credentials file, in file order.

    The file looks like `{"devices": [{"team", "worker", "username", "password"}, ...], ...}`;
    other top-level keys (managers, services) are ignored. Raises `ValueError` with the offending
    entry on a malformed file, `OSError` if it cannot be read.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    devices = document.get("devices") if isinstance(document, dict) else None
    if not isinstance(devices, list):
        raise ValueError(f'{path} has no "devices" list')
    identities = [_identity(entry, f"devices[{index}]") for index, entry in enumerate(devices)]
    seen: set[tuple[str, str]] = set()
    for identity in identities:
        key = (identity.team, identity.worker)
        if key in seen:
            raise ValueError(f"{path} lists worker {identity.team}/{identity.worker} twice")
        seen.add(key)
    return identities


def select_identities(
    identities: list[DeviceIdentity], teams: int | None = None, workers_per_team: int | None = None
) -> list[DeviceIdentity]:
    """The first `teams` teams and the first `workers_per_team` workers of each, in file order.

    None means all. The result is grouped by team, in the order teams first appear.
    """
    if teams is not None and teams < 0:
        raise ValueError("teams must not be negative")
    if workers_per_team is not None and workers_per_team < 0:
        raise ValueError("workers per team must not be negative")
    by_team: dict[str, list[DeviceIdentity]] = {}
    for identity in identities:
        by_team.setdefault(identity.team, []).append(identity)
    chosen_teams = list(by_team)[:teams] if teams is not None else list(by_team)
    return [
        identity
        for team in chosen_teams
        for identity in (
            by_team[team][:workers_per_team] if workers_per_team is not None else by_team[team]
        )
    ]
