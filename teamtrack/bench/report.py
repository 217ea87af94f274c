"""The report of a run: `result.json` (everything), `summary.md` (for people), and the plots."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Final

import orjson
from rich.console import Console
from rich.table import Table

from teamtrack.bench.results import TARGET_RATE, BenchResult, RunResult, StepResult, TargetCheck
from teamtrack.bench.scenarios import SCENARIOS

RESULT_FILE: Final = "result.json"
SUMMARY_FILE: Final = "summary.md"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _met(check: TargetCheck) -> str:
    if check.undecided is not None:
        return f"undecided ({check.undecided})"
    return {True: "yes", False: "**no**", None: "not measured"}[check.met]


def _measured(check: TargetCheck) -> str:
    if check.value is None:
        return "-"
    text = f"{check.value:,.2f} {check.unit}"
    if len(check.per_round) > 1:
        rounds = " / ".join(f"{value:,.2f}" for value in check.per_round)
        text += f" (median of {len(check.per_round)} rounds: {rounds})"
    return text


def _step_row(run: RunResult, step: StepResult) -> list[str]:
    latency = step.latency
    return [
        run.name,
        f"{step.offered_rate:,}",
        _rate(step.achieved_rate),
        _rate(step.delivered_rate),
        f"{step.delivery.lost:,}",
        f"{step.delivery.shed:,}",
        f"{step.bridge_drops:,}",
        f"{step.delivery.duplicated:,}",
        _ms(latency.p50_ms if latency else None),
        _ms(latency.p90_ms if latency else None),
        _ms(latency.p99_ms if latency else None),
        _ms(latency.max_ms if latency else None),
        f"{step.generator_cpu_percent:.0f}",
        f"{step.usage.machine_busy_percent:.0f}",
        "pass" if step.passed else "; ".join(step.failures),
    ]



def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _cost_lines(result: BenchResult) -> list[str]:
    """CPU microseconds per delivered position: per process, the path's total, the load
    tooling apart, and the path against the baseline at the same rate."""
    lines = [
        "## CPU per delivered position (microseconds of CPU time, user + system)",
        "",
        "Each process's CPU over the measured window divided by the positions delivered in it. "
        "`path` adds up every process of the deployment (for `baseline`, Mosquitto alone); "
        "`x baseline` is the path against the baseline at the same rate, shape and round; "
        "`load tooling` (generators, receiver, harness) is not part of the path.",
        "",
    ]
    for run in result.runs:
        costs = [(step, step.cpu_per_position) for step in run.steps]
        roles = sorted({role for _, cost in costs if cost is not None for role in cost.processes})
        if not roles:
            continue
        rows = []
        for step, cost in costs:
            ratio = result.cost_ratio(run, step)
            rows.append([
                f"{step.offered_rate:,}",
                _rate(step.delivered_rate),
                _us(cost.path if cost else None),
                "-" if ratio is None else f"{ratio:.2f}",
                *(_us(cost.processes.get(role) if cost else None) for role in roles),
                _us(cost.load_tooling_total if cost else None),
            ])
        lines += [
            f"### {run.name}, {run.shape.value}",
            "",
            *_table(["offered/s", "delivered/s", "path us", "x baseline", *roles,
                     "load tooling us"], rows),
            "",
        ]
    return lines


def _long_steps(result: BenchResult) -> list[str]:
    """For steps of a minute or more: RSS at the start, halfway and at the end of the window.
    The second half is what tells a bounded memory from a growing one: the first fills caches
    and the backend's bounded history."""
    lines: list[str] = []
    for run, step in result.long_steps():
        rows = []
        for role, usage in sorted(step.usage.processes.items()):
            timeline = usage.rss_timeline
            if not timeline:
                continue
            halfway = min(timeline, key=lambda sample: abs(sample[0] - timeline[-1][0] / 2))
            rows.append([
                role, f"{usage.cpu_percent:.0f}", f"{timeline[0][1]:.1f}",
                f"{halfway[1]:.1f}", f"{timeline[-1][1]:.1f}",
                f"{timeline[-1][1] - halfway[1]:+.1f}",
            ])
        lines += [
            f"## {run.name}, {run.shape.value}, {step.offered_rate:,} msg/s for "
            f"{step.measure_seconds:.0f} s: CPU and memory over the window",
            "",
            *_table(["process", "CPU %", "RSS start MiB", "RSS halfway MiB", "RSS end MiB",
                     "growth, second half"], rows),
            "",
        ]
        slices = step.delivery.timeline
        if slices:
            lines += [
                "Latency by send time, first / middle / last slice of the window: "
                + " / ".join(
                    f"p50 {point.p50_ms:,.1f} ms, p99 {point.p99_ms:,.1f} ms"
                    for point in (slices[0], slices[len(slices) // 2], slices[-1])
                ),
                "",
            ]
    return lines


def summary_markdown(result: BenchResult, plots: list[Path]) -> str:
    config = result.config
    machine = result.machine
    lines = [
        f"# teamtrack benchmark, {result.started_at}",
        "",
        "Generated by `teamtrack bench`; every number below is in `result.json` too.",
        "",
        "## Machine",
        "",
        *_table(
            ["what", "value"],
            [[key.replace("_", " "), str(value)] for key, value in machine.items()],
        ),
        "",
        "Everything (generators, receiver, brokers, bridges, Redis, dashboards) shares these "
        "cores; the generators' CPU is reported per step, so a generator-bound step shows.",
        "",
        "## Configuration",
        "",
        f"- scenarios: {', '.join(config.scenarios)}",
        *(f"  - `{name}`: {SCENARIOS[name].path}" for name in config.scenarios),
        "- load shapes: "
        + ", ".join(f"{shape.value} ({config.workers_for(shape):,} connections)"
                    for shape in config.shapes),
        f"- {_count(config.teams, 'team')}; "
        f"{_count(config.generator_processes, 'generator process', 'generator processes')}; "
        f"QoS {config.qos}",
        f"- each step: {config.warmup_seconds:g} s warm-up (not measured), "
        f"{config.step_seconds:g} s measured, drain up to {config.drain_seconds:g} s",
        (f"- ladder: {', '.join(f'{rate:,}' for rate in sorted(config.rates))} msg/s, stopped "
         f"at the first step with a loss, a position shed by viewer conflation, a duplicate, "
         f"p99 >= {config.max_p99_ms:,.0f} ms or a generator that could not offer the rate"
         if config.rates else "- ladder: none (fixed rates only)"),
        "- fixed rates, always run: "
        + (", ".join(f"{rate:,}" for rate in sorted(config.fixed_rates)) or "none"),
    ]
    if config.rounds > 1:
        lines.append(
            f"- {config.rounds} rounds: every scenario in turn, then again (#1, #2, ...); a path "
            "is compared with the baseline of its own round and each target takes the median "
            "over the rounds"
        )
    if config.endpoints is not None:
        lines.append(f"- against the running cluster of `{config.endpoints}`")
    else:
        lines.append(
            f"- bridges per broker of the local cluster: {config.bridges_per_broker}"
            + (" (one shared subscription)" if config.bridges_per_broker > 1 else "")
        )
        lines.append(f"- the bridges' mirror: {config.mirror}")
    if config.faults.drop_every or config.faults.duplicate_every:
        lines.append(
            f"- **fault injection on**: drop every {config.faults.drop_every}th, duplicate "
            f"every {config.faults.duplicate_every}th measured message (a harness check)"
        )
    lines += [
        "",
        "## Sustained rate (highest offered rate with zero loss and p99 under the limit)",
        "",
        *_table(
            ["scenario", "shape", "connections", "sustained msg/s", "x R0", "ladder stopped at"],
            [
                [
                    run.name,
                    run.shape.value,
                    f"{run.connect.get('connected', 0):,}",
                    _rate(run.sustainable_rate),
                    "-" if (ratio := result.ratio_to_baseline(run)) is None else f"{ratio:.2f}",
                    run.ladder_stop or "-",
                ]
                for run in result.runs
            ],
        ),
        "",
        "## Targets",
        "",
        *_table(
            ["target", "shape", "measured", "limit", "met"],
            [
                [
                    check.name,
                    check.shape.value,
                    _measured(check),
                    f"{'>=' if check.at_least else '<='} {check.limit:g} {check.unit}",
                    _met(check),
                ]
                for check in result.targets()
            ],
        ),
        "",
    ]
    for shape in config.shapes:
        runs = [run for run in result.runs if run.shape is shape]
        lines += [
            f"## Steps, {shape.value} connections ({config.workers_for(shape):,})",
            "",
            *_table(
                ["scenario", "offered/s", "achieved/s", "delivered/s", "lost", "shed",
                 "bridge drops", "dup",
                 "p50 ms", "p90 ms", "p99 ms", "max ms", "generators CPU %", "machine busy %",
                 "result"],
                [_step_row(run, step) for run in runs for step in run.steps],
            ),
            "",
        ]
    lines += _cost_lines(result)
    lines += [
        "## CPU (% of one core), peak RSS (MiB) and RSS growth over the window, at the fixed rates",
        "",
    ]
    for run in result.runs:
        fixed_steps = [step for step in run.steps if step.fixed]
        if not fixed_steps:
            continue
        roles = sorted({role for step in fixed_steps for role in step.usage.processes})
        lines += [
            f"### {run.name}, {run.shape.value}",
            "",
            *_table(
                ["offered/s", *roles],
                [
                    [f"{step.offered_rate:,}"]
                    + [
                        f"{usage.cpu_percent:.0f} % / {usage.rss_peak_mib:.0f}"
                        f" ({usage.rss_growth_mib:+.1f})"
                        if (usage := step.usage.processes.get(role)) is not None
                        else "-"
                        for role in roles
                    ]
                    for step in fixed_steps
                ],
            ),
            "",
        ]
    lines += [
        "## Connections",
        "",
        *_table(
            ["scenario", "shape", "connected", "failed", "seconds", "memory per connection"],
            [
                [
                    run.name,
                    run.shape.value,
                    f"{run.connect.get('connected', 0):,}",
                    f"{run.connect.get('failed', 0):,}",
                    f"{run.connect.get('seconds', 0):.1f}",
                    ", ".join(f"{role} {kib:.1f} KiB"
                              for role, kib in run.memory_per_connection_kib.items()) or "-",
                ]
                for run in result.runs
            ],
        ),
        "",
    ]
    lines += _long_steps(result)
    broken = [run for run in result.runs if run.error]
    if broken:
        lines += ["## Runs that broke", ""]
        lines += [f"- {run.name}/{run.shape.value}: {run.error}" for run in broken]
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{plot.stem}]({plot.name})" for plot in plots]
        lines.append("")
    return "\n".join(lines)


def write_report(result: BenchResult, out_dir: Path) -> list[Path]:
    """Write result.json, the plots (if matplotlib is installed) and summary.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / RESULT_FILE]
    written[0].write_bytes(
        orjson.dumps(result.document(), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    )
    plots: list[Path] = []
    try:
        from teamtrack.bench.plots import write_plots
    except ImportError:
        pass  # matplotlib is in the `bench` extra; the report says the plots are missing
    else:
        plots = write_plots(result, out_dir)
    summary = out_dir / SUMMARY_FILE
    summary.write_text(summary_markdown(result, plots), encoding="utf-8")
    return [*written, summary, *plots]


def summary_table(result: BenchResult) -> Table:
    """The closing table on the console: sustained rates, ratios, the 10,000 msg/s step, and
    the first failing rate (why it failed is in summary.md)."""
    table = Table(title="teamtrack bench: summary", title_justify="left")
    for column in ("scenario", "shape", "sustained msg/s", "x R0", "p50 @10k", "p99 @10k",
                   "CPU us/pos @10k", "x baseline", "failed at"):
        table.add_column(column, justify="left" if column in ("scenario", "shape") else "right")
    for run in result.runs:
        ratio = result.ratio_to_baseline(run)
        step = run.step_at(TARGET_RATE)
        latency = step.latency if step is not None else None
        cost = step.cpu_per_position if step is not None else None
        cost_ratio = result.cost_ratio(run, step) if step is not None else None
        table.add_row(
            run.name,
            run.shape.value,
            _rate(run.sustainable_rate),
            "-" if ratio is None else f"{ratio:.2f}",
            _ms(latency.p50_ms if latency else None),
            _ms(latency.p99_ms if latency else None),
            _us(cost.path if cost else None),
            "-" if cost_ratio is None else f"{cost_ratio:.2f}",
            _stop_rate(run),
        )
    return table


def cost_table(result: BenchResult) -> Table:
    """Every step's path CPU per delivered position, and the largest processes of it."""
    table = Table(title="CPU us per delivered position (path; load tooling apart)",
                  title_justify="left")
    for column in ("scenario", "shape", "offered/s", "path", "x baseline", "largest processes",
                   "load tooling"):
        table.add_column(column, justify="left" if column in (
            "scenario", "shape", "largest processes") else "right")
    for run in result.runs:
        for step in run.steps:
            cost = step.cpu_per_position
            if cost is None:
                continue
            ratio = result.cost_ratio(run, step)
            largest = sorted(cost.processes.items(), key=lambda item: -item[1])[:4]
            table.add_row(
                run.name, run.shape.value, f"{step.offered_rate:,}", _us(cost.path),
                "-" if ratio is None else f"{ratio:.2f}",
                ", ".join(f"{role} {us:,.0f}" for role, us in largest),
                _us(cost.load_tooling_total),
            )
    return table


def _stop_rate(run: RunResult) -> str:
    failing = next((step for step in run.steps if not step.passed), None)
    if failing is not None:
        return f"{failing.offered_rate:,}"
    return "broke" if run.error else "-"



def print_summary(result: BenchResult, written: list[Path], console: Console) -> None:
    console.print(summary_table(result))
    console.print(cost_table(result))
    for check in result.targets():
        if check.undecided is not None:
            console.print(
                f"target {check.name} ({check.shape.value}): undecided, {check.undecided}",
                highlight=False,
            )
        elif check.met is not None:
            mark = "[green]met" if check.met else "[red]not met"
            console.print(
                f"target {check.name} ({check.shape.value}): {_measured(check)} {mark}",
                highlight=False,
            )
    for path in written:
        console.print(f"wrote {path}", highlight=False)


def _count(number: int, singular: str, plural: str | None = None) -> str:
    """`1 team`, `3 teams`."""
    return f"{number:,} {singular if number == 1 else plural or singular + 's'}"
