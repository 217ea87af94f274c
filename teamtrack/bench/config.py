"""What a benchmark run does: scenarios, load shapes, offered rates, step timing, output."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final

DEFAULT_LADDER: Final = (1_000, 2_000, 5_000, 10_000, 15_000, 20_000, 30_000, 40_000, 50_000)
DEFAULT_FIXED_RATES: Final = (1_000, 5_000, 10_000)
DEFAULT_MANY_WORKERS: Final = 10_000
DEFAULT_FEW_WORKERS: Final = 20
DEFAULT_TEAMS: Final = 10
# A step passes when nothing is lost and p99 stays under this.
DEFAULT_MAX_P99_MS: Final = 1_000.0
# A step whose generators offered less than this share of the asked rate was generator-bound.
MIN_ACHIEVED_SHARE: Final = 0.95


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says what failed and where its log is."""


class Shape(StrEnum):
    """How the offered load is spread over device connections."""

    MANY = "many"  # many connections, each at a low rate (10,000 workers at ~1 Hz)
    FEW = "few"  # few connections, each at a high rate


@dataclass(frozen=True, slots=True)
class FaultInjection:
    """Faults the generators inject into the measured window, for testing the accounting.

    Every `drop_every`-th measured message is recorded as sent but never published (it must
    be counted as lost); every `duplicate_every`-th is published twice (it must be counted as
    duplicated once). 0 turns a fault off.
    """

    drop_every: int = 0
    duplicate_every: int = 0

    def __post_init__(self) -> None:
        if self.drop_every < 0 or self.duplicate_every < 0:
            raise ValueError("fault intervals must be >= 0")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    out_dir: Path
    scenarios: tuple[str, ...] = ("baseline", "redis", "mqtt-mirror")
    rates: tuple[int, ...] = DEFAULT_LADDER
    fixed_rates: tuple[int, ...] = DEFAULT_FIXED_RATES
    shapes: tuple[Shape, ...] = (Shape.MANY, Shape.FEW)
    many_workers: int = DEFAULT_MANY_WORKERS
    few_workers: int = DEFAULT_FEW_WORKERS
    teams: int = DEFAULT_TEAMS
    step_seconds: float = 10.0
    warmup_seconds: float = 2.0
    drain_seconds: float = 5.0
    generator_processes: int = 2
    qos: int = 0
    max_p99_ms: float = DEFAULT_MAX_P99_MS
    # A running cluster's endpoints.json; its state folder (credentials.json, processes.json,
    # mosquitto.passwd, mosquitto.acl) is `state_dir`, by default the file's folder.
    endpoints: Path | None = None
    state_dir: Path | None = None
    faults: FaultInjection = field(default_factory=FaultInjection)
    show_progress: bool = True
    # The whole plan this many times, scenarios interleaved, so that a path and the baseline it
    # is compared with are measured minutes apart in every round; targets take the median.
    rounds: int = 1
    # The cluster `--scenarios faults` runs on: "redis" or "kafka" (three nodes).
    fault_backend: str = "redis"
    # Bridge processes per broker of the local cluster (`teamtrack up --bridges-per-broker`).
    bridges_per_broker: int = 1
    # Workers of each half of `--scenarios spike` (the load doubles from this, then halves).
    spike_workers: int = 200
    # What the local cluster's bridges mirror into their brokers (`teamtrack up --mirror`).
    mirror: str = "on-demand"

    def __post_init__(self) -> None:
        if not self.scenarios:
            raise ValueError("at least one scenario is needed")
        if not self.shapes:
            raise ValueError("at least one load shape is needed")
        if not self.rates and not self.fixed_rates:
            raise ValueError("at least one offered rate is needed")
        if any(rate <= 0 for rate in (*self.rates, *self.fixed_rates)):
            raise ValueError("offered rates must be positive")
        if self.many_workers < 1 or self.few_workers < 1 or self.teams < 1:
            raise ValueError("workers and teams must be at least 1")
        if self.generator_processes < 1:
            raise ValueError("at least one generator process is needed")
        for name, value in (
            ("step seconds", self.step_seconds),
            ("drain seconds", self.drain_seconds),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number")
        if not (math.isfinite(self.warmup_seconds) and self.warmup_seconds >= 0):
            raise ValueError("warm-up seconds must be >= 0")
        if self.qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")
        if self.bridges_per_broker < 1:
            raise ValueError("--bridges-per-broker must be at least 1")

    def workers_for(self, shape: Shape) -> int:
        return self.many_workers if shape is Shape.MANY else self.few_workers

    @property
    def largest_shape_workers(self) -> int:
        return max(self.workers_for(shape) for shape in self.shapes)

    def step_rates(self) -> list[tuple[int, bool]]:
        """(offered rate, is a fixed rate) in ascending order, each rate once."""
        fixed = set(self.fixed_rates)
        return [(rate, rate in fixed) for rate in sorted(set(self.rates) | fixed)]
