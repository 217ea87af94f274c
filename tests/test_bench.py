"""The benchmark harness measures correctly: what is sent, delivered, lost and duplicated.

No timing thresholds here: the performance targets live in the benchmark report. The smoke run
drives real servers at a tiny rate with faults injected by the generators (messages recorded as
sent but never published, messages published twice) and checks that the accounting finds
exactly those.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from teamtrack.bench import BenchConfig, BenchError, FaultInjection, Shape, run_benchmark
from teamtrack.bench.accounting import (
    Delivery,
    LatencySummary,
    account,
    latency_timeline,
    percentile,
)
from teamtrack.bench.command import build_config, parse_rates
from teamtrack.bench.deployments import Deployment, cluster_options, running_cluster
from teamtrack.bench.records import RecordLog, iter_records, message_key, split_key
from teamtrack.bench.report import cost_table, write_report
from teamtrack.bench.results import BenchResult, CpuPerPosition, RunResult, StepResult
from teamtrack.bench.runner import select_devices
from teamtrack.bench.scenarios import (
    REDIS_CLUSTER,
    DeploymentKind,
    DeploymentSpec,
    parse_scenarios,
)
from teamtrack.bench.system import ProcessUsage, UsageReport, UsageSampler
from teamtrack.cli import app
from teamtrack.provision import ProvisionResult

MS = 1_000_000


def test_message_key_round_trips() -> None:
    assert split_key(message_key(12_345, 678)) == (12_345, 678)
    assert message_key(1, 0) != message_key(0, 1)


def test_record_files_round_trip(tmp_path: Path) -> None:
    log = RecordLog()
    log.add(message_key(1, 2), 3)
    log.add(message_key(4, 5), 6)
    assert log.write(tmp_path / "records.bin") == 2
    assert len(log) == 0
    assert list(iter_records([tmp_path / "records.bin"])) == [
        (message_key(1, 2), 3),
        (message_key(4, 5), 6),
    ]


def test_accounting_counts_delivered_lost_and_duplicated() -> None:
    sent = [(message_key(0, seq), seq * MS) for seq in range(10)]
    received = [
        *((message_key(0, seq), seq * MS + 2 * MS) for seq in range(8)),  # seq 8, 9 lost
        (message_key(0, 3), 50 * MS),  # a duplicate of seq 3
        (message_key(0, 99), 60 * MS),  # not sent in the window (warm-up): ignored
        (message_key(7, 0), 61 * MS),  # another worker, not sent in the window: ignored
    ]
    delivery = account(sent, received)
    assert (delivery.sent, delivery.delivered, delivery.lost, delivery.duplicated) == (
        10, 8, 2, 1,
    )
    assert delivery.shed == 0
    assert delivery.latency is not None
    # Latency is that of the first copy: every delivered message took exactly 2 ms.
    assert delivery.latency.p50_ms == delivery.latency.max_ms == 2.0


def test_positions_replaced_by_a_sync_frame_count_as_shed_not_lost() -> None:
    sent = [(message_key(worker, seq), seq * MS) for worker in (0, 1) for seq in range(6)]
    received = [
        # worker 0: seq 0, 1 in events frames; 2, 3, 4 conflated; seq 5 in a sync frame
        (message_key(0, 0), 1 * MS), (message_key(0, 1), 2 * MS),
        # worker 1: seq 0..3 in events frames; 4 and 5 never arrive
        *((message_key(1, seq), seq * MS + MS) for seq in range(4)),
    ]
    synced = [(message_key(0, 5), 9 * MS)]
    delivery = account(sent, received, synced)
    assert (delivery.delivered, delivery.shed, delivery.lost, delivery.duplicated) == (7, 3, 2, 0)
    assert delivery.latency is not None
    assert delivery.latency.max_ms == 4.0  # worker 0's seq 5: sent at 5 ms, synced at 9 ms


def test_accounting_of_nothing_received() -> None:
    delivery = account([(message_key(0, 0), 0)], [])
    assert (delivery.delivered, delivery.lost, delivery.latency) == (0, 1, None)


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7], 99) == 7


def test_latency_timeline_slices_by_send_time() -> None:
    second = 1_000_000_000
    # 10 s of sends, 100 per second; latency 1 ms in the first half, 9 ms in the second.
    records = [
        (number * second // 100, (1 if number < 500 else 9) * 1_000_000)
        for number in range(1000)
    ]
    timeline = latency_timeline(records, points=10)
    assert [point.delivered for point in timeline] == [100] * 10
    assert [point.p50_ms for point in timeline] == [1.0] * 5 + [9.0] * 5
    assert timeline[-1].start_s == pytest.approx(9.0, abs=0.01)
    assert latency_timeline([]) == ()


def _ladder(
    scenario: str,
    passed: list[int],
    failed: int | None = None,
    *,
    round_number: int | None = None,
    p50_p99_ms: tuple[float, float] | None = None,
) -> RunResult:
    latency = (
        LatencySummary(p50_p99_ms[0], p50_p99_ms[0], p50_p99_ms[1], p50_p99_ms[1], p50_p99_ms[0])
        if p50_p99_ms is not None
        else None
    )

    def step(rate: int, failures: tuple[str, ...]) -> StepResult:
        return StepResult(
            offered_rate=rate, fixed=False, measure_seconds=1.0, achieved_rate=rate,
            delivery=Delivery(sent=rate, delivered=rate, lost=0, shed=0, duplicated=0,
                              latency=latency),
            failures=failures, generator={}, receiver={},
            usage=UsageReport(seconds=1.0, processes={}, machine_busy_percent=0.0),
            drain_seconds=0.0,
        )

    steps = [step(rate, ()) for rate in passed]
    if failed is not None:
        steps.append(step(failed, ("lost 1",)))
    return RunResult(scenario, "", Shape.FEW, 20, "", steps=steps, round_number=round_number)


def test_a_ratio_from_a_ladder_passed_to_its_top_is_only_a_bound(tmp_path: Path) -> None:
    """R0 or the path passing every step says only "at least the top": the ratio then decides
    the target on one side only, and the report says undecided instead of a yes."""
    config = BenchConfig(out_dir=tmp_path, scenarios=("baseline", "redis"), shapes=(Shape.FEW,))

    def ratio_check(baseline: RunResult, redis: RunResult) -> dict[str, object]:
        result = BenchResult(config, {}, "", runs=[baseline, redis])
        document: dict[str, object] = result.document()["targets"][0]
        return document

    both_top = ratio_check(_ladder("baseline", [10_000]), _ladder("redis", [10_000]))
    assert (both_top["value"], both_top["met"]) == (1.0, None)
    assert "whole ladder" in str(both_top["undecided"])
    at_most = ratio_check(
        _ladder("baseline", [10_000, 20_000, 30_000]), _ladder("redis", [10_000, 20_000], 30_000)
    )
    assert at_most["met"] is None and "at most 0.67" in str(at_most["undecided"])
    below = ratio_check(
        _ladder("baseline", [10_000, 20_000, 30_000]), _ladder("redis", [10_000], 20_000)
    )
    assert (below["met"], below["undecided"]) == (False, None)
    above = ratio_check(
        _ladder("baseline", [10_000, 20_000], 30_000), _ladder("redis", [10_000, 20_000], 30_000)
    )
    assert (above["met"], above["undecided"]) == (True, None)


def test_the_latency_plot_marks_the_offered_rates_in_plain_numbers() -> None:
    """A log axis labelled itself 10^3 and 2x10^3: the rates are written as the options take
    them (1k, 2k), at the measured rates only."""
    import matplotlib.pyplot as plt

    from teamtrack.bench.plots import label_rates, rate_label

    assert [rate_label(rate) for rate in (200, 1_000, 1_500, 10_000, 50_000)] == [
        "200", "1k", "1.5k", "10k", "50k"]
    figure, axis = plt.subplots()
    axis.plot([1_000, 2_000, 5_000], [1.0, 2.0, 3.0])
    axis.set_xscale("log")
    label_rates(axis, [1_000, 2_000, 5_000])
    figure.canvas.draw()
    assert [label.get_text() for label in axis.get_xticklabels()] == ["1k", "2k", "5k"]
    assert not any(label.get_text() for label in axis.get_xticklabels(minor=True))
    plt.close(figure)


def test_without_a_ladder_the_ratio_blames_no_ladder(tmp_path: Path) -> None:
    """`--rates ""` (fixed rates only): the report said "both passed the whole ladder" of a
    run that had none."""
    config = BenchConfig(out_dir=tmp_path, scenarios=("baseline", "redis"), shapes=(Shape.FEW,),
                         rates=(), fixed_rates=(1_000, 2_000))
    result = BenchResult(config, {}, "", runs=[_ladder("baseline", [1_000, 2_000]),
                                               _ladder("redis", [1_000, 2_000])])
    target = result.document()["targets"][0]
    assert target["met"] is None
    assert "ladder" not in str(target["undecided"]).replace("no ladder", "")
    assert "every fixed rate" in str(target["undecided"])


def test_rounds_compare_each_path_with_the_baseline_of_its_own_round(tmp_path: Path) -> None:
    """With --rounds, each target is judged per round against that round's baseline, and the
    median of the rounds decides; the report names every round's run."""
    config = BenchConfig(
        out_dir=tmp_path, scenarios=("baseline", "redis"), shapes=(Shape.FEW,),
        rates=(10_000, 20_000, 30_000), fixed_rates=(), rounds=3,
    )
    runs = []
    # round: baseline p99, redis p50 and p99 at 10,000 msg/s, redis' last passed rate
    for number, (baseline_p99, p50, p99, redis_top) in enumerate(
        [(0.5, 4.0, 12.0, 10_000), (8.0, 6.0, 16.0, 20_000), (0.7, 4.5, 13.0, 10_000)], start=1
    ):
        runs.append(_ladder("baseline", [10_000, 20_000], 30_000, round_number=number,
                            p50_p99_ms=(0.3, baseline_p99)))
        runs.append(_ladder("redis", [10_000, 20_000][: redis_top // 10_000], redis_top + 10_000,
                            round_number=number, p50_p99_ms=(p50, p99)))
    result = BenchResult(config, {}, "", runs=runs)
    targets = {check["name"]: check for check in result.document()["targets"]}

    ratio = targets["redis sustains >= 0.6 x R0 with zero loss"]
    assert (ratio["per_round"], ratio["value"], ratio["met"]) == ([0.5, 1.0, 0.5], 0.5, False)
    p50 = targets["redis p50 at 10,000 msg/s"]
    assert (p50["value"], p50["met"]) == (4.5, True)
    # 12.0 - 0.5, 16.0 - 8.0, 13.0 - 0.7: against round 1's baseline alone the median would
    # be 12.5.
    distance = targets["redis p99 minus baseline p99 at 10,000 msg/s"]
    assert distance["per_round"] == [11.5, 8.0, 12.3]
    assert (distance["value"], distance["met"]) == (11.5, False)
    assert result.document()["baseline_rates"] == {"few": [20_000, 20_000, 20_000]}

    write_report(result, tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "| redis #2 | few |" in summary
    assert "11.50 ms (median of 3 rounds: 11.50 / 8.00 / 12.30)" in summary


def _usage(cpu_percent: dict[str, float]) -> UsageReport:
    return UsageReport(
        seconds=10.0,
        processes={role: ProcessUsage(cpu, 1.0, 1.0, 1.0) for role, cpu in cpu_percent.items()},
        machine_busy_percent=0.0,
    )


def _cost_step(rate: int, delivered: int, cpu_percent: dict[str, float]) -> StepResult:
    return StepResult(
        offered_rate=rate, fixed=True, measure_seconds=10.0, achieved_rate=rate,
        delivery=Delivery(sent=delivered, delivered=delivered, lost=0, shed=0, duplicated=0,
                          latency=None),
        failures=(), generator={}, receiver={}, usage=_usage(cpu_percent), drain_seconds=0.0,
    )


def test_cpu_per_position_is_each_process_cpu_over_the_delivered_rate() -> None:
    """10 % of a core at 1,000 positions/s is 100 us per position; the load tooling is apart."""
    cost = CpuPerPosition.of(
        _usage({"broker-1": 10.0, "bridge-1": 20.0, "redis": 5.0, "generator-1": 6.0,
                "generator-2": 1.0, "receiver": 0.5, "harness": 0.5}),
        delivered_per_s=1_000.0,
    )
    assert cost is not None
    assert cost.processes == pytest.approx({"broker-1": 100.0, "bridge-1": 200.0, "redis": 50.0})
    assert cost.path == pytest.approx(350.0)
    assert set(cost.load_tooling) == {"generator-1", "generator-2", "receiver", "harness"}
    assert cost.load_tooling_total == pytest.approx(80.0)
    assert CpuPerPosition.of(_usage({"broker": 1.0}), delivered_per_s=0.0) is None
    step = _cost_step(1_000, 10_000, {"broker": 4.0})  # 1,000/s over the 10 s window
    assert step.cpu_per_position is not None
    assert step.cpu_per_position.path == pytest.approx(40.0)


def test_the_path_cost_is_compared_with_the_baseline_at_the_same_rate(tmp_path: Path) -> None:
    config = BenchConfig(
        out_dir=tmp_path, scenarios=("baseline", "redis"), shapes=(Shape.FEW,), rates=(),
        fixed_rates=(200, 10_000),
    )
    baseline = RunResult("baseline", "", Shape.FEW, 20, "", steps=[
        _cost_step(200, 2_000, {"broker": 0.5, "receiver": 3.0}),  # 25 us
        _cost_step(10_000, 100_000, {"broker": 20.0, "generator-1": 30.0}),  # 20 us
    ])
    redis = RunResult("redis", "", Shape.FEW, 20, "", steps=[
        _cost_step(200, 2_000, {"broker-1": 1.0, "bridge-1": 4.0, "dashboard-2": 5.0}),  # 500
        _cost_step(10_000, 100_000, {"broker-1": 20.0, "bridge-1": 30.0, "redis": 10.0}),  # 60
    ])
    result = BenchResult(config, {}, "", runs=[baseline, redis])
    assert result.cost_ratio(redis, redis.steps[0]) == pytest.approx(20.0)
    assert result.cost_ratio(redis, redis.steps[1]) == pytest.approx(3.0)
    assert result.cost_ratio(baseline, baseline.steps[1]) == pytest.approx(1.0)

    document = result.document()
    [cost_target] = [
        target for target in document["targets"] if "CPU per position" in target["name"]
    ]
    assert (cost_target["value"], cost_target["limit"], cost_target["met"]) == (3.0, 3.0, True)
    reported = document["runs"][1]
    assert reported["cpu_per_position_x_baseline"] == [20.0, 3.0]
    step = reported["steps"][1]["cpu_us_per_position"]
    assert step["path"] == 60.0
    assert step["processes"] == {"bridge-1": 30.0, "broker-1": 20.0, "redis": 10.0}
    assert document["runs"][0]["steps"][1]["cpu_us_per_position"]["load_tooling"] == 30.0

    write_report(result, tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "## CPU per delivered position" in summary
    # columns: bridge-1, broker-1, dashboard-2 (not sampled at 10,000), redis
    assert "| 10,000 | 10,000 | 60.0 | 3.00 | 30.0 | 20.0 | - | 10.0 | 0.0 |" in summary
    console_rows = [row for column in cost_table(result).columns for row in column._cells]
    assert "dashboard-2 250, bridge-1 200, broker-1 50" in console_rows


def test_usage_sampler_reads_cpu_and_memory_from_proc() -> None:
    sampler = UsageSampler({"this": os.getpid(), "gone": 2**22 + 1})
    sampler.start()
    sampler.sample()
    report = sampler.finish()
    assert set(report.processes) == {"this"}  # a process that does not exist is left out
    usage = report.processes["this"]
    assert usage.cpu_percent >= 0
    assert usage.rss_peak_mib >= max(usage.rss_start_mib, usage.rss_end_mib) > 0
    assert len(usage.rss_timeline) == 3  # start, sample, finish
    assert usage.rss_timeline[0][1] == usage.rss_start_mib


def test_rates_and_options_are_parsed() -> None:
    assert parse_rates("1000, 5k,2.5k", ()) == (1000, 5000, 2500)
    assert parse_rates(None, (1,)) == (1,)
    assert parse_rates("", (1,)) == ()
    # The low-rate steps of issue 15: `--fixed-rates 200,1k,5k,10k`.
    assert parse_rates("200,1k,5k,10k", ()) == (200, 1_000, 5_000, 10_000)
    config = build_config(
        scenarios="baseline,redis", rates="1k", fixed_rates="", step_seconds=3,
        warmup_seconds=1, drain_seconds=2, shape="few", workers=None, few_workers=3,
        teams=1, generators=1, qos=0, endpoints=None, state_dir=None, out=Path("x"),
        progress=False,
    )
    assert config.scenarios == ("baseline", "redis")
    assert config.shapes == (Shape.FEW,)
    assert config.step_rates() == [(1000, False)]


def test_bridges_per_broker_reach_the_cluster_and_the_report(tmp_path: Path) -> None:
    config = build_config(
        scenarios="redis", rates="1k", fixed_rates="", step_seconds=3, warmup_seconds=1,
        drain_seconds=2, shape="few", workers=None, few_workers=3, teams=1, generators=1,
        qos=0, endpoints=None, state_dir=None, out=tmp_path, progress=False,
        bridges_per_broker=3,
    )
    options = cluster_options(REDIS_CLUSTER, tmp_path, 1, 3, config.bridges_per_broker)
    assert options.bridges_per_broker == 3
    write_report(BenchResult(config, {}, "", runs=[]), tmp_path)
    assert orjson.loads((tmp_path / "result.json").read_bytes())["config"][
        "bridges_per_broker"] == 3
    summary = (tmp_path / "summary.md").read_text()
    assert "- bridges per broker of the local cluster: 3 (one shared subscription)" in summary
    refused = CliRunner().invoke(app, ["bench", "--bridges-per-broker", "0"])
    assert refused.exit_code == 2
    assert "--bridges-per-broker must be at least 1" in refused.output


def test_devices_are_taken_from_every_team_in_turn(provisioned: ProvisionResult) -> None:
    chosen = select_devices(provisioned.credentials, 3)
    assert [(device.team, device.worker) for device in chosen] == [
        ("alpha", "w001"), ("bravo", "w001"), ("alpha", "w002"),
    ]
    with pytest.raises(BenchError, match="needs 7"):
        select_devices(provisioned.credentials, 7)


def test_a_running_cluster_is_read_from_its_state_folder(
    tmp_path: Path, provisioned: ProvisionResult
) -> None:
    state = provisioned.out_dir
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_bytes(orjson.dumps({
        "brokers": [{"mqtt": "mqtt://127.0.0.1:1", "ws": "ws://127.0.0.1:2"},
                    {"mqtt": "mqtt://127.0.0.1:3", "ws": "ws://127.0.0.1:4"}],
        "dashboards": ["http://127.0.0.1:5"],
        "backend": "redis://127.0.0.1:6/0",
    }))
    deployment = running_cluster(REDIS_CLUSTER, endpoints, state)
    assert deployment.broker_url(1) == "mqtt://127.0.0.1:3"
    # One dashboard only: the far side falls back to it.
    assert deployment.dashboard_url(1) == "http://127.0.0.1:5"
    assert deployment.credentials.observer is not None
    with pytest.raises(BenchError, match="'redis' backend, not 'kafka'"):
        running_cluster(DeploymentSpec(DeploymentKind.CLUSTER, "kafka"), endpoints, state)
    lone = Deployment("lone broker", ["mqtt://127.0.0.1:1"], [], deployment.credentials, {})
    with pytest.raises(BenchError, match="no dashboard"):
        lone.dashboard_url(0)


def test_cli_refuses_an_unknown_scenario_and_shape() -> None:
    runner = CliRunner()
    unknown = runner.invoke(app, ["bench", "--scenarios", "carrier-pigeon"])
    assert unknown.exit_code == 2
    assert "carrier-pigeon" in unknown.output
    shape = runner.invoke(app, ["bench", "--shape", "sideways"])
    assert shape.exit_code == 2
    rounds = runner.invoke(app, ["bench", "--rounds", "0"])
    assert rounds.exit_code == 2
    assert "rounds must be at least 1" in rounds.output


def _smoke_config(out_dir: Path, scenarios: tuple[str, ...], generators: int) -> BenchConfig:
    """One short step at 200 msg/s over 4 workers, with drops and duplicates injected."""
    return BenchConfig(
        out_dir=out_dir,
        scenarios=scenarios,
        rates=(200,),
        fixed_rates=(),
        shapes=(Shape.FEW,),
        few_workers=4,
        teams=2,
        step_seconds=2.0,
        warmup_seconds=0.5,
        drain_seconds=10.0,  # ends as soon as everything published has arrived
        generator_processes=generators,
        faults=FaultInjection(drop_every=40, duplicate_every=25),
        show_progress=False,
    )


async def test_smoke_run_counts_injected_drops_and_duplicates_exactly(tmp_path: Path) -> None:
    config = _smoke_config(tmp_path / "report", ("baseline", "redis"), generators=2)
    result = await run_benchmark(config)

    assert [(run.scenario, run.error) for run in result.runs] == [
        ("baseline", None),
        ("redis", None),
    ]
    for run in result.runs:
        assert run.connect["connected"] == 4
        [step] = run.steps
        generator = step.generator
        delivery = step.delivery
        assert generator["injected_drops"] > 0
        assert generator["injected_duplicates"] > 0
        # Every message of the window is accounted for, and only the injected faults differ.
        assert delivery.sent == generator["measured_sent"] > 0
        assert delivery.lost == generator["injected_drops"]
        assert delivery.shed == 0
        if run.scenario == "baseline":
            assert delivery.duplicated == generator["injected_duplicates"]
        else:
            # A position published twice (same seq, same ts) is shown once: the dashboards
            # drop repeats (dashboard/repeats.py), as they do QoS 1 redeliveries.
            assert delivery.duplicated == 0
        assert delivery.delivered == delivery.sent - generator["injected_drops"]
        assert step.latency is not None
        assert not step.passed  # a loss and a duplicate fail the step
        assert step.receiver["disconnects"] == 0
        assert {"receiver", "generator-1", "generator-2"} <= set(step.usage.processes)
        cost = step.cpu_per_position
        assert cost is not None and cost.path > 0
        assert set(cost.load_tooling) == {"receiver", "generator-1", "generator-2", "harness"}
        path_roles = {"broker"} if run.scenario == "baseline" else {"broker-1", "bridge-1",
                                                                     "redis", "dashboard-2"}
        assert path_roles <= set(cost.processes)
    redis_step = result.runs[1].steps[0]
    assert {"bridge-1", "dashboard-2", "redis"} <= set(redis_step.usage.processes)

    written = write_report(result, config.out_dir)
    names = {path.name for path in written}
    assert {"result.json", "summary.md", "latency-few.png", "throughput-few.png"} <= names
    document = orjson.loads((config.out_dir / "result.json").read_bytes())
    reported = document["runs"][1]["steps"][0]
    assert (reported["lost"], reported["duplicated"]) == (
        redis_step.delivery.lost,
        redis_step.delivery.duplicated,
    )
    assert "redis" in (config.out_dir / "summary.md").read_text()
    assert reported["bridge_drops"] == 0
    assert reported["cpu_us_per_position"]["path"] > 0
    assert document["runs"][1]["cpu_per_position_x_baseline"][0] > 0
    assert "## CPU per delivered position" in (config.out_dir / "summary.md").read_text()
    assert sum(point["delivered"] for point in reported["latency_timeline"]) == (
        redis_step.delivery.delivered
    )

    # A long step (a soak) also gets a timeline plot and the memory table.
    result.runs[1].steps[0] = dataclasses.replace(redis_step, measure_seconds=600.0)
    long_written = write_report(result, tmp_path / "long")
    assert "timeline-redis-few-200.png" in {path.name for path in long_written}
    assert "RSS halfway MiB" in (tmp_path / "long" / "summary.md").read_text()


@pytest.mark.extended
async def test_kafka_scenario_runs_on_a_local_kafka_cluster(tmp_path: Path) -> None:
    """The `kafka` path end to end at a tiny rate, faults injected: every message accounted."""
    config = _smoke_config(tmp_path / "report", ("kafka",), generators=1)
    result = await run_benchmark(config)

    [run] = result.runs
    assert (run.scenario, run.error) == ("kafka", None)
    assert "kafka" in run.deployment
    [step] = run.steps
    delivery, generator = step.delivery, step.generator
    assert delivery.sent == generator["measured_sent"] > 0
    assert delivery.lost == generator["injected_drops"] > 0
    assert generator["injected_duplicates"] > 0
    assert delivery.duplicated == 0  # shown once by the dashboards, as on the redis path
    assert delivery.shed == 0
    assert {"bridge-1", "dashboard-2", "kafka"} <= set(step.usage.processes)


@pytest.mark.extended
async def test_http_scenario_streams_ndjson_into_a_gateway_and_out_to_a_manager(
    tmp_path: Path,
) -> None:
    """The `http` path (issue 14): one NDJSON stream per worker into device gateway 1, the
    manager's WebSocket on dashboard 2; faults injected, every message accounted."""
    config = _smoke_config(tmp_path / "report", ("http",), generators=1)
    result = await run_benchmark(config)

    [run] = result.runs
    assert (run.scenario, run.error) == ("http", None)
    assert run.connect["connected"] == 4
    [step] = run.steps
    delivery, generator = step.delivery, step.generator
    assert delivery.sent == generator["measured_sent"] > 0
    assert delivery.lost == generator["injected_drops"] > 0
    assert generator["injected_duplicates"] > 0
    assert delivery.duplicated == 0  # a repeated line is shown once, as on the MQTT path
    assert generator["publish_errors"] == 0  # no line refused
    assert {"gateway-1", "dashboard-2", "redis"} <= set(step.usage.processes)


def test_the_fault_report_has_every_fault_with_its_counts_and_a_plot(tmp_path: Path) -> None:
    from teamtrack.bench.faultbench import fault_table, write_fault_report
    from teamtrack.bench.faults import FaultLoad, FaultOutcome

    clean = FaultOutcome("kill broker-1", published=10, acknowledged=10, stored=10, shown=10,
                         recovery_s=1.2, max_latency_s=1.25)
    lossy = FaultOutcome("kill redis", published=10, acknowledged=10, stored=8, missing=2,
                         shown=8, not_shown=2)
    assert clean.clean and not lossy.clean
    written = write_fault_report([clean, lossy], tmp_path, "redis", FaultLoad())
    assert [path.name for path in written] == ["faults.json", "faults.md", "faults.png"]
    document = orjson.loads((tmp_path / "faults.json").read_bytes())
    assert [fault["missing"] for fault in document["faults"]] == [0, 2]
    summary = (tmp_path / "faults.md").read_text()
    assert "| kill broker-1 | 10 | 10 | 0 | 0 | 10 | 0 | 0 | 1.2 s | 1.25 s |" in summary
    assert "| kill redis | 10 | 8 | 2 |" in summary and "![recovery per fault]" in summary
    assert fault_table([clean, lossy]).row_count == 2
    assert parse_scenarios("faults,redis") == ("faults", "redis")
