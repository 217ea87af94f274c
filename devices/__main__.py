"""`python -m devices`: run the device simulator from the command line.

Example:
    python -m devices --credentials state/credentials.json \\
        --broker-url mqtt://127.0.0.1:1883 --broker-url mqtt://127.0.0.1:1884 \\
        --teams 10 --workers 100 --schedule "100@0,1000@60,1000@120,500@150"
    python -m devices --credentials state/credentials.json --ca-file state/tls/ca.crt \\
        --broker-url mqtts://broker.example.org:8883
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from rich.logging import RichHandler

from devices.identities import load_device_identities
from devices.movement import CENTRAL_BERLIN, BoundingBox, ProfileMix
from devices.schedule import parse_schedule
from devices.simulator import (
    DEFAULT_BROKER_URL,
    BrokerAddress,
    SimulationConfig,
    SimulationSummary,
    run_simulation,
)
from teamtrack.help_style import HelpFormatter
from teamtrack.runtime import run

_Parsed = TypeVar("_Parsed")


class _OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad flag in one line instead of the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _typed(parse: Callable[[str], _Parsed]) -> Callable[[str], _Parsed]:
    """Turns a parser's ValueError into argparse's one-line message."""

    def convert(text: str) -> _Parsed:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def _broker_url(text: str) -> str:
    BrokerAddress.parse(text, allow_tls=True)
    return text


def build_parser(prog: str = "python -m devices") -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog=prog,
        description="Simulate field workers reporting positions over MQTT 5.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--credentials",
        required=True,
        metavar="PATH",
        help="credentials.json with a devices list (team, worker, username, password)",
    )
    parser.add_argument(
        "--broker-url",
        action="append",
        type=_typed(_broker_url),
        dest="broker_urls",
        metavar="URL",
        help="mqtt://host:port, or mqtts://host:port for MQTT over TLS; repeat for several "
        f"brokers [default: {DEFAULT_BROKER_URL}]",
    )
    parser.add_argument(
        "--ca-file",
        metavar="PATH",
        help="certificate authority that mqtts:// brokers' certificates must be signed by "
        "(a cluster's state/tls/ca.crt) [default: the system's trusted authorities]",
    )
    parser.add_argument(
        "--teams",
        type=_typed(_non_negative_int),
        metavar="INT",
        help="use the first N teams [default: all]",
    )
    parser.add_argument(
        "--workers",
        type=_typed(_non_negative_int), metavar="INT",
        help="use the first N workers of each team [default: all]",
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between fixes [default: 1.0]"
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.1,
        help="random interval variation as a fraction, 0.1 = ±10%% [default: 0.1]",
    )
    parser.add_argument(
        "--qos", type=int, choices=(0, 1), default=0, help="position QoS [default: 0]"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="run length in seconds; 0 = until Ctrl-C, or until the schedule's last point",
    )
    parser.add_argument(
        "--schedule",
        type=_typed(parse_schedule),
        metavar="STR",
        help='online-worker targets COUNT@SECONDS,..., e.g. "100@0,1000@60,500@150"',
    )
    parser.add_argument(
        "--bbox",
        type=_typed(BoundingBox.parse),
        metavar="STR",
        default=CENTRAL_BERLIN,
        help=f"south,west,north,east to move in [default: {CENTRAL_BERLIN}]",
    )
    parser.add_argument(
        "--mix",
        type=_typed(ProfileMix.parse),
        metavar="STR",
        default=ProfileMix(),
        help=f"shares of movement profiles [default: {ProfileMix()}]",
    )
    parser.add_argument("--seed", type=int, help="seed for a reproducible run")
    parser.add_argument(
        "--max-connects",
        type=int,
        default=100,
        help="connection attempts in flight at once [default: 100]",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no live progress display or summary table"
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level [default: WARNING]",
    )
    return parser


def _config(arguments: argparse.Namespace) -> SimulationConfig:
    return SimulationConfig(
        broker_urls=tuple(arguments.broker_urls or (DEFAULT_BROKER_URL,)),
        teams=arguments.teams,
        workers_per_team=arguments.workers,
        interval=arguments.interval,
        jitter=arguments.jitter,
        qos=arguments.qos,
        duration=arguments.duration,
        schedule=arguments.schedule,
        bbox=arguments.bbox,
        profile_mix=arguments.mix,
        seed=arguments.seed,
        show_progress=not arguments.no_progress,
        max_concurrent_connects=arguments.max_connects,
        ca_file=arguments.ca_file,
    )


async def _run_until_signalled(
    config: SimulationConfig, arguments: argparse.Namespace
) -> SimulationSummary:
    identities = load_device_identities(arguments.credentials)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(signum: signal.Signals) -> None:
        stop.set()
        # A second Ctrl-C falls through to Python's default and aborts the clean shutdown.
        loop.remove_signal_handler(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, request_stop, signum)
    return await run_simulation(config, identities, stop=stop)


def main(argv: Sequence[str] | None = None, prog: str = "python -m devices") -> int:
    """Run with `argv` (default: the process's arguments); returns the exit code.

    0 after a run in which workers got online, 1 if none could (or the credentials file is
    unusable), 2 for a bad flag. `prog` names the command in messages (`teamtrack simulate`).
    """
    parser = build_parser(prog)
    arguments = parser.parse_args(argv)
    try:
        config = _config(arguments)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=arguments.log_level,
        format="%(message)s",
        handlers=[RichHandler(show_path=False)],
    )
    # gmqtt's protocol module logs every connection at INFO and every closed socket at WARNING,
    # which is noise next to the simulator's own counted, rate-limited errors.
    if arguments.log_level != "DEBUG":
        logging.getLogger("gmqtt").setLevel(logging.ERROR)
    try:
        summary = run(_run_until_signalled(config, arguments))
    except (OSError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    if arguments.no_progress:
        print(
            f"sent {summary.messages_sent} messages in {summary.duration_s:.1f} s,"
            f" peak {summary.workers_peak} workers, {summary.error_count} errors,"
            f" {summary.reconnects} reconnects ({summary.failovers} failovers),"
            f" {summary.resent} resent"
        )
    # A run in which no worker ever got online is a failed run (wrong URL or credentials).
    return 0 if summary.workers_peak > 0 or summary.workers_selected == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
