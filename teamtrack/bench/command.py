"""`teamtrack bench`: the command-line options turned into a run, a report and an exit code."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime
from pathlib import Path

from rich.console import Console

from teamtrack.bench.config import (
    DEFAULT_FEW_WORKERS,
    DEFAULT_FIXED_RATES,
    DEFAULT_LADDER,
    DEFAULT_MANY_WORKERS,
    DEFAULT_TEAMS,
    BenchConfig,
    BenchError,
    Shape,
)
from teamtrack.bench.report import print_summary, write_report
from teamtrack.bench.runner import run_benchmark
from teamtrack.bench.scenarios import FAULTS, SCENARIOS, SPIKE, parse_scenarios

REPORTS_DIR = Path("reports")


def parse_rates(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    """`1000,5k,10000` -> (1000, 5000, 10000); an empty text means none."""
    if text is None:
        return default
    rates = []
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        multiplier = 1000 if item.endswith("k") else 1
        try:
            rates.append(int(float(item.removesuffix("k")) * multiplier))
        except ValueError:
            raise ValueError(f"{item!r} is not a rate in messages per second") from None
    return tuple(rates)


def parse_shapes(text: str) -> tuple[Shape, ...]:
    if text == "both":
        return (Shape.MANY, Shape.FEW)
    try:
        return (Shape(text),)
    except ValueError:
        raise ValueError(f"--shape must be many, few or both, not {text!r}") from None


def default_out_dir() -> Path:
    return REPORTS_DIR / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def build_config(
    *,
    scenarios: str | None,
    rates: str | None,
    fixed_rates: str | None,
    step_seconds: float,
    warmup_seconds: float,
    drain_seconds: float,
    shape: str,
    workers: int | None,
    few_workers: int | None,
    teams: int | None,
    generators: int,
    qos: int,
    endpoints: Path | None,
    state_dir: Path | None,
    out: Path | None,
    progress: bool,
    rounds: int = 1,
    fault_backend: str = "redis",
    bridges_per_broker: int = 1,
    spike_workers: int = 200,
    mirror: str = "on-demand",
) -> BenchConfig:
    """A BenchConfig from the command line; None takes the reference default."""
    if state_dir is not None and endpoints is None:
        raise ValueError("--state-dir goes with --endpoints")
    return BenchConfig(
        out_dir=out or default_out_dir(),
        scenarios=parse_scenarios(scenarios) if scenarios else tuple(SCENARIOS),
        rates=parse_rates(rates, DEFAULT_LADDER),
        fixed_rates=parse_rates(fixed_rates, DEFAULT_FIXED_RATES),
        shapes=parse_shapes(shape),
        many_workers=workers or DEFAULT_MANY_WORKERS,
        few_workers=few_workers or DEFAULT_FEW_WORKERS,
        teams=teams or DEFAULT_TEAMS,
        step_seconds=step_seconds,
        warmup_seconds=warmup_seconds,
        drain_seconds=drain_seconds,
        generator_processes=generators,
        qos=qos,
        endpoints=endpoints,
        state_dir=state_dir,
        show_progress=progress,
        rounds=rounds,
        fault_backend=fault_backend,
        bridges_per_broker=bridges_per_broker,
        spike_workers=spike_workers,
        mirror=mirror,
    )


def run_command(config: BenchConfig, console: Console) -> int:
    """Run, report, print the summary; 1 if a scenario could not be measured at all (or a
    fault lost or doubled a position)."""
    code = 0
    if SPIKE in config.scenarios:
        from teamtrack.bench.spike import run_spike_bench

        code = run_spike_bench(
            config.out_dir, console, workers=config.spike_workers,
            phase_s=max(config.step_seconds, 10.0),
        )
        rest = tuple(name for name in config.scenarios if name != SPIKE)
        if not rest:
            return code
        config = dataclasses.replace(config, scenarios=rest)
    if FAULTS in config.scenarios:
        from teamtrack.bench.faultbench import run_fault_bench

        code |= run_fault_bench(
            config.out_dir, console, backend=config.fault_backend,
            rate=float(config.fixed_rates[0]) if config.fixed_rates else 300.0,
            duration_s=config.step_seconds, show_progress=config.show_progress,
        )
        rest = tuple(name for name in config.scenarios if name != FAULTS)
        if not rest:
            return code
        config = dataclasses.replace(config, scenarios=rest)
    try:
        result = asyncio.run(run_benchmark(config, console))
    except BenchError as error:
        console.print(f"[red]teamtrack bench:[/red] {error}", highlight=False)
        return 1
    written = write_report(result, config.out_dir)
    print_summary(result, written, console)
    return 1 if code or any(run.error for run in result.runs) else 0
