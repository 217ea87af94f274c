"""The benchmark run: deployments up, then per scenario and load shape a ladder of rate steps.

For each (scenario, shape): start the receiver and wait until it receives, start the generator
processes and connect every worker, then step through the offered rates, lowest first. A step
is: warm-up (not measured), the measurement window (CPU and RSS of every process sampled from
/proc), the drain (until the receiver has everything that was published, goes quiet, or the
drain time is up), then the join of the generators' send records with the receiver's receive
records. The ladder stops at the first step that loses a message, sheds one (viewer
conflation), duplicates one, has a p99 of `max_p99_ms` or more, or whose generators could not
offer the rate; the fixed rates are run regardless, so the report always has them.

Deployments are started when a scenario first needs them and stopped after the last scenario
that needs them, so `redis` and `mqtt-mirror` share one cluster and nothing idles during the
baseline.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from teamtrack.bench.accounting import account
from teamtrack.bench.config import MIN_ACHIEVED_SHARE, BenchConfig, BenchError, Shape
from teamtrack.bench.control import ChildProcess
from teamtrack.bench.deployments import (
    Deployment,
    running_cluster,
    start_local_cluster,
    start_lone_broker,
)
from teamtrack.bench.records import iter_records
from teamtrack.bench.results import BenchResult, RunResult, StepResult
from teamtrack.bench.scenarios import (
    SCENARIOS,
    DeploymentKind,
    DeploymentSpec,
    ReceiverKind,
    Scenario,
    SenderKind,
)
from teamtrack.bench.system import (
    UsageSampler,
    describe_machine,
    raise_open_file_limit,
    rss_bytes,
)
from teamtrack.metrics import scrape_totals
from teamtrack.provision import Credentials, DeviceCredential, provision
from teamtrack.registry import demo_registry

GENERATOR_MODULE: Final = "teamtrack.bench.generator"
RECEIVER_MODULE: Final = "teamtrack.bench.receiver"
READY_TIMEOUT_S: Final = 90.0
# Connecting is bounded by the broker's accept rate; allow this many connects per second.
SLOWEST_CONNECT_RATE: Final = 100.0
STEP_GRACE_S: Final = 60.0
COLLECT_TIMEOUT_S: Final = 120.0
SAMPLE_INTERVAL_S: Final = 0.5
DRAIN_POLL_S: Final = 0.05
# The drain ends early once the receiver got nothing new for this long (it ends at once when
# everything published has arrived, so this only costs time when something is missing). Two
# seconds: a busy 2-core machine can hold a healthy path up for a second.
DRAIN_QUIET_S: Final = 2.0
# After connecting, the brokers get this long before their memory is read.
SETTLE_S: Final = 1.0
KIB: Final = 1024


def select_devices(credentials: Credentials, count: int) -> list[DeviceCredential]:
    """`count` devices, interleaved across teams (t1w1, t2w1, ..., t1w2, ...)."""
    by_team: dict[str, list[DeviceCredential]] = {}
    for device in credentials.devices:
        by_team.setdefault(device.team, []).append(device)
    columns = list(by_team.values())
    depth = max((len(column) for column in columns), default=0)
    interleaved = [column[row] for row in range(depth) for column in columns if row < len(column)]
    if len(interleaved) < count:
        raise BenchError(
            f"the registry has {len(interleaved)} devices; this load shape needs {count}"
        )
    return interleaved[:count]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _bridge_drops(urls: list[str]) -> int:
    """QoS 0 messages the bridges dropped so far because their backend lagged (bounded queue)."""
    return sum(
        int(scrape_totals(url).get("teamtrack_bridge_dropped_overflow_total", 0)) for url in urls
    )


def _sum_counts(replies: list[dict[str, Any]], key: str) -> int:
    return sum(int(reply.get(key, 0)) for reply in replies)


class _Progress:
    """A live table of finished steps and a line for the step in progress."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.live_enabled = enabled and console.is_terminal
        self.quiet = not enabled
        self.table = self._new_table()
        self.current = Text("")
        self.live: Live | None = None

    @staticmethod
    def _new_table() -> Table:
        table = Table(title="teamtrack bench", title_justify="left")
        for column in ("scenario", "shape", "offered/s", "achieved/s", "delivered", "lost",
                       "shed", "dup", "p50 ms", "p99 ms", "max ms", "gen CPU %", "result"):
            table.add_column(column, justify="left" if column in ("scenario", "shape") else "right")
        return table

    def __enter__(self) -> _Progress:
        if self.live_enabled:
            self.live = Live(Group(self.table, self.current), console=self.console,
                             refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def note(self, message: str) -> None:
        if self.live is not None:
            self.current = Text(message)
            self.live.update(Group(self.table, self.current))
        elif not self.quiet:
            self.console.print(message, highlight=False)

    def step_done(self, run: RunResult, step: StepResult) -> None:
        latency = step.latency
        cells = [
            run.name,
            run.shape.value,
            f"{step.offered_rate:,}",
            f"{step.achieved_rate:,.0f}",
            f"{step.delivery.delivered:,}",
            f"{step.delivery.lost:,}",
            f"{step.delivery.shed:,}",
            f"{step.delivery.duplicated:,}",
            f"{latency.p50_ms:.1f}" if latency else "-",
            f"{latency.p99_ms:.1f}" if latency else "-",
            f"{latency.max_ms:.1f}" if latency else "-",
            f"{step.generator_cpu_percent:.0f}",
            "[green]pass" if step.passed else f"[red]{'; '.join(step.failures)}",
        ]
        self.table.add_row(*cells)
        if self.live is None and not self.quiet:
            self.console.print("  ".join(cells), highlight=False)


class BenchRunner:
    def __init__(self, config: BenchConfig, console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console()
        self.out_dir = config.out_dir.resolve()
        self._deployments: dict[DeploymentSpec, Deployment] = {}
        self._state_dir = self.out_dir / "state"
        self._progress = _Progress(self.console, config.show_progress)

    # The whole run ---------------------------------------------------------------------------
    async def run(self) -> BenchResult:
        config = self.config
        raise_open_file_limit()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        result = BenchResult(config, describe_machine(), started_at=_now())
        # Rounds are numbered only when there are several; deployments stay up until their last
        # round, so that a round costs its steps, not a cluster start.
        plan = [
            (SCENARIOS[name], shape, number if config.rounds > 1 else None)
            for number in range(1, config.rounds + 1)
            for name in config.scenarios
            for shape in config.shapes
        ]
        last_use = {scenario.deployment: index for index, (scenario, _, _) in enumerate(plan)}
        with self._progress:
            try:
                await self._prepare_identities()
                for index, (scenario, shape, number) in enumerate(plan):
                    result.runs.append(await self._run_safely(scenario, shape, number))
                    if last_use[scenario.deployment] == index:
                        await self._stop_deployment(scenario.deployment)
            finally:
                for spec in list(self._deployments):
                    await self._stop_deployment(spec)
        result.finished_at = _now()
        return result

    async def _prepare_identities(self) -> None:
        config = self.config
        if config.endpoints is not None:
            self._state_dir = (config.state_dir or config.endpoints.parent).resolve()
            return
        self._progress.note(f"provisioning {self._workers_per_team() * config.teams:,} devices")
        registry = demo_registry(config.teams, self._workers_per_team())
        await asyncio.to_thread(provision, registry, self._state_dir)

    def _workers_per_team(self) -> int:
        return math.ceil(self.config.largest_shape_workers / self.config.teams)

    async def _deployment(self, spec: DeploymentSpec) -> Deployment:
        deployment = self._deployments.get(spec)
        if deployment is not None:
            return deployment
        config = self.config
        self._progress.note(f"starting the {spec.label}")
        if spec.kind is DeploymentKind.LONE_BROKER:
            deployment = await asyncio.to_thread(
                start_lone_broker, self._state_dir, self.out_dir / "lone-broker"
            )
        elif config.endpoints is not None:
            deployment = running_cluster(spec, config.endpoints, self._state_dir)
        else:
            deployment = await asyncio.to_thread(
                start_local_cluster, spec, self._state_dir, config.teams,
                self._workers_per_team(), config.bridges_per_broker, config.mirror,
            )
        self._deployments[spec] = deployment
        return deployment

    async def _stop_deployment(self, spec: DeploymentSpec) -> None:
        deployment = self._deployments.pop(spec, None)
        if deployment is not None:
            self._progress.note(f"stopping the {deployment.label}")
            await asyncio.to_thread(deployment.stop)

    async def _run_safely(
        self, scenario: Scenario, shape: Shape, number: int | None
    ) -> RunResult:
        run = RunResult(
            scenario.name, scenario.path, shape, self.config.workers_for(shape), deployment="",
            round_number=number,
        )
        try:
            deployment = await self._deployment(scenario.deployment)
            run.deployment = deployment.label
            await self._run(scenario, shape, deployment, run)
        except BenchError as error:
            run.error = str(error)
            self._progress.note(f"[{run.name}/{shape.value}] failed: {error}")
        return run

    # One scenario under one load shape -------------------------------------------------------
    async def _run(
        self, scenario: Scenario, shape: Shape, deployment: Deployment, run: RunResult
    ) -> None:
        config = self.config
        devices = select_devices(deployment.credentials, config.workers_for(shape))
        run_dir = self.out_dir / "runs" / f"{run.slug}-{shape.value}"
        label = f"[{run.name}/{shape.value}]"
        receiver = ChildProcess("receiver", RECEIVER_MODULE, run_dir / "receiver.log")
        generator_count = min(config.generator_processes, len(devices))
        generators = [
            ChildProcess(f"generator-{number + 1}", GENERATOR_MODULE,
                         run_dir / f"generator-{number + 1}.log")
            for number in range(generator_count)
        ]
        try:
            self._progress.note(f"{label} starting the receiver")
            await receiver.start(self._receiver_config(scenario, deployment, devices))
            await receiver.expect("ready", READY_TIMEOUT_S)
            shares = []
            for number, generator in enumerate(generators):
                mine = [
                    [index, device.team, device.worker, device.username, device.password]
                    for index, device in enumerate(devices)
                    if index % generator_count == number
                ]
                http = scenario.sender is SenderKind.HTTP
                await generator.start({
                    "broker_url": deployment.broker_url(scenario.sender_broker),
                    "transport": scenario.sender.value,
                    "gateway_url": deployment.stream_url(scenario.sender_broker) if http else "",
                    "devices": mine,
                    "qos": config.qos,
                    "client_id_prefix": f"bench-{run.slug}-{shape.value}",
                    "faults": {
                        "drop_every": config.faults.drop_every,
                        "duplicate_every": config.faults.duplicate_every,
                    },
                })
                shares.append(len(mine) / len(devices))
            processes = {
                "harness": os.getpid(),
                **deployment.processes,
                "receiver": receiver.pid,
                **{generator.role: generator.pid for generator in generators},
            }
            await self._connect(label, scenario, deployment, generators, processes, run)
            ladder_open = True
            for number, (rate, fixed) in enumerate(config.step_rates()):
                if not ladder_open and not fixed:
                    continue
                step = await self._step(
                    label, run_dir / f"step-{number + 1:02d}-{rate}", rate, fixed,
                    generators, shares, receiver, processes, deployment.bridge_metrics_urls,
                )
                run.steps.append(step)
                self._progress.step_done(run, step)
                ladder_open = ladder_open and step.passed
        finally:
            self._progress.note(f"{label} disconnecting")
            await asyncio.gather(
                *(generator.stop() for generator in generators), receiver.stop(),
                return_exceptions=True,
            )

    def _receiver_config(
        self, scenario: Scenario, deployment: Deployment, devices: list[DeviceCredential]
    ) -> dict[str, Any]:
        workers = [[device.team, device.worker] for device in devices]
        credentials = deployment.credentials
        if scenario.receiver is ReceiverKind.MQTT:
            observer = credentials.observer
            if observer is None:
                raise BenchError("the credentials have no observer login for the subscriber")
            return {
                "kind": "mqtt",
                "broker_url": deployment.broker_url(scenario.receiver_endpoint),
                "username": observer.username,
                "password": observer.password,
                "qos": self.config.qos,
                "workers": workers,
            }
        base = deployment.dashboard_url(scenario.receiver_endpoint).replace("http", "ws", 1)
        viewers = []
        for team in dict.fromkeys(device.team for device in devices):
            managers = credentials.managers_of(team)
            if not managers:
                raise BenchError(f"team {team} has no manager to watch it")
            viewers.append([team, f"{base}/ws/teams/{team}", managers[0].token])
        return {"kind": "websocket", "viewers": viewers, "workers": workers}

    async def _connect(
        self,
        label: str,
        scenario: Scenario,
        deployment: Deployment,
        generators: list[ChildProcess],
        processes: dict[str, int],
        run: RunResult,
    ) -> None:
        self._progress.note(f"{label} connecting {run.workers:,} workers")
        before = {role: rss_bytes(pid) for role, pid in deployment.processes.items()}
        timeout = READY_TIMEOUT_S + run.workers / SLOWEST_CONNECT_RATE
        replies = await asyncio.gather(
            *(generator.request("connect", "connected", timeout) for generator in generators)
        )
        await asyncio.sleep(SETTLE_S)
        errors: Counter[str] = Counter()
        for reply in replies:
            errors.update(reply.get("errors", {}))
        connected = _sum_counts(replies, "connected")
        run.connect = {
            "connected": connected,
            "failed": _sum_counts(replies, "failed"),
            "seconds": max(float(reply.get("seconds", 0.0)) for reply in replies),
            "errors": dict(errors),
        }
        if connected == 0:
            raise BenchError(f"no worker could connect: {dict(errors)}")
        # What one more connection costs: the sender broker's growth, read here, and each
        # generator's, which it reads itself around its connects.
        sender = "gateway" if scenario.sender is SenderKind.HTTP else "broker"
        broker_role = (
            "broker" if "broker" in processes else f"{sender}-{scenario.sender_broker + 1}"
        )
        grown_from, grown_to = before.get(broker_role), rss_bytes(processes.get(broker_role, -1))
        if grown_from is not None and grown_to is not None:
            run.memory_per_connection_kib[broker_role] = round(
                (grown_to - grown_from) / connected / KIB, 2
            )
        for generator, reply in zip(generators, replies, strict=True):
            connections = int(reply.get("connected", 0))
            if connections and reply.get("rss_before") and reply.get("rss_after"):
                run.memory_per_connection_kib[generator.role] = round(
                    (int(reply["rss_after"]) - int(reply["rss_before"])) / connections / KIB, 2
                )

    async def _step(
        self,
        label: str,
        step_dir: Path,
        rate: int,
        fixed: bool,
        generators: list[ChildProcess],
        shares: list[float],
        receiver: ChildProcess,
        processes: dict[str, int],
        bridge_metrics_urls: list[str],
    ) -> StepResult:
        config = self.config
        dropped_before = await asyncio.to_thread(_bridge_drops, bridge_metrics_urls)
        # The record files' folder is made by whoever writes into it first.
        received_before = int(receiver.progress.get("received", 0))
        sent_files = [step_dir / f"sent-{generator.role}.bin" for generator in generators]
        for generator, share, records in zip(generators, shares, sent_files, strict=True):
            await generator.command(
                "run", rate=rate * share, warmup_s=config.warmup_seconds,
                measure_s=config.step_seconds, records=str(records),
            )
        waits = [
            asyncio.ensure_future(generator.expect(
                "step_done", config.warmup_seconds + config.step_seconds + STEP_GRACE_S
            ))
            for generator in generators
        ]
        sampler = UsageSampler(processes)
        started = time.monotonic()
        measuring = False
        try:
            while not all(wait.done() for wait in waits):
                await asyncio.wait(waits, timeout=SAMPLE_INTERVAL_S)
                elapsed = time.monotonic() - started
                if not measuring and elapsed >= config.warmup_seconds:
                    sampler.start()
                    measuring = True
                elif measuring:
                    sampler.sample()
                published = sum(int(g.progress.get("published", 0)) for g in generators)
                received = int(receiver.progress.get("received", 0)) - received_before
                self._progress.note(
                    f"{label} {rate:,} msg/s: {elapsed:4.1f} s of "
                    f"{config.warmup_seconds + config.step_seconds:.0f} s; "
                    f"published {published:,}, received {received:,}"
                )
            done = [wait.result() for wait in waits]
        finally:
            for wait in waits:
                wait.cancel()
        if not measuring:
            sampler.start()
        usage = sampler.finish()

        drain_started = time.monotonic()
        await self._drain(receiver, received_before + _sum_counts(done, "published"))
        drain_seconds = time.monotonic() - drain_started
        bridge_drops = (
            await asyncio.to_thread(_bridge_drops, bridge_metrics_urls) - dropped_before
        )
        received_file, synced_file = step_dir / "received.bin", step_dir / "synced.bin"
        collected = await receiver.request(
            "collect", "collected", COLLECT_TIMEOUT_S,
            records=str(received_file), synced=str(synced_file),
        )
        self._progress.note(f"{label} {rate:,} msg/s: accounting")
        delivery = await asyncio.to_thread(
            account,
            iter_records(sent_files),
            iter_records([received_file]),
            iter_records([synced_file]),
        )
        achieved = sum(float(reply["achieved_rate"]) for reply in done)
        generator_counts = {
            key: _sum_counts(done, key)
            for key in ("published", "measured_sent", "injected_drops", "injected_duplicates",
                        "skipped_disconnected", "shortfall", "disconnects")
        }
        generator_counts["publish_errors"] = sum(
            sum(reply.get("publish_errors", {}).values()) for reply in done
        )
        failures = []
        if delivery.sent == 0:
            failures.append("nothing sent")
        if delivery.lost:
            counted = f" ({bridge_drops:,} counted by bridges)" if bridge_drops else ""
            failures.append(f"lost {delivery.lost:,}{counted}")
        if delivery.shed:
            failures.append(f"shed {delivery.shed:,} (viewer conflation)")
        if delivery.duplicated:
            failures.append(f"duplicated {delivery.duplicated:,}")
        if delivery.latency is not None and delivery.latency.p99_ms >= config.max_p99_ms:
            failures.append(f"p99 {delivery.latency.p99_ms:,.0f} ms")
        if achieved < MIN_ACHIEVED_SHARE * rate:
            failures.append(f"generator-bound: offered {achieved:,.0f}/s")
        return StepResult(
            offered_rate=rate,
            fixed=fixed,
            measure_seconds=config.step_seconds,
            achieved_rate=achieved,
            delivery=delivery,
            failures=tuple(failures),
            generator=generator_counts,
            receiver={
                key: int(collected.get(key, 0))
                for key in ("disconnects", "gaps", "sync_frames", "unknown")
            },
            usage=usage,
            drain_seconds=drain_seconds,
            bridge_drops=bridge_drops,
        )

    async def _drain(self, receiver: ChildProcess, expected_total: int) -> None:
        """Wait until the receiver has `expected_total`, goes quiet, or the drain time is up."""
        now = time.monotonic()
        deadline = now + self.config.drain_seconds
        last_count, last_change = -1, now
        while (now := time.monotonic()) < deadline:
            count = int(receiver.progress.get("received", 0))
            if count >= expected_total:
                return
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change >= DRAIN_QUIET_S:
                return
            await asyncio.sleep(DRAIN_POLL_S)


async def run_benchmark(config: BenchConfig, console: Console | None = None) -> BenchResult:
    """Run every scenario under every load shape of `config`; see the module docstring."""
    return await BenchRunner(config, console).run()
