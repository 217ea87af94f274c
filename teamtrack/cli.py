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
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from teamtrack.history_cli import history_app
from teamtrack.mqtt import MirrorMode
from teamtrack.settings import ENV_PREFIX

if TYPE_CHECKING:
    from teamtrack.enrolment import Destination

app = typer.Typer(
    name="teamtrack",
    help="Live positions of field teams for their managers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


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


def _env(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


def _fail(message: str) -> typer.Exit:
    errors.print(f"[red]teamtrack:[/red] {message}", highlight=False)
    return typer.Exit(2)


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


provision_app = typer.Typer(
    help="Registry -> credentials.json, mosquitto.passwd, mosquitto.acl, dashboard-auth.json; "
    "`provision rotate|revoke|reinstate ACCOUNT` for one account; `provision enrol TEAM WORKER` "
    "and `enrol-team TEAM` for phones running OwnTracks.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(provision_app, name="provision")
app.add_typer(history_app, name="history")


@provision_app.callback()
def provision_command(
    context: typer.Context,
    registry: Annotated[
        Path | None,
        typer.Option(envvar=_env("registry"), help="registry YAML of teams and people"),
    ] = None,
    out: Annotated[
        Path, typer.Option(envvar=_env("out"), help="folder for the generated files")
    ] = Path("state"),
    rotate: Annotated[
        bool, typer.Option(help="replace every existing secret instead of keeping them")
    ] = False,
    compose: Annotated[
        bool,
        typer.Option(help="also write OUT/compose/ broker configs and OUT/history/ for "
                     "docker-compose.yml"),
    ] = False,
    tls_hosts: Annotated[
        str,
        typer.Option(envvar=_env("tls_hosts"), help="comma-separated names and addresses the "
                     "server certificate carries besides localhost, 127.0.0.1, ::1 and the "
                     "registry's tls_hosts"),
    ] = "",
    rotate_tls: Annotated[
        bool, typer.Option(help="issue a new certificate authority and server certificate")
    ] = False,
) -> None:
    """Registry -> credentials.json, mosquitto.passwd, mosquitto.acl, dashboard-auth.json,
    and tls/ (a local certificate authority and the servers' certificate)."""
    if context.invoked_subcommand is not None:
        return
    from teamtrack.provision import ProvisionError, provision
    from teamtrack.registry import RegistryError, load_registry
    from teamtrack.tls import split_hosts

    if registry is None:
        raise _fail(
            "--registry is required (or a command: rotate, revoke, reinstate, enrol, enrol-team)"
        )
    try:
        result = provision(
            load_registry(registry), out, reuse_existing=not rotate,
            tls_hosts=split_hosts(tls_hosts), rotate_tls=rotate_tls,
        )
    except (RegistryError, ProvisionError, OSError) as error:
        raise _fail(str(error)) from None
    console.print(
        f"{len(result.credentials.devices)} devices, {len(result.credentials.managers)} managers;"
        f" added {len(result.added_usernames)}, removed {len(result.removed_usernames)}"
        + (f", revoked {len(result.revoked_usernames)}" if result.revoked_usernames else "")
    )
    for path in (result.credentials_path, result.password_file, result.acl_file,
                 result.dashboard_auth_path):
        console.print(f"wrote {path}")
    if result.tls is not None:
        issued = ", ".join(result.tls.issued) or "nothing: the existing ones are still good"
        console.print(
            f"TLS in {result.tls.directory}/ (issued {issued}); the certificate names "
            f"{', '.join(result.tls.hosts)}; clients trust {result.tls.ca_cert}"
        )
    if compose:
        from teamtrack.local.mosquitto_config import render_compose_broker_configs

        for path in render_compose_broker_configs(out / "compose"):
            console.print(f"wrote {path}")
        # Made here, owned by whoever provisions: Docker would create a missing one as root.
        history = out / "history"
        history.mkdir(mode=0o700, exist_ok=True)
        console.print(f"made {history}/ for the history database")
    console.print(
        "reload brokers with SIGHUP to apply the new password file, ACL and certificate; "
        "restart dashboards serving HTTPS when a certificate was issued"
    )


_ACCOUNT = Annotated[
    str, typer.Argument(help="username: team.worker (a device), a manager, observer, bridge-...")
]
_OUT = Annotated[
    Path, typer.Option(envvar=_env("out"), help="the provisioned folder (credentials.json)")
]
_REGISTRY = Annotated[
    Path | None,
    typer.Option(envvar=_env("registry"), help="registry YAML \\[default: OUT/registry.yaml]"),
]
_STATE_DIR = Annotated[
    Path | None,
    typer.Option(
        envvar=_env("state_dir"),
        help="state folder of a running `teamtrack up` whose brokers get SIGHUP "
        "\\[default: OUT]",
    ),
]


def _one_account(
    action: str, account: str, out: Path, registry: Path | None, state_dir: Path | None
) -> None:
    """rotate / revoke / reinstate one account, then reload the running brokers; no secret is
    printed (the new ones are in OUT/credentials.json, 0600)."""
    from teamtrack.local.cluster import reload_brokers
    from teamtrack.provision import (
        ProvisionError,
        reinstate_account,
        revoke_account,
        rotate_account,
    )
    from teamtrack.registry import RegistryError, load_registry

    change = {"rotate": rotate_account, "revoke": revoke_account,
              "reinstate": reinstate_account}[action]
    registry_path = registry if registry is not None else out / "registry.yaml"
    # Whatever is written (credentials, password file) is its owner's alone.
    previous = os.umask(0o077)
    try:
        result = change(load_registry(registry_path), out, account)
    except (RegistryError, ProvisionError, OSError) as error:
        raise _fail(str(error)) from None
    finally:
        os.umask(previous)
    done = {"rotate": "rotated", "revoke": "revoked", "reinstate": "reinstated"}[action]
    console.print(f"{done} {account}; wrote {result.credentials_path} and the files next to it")
    signalled = reload_brokers(state_dir if state_dir is not None else out)
    if signalled:
        console.print(f"reloaded {', '.join(signalled)} (SIGHUP)")
    else:
        console.print("no running brokers found there: send SIGHUP to your brokers")
    console.print("dashboards re-read their auth file on their own within a few seconds")


@provision_app.command("rotate")
def rotate_command(
    account: _ACCOUNT, out: _OUT = Path("state"), registry: _REGISTRY = None,
    state_dir: _STATE_DIR = None,
) -> None:
    """New secrets for one account; its old ones stop working (live connections are closed)."""
    _one_account("rotate", account, out, registry, state_dir)


@provision_app.command("revoke")
def revoke_command(
    account: _ACCOUNT, out: _OUT = Path("state"), registry: _REGISTRY = None,
    state_dir: _STATE_DIR = None,
) -> None:
    """Cut one account off everywhere (it stays revoked until `reinstate`)."""
    _one_account("revoke", account, out, registry, state_dir)


@provision_app.command("reinstate")
def reinstate_command(
    account: _ACCOUNT, out: _OUT = Path("state"), registry: _REGISTRY = None,
    state_dir: _STATE_DIR = None,
) -> None:
    """Give a revoked account new secrets."""
    _one_account("reinstate", account, out, registry, state_dir)


_MODE = Annotated[
    str, typer.Option(envvar=_env("enrol_mode"), help="how phones report: mqtt (over TLS) or http")
]
_HOST = Annotated[
    str | None,
    typer.Option(envvar=_env("enrol_host"), help="the name or address phones reach the brokers "
                 "(or the device gateway) at; needed when the endpoints are loopback only"),
]
_PORT = Annotated[
    int | None,
    typer.Option(help="the port phones connect to \\[default: each broker's mqtts "
                 "port in endpoints.json]", min=1, max=65535),
]
_HTTP_URL = Annotated[
    str | None,
    typer.Option(envvar=_env("enrol_http_url"), help="--mode http: the https:// URL of the "
                 "device gateway's OwnTracks endpoint as phones reach it \\[default: "
                 "endpoints.json's device_http under --host]"),
]
_TLS = Annotated[bool, typer.Option(help="MQTT over TLS (phones reach no plain listener)")]
_MONITORING = Annotated[
    str, typer.Option(help="move (frequent reports, for a live map) or significant (battery "
                      "first)")
]
_CERTIFICATE_CHECK = Annotated[
    bool, typer.Option(help="refuse a --host the servers' certificate (OUT/tls) does not name")
]
_ENDPOINTS_DIR = Annotated[
    Path | None,
    typer.Option(envvar=_env("state_dir"), help="state folder of `teamtrack up` with "
                 "endpoints.json \\[default: OUT]"),
]


def _enrolment_destinations(
    out: Path, state_dir: Path | None, mode: str, host: str | None, port: int | None,
    http_url: str | None, tls: bool, certificate_check: bool,
) -> tuple[Destination, ...]:
    from teamtrack.enrolment import EnrolmentError, resolve_destinations

    try:
        return resolve_destinations(
            out, mode=mode, host=host, port=port, tls=tls, http_url=http_url,
            state_dir=state_dir, check_certificate=certificate_check,
        )
    except EnrolmentError as error:
        raise _fail(str(error)) from None


def _enrolment_hints(out: Path, tls: bool) -> None:
    from teamtrack.tls import CA_CERT, TLS_DIR

    console.print(
        "they hold the device's password (files 0600): hand each to its worker only",
        soft_wrap=True, highlight=False,
    )
    if tls:
        console.print(
            f"phones must trust {out / TLS_DIR / CA_CERT} first (docs/devices.md, "
            "\"Real phones (OwnTracks)\")",
            soft_wrap=True, highlight=False,
        )


@provision_app.command("enrol")
def enrol_command(
    team: Annotated[str, typer.Argument(help="team id")],
    worker: Annotated[str, typer.Argument(help="worker id")],
    out: _OUT = Path("state"),
    mode: _MODE = "mqtt",
    host: _HOST = None,
    port: _PORT = None,
    http_url: _HTTP_URL = None,
    tls: _TLS = True,
    monitoring: _MONITORING = "move",
    certificate_check: _CERTIFICATE_CHECK = True,
    state_dir: _ENDPOINTS_DIR = None,
) -> None:
    """One worker's phone: OUT/enrol/TEAM/WORKER.otrc (OwnTracks configuration) and .png (its
    QR code, which the app imports), both 0600."""
    from teamtrack.enrolment import EnrolmentError, destination_for, enrol_device, find_device
    from teamtrack.provision import ProvisionError, load_credentials

    try:
        device = find_device(load_credentials(out), team, worker)
    except (EnrolmentError, ProvisionError) as error:
        raise _fail(str(error)) from None
    destinations = _enrolment_destinations(
        out, state_dir, mode, host, port, http_url, tls, certificate_check
    )
    try:
        enrolled = enrol_device(
            out, device, destination_for(destinations, device.username), monitoring=monitoring
        )
    except (EnrolmentError, OSError) as error:
        raise _fail(str(error)) from None
    console.print(
        f"enrolled {team}/{worker} (account {enrolled.username}), OwnTracks in {mode.upper()} "
        f"mode to {enrolled.destination.describe()}:", soft_wrap=True, highlight=False,
    )
    console.print(f"  configuration  {enrolled.otrc}", soft_wrap=True, highlight=False)
    console.print(f"  QR code        {enrolled.png}", soft_wrap=True, highlight=False)
    _enrolment_hints(out, enrolled.destination.tls)


@provision_app.command("enrol-team")
def enrol_team_command(
    team: Annotated[str, typer.Argument(help="team id")],
    out: _OUT = Path("state"),
    mode: _MODE = "mqtt",
    host: _HOST = None,
    port: _PORT = None,
    http_url: _HTTP_URL = None,
    tls: _TLS = True,
    monitoring: _MONITORING = "move",
    certificate_check: _CERTIFICATE_CHECK = True,
    state_dir: _ENDPOINTS_DIR = None,
) -> None:
    """Every worker of a team (as `enrol`), plus OUT/enrol/TEAM/sheet.html: one QR code per
    worker, self-contained, for the manager to print or show (0600)."""
    from teamtrack.enrolment import EnrolmentError, enrol_team
    from teamtrack.provision import ProvisionError, load_credentials

    try:
        credentials = load_credentials(out)
    except ProvisionError as error:
        raise _fail(str(error)) from None
    destinations = _enrolment_destinations(
        out, state_dir, mode, host, port, http_url, tls, certificate_check
    )
    try:
        result = enrol_team(out, credentials, team, destinations, monitoring=monitoring)
    except (EnrolmentError, OSError) as error:
        raise _fail(str(error)) from None
    where = ", ".join(sorted({device.destination.describe() for device in result.devices}))
    folder = result.sheet.parent
    console.print(
        f"enrolled {len(result.devices)} workers of team {team}, OwnTracks in {mode.upper()} "
        f"mode to {where or 'nowhere'}: WORKER.otrc and WORKER.png in {folder}",
        soft_wrap=True, highlight=False,
    )
    if result.removed:
        console.print(
            f"removed the files of {len(result.removed)} workers no longer provisioned: "
            f"{', '.join(result.removed)}", soft_wrap=True, highlight=False,
        )
    console.print(f"  sheet to print or show  {result.sheet}", soft_wrap=True, highlight=False)
    _enrolment_hints(out, all(device.destination.tls for device in result.devices))


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
