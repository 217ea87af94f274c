"""`teamtrack credentials`: one secret of a provisioned state folder, for a person or a script.

    teamtrack credentials --manager alpha-lead              the dashboard password (stdout)
    teamtrack credentials --manager alpha-lead --token --out state/alpha.header
                                                            `Authorization: Bearer ...` (0600)
    teamtrack credentials --device alpha/w001 --out state/alpha.w001/mosquitto_pub
                                                            a mosquitto_pub/sub options file
    teamtrack credentials --observer --out state/observer/mosquitto_sub

Without `--out` the secret goes to standard output alone (for `$(...)` or a password manager);
with it, into a new file only its owner may read, never onto a command line, where every local
user's `ps` would show it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from teamtrack.files import write_atomically
from teamtrack.provision import Credentials, load_credentials


class CredentialsError(ValueError):
    """The account asked for is not in the state folder; the message says what is."""


def secret_text(
    credentials: Credentials,
    *,
    manager: str | None = None,
    team: str | None = None,
    device: str | None = None,
    observer: bool = False,
    token: bool = False,
    mqtt: bool = False,
    options_file: bool = False,
) -> str:
    """The text to hand out: a bare secret, a curl header line, or an MQTT options file."""
    chosen = [manager is not None or team is not None, device is not None, observer]
    if sum(chosen) != 1:
        raise CredentialsError("name one account: --manager NAME (or --team TEAM), "
                               "--device TEAM/WORKER or --observer")
    if device is not None:
        team_id, _, worker = device.partition("/")
        try:
            login = credentials.device(team_id, worker)
        except KeyError:
            raise CredentialsError(f"no device {device!r} (TEAM/WORKER)") from None
        return _mqtt_options(login.username, login.password, options_file)
    if observer:
        account = credentials.observer
        if account is None:
            raise CredentialsError("this state folder has no observer account")
        return _mqtt_options(account.username, account.password, options_file)
    if manager is not None:
        try:
            person = credentials.manager(manager)
        except KeyError:
            known = ", ".join(m.username for m in credentials.managers) or "none"
            raise CredentialsError(f"no manager {manager!r} (managers: {known})") from None
    else:
        assert team is not None
        managers = credentials.managers_of(team)
        if not managers:
            raise CredentialsError(f"team {team!r} has no manager")
        person = managers[0]
    if token:
        return f"Authorization: Bearer {person.token}\n" if options_file else person.token + "\n"
    if mqtt:
        return _mqtt_options(person.username, person.mqtt_password, options_file)
    return person.password + "\n"


def _mqtt_options(username: str, password: str, options_file: bool) -> str:
    if options_file:
        return f"-V mqttv5\n-u {username}\n-P {password}\n"
    return password + "\n"


def credentials_command(
    state_dir: Annotated[Path, typer.Option(envvar="TEAMTRACK_STATE_DIR",
                                            help="the provisioned folder")] = Path("state"),
    manager: Annotated[str | None, typer.Option(help="a manager's username")] = None,
    team: Annotated[str | None, typer.Option(help="the first manager of this team")] = None,
    device: Annotated[str | None, typer.Option(help="a device: TEAM/WORKER")] = None,
    observer: Annotated[bool, typer.Option(help="the observer (reads every team)")] = False,
    token: Annotated[bool, typer.Option(help="the manager's API token, not the password")] = False,
    mqtt: Annotated[bool, typer.Option(help="the manager's MQTT password")] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="write a file only you may read: a curl header line (--token) or a "
                     "mosquitto_sub/pub options file (MQTT accounts); must not exist yet"),
    ] = None,
) -> None:
    """One secret from credentials.json: printed alone, or written to a 0600 file."""
    try:
        credentials = load_credentials(state_dir)
        text = secret_text(credentials, manager=manager, team=team, device=device,
                           observer=observer, token=token, mqtt=mqtt,
                           options_file=out is not None)
    except (CredentialsError, OSError, ValueError) as error:
        typer.echo(f"teamtrack credentials: {error}", err=True)
        raise typer.Exit(2) from None
    if out is None:
        typer.echo(text, nl=False)
        return
    if out.exists():
        typer.echo(f"teamtrack credentials: {out} exists; remove it first", err=True)
        raise typer.Exit(2)
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(out, text.encode())
    os.chmod(out, 0o600)
    typer.echo(f"wrote {out} (0600)", err=True)
