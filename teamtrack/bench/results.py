"""What a benchmark run measured, and the performance targets checked against it."""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

from teamtrack.bench.accounting import Delivery, LatencySummary
from teamtrack.bench.config import BenchConfig, Shape
from teamtrack.bench.system import UsageReport

RESULT_FORMAT_VERSION: Final = 3  # 3: CPU per delivered position; 2: rounds
TARGET_RATE: Final = 10_000
# The path's CPU per delivered position may be at most this many times the baseline's (Mosquitto
# alone, same rate, shape and round): issue 15.
COST_TARGET_RATIO: Final = 3.0
# Processes of a step that drive or watch the load, not part of the path measured: the
# generators, the receiver and the harness itself. Every other process is the path.
LOAD_TOOLING_ROLES: Final = ("generator", "receiver", "harness")


def is_load_tooling(role: str) -> bool:
    return role.split("-", 1)[0] in LOAD_TOOLING_ROLES


@dataclass(frozen=True, slots=True)
class CpuPerPosition:
    """CPU time (user + system, microseconds) per delivered position, over a step's window.

    Each process's CPU over the window divided by the positions delivered in it: a process that
    works per wake-up rather than per message shows a higher cost at low rates. `path` adds up
    every process of the deployment (brokers, bridges, backend, dashboards, ingest, gateways);
    the load tooling (generators, receiver, harness) is reported apart.
    """

    processes: dict[str, float]
    load_tooling: dict[str, float]

    @property
    def path(self) -> float:
        return sum(self.processes.values())

    @property
    def load_tooling_total(self) -> float:
        return sum(self.load_tooling.values())

    @classmethod
    def of(cls, usage: UsageReport, delivered_per_s: float) -> CpuPerPosition | None:
        """None when nothing was delivered (no position to share the CPU over)."""
        if delivered_per_s <= 0:
            return None
        # cpu_percent is % of one core: cpu_percent / 100 CPU-seconds per second.
        costs = {
            role: process.cpu_percent * 1e4 / delivered_per_s
            for role, process in usage.processes.items()
        }
        return cls(
            processes={role: us for role, us in costs.items() if not is_load_tooling(role)},
            load_tooling={role: us for role, us in costs.items() if is_load_tooling(role)},
        )

    def document(self) -> dict[str, Any]:
        return {
            "path": round(self.path, 2),
            "processes": {role: round(us, 2) for role, us in sorted(self.processes.items())},
            "load_tooling": round(self.load_tooling_total, 2),
            "load_tooling_processes": {
                role: round(us, 2) for role, us in sorted(self.load_tooling.items())
            },
        }


@dataclass(frozen=True, slots=True)
class StepResult:
    """One offered rate, held for the measurement window, then drained and accounted."""

    offered_rate: int
    fixed: bool
    measure_seconds: float
    achieved_rate: float  # what the generators actually offered in the window
    delivery: Delivery
    failures: tuple[str, ...]  # why the step does not count as sustained; empty if it does
    generator: dict[str, int]
    receiver: dict[str, int]
    usage: UsageReport
    drain_seconds: float
    # Dropped by the bridges' bounded queues, and counted there, from warm-up to drain end: not
    # silent, but not delivered either, so also in `lost` when it falls in the window.
    bridge_drops: int = 0

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def latency(self) -> LatencySummary | None:
        return self.delivery.latency

    @property
    def delivered_rate(self) -> float:
        return self.delivery.delivered / self.measure_seconds

    @property
    def cpu_per_position(self) -> CpuPerPosition | None:
        """CPU microseconds per delivered position, per process and for the whole path."""
        return CpuPerPosition.of(self.usage, self.delivered_rate)

    @property
    def generator_cpu_percent(self) -> float:
        return sum(
            usage.cpu_percent
            for role, usage in self.usage.processes.items()
            if role.startswith("generator")
        )

    def document(self) -> dict[str, Any]:
        latency = self.latency
        return {
            "offered_rate": self.offered_rate,
            "fixed_rate": self.fixed,
            "measure_seconds": round(self.measure_seconds, 3),
            "achieved_rate": round(self.achieved_rate, 1),
            "delivered_rate": round(self.delivered_rate, 1),
            "sent": self.delivery.sent,
            "delivered": self.delivery.delivered,
            "lost": self.delivery.lost,
            "shed": self.delivery.shed,
            "bridge_drops": self.bridge_drops,
            "duplicated": self.delivery.duplicated,
            "latency_ms": (
                {key: round(value, 3) for key, value in asdict(latency).items()}
                if latency is not None
                else None
            ),
            "latency_timeline": [
                {"start_s": round(point.start_s, 2), "delivered": point.delivered,
                 "p50_ms": round(point.p50_ms, 3), "p99_ms": round(point.p99_ms, 3)}
                for point in self.delivery.timeline
            ],
            "passed": self.passed,
            "failures": list(self.failures),
            "generator": self.generator,
            "receiver": self.receiver,
            "drain_seconds": round(self.drain_seconds, 3),
            "usage_seconds": round(self.usage.seconds, 3),
            "machine_busy_percent": round(self.usage.machine_busy_percent, 1),
            "processes": {
                role: usage.document() for role, usage in sorted(self.usage.processes.items())
            },
            "cpu_us_per_position": (
                cost.document() if (cost := self.cpu_per_position) is not None else None
            ),
        }


@dataclass(slots=True)
class RunResult:
    """One scenario under one load shape: its connections and its steps, lowest rate first."""

    scenario: str
    path: str
    shape: Shape
    workers: int
    deployment: str
    connect: dict[str, Any] = field(default_factory=dict)
    memory_per_connection_kib: dict[str, float] = field(default_factory=dict)
    steps: list[StepResult] = field(default_factory=list)
    error: str | None = None
    round_number: int | None = None  # its round when the plan ran more than once (`--rounds`)

    @property
    def name(self) -> str:
        """The scenario, and its round when there are several: how people read it."""
        if self.round_number is None:
            return self.scenario
        return f"{self.scenario} #{self.round_number}"

    @property
    def slug(self) -> str:
        """The same for file names."""
        if self.round_number is None:
            return self.scenario
        return f"{self.scenario}-r{self.round_number}"

    @property
    def sustainable_rate(self) -> int | None:
        """The highest offered rate of the ladder passed before its first failing step."""
        best = None
        for step in self.steps:
            if not step.passed:
                break
            best = step.offered_rate
        return best

    @property
    def reached_the_top(self) -> bool:
        """Every step passed: the sustained rate is only a lower bound of the real one."""
        return self.sustainable_rate is not None and self.ladder_stop is None

    @property
    def ladder_stop(self) -> str | None:
        for step in self.steps:
            if not step.passed:
                return f"{step.offered_rate:,} msg/s: {'; '.join(step.failures)}"
        return self.error

    def step_at(self, rate: int) -> StepResult | None:
        return next((step for step in self.steps if step.offered_rate == rate), None)

    def document(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "round": self.round_number,
            "path": self.path,
            "shape": self.shape.value,
            "workers": self.workers,
            "deployment": self.deployment,
            "connect": self.connect,
            "memory_per_connection_kib": self.memory_per_connection_kib,
            "sustainable_rate": self.sustainable_rate,
            "ladder_stop": self.ladder_stop,
            "error": self.error,
            "steps": [step.document() for step in self.steps],
        }


@dataclass(frozen=True, slots=True)
class TargetCheck:
    name: str
    shape: Shape
    value: float | None  # None: not measured in this run
    limit: float
    at_least: bool  # the value must be >= limit (else <= limit)
    unit: str
    # Why the value cannot decide, when it is only a bound on one side of the limit.
    undecided: str | None = None
    # With several rounds: the value of each round that measured it (`value`: their median).
    per_round: tuple[float, ...] = ()

    @property
    def met(self) -> bool | None:
        if self.value is None or self.undecided is not None:
            return None
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def document(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": self.shape.value,
            "value": None if self.value is None else round(self.value, 3),
            "limit": self.limit,
            "comparison": ">=" if self.at_least else "<=",
            "unit": self.unit,
            "met": self.met,
            "undecided": self.undecided,
            "per_round": [round(value, 3) for value in self.per_round],
        }


def _ratio(run: RunResult, baseline: RunResult | None) -> float | None:
    r0 = baseline.sustainable_rate if baseline is not None else None
    sustained = run.sustainable_rate
    if not r0 or sustained is None:
        return None
    return sustained / r0


def combine_rounds(checks: Sequence[TargetCheck]) -> TargetCheck:
    """One target over several rounds: the median of what each measured. A round whose value
    is only a bound leaves the target undecided."""
    if len(checks) == 1:
        return checks[0]
    values = [check.value for check in checks if check.value is not None]
    undecided = next((check.undecided for check in checks if check.undecided is not None), None)
    return replace(
        checks[0],
        value=statistics.median(values) if values else None,
        undecided=undecided,
        per_round=tuple(values),
    )


# Steps measured this long or longer (a soak, an overload) get their latency and memory over
# the window in the report and a timeline plot.
LONG_STEP_S: Final = 60.0


@dataclass(slots=True)
class BenchResult:
    config: BenchConfig
    machine: dict[str, Any]
    started_at: str
    finished_at: str = ""
    runs: list[RunResult] = field(default_factory=list)

    def runs_of(self, scenario: str, shape: Shape) -> list[RunResult]:
        """A scenario's runs under a shape, one per round."""
        return [run for run in self.runs if run.scenario == scenario and run.shape is shape]

    def partner(self, run: RunResult, scenario: str) -> RunResult | None:
        """`scenario`'s run of the same shape and round as `run` (the one to compare it with)."""
        return next(
            (
                other
                for other in self.runs_of(scenario, run.shape)
                if other.round_number == run.round_number
            ),
            None,
        )

    def long_steps(self) -> Iterator[tuple[RunResult, StepResult]]:
        """The steps of at least `LONG_STEP_S`, with their run."""
        for run in self.runs:
            for step in run.steps:
                if step.measure_seconds >= LONG_STEP_S:
                    yield run, step

    def cost_ratio(self, run: RunResult, step: StepResult) -> float | None:
        """The step's path CPU per delivered position over the baseline's at the same offered
        rate (same shape and round); None without such a baseline step."""
        baseline = self.partner(run, "baseline")
        baseline_step = baseline.step_at(step.offered_rate) if baseline is not None else None
        if baseline_step is None:
            return None
        mine, theirs = step.cpu_per_position, baseline_step.cpu_per_position
        if mine is None or theirs is None or theirs.path <= 0:
            return None
        return mine.path / theirs.path

    def _cost_check(self, run: RunResult) -> TargetCheck:
        step = run.step_at(TARGET_RATE)
        return TargetCheck(
            f"{run.scenario} path CPU per position at 10,000 msg/s vs baseline", run.shape,
            self.cost_ratio(run, step) if step is not None else None, COST_TARGET_RATIO,
            False, "x baseline",
        )

    def ratio_to_baseline(self, run: RunResult) -> float | None:
        """The run's sustained rate over R0: what Mosquitto alone sustained with the same
        generator and receiver, under the same shape, in the same round."""
        return _ratio(run, self.partner(run, "baseline"))

    def _ratio_check(self, run: RunResult, share: float) -> TargetCheck:
        """A ladder that passed every step only says the rate is at least its top: the ratio
        is then a bound, which decides the target on one side only."""
        baseline = self.partner(run, "baseline")
        ratio = _ratio(run, baseline)
        undecided = None
        # `--rates ""`: the fixed rates alone, no ladder to raise.
        passed_all = "the whole ladder" if self.config.rates else "every fixed rate"
        if ratio is not None and baseline is not None:
            if run.reached_the_top and baseline.reached_the_top:
                undecided = (f"both passed {passed_all}: raise --rates" if self.config.rates
                             else "both passed every fixed rate (no ladder): give --rates")
            elif run.reached_the_top and ratio < share:
                undecided = f"at least {ratio:.2f}: {run.scenario} passed {passed_all}"
            elif baseline.reached_the_top and ratio >= share:
                undecided = f"at most {ratio:.2f}: the baseline passed {passed_all}"
            if undecided is not None and run.round_number is not None:
                undecided = f"round {run.round_number}, {undecided}"
        return TargetCheck(
            f"{run.scenario} sustains >= {share} x R0 with zero loss", run.shape, ratio, share,
            True, "x R0", undecided,
        )

    def _latency_checks(self, redis: RunResult) -> list[TargetCheck]:
        step = redis.step_at(TARGET_RATE)
        latency = step.latency if step is not None else None
        baseline_run = self.partner(redis, "baseline")
        baseline_step = baseline_run.step_at(TARGET_RATE) if baseline_run else None
        baseline_latency = baseline_step.latency if baseline_step is not None else None
        return [
            TargetCheck(
                "redis p50 at 10,000 msg/s", redis.shape,
                latency.p50_ms if latency else None, 5.0, False, "ms",
            ),
            TargetCheck(
                "redis p99 at 10,000 msg/s", redis.shape,
                latency.p99_ms if latency else None, 25.0, False, "ms",
            ),
            TargetCheck(
                "redis p99 minus baseline p99 at 10,000 msg/s", redis.shape,
                latency.p99_ms - baseline_latency.p99_ms
                if latency and baseline_latency
                else None,
                10.0, False, "ms",
            ),
        ]

    def targets(self) -> list[TargetCheck]:
        """The targets of issues 6 and 15 that this run can judge, per load shape; with several
        rounds, each is judged in every round (a path against the baseline of its own round)
        and the median decides."""
        checks = []
        for shape in self.config.shapes:
            for scenario, share in (("redis", 0.6), ("kafka", 0.5)):
                runs = self.runs_of(scenario, shape)
                if runs:
                    checks.append(combine_rounds([self._ratio_check(run, share) for run in runs]))
            per_round = [self._latency_checks(run) for run in self.runs_of("redis", shape)]
            checks += [combine_rounds(same_target) for same_target in zip(*per_round, strict=True)]
            redis_runs = self.runs_of("redis", shape)
            if redis_runs:
                checks.append(combine_rounds([self._cost_check(run) for run in redis_runs]))
        return checks

    def document(self) -> dict[str, Any]:
        config = self.config
        return {
            "format_version": RESULT_FORMAT_VERSION,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "machine": self.machine,
            "config": {
                "scenarios": list(config.scenarios),
                "shapes": [shape.value for shape in config.shapes],
                "rates": list(config.rates),
                "fixed_rates": list(config.fixed_rates),
                "many_workers": config.many_workers,
                "few_workers": config.few_workers,
                "teams": config.teams,
                "step_seconds": config.step_seconds,
                "warmup_seconds": config.warmup_seconds,
                "drain_seconds": config.drain_seconds,
                "generator_processes": config.generator_processes,
                "qos": config.qos,
                "rounds": config.rounds,
                "bridges_per_broker": config.bridges_per_broker,
                "mirror": config.mirror,
                "max_p99_ms": config.max_p99_ms,
                "endpoints": str(config.endpoints) if config.endpoints else None,
                "faults": asdict(config.faults),
            },
            "baseline_rates": {
                shape.value: [run.sustainable_rate for run in self.runs_of("baseline", shape)]
                for shape in config.shapes
            },
            "runs": [
                {
                    **run.document(),
                    "ratio_to_baseline": self.ratio_to_baseline(run),
                    # Per step (same order as `steps`): path CPU per delivered position over
                    # the baseline's at the same rate.
                    "cpu_per_position_x_baseline": [
                        None if (ratio := self.cost_ratio(run, step)) is None
                        else round(ratio, 3)
                        for step in run.steps
                    ],
                }
                for run in self.runs
            ],
            "targets": [check.document() for check in self.targets()],
        }
