"""The spike scenario's accounting and judgement (`teamtrack/bench/spike.py`), on recorded
outcomes: what counts as lost, missing and duplicated, and which windows break the p99 target.
The scenario itself runs with `teamtrack bench --scenarios spike` (a minute or more)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from teamtrack.bench.spike import SpikePlan, SpikeRun, _account, _judge

START = 1_000_000.0


class Recorded:
    """What the spike's devices recorded: when each position was sent, which were acked."""

    def __init__(self, sent_at: dict[tuple[str, int, int], float], unacked: set[Any]) -> None:
        self.sent_at = sent_at
        self._unacked = unacked

    def outcome(self) -> tuple[set[Any], set[Any], set[Any]]:
        return set(self.sent_at) - self._unacked, set(), set(self._unacked)


class Shown:
    def __init__(self, shown: dict[Any, tuple[int, float]], gaps: int = 0) -> None:
        self.shown = Counter({key: count for key, (count, _) in shown.items()})
        self.first_shown_at = {key: at for key, (_, at) in shown.items()}
        self.gaps = gaps


def run_of(seconds: int) -> SpikeRun:
    run = SpikeRun(SpikePlan(workers=10, steady_s=5, hold_s=5, tail_s=5), Path("."))
    run.started_at = START
    run.processes = dict.fromkeys(range(seconds + 1), 12)
    return run


def test_lost_missing_and_duplicated_are_counted_by_the_second_they_were_sent() -> None:
    keys = [("w001", 1000 + n, n) for n in range(4)]
    sent = {key: START + n + 0.1 for n, key in enumerate(keys)}
    devices = Recorded(sent, unacked={keys[3]})
    viewer = Shown({keys[0]: (1, sent[keys[0]] + 0.002), keys[1]: (2, sent[keys[1]] + 0.004)})
    stored = {"alpha": Counter({keys[0]: 1, keys[2]: 1})}
    result = _account(
        run_of(4), {"alpha": devices}, {"alpha": viewer}, stored  # type: ignore[dict-item]
    )
    rows = {row["second"]: row for row in result["seconds"]}
    assert rows[0]["shown"] == 1 and round(rows[0]["p50_ms"], 3) == 2.0
    assert rows[1]["duplicated"] == 1 and rows[1]["missing"] == 1  # shown twice, never stored
    assert rows[2]["lost"] == 1  # stored, never shown
    assert rows[3]["offered"] == 1 and rows[3]["acknowledged"] == 0
    assert not result["summary"]["clean"]


def test_p99_is_judged_on_windows_outside_the_settling_time_after_a_change() -> None:
    run = run_of(30)
    run.changes = [(10.0, "scale out")]
    latencies = {second: [2.0] * 100 for second in range(30)}
    latencies[12] = [50.0] * 100  # within 5 s of the change: allowed
    assert _judge(run, [], latencies, gaps=0)["seconds_over_2x_p99"] == []
    latencies[25] = [50.0] * 100  # later: every window holding second 25 breaks the target
    over = _judge(run, [], latencies, gaps=0)["seconds_over_2x_p99"]
    assert over == [21, 22, 23, 24, 25]
