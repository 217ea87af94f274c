"""`teamtrack`: the command line of the platform.

    teamtrack up          a local cluster (brokers, Redis, bridges, dashboards, simulated teams)
    teamtrack scale       grow or shrink a running `teamtrack up` (brokers, bridges, dashboards)
    teamtrack provision   registry.yaml -> Mosquitto password file, ACL, dashboard auth, secrets
    teamtrack provision rotate|revoke|reinstate ACCOUNT   one account, live (brokers: SIGHUP)
    teamtrack provision enrol TEAM WORKER | enrol-team TEAM   OwnTracks phones: .otrc + QR code
    teamtrack registry    write a starter registry.yaml
    teamtrack credentials one secret of credentials.json, printed or in a 0600 file
    teamtrack history export-person|erase TEAM WORKER   a tracked person's data (docs/privacy.md)
    teamtrack simulate    simulated workers (flags: `teamtrack simulate --help`)

Every option is also read from `TEAMTRACK_<OPTION>` (dashes as underscores).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from teamtrack.cli_support import console, env_name, failure
from teamtrack.history_cli import history_app
from teamtrack.mqtt import MirrorMode
from teamtrack.provision_cli import provision_app

app = typer.Typer(
    name="teamtrack",
    help="Live positions of field teams for their managers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"teamtrack {version('teamtrack')}", highlight=False)
        except PackageNotFoundError:
            console.print("teamtrack (not installed: run from a source tree)")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True,
                     help="print the version and exit"),
    ] = False,
) -> None:
    """Live positions of field teams for their managers."""


_env = env_name


def _fail(message: str) -> typer.Exit:
    return failure("teamtrack", message)


@app.command()
def up(
    brokers: Annotated[int, typer.Option(envvar=_env("brokers"), help="Mosquitto brokers")] = 2,
    dashboards: Annotated[
        int, typer.Option(envvar=_env("dashboards"), help="dashboard instances")
    ] = 2,
    teams: Annotated[int, typer.Option(envvar=_env("teams"), help="demo teams")] = 3,
    workers: Annotated[int, typer.Option(envvar=_env("workers"), help="workers per team")] = 50,
    base_port: Annotated[
        int,
        typer.Option(envvar=_env("base_port"), help="first port of the plan (0: free ports)"),
    ] = 18830,
    state_dir: Annotated[
        Path, typer.Option(envvar=_env("state_dir"), help="configs, secrets, logs")
    ] = Path("state"),
    backend_url: Annotated[
        str | None,
        typer.Option(
            envvar=_env("backend_url"),
            help="use this Redis or Kafka (redis://..., kafka://host:9092) instead of starting one",
        ),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            envvar=_env("backend"),
            help="the server to start when no --backend-url is given: redis or kafka",
        ),
    ] = "redis",
    kafka_nodes: Annotated[
        int,
        typer.Option(
            envvar=_env("kafka_nodes"),
            help="nodes of the Kafka started for --backend kafka (3: every topic on 3 nodes, "
            "any one may crash)",
        ),
    ] = 1,
    bridges_per_broker: Annotated[
        int,
        typer.Option(
            envvar=_env("bridges_per_broker"),
            help="bridge processes per broker, in one shared subscription, each with its own "
            "MQTT account (bridge-b<i>-<n>): more throughput per broker",
        ),
    ] = 1,
    mirror: Annotated[
        MirrorMode,
        typer.Option(
            envvar=_env("mirror"),
            help="other brokers' traffic mirrored into each broker: on-demand (presence always, "
            "positions while the broker has a subscriber besides its bridges), all, or off",
        ),
    ] = MirrorMode.ON_DEMAND,
    simulate: Annotated[
        bool, typer.Option(envvar=_env("simulate"), help="run the device simulator")
    ] = True,
    interval: Annotated[
        float, typer.Option(envvar=_env("interval"), help="seconds between a worker's fixes")
    ] = 1.0,
    qos: Annotated[int, typer.Option(envvar=_env("qos"), help="QoS of positions (0 or 1)")] = 0,
    duration: Annotated[
        float, typer.Option(envvar=_env("duration"), help="stop after N seconds (0: Ctrl-C)")
    ] = 0.0,
    status: Annotated[
        bool, typer.Option(help="live status table while running")
    ] = True,
    tls: Annotated[
        bool,
        typer.Option(envvar=_env("tls"), help="a local CA and server certificate (state/tls/), "
                     "an MQTT over TLS listener per broker; the simulator publishes through it"),
    ] = True,
    https: Annotated[
        bool,
        typer.Option(envvar=_env("https"), help="dashboards serve HTTPS with that certificate; "
                     "without it, plain HTTP on 127.0.0.1 only"),
    ] = False,
    tls_hosts: Annotated[
        str,
        typer.Option(envvar=_env("tls_hosts"), help="comma-separated names and addresses the "
                     "certificate must carry besides localhost, 127.0.0.1 and ::1"),
    ] = "",
    mqtts_host: Annotated[
        str,
        typer.Option(envvar=_env("mqtts_host"), help="address of the MQTT over TLS listeners "
                     "(0.0.0.0: every interface, for devices on the network)"),
    ] = "127.0.0.1",
    tile_url: Annotated[
        str | None,
        typer.Option(envvar=_env("tile_url"), help="the dashboards' map tiles: an http(s) URL "
                     "template with {z}, {x}, {y} (e.g. a self-hosted tile server); '' for none "
                     "\\[default: OpenStreetMap's]"),
    ] = None,
    tile_attribution: Annotated[
        str | None,
        typer.Option(envvar=_env("tile_attribution"), help="the credit shown under those "
                     "tiles (plain text)"),
    ] = None,
) -> None:
    """Start a local cluster and keep it running until Ctrl-C or SIGTERM."""
    import threading

    from teamtrack.local.cluster import ClusterError, ClusterOptions, LocalCluster, ServerError
    from teamtrack.local.scaling import Scaler
    from teamtrack.provision import ProvisionError
    from teamtrack.tls import split_hosts

    if qos not in (0, 1):
        raise _fail("--qos must be 0 or 1")
    # The state folder holds every team's track, the logs and the secrets: whatever this
    # process and its children create there is their owner's alone.
    os.umask(0o077)
    options = ClusterOptions(
        state_dir=state_dir, brokers=brokers, dashboards=dashboards, teams=teams,
        workers=workers, base_port=base_port, backend_url=backend_url, simulate=simulate,
        interval=interval, qos=qos, duration=duration, backend=backend,
        kafka_nodes=kafka_nodes, tls=tls, https=https, tls_hosts=split_hosts(tls_hosts),
        mqtts_host=mqtts_host, bridges_per_broker=bridges_per_broker, mirror=mirror.value,
        tile_url=tile_url, tile_attribution=tile_attribution,
    )
    cluster = LocalCluster(options, console)
    try:
        with console.status("starting the cluster..."):
            cluster.start()
    except (ClusterError, ServerError, ProvisionError, ValueError) as error:
        cluster.stop()
        raise _fail(str(error)) from None
    _print_endpoints(cluster)
    if duration:
        threading.Timer(duration, cluster.request_stop).start()
    try:
        cluster.run_until_stopped(
            show_status=status and console.is_terminal, tick=Scaler(cluster).poll
        )
    finally:
        with console.status("stopping..."):
            results = cluster.stop()
    # 143 (128 + SIGTERM) is how the JVM of Kafka reports a clean stop on SIGTERM.
    unclean = [(role, code) for role, code in results if code not in (0, -15, 143, None)]
    console.print(
        f"stopped {len(results)} processes"
        + (f"; unclean exits: {unclean}" if unclean else ", all cleanly")
    )


def _print_endpoints(cluster: object) -> None:
    from teamtrack.local.cluster import LocalCluster
    from teamtrack.provision import OBSERVER_CONFIG_DIR

    assert isinstance(cluster, LocalCluster)
    assert cluster.provisioned is not None
    credentials = cluster.provisioned.credentials
    endpoints = cluster.endpoints()
    console.rule("teamtrack is up")
    for url in endpoints["dashboards"]:  # type: ignore[attr-defined]
        console.print(f"dashboard  {url}")
    for broker in endpoints["brokers"]:  # type: ignore[attr-defined]
        tls_url = f", over TLS: {broker['mqtts']}" if "mqtts" in broker else ""
        console.print(
            f"broker     {broker['mqtt']}  (MQTT over WebSockets: {broker['ws']}{tls_url})"
        )
    for gateway in endpoints["device_http"]:  # type: ignore[attr-defined]
        console.print(f"devices    {gateway['owntracks']}  (OwnTracks HTTP mode; NDJSON: "
                      f"{gateway['ndjson']})", soft_wrap=True, highlight=False)
    if "ca" in endpoints:
        console.print(f"TLS CA     {endpoints['ca']}  (clients verify the servers against it)")
    console.print(f"backend    {endpoints['backend']}")
    credentials_path = cluster.provisioned.credentials_path
    manager = credentials.managers[0] if credentials.managers else None
    if manager is not None:
        console.print(
            f"log in as  [bold]{manager.username}[/bold] (team {manager.team}); passwords "
            f"and tokens of every manager are in {credentials_path}"
        )
    observer = credentials.observer
    if observer is not None:
        first_port = cluster.ports.broker_mqtt[0]
        console.print("watch a team on any broker:")
        observer_dir = cluster.state_dir / OBSERVER_CONFIG_DIR
        console.print(
            f"  XDG_CONFIG_HOME={observer_dir} mosquitto_sub -h 127.0.0.1 -p {first_port} "
            "-t 'teams/alpha/#' -v",
            soft_wrap=True, highlight=False,
        )
    console.print(f"endpoints  {cluster.state_dir / 'endpoints.json'}")


app.add_typer(provision_app, name="provision")
app.add_typer(history_app, name="history")


@app.command("registry")
def registry_command(
    out: Annotated[Path, typer.Option(help="where to write the registry")] = Path(
        "registry.yaml"
    ),
    teams: Annotated[int, typer.Option(help="number of teams")] = 3,
    workers: Annotated[int, typer.Option(help="workers per team")] = 50,
    brokers: Annotated[int, typer.Option(help="brokers b1..bN, for the bridge accounts")] = 2,
    bridges_per_broker: Annotated[
        int, typer.Option(help="bridge processes per broker: one MQTT account each")
    ] = 1,
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Write a starter registry (teams alpha, bravo, ... with workers w001.. and a lead each)."""
    from teamtrack.registry import demo_registry, dump_registry

    if out.exists() and not force:
        raise _fail(f"{out} exists; pass --force to overwrite it")
    try:
        registry = demo_registry(
            teams, workers, brokers=brokers, bridges_per_broker=bridges_per_broker
        )
        dump_registry(registry, out)
    except ValueError as error:
        raise _fail(str(error)) from None
    console.print(f"wrote {out}; next: teamtrack provision --registry {out}")


@app.command(
    "simulate",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def simulate_command(context: typer.Context) -> None:
    """Simulated workers moving through a city (`teamtrack simulate --help` for the flags)."""
    from devices.__main__ import main as simulate_main

    raise typer.Exit(simulate_main(list(context.args), prog="teamtrack simulate") or 0)


@app.command("endpoints")
def endpoints_command(
    state_dir: Annotated[Path, typer.Option(envvar=_env("state_dir"))] = Path("state"),
) -> None:
    """Print the endpoints of the cluster started by `teamtrack up`."""
    from teamtrack.local.scaling import running_supervisor

    path = state_dir / "endpoints.json"
    if not path.exists():
        raise _fail(f"{path} not found: is `teamtrack up` running with this --state-dir?")
    if running_supervisor(state_dir) is None:
        raise _fail(f"the cluster of {state_dir} is not running (`teamtrack up` starts it)")
    json.dump(json.loads(path.read_text()), sys.stdout, indent=2)
    sys.stdout.write("\n")


def _credentials_command() -> None:
    from teamtrack.credentials_cli import credentials_command

    app.command("credentials")(credentials_command)


_credentials_command()


@app.command("scale")
def scale_command(
    state_dir: Annotated[Path, typer.Option(envvar=_env("state_dir"))] = Path("state"),
    brokers: Annotated[int | None, typer.Option(help="Mosquitto brokers")] = None,
    bridges_per_broker: Annotated[
        int | None, typer.Option(help="bridge processes per broker (a shared subscription)")
    ] = None,
    dashboards: Annotated[
        int | None, typer.Option(help="dashboard instances (each with its device gateway)")
    ] = None,
    wait: Annotated[float, typer.Option(help="longest wait for the change, seconds")] = 300.0,
) -> None:
    """Grow or shrink a running `teamtrack up` (what leaves drains first, nothing is lost)."""
    from rich.table import Table

    from teamtrack.local.scaling import (
        ScaleError,
        ScaleRequest,
        running_supervisor,
        submit,
        wait_result,
    )

    if brokers is None and bridges_per_broker is None and dashboards is None:
        raise _fail("say what to change: --brokers, --bridges-per-broker and/or --dashboards")
    if running_supervisor(state_dir) is None:
        raise _fail(f"no `teamtrack up` is running with --state-dir {state_dir}")
    request = ScaleRequest.new(brokers, bridges_per_broker, dashboards)
    submit(state_dir, request)
    try:
        with console.status("scaling...") as status:

            def show(step: str) -> None:
                console.print(f"  {step}")
                status.update(step)

            result = wait_result(state_dir, request.id, wait, show)
    except ScaleError as error:
        raise _fail(str(error)) from None
    table = Table(title="teamtrack processes")
    table.add_column("process")
    table.add_column("pid", justify="right")
    processes = result.get("processes", {})
    assert isinstance(processes, dict)
    for role, pid in processes.items():
        table.add_row(role, str(pid))
    console.print(table)
    scale = result.get("scale", {})
    assert isinstance(scale, dict)
    summary = ", ".join(f"{name.replace('_', ' ')} {count}" for name, count in scale.items())
    if result.get("state") != "done":
        raise _fail(f"scaling failed: {result.get('error')} (now: {summary})")
    console.print(f"scaled: {summary}")


@app.command("bench")
def bench_command(
    scenarios: Annotated[
        str | None,
        typer.Option(help="comma-separated paths: baseline, redis, mqtt-mirror, http, kafka; "
                     "or faults (the fault suite under load, with recovery times; "
                     "the rate is the first of --fixed-rates, the load --step-seconds long) "
                     "or spike (the load doubled and halved while `teamtrack scale` "
                     "changes the cluster; phases of --step-seconds, at least 10) "
                     "\\[default: baseline,redis,mqtt-mirror,http,kafka]"),
    ] = None,
    rates: Annotated[
        str | None, typer.Option(help="offered-rate ladder, msg/s \\[default: 1k,2k,5k,...,50k]")
    ] = None,
    fixed_rates: Annotated[
        str | None, typer.Option(help="rates always run and reported \\[default: 1k,5k,10k]")
    ] = None,
    step_seconds: Annotated[float, typer.Option(help="measured seconds per step")] = 10.0,
    warmup_seconds: Annotated[float, typer.Option(help="unmeasured seconds first")] = 2.0,
    drain_seconds: Annotated[float, typer.Option(help="longest wait for stragglers")] = 5.0,
    shape: Annotated[str, typer.Option(help="many (connections), few, or both")] = "both",
    workers: Annotated[
        int | None, typer.Option(help="connections of the many shape \\[default: 10000]")
    ] = None,
    few_workers: Annotated[
        int | None, typer.Option(help="connections of the few shape \\[default: 20]")
    ] = None,
    teams: Annotated[
        int | None, typer.Option(help="teams the workers belong to \\[default: 10]")
    ] = None,
    generators: Annotated[int, typer.Option(help="load generator processes")] = 2,
    qos: Annotated[int, typer.Option(help="QoS of the positions (0 or 1)")] = 0,
    endpoints: Annotated[
        Path | None, typer.Option(help="endpoints.json of a running `teamtrack up`")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="its state folder \\[default: the endpoints' folder]")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="report folder \\[default: reports/bench-<time>]")
    ] = None,
    progress: Annotated[bool, typer.Option(help="live progress table")] = True,
    rounds: Annotated[
        int, typer.Option(help="run every scenario this many times, in turn; targets take the "
                          "median (the host's noise changes from one quarter hour to the next)")
    ] = 1,
    fault_backend: Annotated[
        str, typer.Option(help="the cluster of --scenarios faults: redis, or kafka (3 nodes)")
    ] = "redis",
    bridges_per_broker: Annotated[
        int, typer.Option(help="bridge processes per broker of the local cluster, in one "
                          "shared subscription (as `teamtrack up --bridges-per-broker`)")
    ] = 1,
    spike_workers: Annotated[
        int, typer.Option(help="--scenarios spike: workers at 1 Hz before the peak doubles them")
    ] = 200,
    mirror: Annotated[
        MirrorMode, typer.Option(help="what the local cluster's bridges mirror into their "
                                 "brokers (as `teamtrack up --mirror`)")
    ] = MirrorMode.ON_DEMAND,
) -> None:
    """Latency and throughput device -> manager, side by side with Mosquitto alone."""
    from teamtrack.bench.command import build_config, run_command

    try:
        config = build_config(
            scenarios=scenarios, rates=rates, fixed_rates=fixed_rates,
            step_seconds=step_seconds, warmup_seconds=warmup_seconds,
            drain_seconds=drain_seconds, shape=shape, workers=workers,
            few_workers=few_workers, teams=teams, generators=generators, qos=qos,
            endpoints=endpoints, state_dir=state_dir, out=out, progress=progress,
            rounds=rounds, fault_backend=fault_backend,
            bridges_per_broker=bridges_per_broker, spike_workers=spike_workers,
            mirror=mirror.value,
        )
    except ValueError as error:
        raise _fail(str(error)) from None
    raise typer.Exit(run_command(config, console))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
