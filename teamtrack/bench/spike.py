"""`teamtrack bench --scenarios spike`: a season's peak, with the cluster scaled out and back in.

N workers of team alpha report once a second (QoS 1). After the steady phase, N workers of
team bravo come online within `RAMP_S` seconds (the load doubles) and the cluster is scaled out
by `teamtrack scale`'s own request (`SCALE_OUT`: more bridges per broker, one more dashboard)
while it happens; the doubled load is held, then bravo goes offline (the load halves) and the
cluster is scaled back in (`SCALE_IN`); a steady tail follows. One manager's viewer per team
watches over WebSocket and resumes on another dashboard whenever it is dropped.

Reported for every second of the run (by the second a position was sent): offered,
acknowledged, shown to the viewer, lost (acknowledged, never shown), missing from the history,
shown twice, p50 and p99 of device -> viewer latency, the number of processes and the CPU of
each. Judged: nothing acknowledged lost, stored twice or shown twice, no gap told to a viewer,
and p99 never above twice the steady phase's outside `SETTLE_S` seconds after each change.
Writes `spike.json`, `spike.md` and `spike.png` into the report folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from rich.console import Console
from rich.table import Table

from teamtrack.bench.faults import FaultLoad, _Devices, _stored, _Viewer, wait_recovered
from teamtrack.bench.system import cpu_ticks
from teamtrack.local.cluster import ClusterError, ClusterOptions, LocalCluster
from teamtrack.local.scaling import ScaleError, Scaler, ScaleRequest, submit, wait_result
from teamtrack.local.servers import LOOPBACK, ServerError

SPIKE_FILE: Final = "spike.json"
SPIKE_SUMMARY: Final = "spike.md"
SPIKE_PLOT: Final = "spike.png"
RAMP_S: Final = 10.0
SETTLE_S: Final = 5.0
# What the cluster becomes for the peak, and what it goes back to.
SCALE_OUT: Final = {"bridges_per_broker": 2, "dashboards": 3}
SCALE_IN: Final = {"bridges_per_broker": 1, "dashboards": 2}
TICKS_PER_S: Final = 100  # /proc CPU ticks (USER_HZ)


@dataclass(frozen=True)
class SpikePlan:
    """The phases, in seconds from the start of the load."""

    workers: int = 200
    steady_s: float = 15.0
    hold_s: float = 20.0
    tail_s: float = 15.0

    @property
    def ramp_at(self) -> float:
        return self.steady_s

    @property
    def halve_at(self) -> float:
        return self.steady_s + RAMP_S + self.hold_s

    @property
    def duration_s(self) -> float:
        return self.halve_at + self.tail_s

    def extra_rate(self, elapsed: float) -> float:
        """Positions a second of the workers who come for the peak, `elapsed` s after ramp_at."""
        return self.workers * min(max(elapsed / RAMP_S, 0.0), 1.0)


@dataclass
class SpikeRun:
    plan: SpikePlan
    # The cluster's state folder, where scale requests go.
    state_dir: Path
    started_at: float = 0.0
    # (second of the run, what happened): the scaling steps and the load's changes.
    changes: list[tuple[float, str]] = field(default_factory=list)
    # Per second: process count and CPU % of each process.
    processes: dict[int, int] = field(default_factory=dict)
    cpu: dict[int, dict[str, float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def run_spike_bench(
    out_dir: Path, console: Console, *, workers: int = 200, phase_s: float = 15.0
) -> int:
    """Run the spike (see the module) on a local cluster of its own; 1 if it was not clean."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = SpikePlan(workers=workers, steady_s=phase_s, hold_s=max(phase_s, 20.0),
                     tail_s=phase_s)
    options = ClusterOptions(
        state_dir=out_dir / "spike-cluster", brokers=2, dashboards=2, teams=2,
        workers=workers, base_port=0, simulate=False, device_rate_per_s=0.0,
    )
    cluster = LocalCluster(options, console)
    run = SpikeRun(plan, cluster.state_dir)
    try:
        with console.status("starting the cluster for the spike..."):
            cluster.start()
        result: dict[str, Any] = {}
        load = threading.Thread(
            target=lambda: result.update(asyncio.run(_drive(cluster, run, console))),
            name="spike-load",
        )
        load.start()
        # The supervisor, with `teamtrack scale`'s requests, in this (the main) thread as in
        # `teamtrack up`; the load thread stops it when done.
        cluster.run_until_stopped(show_status=False, tick=Scaler(cluster).poll)
        load.join()
    except (ClusterError, ServerError, ValueError) as error:
        console.print(f"[red]the spike's cluster did not start:[/red] {error}")
        return 1
    finally:
        with console.status("stopping the spike's cluster..."):
            cluster.stop()
    if not result:
        console.print("[red]the spike run failed[/red]: " + "; ".join(run.errors))
        return 1
    _write(out_dir, result)
    _print(result, console)
    return 0 if result["summary"]["clean"] else 1


async def _drive(cluster: LocalCluster, run: SpikeRun, console: Console) -> dict[str, Any]:
    plan = run.plan
    try:
        await wait_recovered(cluster)
        assert cluster.provisioned is not None
        credentials = cluster.provisioned.credentials
        dashboards = [f"http://{LOOPBACK}:{port}" for port in cluster.ports.dashboards[:2]]
        viewers = {
            team: _Viewer(dashboards, team, credentials.managers_of(team)[0].token, 0)
            for team in ("alpha", "bravo")
        }
        viewing = [asyncio.create_task(viewer.run()) for viewer in viewers.values()]
        for viewer in viewers.values():
            await asyncio.wait_for(viewer.connected.wait(), 15)
        steady = await asyncio.to_thread(
            _Devices, cluster, FaultLoad(team="alpha", workers=plan.workers)
        )
        await asyncio.to_thread(steady.wait_connected)
        since_ms = int(time.time() * 1000)
        stop = threading.Event()
        run.started_at = time.time()
        sampling = asyncio.create_task(_sample(cluster, run))
        publishing = [asyncio.create_task(asyncio.to_thread(
            steady.publish_for, plan.duration_s, float(plan.workers), stop
        ))]
        console.print(f"spike: {plan.workers} workers at 1 Hz, doubled at "
                      f"{plan.ramp_at:g}s, halved at {plan.halve_at:g}s")
        await _sleep_until(run, plan.ramp_at)
        peak = await asyncio.to_thread(
            _Devices, cluster, FaultLoad(team="bravo", workers=plan.workers)
        )
        run.changes.append((_now(run), f"bravo's {plan.workers} workers come online"))
        publishing.append(asyncio.create_task(asyncio.to_thread(
            peak.publish_shaped, plan.halve_at - _now(run), plan.extra_rate, stop
        )))
        await _scale(run, SCALE_OUT, console)
        await _sleep_until(run, plan.halve_at)
        await asyncio.gather(publishing[1])
        await asyncio.to_thread(peak.close)
        run.changes.append((_now(run), f"bravo's {plan.workers} workers go offline"))
        await asyncio.sleep(2)
        await _scale(run, SCALE_IN, console)
        await asyncio.gather(publishing[0])
        run.changes.append((_now(run), "load ends"))
        console.print("spike: settling")
        devices = {"alpha": steady, "bravo": peak}
        await _settle(cluster, devices, viewers, since_ms)
        sampling.cancel()
        for viewer in viewers.values():
            viewer.stop()
        for task in viewing:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
        await asyncio.to_thread(steady.close)
        stored = {team: _stored(_database(cluster), team, since_ms) for team in devices}
        return _account(run, devices, viewers, stored)
    except Exception as error:  # reported; the supervisor must stop either way
        run.errors.append(f"{type(error).__name__}: {error}")
        return {}
    finally:
        cluster.request_stop()


async def _scale(run: SpikeRun, counts: dict[str, int], console: Console) -> None:
    """What `teamtrack scale` does: a request to the supervisor, then its answer."""
    request = ScaleRequest.new(None, counts["bridges_per_broker"], counts["dashboards"])
    started = _now(run)
    submit(run.state_dir, request)
    try:
        result = await asyncio.to_thread(
            wait_result, run.state_dir, request.id, 120.0, lambda _step: None
        )
    except ScaleError as error:
        run.errors.append(f"scale: {error}")
        return
    text = ", ".join(f"{name.replace('_', ' ')} {count}" for name, count in counts.items())
    state = result.get("state")
    run.changes.append((started, f"scale to {text} ({state}, {_now(run) - started:.1f}s)"))
    console.print(f"spike: scaled to {text} at {started:.0f}s ({state})")


def _now(run: SpikeRun) -> float:
    return time.time() - run.started_at


async def _sleep_until(run: SpikeRun, second: float) -> None:
    await asyncio.sleep(max(0.0, second - _now(run)))


async def _sample(cluster: LocalCluster, run: SpikeRun) -> None:
    """Each second: the processes and the CPU each used in that second."""
    previous: dict[str, tuple[int, int]] = {}
    while True:
        second = int(_now(run))
        processes = cluster.processes()
        usage: dict[str, float] = {}
        for role, pid in processes.items():
            ticks = cpu_ticks(pid)
            if ticks is None:
                continue
            before = previous.get(role)
            if before is not None and before[0] == pid:
                usage[role] = 100.0 * (ticks - before[1]) / TICKS_PER_S
            previous[role] = (pid, ticks)
        run.processes[second] = len(processes)
        run.cpu[second] = usage
        await asyncio.sleep(1.0 - (_now(run) % 1.0))


async def _settle(
    cluster: LocalCluster, devices: dict[str, _Devices], viewers: dict[str, _Viewer],
    since_ms: int,
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        acknowledged = {team: device.outcome()[0] for team, device in devices.items()}
        shown = all(acknowledged[team] <= set(viewers[team].shown) for team in devices)
        stored = all(
            acknowledged[team] <= set(_stored(_database(cluster), team, since_ms))
            for team in devices
        )
        if shown and stored:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(2)  # anything doubled late still arrives


def _database(cluster: LocalCluster) -> Path:
    return cluster.state_dir / "history.sqlite3"


def _percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


def _account(
    run: SpikeRun, devices: dict[str, _Devices], viewers: dict[str, _Viewer],
    stored: dict[str, Any],
) -> dict[str, Any]:
    rows: dict[int, dict[str, Any]] = defaultdict(lambda: {
        "offered": 0, "acknowledged": 0, "shown": 0, "lost": 0, "missing": 0, "duplicated": 0,
        "latencies": [],
    })
    gaps = 0
    for team, device in devices.items():
        viewer = viewers[team]
        gaps += viewer.gaps
        acknowledged, _, _ = device.outcome()
        for key, sent_at in device.sent_at.items():
            row = rows[int(sent_at - run.started_at)]
            row["offered"] += 1
            if key not in acknowledged:
                continue
            row["acknowledged"] += 1
            if key in viewer.shown:
                row["shown"] += 1
                row["latencies"].append(1000 * (viewer.first_shown_at[key] - sent_at))
                if viewer.shown[key] > 1:
                    row["duplicated"] += 1
            else:
                row["lost"] += 1
            if key not in stored[team]:
                row["missing"] += 1
            elif stored[team][key] > 1:
                row["duplicated"] += 1
    seconds = []
    latencies_by_second: dict[int, list[float]] = {}
    for second in sorted(rows):
        row = rows[second]
        latencies = latencies_by_second[second] = row.pop("latencies")
        cpu = run.cpu.get(second + 1, {})
        seconds.append({
            "second": second, **row,
            "p50_ms": _percentile(latencies, 0.50), "p99_ms": _percentile(latencies, 0.99),
            "processes": run.processes.get(second + 1, run.processes.get(second, 0)),
            "cpu_percent": {role: round(value, 1) for role, value in sorted(cpu.items())},
        })
    return {"plan": run.plan.__dict__ | {"ramp_s": RAMP_S, "settle_s": SETTLE_S},
            "changes": run.changes, "seconds": seconds,
            "summary": _judge(run, seconds, latencies_by_second, gaps)}


def _judge(
    run: SpikeRun, seconds: list[dict[str, Any]], latencies: dict[int, list[float]], gaps: int
) -> dict[str, Any]:
    """The p99 is judged over sliding windows of `SETTLE_S` seconds (a second holds too few
    positions for a p99 that is not its maximum), against the steady phase's."""
    steady_p99 = _percentile(
        [value for second, values in latencies.items() if second < run.plan.ramp_at
         for value in values], 0.99,
    ) or 0.0
    change_at = [at for at, _ in run.changes]
    window = int(SETTLE_S)
    over = []
    for start in sorted(latencies):
        if any(at - window <= start <= at + SETTLE_S for at in change_at):
            continue
        pooled = [value for second in range(start, start + window)
                  for value in latencies.get(second, [])]
        p99 = _percentile(pooled, 0.99)
        if p99 is not None and len(pooled) >= 100 and p99 > 2 * steady_p99:
            over.append(start)
    lost = sum(row["lost"] for row in seconds)
    missing = sum(row["missing"] for row in seconds)
    duplicated = sum(row["duplicated"] for row in seconds)
    return {
        "offered": sum(row["offered"] for row in seconds),
        "acknowledged": sum(row["acknowledged"] for row in seconds),
        "lost": lost, "missing": missing, "duplicated": duplicated, "gaps": gaps,
        "steady_p99_ms": round(steady_p99, 2),
        "seconds_over_2x_p99": over,
        "clean": lost == 0 and missing == 0 and duplicated == 0 and gaps == 0 and not over,
        "errors": run.errors,
    }


def _write(out_dir: Path, result: dict[str, Any]) -> None:
    (out_dir / SPIKE_FILE).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    lines = ["# Spike: load doubled and halved while the cluster scales", ""]
    summary = result["summary"]
    lines.append(
        f"Offered {summary['offered']:,}, acknowledged {summary['acknowledged']:,}, lost "
        f"{summary['lost']}, missing from the history {summary['missing']}, duplicated "
        f"{summary['duplicated']}, gaps {summary['gaps']}; steady p99 "
        f"{summary['steady_p99_ms']} ms; {SETTLE_S:g}-second windows (outside {SETTLE_S:g} s "
        f"after a change) whose p99 was over twice that, by start: "
        f"{summary['seconds_over_2x_p99'] or 'none'}."
    )
    lines += ["", "| at s | change |", "|---|---|"]
    lines += [f"| {at:.1f} | {text} |" for at, text in result["changes"]]
    lines += ["", "| s | offered | acked | shown | lost | missing | dup | p50 ms | p99 ms | "
              "processes | CPU % (all) | busiest |", "|" + "---|" * 12]
    for row in result["seconds"]:
        cpu = row["cpu_percent"]
        busiest = max(cpu.items(), key=lambda item: item[1], default=("-", 0.0))
        lines.append(
            f"| {row['second']} | {row['offered']} | {row['acknowledged']} | {row['shown']} | "
            f"{row['lost']} | {row['missing']} | {row['duplicated']} | "
            f"{_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} | {row['processes']} | "
            f"{sum(cpu.values()):.0f} | {busiest[0]} {busiest[1]:.0f} |"
        )
    (out_dir / SPIKE_SUMMARY).write_text("\n".join(lines) + "\n")
    _plot(out_dir / SPIKE_PLOT, result)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["seconds"]
    seconds = [row["second"] for row in rows]
    figure, (rates, latency, machine) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    rates.plot(seconds, [row["offered"] for row in rows], label="offered/s")
    rates.plot(seconds, [row["shown"] for row in rows], label="shown/s", linestyle="--")
    rates.plot(seconds, [row["lost"] for row in rows], label="lost/s", color="red")
    rates.set_ylabel("positions / s")
    latency.plot(seconds, [row["p50_ms"] for row in rows], label="p50")
    latency.plot(seconds, [row["p99_ms"] for row in rows], label="p99")
    latency.axhline(2 * result["summary"]["steady_p99_ms"], color="grey", linestyle=":",
                    label="2 x steady p99")
    latency.set_ylabel("device -> viewer, ms")
    machine.plot(seconds, [sum(row["cpu_percent"].values()) for row in rows],
                 label="CPU % (all processes)")
    twin = machine.twinx()
    twin.step(seconds, [row["processes"] for row in rows], color="black", where="post",
              label="processes")
    twin.set_ylabel("processes")
    machine.set_ylabel("CPU %")
    machine.set_xlabel("seconds")
    for axis in (rates, latency, machine):
        for at, _ in result["changes"]:
            axis.axvline(at, color="grey", alpha=0.4)
        axis.legend(loc="upper left", fontsize="small")
    figure.suptitle("Spike: load doubled and halved while the cluster scales out and in")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _print(result: dict[str, Any], console: Console) -> None:
    summary = result["summary"]
    table = Table(title="spike")
    for column in ("offered", "acknowledged", "lost", "missing", "duplicated", "gaps",
                   "steady p99 ms", "s over 2x p99", "clean"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{summary['offered']:,}", f"{summary['acknowledged']:,}", str(summary["lost"]),
        str(summary["missing"]), str(summary["duplicated"]), str(summary["gaps"]),
        str(summary["steady_p99_ms"]), str(len(summary["seconds_over_2x_p99"])),
        "yes" if summary["clean"] else "[red]no",
    )
    console.print(table)
