"""`teamtrack history ...`: the tracked person's rights over what teamtrack stores about them.

    teamtrack history export-person TEAM WORKER [--out FILE]
    teamtrack history erase TEAM WORKER [--before DATE] [--state-dir DIR] [--yes]

Where the data is: `--state-dir` of a running `teamtrack up` gives its SQLite history and its
backend (endpoints.json, with the admin account of redis-users.json / kafka-users.json);
`--database-url` and `--backend-url` (better: `TEAMTRACK_DATABASE_URL` and
`TEAMTRACK_BACKEND_URL`, which keep passwords off the command line) give them otherwise.
docs/privacy.md has the whole story: what is stored where, for how long, what erase reaches.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import quote, urlsplit, urlunsplit

import typer

from teamtrack.cli_support import console, env_name, errors, failure

if TYPE_CHECKING:
    from teamtrack.person_export import ExportSummary

history_app = typer.Typer(
    help="The tracked person's data: export everything stored about a worker, or erase it.",
    no_args_is_help=True,
)
# After erasing, the history is erased once more this much later: rows the ingest was still
# writing from the backend's log (it runs a fraction of a second behind) go too.
SETTLE_S = 2.0


_env = env_name


def _fail(message: str, code: int = 2) -> typer.Exit:
    return failure("teamtrack history", message, code)


StateDir = Annotated[
    Path, typer.Option(envvar=_env("state_dir"), help="state folder of a `teamtrack up`")
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(envvar=_env("database_url"), show_default=False,
                 help="history database; prefer the variable when it holds a password "
                 "\\[default: the state folder's history.sqlite3]"),
]
BackendUrl = Annotated[
    str | None,
    typer.Option(envvar=_env("backend_url"), show_default=False,
                 help="live backend; prefer the variable when it holds a password "
                 "\\[default: the running `teamtrack up` of --state-dir]"),
]


@dataclass(frozen=True)
class Targets:
    database_url: str
    backend_url: str | None
    """None: no backend known (export without last-known; erase refuses unless asked)."""


def without_password(url: str) -> str:
    from teamtrack.local.cluster_support import without_password as strip

    return strip(url)


def _with_user(url: str, username: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def cluster_backend_url(state_dir: Path) -> str | None:
    """The backend of the `teamtrack up` running in `state_dir`, as its admin; None if none
    runs there."""
    from teamtrack.files import supervisor_running

    endpoints = state_dir / "endpoints.json"
    if not supervisor_running(state_dir) or not endpoints.exists():
        return None
    url = str(json.loads(endpoints.read_text(encoding="utf-8"))["backend"])
    scheme = urlsplit(url).scheme
    if urlsplit(url).password is None:
        # The cluster's own servers want their admin account (the file is 0600).
        users_file, username = {
            "redis": ("redis-users.json", "default"),
            "kafka": ("kafka-users.json", "tt-admin"),
        }.get(scheme, ("", ""))
        if users_file and (state_dir / users_file).exists():
            users = json.loads((state_dir / users_file).read_text(encoding="utf-8"))
            if users.get("admin"):
                url = _with_user(url, username, users["admin"])
    return url


def resolve_targets(
    state_dir: Path, database_url: str | None, backend_url: str | None
) -> Targets:
    from teamtrack.history import HISTORY_FILE_NAME, default_database_url

    if database_url is None:
        if not (state_dir / HISTORY_FILE_NAME).exists():
            raise _fail(f"no history in {state_dir} ({HISTORY_FILE_NAME}): give --state-dir "
                        "of a `teamtrack up`, or --database-url")
        database_url = default_database_url(state_dir)
    return Targets(database_url, backend_url or cluster_backend_url(state_dir))


def parse_before(text: str) -> int:
    """An ISO date (midnight UTC) or date-time (UTC unless it says) as epoch ms."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise _fail(f"--before {text!r}: give a date (2026-01-31) or a date-time "
                    "(2026-01-31T18:00:00Z)") from None
    return int(moment.timestamp() * 1000)


def _slugs(team: str, worker: str) -> None:
    from teamtrack.contract import is_slug

    for what, value in (("team", team), ("worker", worker)):
        if not is_slug(value):
            raise _fail(f"{what} {value!r} is not a team/worker id")


# export-person ------------------------------------------------------------------------------
@history_app.command("export-person")
def export_person_command(
    team: Annotated[str, typer.Argument(help="team id")],
    worker: Annotated[str, typer.Argument(help="worker id")],
    out: Annotated[
        Path | None,
        typer.Option(help="archive to write \\[default: TEAM-WORKER-export.zip here]",
                     show_default=False),
    ] = None,
    state_dir: StateDir = Path("state"),
    database_url: DatabaseUrl = None,
    backend_url: BackendUrl = None,
) -> None:
    """Everything stored about one worker (history, presence, events, last-known, earlier
    erasures) as GeoJSON and CSV in one zip archive (readable by its owner only)."""
    _slugs(team, worker)
    targets = resolve_targets(state_dir, database_url, backend_url)
    target = out if out is not None else Path(f"{team}-{worker}-export.zip")
    summary = asyncio.run(_export(targets, team, worker, target))
    counts = ", ".join(f"{count} {name}" for name, count in summary.counts.items())
    console.print(f"wrote {summary.path}: {counts}", highlight=False, soft_wrap=True)


async def _export(targets: Targets, team: str, worker: str, out: Path) -> ExportSummary:
    from teamtrack.history import HistoryStore
    from teamtrack.person_export import write_person_archive

    snapshot = None
    if targets.backend_url is not None:
        from teamtrack.backends import from_url

        async with from_url(targets.backend_url) as backend:
            snapshot = await backend.snapshot(team)
    else:
        errors.print("no backend known (no `teamtrack up` running in --state-dir, no "
                     "--backend-url): the archive leaves out the live last-known position")
    store = HistoryStore.from_url(targets.database_url)
    try:
        await store.migrate()
        return await write_person_archive(
            out, store, team, worker, snapshot=snapshot,
            exported_at_ms=int(time.time() * 1000),
            retention={"see": "docs/privacy.md", "history_days_default": 90},
        )
    finally:
        await store.close()


# erase --------------------------------------------------------------------------------------
@history_app.command("erase")
def erase_command(
    team: Annotated[str, typer.Argument(help="team id")],
    worker: Annotated[str, typer.Argument(help="worker id")],
    before: Annotated[
        str | None,
        typer.Option(help="only what is older than this date (UTC) or date-time",
                     show_default=False),
    ] = None,
    state_dir: StateDir = Path("state"),
    database_url: DatabaseUrl = None,
    backend_url: BackendUrl = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    history_only: Annotated[
        bool, typer.Option(help="erase the history even when no backend is known (its "
                           "last-known position of the worker then stays)")
    ] = False,
    settle_s: Annotated[
        float, typer.Option(help="seconds before the history is erased once more (rows the "
                            "ingest was still writing)")
    ] = SETTLE_S,
    operator: Annotated[
        str | None, typer.Option(help="who erases, for the erasure log \\[default: the "
                                 "login name and host]", show_default=False)
    ] = None,
) -> None:
    """Erase a worker's history (positions, presence, events) and last-known position and
    presence; the live logs age out on their own (docs/privacy.md). The erasure is logged
    (who, when, counts), never the data."""
    _slugs(team, worker)
    before_ms = parse_before(before) if before is not None else None
    targets = resolve_targets(state_dir, database_url, backend_url)
    if targets.backend_url is None and not history_only:
        raise _fail(
            f"no backend known: no `teamtrack up` is running in {state_dir} and no "
            "--backend-url (or TEAMTRACK_BACKEND_URL) was given; a backend that is not "
            "erased keeps the worker's last-known position (--history-only erases the "
            "history alone)"
        )
    if before_ms is not None and targets.backend_url is not None:
        errors.print("--before: the last-known position is kept if it is newer")
    what = f"{team}/{worker}" + (f" before {before}" if before else "")
    where = without_password(targets.database_url) + (
        f" and {without_password(targets.backend_url)}" if targets.backend_url else ""
    )
    if not yes and not typer.confirm(f"erase everything stored about {what} in {where}?"):
        raise _fail("nothing erased", code=1)
    who = operator or f"{getpass.getuser()}@{socket.gethostname()}"
    line = asyncio.run(erase_everywhere(targets, team, worker, before_ms, who, settle_s))
    console.print(line, highlight=False, soft_wrap=True)


async def erase_everywhere(
    targets: Targets, team: str, worker: str, before_ms: int | None, operator: str,
    settle_s: float,
) -> str:
    """`teamtrack history erase`'s work (docs/privacy.md): the history, the backend's
    last-known entries, the erasure logged; the line it prints."""
    from teamtrack.history import HistoryStore
    from teamtrack.history_privacy import erase_worker, record_erasure

    store = HistoryStore.from_url(targets.database_url)
    try:
        await store.migrate()
        deleted = await erase_worker(store, team, worker, before_ms=before_ms)
        last_known: int | None = None
        if targets.backend_url is not None:
            last_known = await _forget(targets.backend_url, team, worker, before_ms)
        # Logged now: a running rules service reads it and drops what it holds of the worker.
        erasure = await record_erasure(store, operator=operator, team=team, worker=worker,
                                       before_ms=before_ms, deleted=deleted,
                                       last_known=last_known)
        # Rows the ingest was still writing (from batches already in the backend's log), and
        # what the rules service stored before it read the erasure.
        await asyncio.sleep(settle_s)
        late = await erase_worker(store, team, worker, before_ms=before_ms)
        deleted.positions += late.positions
        deleted.presence += late.presence
        deleted.events += late.events
        deleted.alerts += late.alerts
        await record_erasure(store, operator=operator, team=team, worker=worker,
                             before_ms=before_ms, deleted=deleted, last_known=last_known,
                             erasure_id=erasure)
    finally:
        await store.close()
    reached = "not reached" if last_known is None else f"{last_known} entries"
    return (f"erased {team}/{worker}: {deleted.positions} positions, {deleted.presence} "
            f"presence changes, {deleted.events} events, {deleted.alerts} alerts; last-known: "
            f"{reached}; logged in "
            "the history's erasures table")


async def _forget(url: str, team: str, worker: str, before_ms: int | None) -> int:
    from teamtrack.backends import from_url

    async with from_url(url) as backend:
        if before_ms is not None:
            snapshot = await backend.snapshot(team)
            newest = [event.ts for event in (snapshot.positions.get(worker),
                                             snapshot.presence.get(worker)) if event]
            if newest and max(newest) >= before_ms:
                return 0  # the live entry is newer than what is erased
        return await backend.forget_worker(team, worker)


__all__ = [
    "Targets", "cluster_backend_url", "erase_everywhere", "history_app", "parse_before",
    "resolve_targets",
]
