"""What a simulation run reports: its progress samples, the reconnects it saw, the summary of
the run, and the summary as a table (`teamtrack simulate` and `python -m devices` print it)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table


@dataclass(frozen=True, slots=True)
class TimelineSample:
    elapsed_s: float
    target: int
    connected: int
    messages_sent: int


@dataclass(frozen=True, slots=True)
class ReconnectSample:
    """A worker connected again after losing its connection: when (seconds into the run),
    where, how long it had been without a connection, and whether that is another broker."""

    elapsed_s: float
    worker: str
    broker: str
    outage_s: float
    failover: bool


@dataclass(frozen=True, slots=True)
class SimulationSummary:
    """The numbers of one run. `timeline` keeps the last hour of progress samples,
    `reconnect_log` the last 100,000 reconnects.

    `failovers`: reconnects to another broker than the one lost. `resent`: QoS 1 positions sent
    again on a new connection because the previous one ended before their PUBACK (duplicates
    at the backend are possible, losses are not). `unacknowledged`: positions still without a
    PUBACK when the run ended; `outbox_dropped`: the oldest unacknowledged ones dropped because
    a worker's outbox was full (`max_unacknowledged`).
    """

    duration_s: float
    seed: int
    workers_selected: int
    workers_peak: int
    messages_sent: int
    mean_rate: float
    errors: dict[str, int]
    reconnects: int
    fixes_skipped: int
    workers_by_broker: dict[str, int]
    timeline: tuple[TimelineSample, ...]
    failovers: int = 0
    resent: int = 0
    unacknowledged: int = 0
    outbox_dropped: int = 0
    reconnect_log: tuple[ReconnectSample, ...] = ()

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def peak_reconnects(self, window_s: float = 1.0) -> dict[str, int]:
        """Per broker, the most reconnects it took within any `window_s` seconds: the connect
        rate a broker sees when another one dies."""
        times: dict[str, list[float]] = {}
        for sample in self.reconnect_log:
            times.setdefault(sample.broker, []).append(sample.elapsed_s)
        return {broker: peak_in_window(sorted(ts), window_s) for broker, ts in times.items()}


def peak_in_window(times: list[float], window_s: float) -> int:
    peak = first = 0
    for last, at in enumerate(times):
        while at - times[first] >= window_s:
            first += 1
        peak = max(peak, last - first + 1)
    return peak


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def summary_table(summary: SimulationSummary) -> Table:
    table = Table(title="device simulation summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("duration", f"{summary.duration_s:,.1f} s")
    table.add_row("seed", str(summary.seed))
    table.add_row("workers selected", f"{summary.workers_selected:,}")
    table.add_row("workers peak", f"{summary.workers_peak:,}")
    for broker, count in summary.workers_by_broker.items():
        table.add_row(f"  on {broker}", f"{count:,}")
    table.add_row("messages sent", f"{summary.messages_sent:,}")
    table.add_row("mean rate", f"{summary.mean_rate:,.1f} msg/s")
    table.add_row("fixes skipped (offline)", f"{summary.fixes_skipped:,}")
    table.add_row("reconnects", f"{summary.reconnects:,}")
    table.add_row("  to another broker (failovers)", f"{summary.failovers:,}")
    if summary.reconnect_log:
        longest = max(sample.outage_s for sample in summary.reconnect_log)
        table.add_row("  longest time without a broker", f"{longest:,.2f} s")
    for broker, peak in summary.peak_reconnects(1.0).items():
        table.add_row(f"  peak reconnects/s on {broker}", f"{peak:,}")
    table.add_row("QoS 1 positions resent", f"{summary.resent:,}")
    table.add_row("  unacknowledged at the end", f"{summary.unacknowledged:,}")
    table.add_row("  dropped from a full outbox", f"{summary.outbox_dropped:,}")
    table.add_row("errors", f"{summary.error_count:,}")
    for kind, count in summary.errors.items():
        table.add_row(f"  {kind}", f"{count:,}")
    return table
