"""One help style for `teamtrack` and every `python -m` service, the one `teamtrack --help`
(typer) shows: a one-line summary, lower-case `<type>` placeholders (`<str>`, `<int>`,
`<float>`, `<path>`, `<secret>`), choices in braces, then `[default: …]` and
`[env var: TEAMTRACK_…]` after the description.

`HelpFormatter` is the argparse side (the services' settings parsers, `python -m devices`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable
from typing import Any, Final

_TYPE_NAMES: Final[dict[Any, str]] = {int: "int", float: "float", str: "str", None: "str"}
# pydantic-settings' own default and env notes, turned into the shared style.
_DEFAULT_NOTE: Final = re.compile(r"\((default(?: factory)?): ([^()]*(?:\([^()]*\)[^()]*)*)\)")


def placeholder(name: str) -> str:
    """`<name>`, lower case: `PATH` -> `<path>`."""
    return f"<{name.strip('<>').lower()}>"


def restyle_notes(help_text: str) -> str:
    """`(default: x)` -> `[default: x]`; no note for an empty or absent default."""

    def note(match: re.Match[str]) -> str:
        value = match.group(2)
        return "" if value in ("", "null", "None") else f"[{match.group(1)}: {value}]"

    return re.sub(r"  +", " ", _DEFAULT_NOTE.sub(note, help_text)).strip()


def env_note(names: Iterable[str]) -> str:
    return f"[env var: {', '.join(name.upper() for name in names)}]"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse in the shared style: `<type>` placeholders, `[default: …]` notes."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 32,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, width)

    def _metavar_formatter(
        self, action: argparse.Action, default_metavar: str
    ) -> Callable[[int], tuple[str, ...]]:
        if action.choices is not None and action.metavar is None:
            return super()._metavar_formatter(action, default_metavar)
        metavar = action.metavar
        if isinstance(metavar, str):
            shown = metavar if metavar.startswith(("<", "{")) else placeholder(metavar)
        else:
            shown = placeholder(_TYPE_NAMES.get(action.type, "value"))

        def format_metavar(tuple_size: int) -> tuple[str, ...]:
            return (shown,) * tuple_size

        return format_metavar

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return restyle_notes(action.help) if action.help else action.help
