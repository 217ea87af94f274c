"""`teamtrack bench --scenarios faults`: the fault suite under load, with recovery times.

One local cluster (Redis, or Kafka with `--fault-backend kafka`: three nodes), then each fault
of `FAULTS` in turn (`teamtrack.bench.faults.run_fault`): QoS 1 workers at the offered rate,
the process killed or stalled, the supervisor bringing it back. For each: acknowledged,
stored, missing, stored twice, shown twice, not shown, and the recovery time (from the fault
until the last position it delayed by more than a second reached the manager's viewer).
Writes `faults.json`, `faults.md` and `faults.png` (recovery time per fault) into the report
folder, and prints the table.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Final

import orjson
from rich.console import Console
from rich.table import Table

from teamtrack.bench.faults import Fault, FaultError, FaultLoad, FaultOutcome, run_fault
from teamtrack.local.cluster import ClusterError, ClusterOptions, LocalCluster
from teamtrack.local.servers import ServerError

FAULTS_FILE: Final = "faults.json"
FAULTS_SUMMARY: Final = "faults.md"
FAULTS_PLOT: Final = "faults.png"
WORKERS: Final = 20

FAULTS: Final[dict[str, tuple[Fault, ...]]] = {
    "redis": (
        Fault("broker-1"),
        Fault("bridge-1"),
        Fault("bridge-1", "stall", stall_s=10.0),
        Fault("redis"),
        Fault("redis", "down", stall_s=3.0),
        Fault("dashboard-2"),
        Fault("dashboard-2", "stall", stall_s=3.0),
        Fault("ingest"),
    ),
    "kafka": (
        Fault("kafka-1"),
        Fault("kafka-2"),
        Fault("broker-1"),
        Fault("bridge-1"),
        Fault("dashboard-2"),
        Fault("ingest"),
    ),
}


def run_fault_bench(
    out_dir: Path,
    console: Console,
    *,
    backend: str = "redis",
    rate: float = 300.0,
    duration_s: float = 12.0,
    show_progress: bool = True,
) -> int:
    """Run every fault of `backend`'s list; 1 if the cluster did not start or one was unclean."""
    if backend not in FAULTS:
        raise ValueError(f"faults run on {' or '.join(FAULTS)}, not {backend!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    options = ClusterOptions(
        state_dir=out_dir / "faults-cluster", brokers=2, dashboards=2, teams=1,
        workers=WORKERS, base_port=0, simulate=False, backend=backend, device_rate_per_s=0.0,
        kafka_nodes=3 if backend == "kafka" else 1,
    )
    load = FaultLoad(workers=WORKERS, rate=rate, duration_s=max(duration_s, 8.0))
    cluster = LocalCluster(options, console)
    outcomes: list[FaultOutcome] = []
    try:
        with console.status(f"starting a {backend} cluster for the fault scenarios..."):
            cluster.start()
        for number, fault in enumerate(FAULTS[backend], 1):
            prefix = f"[{number}/{len(FAULTS[backend])}]"
            with console.status(f"{prefix} {fault.name}") as status:

                def report(text: str, status: object = status, prefix: str = prefix) -> None:
                    if show_progress:
                        status.update(f"{prefix} {text}")  # type: ignore[attr-defined]

                outcome = asyncio.run(run_fault(cluster, fault, load, on_progress=report))
            outcomes.append(outcome)
            console.print(("[green]clean[/green] " if outcome.clean else "[red]LOST[/red] ")
                          + outcome.summary(), highlight=False)
    except (ClusterError, ServerError, FaultError) as error:
        console.print(f"[red]teamtrack bench faults:[/red] {error}", highlight=False)
        return 1
    finally:
        with console.status("stopping the cluster..."):
            cluster.stop()
    written = write_fault_report(outcomes, out_dir, backend, load)
    console.print(fault_table(outcomes))
    console.print("written: " + ", ".join(str(path) for path in written), highlight=False)
    return 0 if all(outcome.clean for outcome in outcomes) else 1


def fault_table(outcomes: list[FaultOutcome]) -> Table:
    table = Table(title="faults under load: acknowledged positions")
    for column in ("fault", "acknowledged", "stored", "missing", "stored twice", "shown",
                   "shown twice", "not shown", "recovery", "max latency"):
        table.add_column(column, justify="left" if column == "fault" else "right")
    for outcome in outcomes:
        table.add_row(*_cells(outcome))
    return table


def _cells(outcome: FaultOutcome) -> list[str]:
    recovery = "-" if outcome.recovery_s is None else f"{outcome.recovery_s:.1f} s"
    return [
        outcome.fault, f"{outcome.acknowledged:,}", f"{outcome.stored:,}", str(outcome.missing),
        str(outcome.stored_twice), f"{outcome.shown:,}", str(outcome.shown_twice),
        str(outcome.not_shown), recovery, f"{outcome.max_latency_s:.2f} s",
    ]


def write_fault_report(
    outcomes: list[FaultOutcome], out_dir: Path, backend: str, load: FaultLoad
) -> list[Path]:
    document = {
        "backend": backend,
        "load": dataclasses.asdict(load),
        "faults": [dataclasses.asdict(outcome) for outcome in outcomes],
    }
    data = out_dir / FAULTS_FILE
    data.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    lines = [
        f"# Faults under load ({backend})",
        "",
        f"{load.workers} QoS 1 workers, {load.rate:g} positions/s for {load.duration_s:g} s "
        "each; the fault 5 s in; the supervisor restarts what was killed.",
        "",
        "| fault | acknowledged | stored | missing | stored twice | shown | shown twice | "
        "not shown | recovery | max latency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(_cells(outcome)) + " |" for outcome in outcomes]
    summary = out_dir / FAULTS_SUMMARY
    written = [data, summary]
    plot = _plot(outcomes, out_dir / FAULTS_PLOT)
    if plot is not None:
        lines += ["", f"![recovery per fault]({plot.name})"]
        written.append(plot)
    summary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return written


def _plot(outcomes: list[FaultOutcome], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None  # the `bench` extra
    figure, axis = plt.subplots(figsize=(8, 0.5 * len(outcomes) + 1.5))
    names = [outcome.fault for outcome in outcomes]
    recoveries = [outcome.recovery_s or 0.0 for outcome in outcomes]
    colours = ["tab:green" if outcome.clean else "tab:red" for outcome in outcomes]
    axis.barh(names, recoveries, color=colours)
    for index, outcome in enumerate(outcomes):
        axis.annotate(
            f"lost {outcome.missing}, twice {outcome.stored_twice + outcome.shown_twice}",
            (recoveries[index], index), xytext=(4, -3), textcoords="offset points", fontsize=8,
        )
    axis.invert_yaxis()
    axis.set_xlabel("recovery: fault -> last delayed position shown (s)")
    axis.set_title("faults under load (green: nothing lost or doubled)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
