"""The identity registry: which teams exist, their workers and managers, and the service users.

The registry is a YAML file written by people (or by `demo_registry` for demos and load tests):

    teams:
      - id: alpha
        name: Alpha couriers          # optional display name
        workers: [w001, w002]         # explicit list, and/or:
        worker_count: 50              # ensures w001..w050 exist (zero-padded to 3+ digits)
        managers: [alpha-lead]
        retention_days: 30            # optional: history kept this long (default: the
                                      # ingest's --retention-days, 90); 0 keeps it forever
        shifts:                       # optional: when its workers are on duty (absent:
          tz: Europe/Berlin           # always); outside, their positions are dropped
          windows: ["mon-fri 07:00-19:00", "sat 08:00-12:00"]   # (docs/privacy.md)
        worker_shifts:                # optional: a worker's own shifts, or "always"
          w002: {tz: Europe/Berlin, windows: ["sun-thu 22:00-06:00"]}
        offline_alert_s: 600          # optional alert thresholds of the rules service:
        battery_alert_below: 20       # offline this long, battery below this %, no
        idle_alert_s: 1200            # movement this long (defaults: the service's flags)
        alert_webhook: https://ops.example.org/teamtrack   # optional: alerts POSTed, signed
    bridges: [bridge-b1-1, bridge-b2-1]   # MQTT users of bridge processes, one per process:
                                      # bridge-{broker}-{instance} (client id = username)
    observers: [observer]             # MQTT users that may read teams/# for debugging
    tls_hosts: [teamtrack.example.org, 203.0.113.7]   # names and addresses the servers are
                                      # reached by, besides localhost, 127.0.0.1 and ::1: the
                                      # SANs of the servers' certificate (teamtrack.tls)

It is the single source from which credentials, the broker password file and the ACL are
provisioned, so everything is validated here once: ids are slugs, and every username is unique
across the whole registry, which also means each manager belongs to exactly one team.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from teamtrack.contract import SLUG_PATTERN, is_slug
from teamtrack.ingress.duty import DutyRoster, ShiftError, TeamDuty, parse_shifts
from teamtrack.mqtt import bridge_username
from teamtrack.tls import TlsError, normalize_hosts

DEVICE_USERNAME_SEPARATOR: Final = "."
DEFAULT_BROKERS: Final = 2
DEFAULT_OBSERVERS: Final = ("observer",)
MAX_WORKER_COUNT: Final = 100_000
DEMO_TEAM_NAMES: Final = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)  # fmt: skip


class RegistryError(ValueError):
    """The registry file is unreadable or breaks a rule; the message names the file and the rule."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


def bridge_usernames(brokers: int, instances: int = 1) -> tuple[str, ...]:
    """One account per bridge process: brokers b1..b{brokers}, instances 1..{instances} each."""
    if brokers < 1 or instances < 1:
        raise ValueError("a cluster needs at least one broker and one bridge per broker")
    return tuple(
        bridge_username(f"b{broker}", instance)
        for broker in range(1, brokers + 1)
        for instance in range(1, instances + 1)
    )


DEFAULT_BRIDGES: Final = bridge_usernames(DEFAULT_BROKERS)


def device_username(team: str, worker: str) -> str:
    """The MQTT username of a worker's device; a slug has no dot, so this is unambiguous."""
    return f"{team}{DEVICE_USERNAME_SEPARATOR}{worker}"


def parse_device_username(username: str) -> tuple[str, str] | None:
    """(team, worker) of a device username, or None if it is not one."""
    team, separator, worker = username.partition(DEVICE_USERNAME_SEPARATOR)
    if not separator or not is_slug(team) or not is_slug(worker):
        return None
    return team, worker


def generated_worker_ids(count: int) -> list[str]:
    """w001..w{count}; at least three digits so that ids sort the same as numbers up to 999."""
    width = max(3, len(str(count)))
    return [f"w{number:0{width}d}" for number in range(1, count + 1)]


def _require_slugs(values: tuple[str, ...], what: str) -> tuple[str, ...]:
    for value in values:
        if not is_slug(value):
            raise ValueError(f"{what} {value!r} is not a slug ({SLUG_PATTERN})")
    duplicates = sorted(value for value, seen in Counter(values).items() if seen > 1)
    if duplicates:
        raise ValueError(f"{what} listed more than once: {', '.join(duplicates)}")
    return values


@dataclass(frozen=True, slots=True)
class Device:
    team: str
    worker: str

    @property
    def username(self) -> str:
        return device_username(self.team, self.worker)


@dataclass(frozen=True, slots=True)
class Manager:
    team: str
    username: str


class Team(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    name: str | None = None
    workers: tuple[str, ...] = ()
    managers: tuple[str, ...] = ()
    # Days of history (positions, presence, events) the ingest keeps for this team; None: its
    # `--retention-days`. 0 keeps everything (docs/privacy.md).
    retention_days: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # When the team's workers are on duty (teamtrack.ingress.duty); None: always.
    shifts: dict[str, Any] | None = None
    # A worker's own shifts, or "always"; only workers of the team.
    worker_shifts: dict[str, dict[str, Any] | str] = Field(default_factory=dict)

    @field_validator("shifts")
    @classmethod
    def _shifts_parse(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                parse_shifts(value)
            except ShiftError as error:
                raise ValueError(str(error)) from None
        return value

    @model_validator(mode="after")
    def _worker_shifts_parse(self) -> Team:
        for worker, shifts in self.worker_shifts.items():
            if worker not in self.worker_set:
                raise ValueError(f"worker_shifts: {worker!r} is not a worker of the team")
            if shifts == "always":
                continue
            try:
                parse_shifts(shifts, f"worker_shifts.{worker}")
            except ShiftError as error:
                raise ValueError(str(error)) from None
        return self

    def duty(self) -> TeamDuty | None:
        """The team's shifts (None: nobody in it has any)."""
        if self.shifts is None and not self.worker_shifts:
            return None
        return TeamDuty(
            parse_shifts(self.shifts) if self.shifts is not None else None,
            {worker: None if shifts == "always" else parse_shifts(shifts)
             for worker, shifts in self.worker_shifts.items()},
        )
    # Alert thresholds of the rules service (docs/protocol.md, "Alerts"); None: its defaults
    # (--offline-alert-s, --battery-alert-below, --idle-alert-s). 0 s turns a timer rule off.
    offline_alert_s: float | None = Field(default=None, ge=0, le=86_400 * 7,
                                          allow_inf_nan=False)
    battery_alert_below: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    idle_alert_s: float | None = Field(default=None, ge=0, le=86_400 * 7, allow_inf_nan=False)
    # Where the rules service POSTs this team's alerts (signed; docs/alerts.md, "Webhooks").
    alert_webhook: str | None = Field(default=None, max_length=500,
                                      pattern=r"^https?://[^\s/?#]+[^\s]*$")

    @model_validator(mode="before")
    @classmethod
    def _expand_worker_count(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or "worker_count" not in data:
            return data
        fields = dict(data)
        count = fields.pop("worker_count")
        if isinstance(count, bool) or not isinstance(count, int):
            raise ValueError("worker_count must be an integer")
        if not 0 <= count <= MAX_WORKER_COUNT:
            raise ValueError(f"worker_count must be between 0 and {MAX_WORKER_COUNT}")
        listed = fields.get("workers") or []
        if not isinstance(listed, list | tuple):
            raise ValueError("workers must be a list")
        already = set(listed)
        fields["workers"] = [
            *listed,
            *(worker for worker in generated_worker_ids(count) if worker not in already),
        ]
        return fields

    @field_validator("id")
    @classmethod
    def _id_is_slug(cls, value: str) -> str:
        if not is_slug(value):
            raise ValueError(f"team id {value!r} is not a slug ({SLUG_PATTERN})")
        return value

    @field_validator("workers")
    @classmethod
    def _workers_are_slugs(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _require_slugs(values, "worker")

    @field_validator("managers")
    @classmethod
    def _managers_are_slugs(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _require_slugs(values, "manager username")

    @property
    def display_name(self) -> str:
        return self.name or self.id

    @cached_property
    def worker_set(self) -> frozenset[str]:
        return frozenset(self.workers)


class Registry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    teams: tuple[Team, ...]
    bridges: tuple[str, ...] = DEFAULT_BRIDGES
    observers: tuple[str, ...] = DEFAULT_OBSERVERS
    tls_hosts: tuple[str, ...] = ()

    @field_validator("teams")
    @classmethod
    def _at_least_one_team(cls, values: tuple[Team, ...]) -> tuple[Team, ...]:
        if not values:
            raise ValueError("at least one team is required")
        return values

    @field_validator("bridges")
    @classmethod
    def _bridges_are_slugs(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _require_slugs(values, "bridge username")

    @field_validator("observers")
    @classmethod
    def _observers_are_slugs(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _require_slugs(values, "observer username")

    @field_validator("tls_hosts")
    @classmethod
    def _tls_hosts_are_names(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        try:
            normalize_hosts(values)
        except TlsError as error:
            raise ValueError(str(error)) from None
        return values

    @model_validator(mode="after")
    def _identities_are_unique(self) -> Registry:
        team_ids = [team.id for team in self.teams]
        repeated_teams = sorted(team for team, seen in Counter(team_ids).items() if seen > 1)
        if repeated_teams:
            raise ValueError(f"team id listed more than once: {', '.join(repeated_teams)}")
        # Device usernames contain a dot and service usernames cannot, so only the slug-shaped
        # usernames (managers, bridges, observers) can collide with each other.
        owners: dict[str, str] = {}
        for role, username in self._service_and_manager_usernames():
            if username in owners:
                raise ValueError(
                    f"username {username!r} is used twice ({owners[username]} and {role}); "
                    "usernames must be unique and each manager belongs to exactly one team"
                )
            owners[username] = role
        return self

    def _service_and_manager_usernames(self) -> Iterator[tuple[str, str]]:
        for team in self.teams:
            for username in team.managers:
                yield f"manager of team {team.id}", username
        for username in self.bridges:
            yield "bridge", username
        for username in self.observers:
            yield "observer", username

    @cached_property
    def _teams_by_id(self) -> dict[str, Team]:
        return {team.id: team for team in self.teams}

    @cached_property
    def _team_of_manager(self) -> dict[str, str]:
        return {username: team.id for team in self.teams for username in team.managers}

    @property
    def team_ids(self) -> tuple[str, ...]:
        return tuple(team.id for team in self.teams)

    @property
    def device_count(self) -> int:
        return sum(len(team.workers) for team in self.teams)

    def team(self, team_id: str) -> Team:
        """The team with this id; KeyError if there is none."""
        return self._teams_by_id[team_id]

    def has_worker(self, team_id: str, worker: str) -> bool:
        team = self._teams_by_id.get(team_id)
        return team is not None and worker in team.worker_set

    def device_username(self, team_id: str, worker: str) -> str:
        """The MQTT username of a registered worker's device; KeyError if it is not registered."""
        if not self.has_worker(team_id, worker):
            raise KeyError(f"no worker {worker!r} in team {team_id!r}")
        return device_username(team_id, worker)

    def retention_days(self, default: float) -> dict[str, float]:
        """Each team's days of history: its `retention_days`, else `default`."""
        return {
            team.id: default if team.retention_days is None else team.retention_days
            for team in self.teams
        }

    def duty_roster(self) -> DutyRoster:
        """Every team's shifts: what `teamtrack provision` writes into duty.json."""
        teams = {team.id: duty for team in self.teams if (duty := team.duty()) is not None}
        return DutyRoster(teams)

    def team_of_manager(self, username: str) -> str | None:
        return self._team_of_manager.get(username)

    def devices(self) -> Iterator[Device]:
        for team in self.teams:
            for worker in team.workers:
                yield Device(team.id, worker)

    def managers(self) -> Iterator[Manager]:
        for team in self.teams:
            for username in team.managers:
                yield Manager(team.id, username)


def _team_label(data: Mapping[Any, Any], index: int) -> str:
    """`teams[2] (id 'bravo')`, so that an error in a long file can be found by the team id."""
    teams = data.get("teams")
    if isinstance(teams, list) and index < len(teams) and isinstance(teams[index], Mapping):
        team_id = teams[index].get("id")
        if team_id is not None:
            return f"teams[{index}] (id {team_id!r})"
    return f"teams[{index}]"


def _describe_validation_error(error: ValidationError, data: Mapping[Any, Any]) -> str:
    problems = []
    for item in error.errors():
        parts = [str(part) for part in item["loc"]]
        if len(item["loc"]) >= 2 and item["loc"][0] == "teams" and isinstance(item["loc"][1], int):
            parts[:2] = [_team_label(data, item["loc"][1])]
        location = ".".join(parts) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{location}: {message}")
    return "; ".join(problems)


def parse_registry(data: object, source: str = "<registry>") -> Registry:
    """Validate already-parsed YAML/JSON data; `source` names it in error messages."""
    if not isinstance(data, Mapping):
        raise RegistryError(source, "the registry must be a mapping with a 'teams' list")
    try:
        return Registry.model_validate(data)
    except ValidationError as error:
        raise RegistryError(source, _describe_validation_error(error, data)) from None


def load_registry(path: Path | str) -> Registry:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise RegistryError(source, f"cannot read the file ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RegistryError(source, f"not valid YAML: {error}") from None
    return parse_registry(data, source)


def _team_document(team: Team) -> dict[str, Any]:
    document: dict[str, Any] = {"id": team.id}
    if team.name is not None:
        document["name"] = team.name
    # The generated sequence is written back as a count, so a demo registry of thousands of
    # workers stays a short, readable file that loads to an equal registry.
    if team.workers and list(team.workers) == generated_worker_ids(len(team.workers)):
        document["worker_count"] = len(team.workers)
    else:
        document["workers"] = list(team.workers)
    document["managers"] = list(team.managers)
    if team.retention_days is not None:
        document["retention_days"] = team.retention_days
    if team.shifts is not None:
        document["shifts"] = team.shifts
    if team.worker_shifts:
        document["worker_shifts"] = dict(team.worker_shifts)
    for name in ("offline_alert_s", "battery_alert_below", "idle_alert_s", "alert_webhook"):
        if getattr(team, name) is not None:
            document[name] = getattr(team, name)
    return document


def registry_document(registry: Registry) -> dict[str, Any]:
    """The registry as plain data in the file format, the inverse of `parse_registry`."""
    return {
        "teams": [_team_document(team) for team in registry.teams],
        "bridges": list(registry.bridges),
        "observers": list(registry.observers),
        **({"tls_hosts": list(registry.tls_hosts)} if registry.tls_hosts else {}),
    }


def dump_registry(registry: Registry, path: Path | str) -> Path:
    """Write the registry as YAML, atomically, so that a reader never sees half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(registry_document(registry), sort_keys=False, default_flow_style=None)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def demo_team_id(index: int) -> str:
    """Readable ids for the first teams (alpha, bravo, ...), then team-27, team-28, ..."""
    if index < len(DEMO_TEAM_NAMES):
        return DEMO_TEAM_NAMES[index]
    return f"team-{index + 1:02d}"


def demo_registry(
    teams: int, workers: int, *, brokers: int = DEFAULT_BROKERS, bridges_per_broker: int = 1
) -> Registry:
    """`teams` teams of `workers` workers each (w001..), one manager `{team}-lead` per team,
    and a bridge account for each of `bridges_per_broker` bridges of brokers b1..b{brokers}."""
    if teams < 1:
        raise ValueError("a demo registry needs at least one team")
    if not 0 <= workers <= MAX_WORKER_COUNT:
        raise ValueError(f"workers per team must be between 0 and {MAX_WORKER_COUNT}")
    worker_ids = tuple(generated_worker_ids(workers))
    team_list = []
    for index in range(teams):
        team_id = demo_team_id(index)
        team_list.append(
            Team(
                id=team_id,
                name=team_id.replace("-", " ").title(),
                workers=worker_ids,
                managers=(f"{team_id}-lead",),
            )
        )
    return Registry(
        teams=tuple(team_list), bridges=bridge_usernames(brokers, bridges_per_broker)
    )
