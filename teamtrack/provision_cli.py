"""`teamtrack provision`: the registry into every account's secrets and the servers' files;
one account rotated, revoked or reinstated live; OwnTracks phones enrolled
(docs/security.md, docs/devices.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from teamtrack.cli_support import console, env_name, failure

if TYPE_CHECKING:
    from teamtrack.enrolment import Destination

_env = env_name


def _fail(message: str) -> typer.Exit:
    return failure("teamtrack", message)


provision_app = typer.Typer(
    help="Registry -> credentials.json, mosquitto.passwd, mosquitto.acl, dashboard-auth.json; "
    "`provision rotate|revoke|reinstate ACCOUNT` for one account; `provision enrol TEAM WORKER` "
    "and `enrol-team TEAM` for phones running OwnTracks.",
    invoke_without_command=True,
    no_args_is_help=False,
)


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


__all__ = ["provision_app"]
