"""What the `teamtrack` command and its sub-commands share: the consoles, the variable name
of an option, and how a command fails."""

from __future__ import annotations

import typer
from rich.console import Console

from teamtrack.settings import ENV_PREFIX

console = Console()
errors = Console(stderr=True)


def env_name(name: str) -> str:
    """`TEAMTRACK_<NAME>`: the variable an option is also read from."""
    return f"{ENV_PREFIX}{name.upper()}"


def failure(command: str, message: str, code: int = 2) -> typer.Exit:
    """Print `message` as the error of `command` (on stderr); the exit to raise."""
    errors.print(f"[red]{command}:[/red] {message}", highlight=False)
    return typer.Exit(code)


__all__ = ["console", "env_name", "errors", "failure"]
