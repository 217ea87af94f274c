"""PNG plots of a run, with matplotlib (the `bench` extra), drawn off-screen.

* `latency-{shape}.png`: one panel per scenario, p50/p90/p99/max latency against offered rate;
* `throughput-{shape}.png`: delivered rate against offered rate, every scenario on one panel,
  with the line where everything offered is delivered;
* `timeline-{scenario}-{shape}-{rate}.png`, for steps measured a minute or longer (a soak,
  an overload): latency p50/p99 and every process's RSS over the step.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter

from teamtrack.bench.config import Shape
from teamtrack.bench.results import BenchResult, RunResult, StepResult

PERCENTILE_LINES = (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("max_ms", "max"))
# Never red: red marks the failing steps.
PERCENTILE_COLOURS = {
    "p50": "tab:blue", "p90": "tab:green", "p99": "tab:orange", "max": "tab:purple",
}


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def rate_label(rate: int) -> str:
    """An offered rate as the report's options write it: 500, 1k, 1.5k, 10k."""
    if rate < 1_000:
        return f"{rate:,}"
    return f"{rate / 1_000:g}k"


def label_rates(axis: Axes, rates: list[int]) -> None:
    """A log axis marked at the measured rates in plain numbers (1k, 2k, 5k), not as 2x10^3."""
    ticks = sorted(set(rates))
    axis.xaxis.set_major_locator(FixedLocator(ticks))
    axis.set_xticklabels([rate_label(rate) for rate in ticks])
    axis.xaxis.set_minor_formatter(NullFormatter())


def _measured(run: RunResult) -> list[tuple[int, float, dict[str, float]]]:
    points = []
    for step in run.steps:
        latency = step.latency
        if latency is None:
            continue
        values = {attribute: getattr(latency, attribute) for attribute, _ in PERCENTILE_LINES}
        points.append((step.offered_rate, step.delivered_rate, values))
    return points


def latency_plot(result: BenchResult, shape: Shape, path: Path) -> Path | None:
    runs = [run for run in result.runs if run.shape is shape and _measured(run)]
    if not runs:
        return None
    figure, axes = plt.subplots(
        1, len(runs), figsize=(4.5 * len(runs), 4), sharey=True, squeeze=False
    )
    for axis, run in zip(axes[0], runs, strict=True):
        points = _measured(run)
        rates = [rate for rate, _, _ in points]
        for attribute, label in PERCENTILE_LINES:
            axis.plot(rates, [values[attribute] for _, _, values in points], marker="o",
                      label=label, color=PERCENTILE_COLOURS[label])
        for step in run.steps:
            if not step.passed:
                axis.axvline(step.offered_rate, color="red", alpha=0.2)
        axis.set_title(run.name)
        axis.set_xlabel("offered rate (msg/s)")
        axis.set_xscale("log")
        axis.set_yscale("log")
        label_rates(axis, rates)
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("latency (ms)")
    axes[0][-1].legend(loc="best")
    figure.suptitle(
        f"device-to-receiver latency, {shape.value} connections "
        f"({result.config.workers_for(shape):,}); red: failing steps"
    )
    return _save(figure, path)


def throughput_plot(result: BenchResult, shape: Shape, path: Path) -> Path | None:
    runs = [run for run in result.runs if run.shape is shape and _measured(run)]
    if not runs:
        return None
    figure, axis = plt.subplots(figsize=(6, 4.5))
    highest = 0
    for run in runs:
        points = _measured(run)
        rates = [rate for rate, _, _ in points]
        highest = max(highest, *rates)
        axis.plot(rates, [delivered for _, delivered, _ in points], marker="o",
                  label=run.name)
    axis.plot([0, highest], [0, highest], color="grey", linestyle="--", label="all delivered")
    axis.set_xlabel("offered rate (msg/s)")
    axis.set_ylabel("delivered rate (msg/s)")
    axis.set_title(
        f"throughput, {shape.value} connections ({result.config.workers_for(shape):,})"
    )
    axis.grid(True, alpha=0.3)
    axis.legend()
    return _save(figure, path)


def timeline_plot(run: RunResult, step: StepResult, path: Path) -> Path | None:
    if not step.delivery.timeline:
        return None
    figure, (latency_axis, memory_axis) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    starts = [point.start_s for point in step.delivery.timeline]
    latency_axis.plot(starts, [point.p50_ms for point in step.delivery.timeline], label="p50")
    latency_axis.plot(starts, [point.p99_ms for point in step.delivery.timeline], label="p99")
    latency_axis.set_ylabel("latency (ms), by send time")
    latency_axis.set_yscale("log")
    latency_axis.grid(True, which="both", alpha=0.3)
    latency_axis.legend(loc="best")
    for role, usage in sorted(step.usage.processes.items()):
        if usage.rss_timeline:
            memory_axis.plot([at for at, _ in usage.rss_timeline],
                             [mib for _, mib in usage.rss_timeline], label=role)
    memory_axis.set_ylabel("RSS (MiB)")
    memory_axis.set_xlabel("seconds into the measured window")
    memory_axis.grid(True, alpha=0.3)
    memory_axis.legend(loc="upper left", fontsize="small", ncol=3)
    figure.suptitle(
        f"{run.name}, {run.shape.value} connections ({run.workers:,}), "
        f"{step.offered_rate:,} msg/s offered for {step.measure_seconds:.0f} s"
    )
    return _save(figure, path)


def write_plots(result: BenchResult, out_dir: Path) -> list[Path]:
    written = []
    for shape in result.config.shapes:
        for plot, name in ((latency_plot, "latency"), (throughput_plot, "throughput")):
            path = plot(result, shape, out_dir / f"{name}-{shape.value}.png")
            if path is not None:
                written.append(path)
    for run, step in result.long_steps():
        name = f"timeline-{run.slug}-{run.shape.value}-{step.offered_rate}.png"
        path = timeline_plot(run, step, out_dir / name)
        if path is not None:
            written.append(path)
    return written
