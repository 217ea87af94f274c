"""Settings read once at each service's entry point: flags first, then `TEAMTRACK_*` variables.

Every setting `some_name` is both the flag `--some-name` and the variable
`TEAMTRACK_SOME_NAME`. Library code never reads settings: services receive plain arguments.
"""

from __future__ import annotations

import enum
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict

from teamtrack.help_style import HelpFormatter, env_note, placeholder, restyle_notes

ENV_PREFIX = "TEAMTRACK_"


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


# A file option that may be left out: an empty value (`TEAMTRACK_TLS_CERT=` in a compose file)
# means none, not the current folder.
OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_none)]


class ServiceSettings(BaseSettings):
    """Common to every service."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="ignore",
    )

    backend_url: str = Field(
        "memory://",
        description=(
            "broadcast backend: memory://, redis://host:port/db (rediss:// over TLS),"
            " redis+sentinel://host:port,host:port/service/db,"
            " redis+cluster://host:port,host:port/, kafka://host:port[,host:port]"
        ),
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def _placeholder_of(annotation: Any) -> str:
    """`<str>`, `<int>`, `<path>`, `<secret>`, `{a,b}` for enums; `X | None` as X."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _placeholder_of(kinds[0]) if len(kinds) == 1 else "<value>"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "{" + ",".join(str(member.value) for member in annotation) + "}"
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ",".join(str(value) for value in typing.get_args(annotation)) + "}"
    if annotation is bool:
        return "bool"  # what pydantic-settings turns into --flag / --no-flag
    names = {str: "str", int: "int", float: "float", Path: "path", SecretStr: "secret"}
    return placeholder(names.get(annotation, "value"))


class _ServiceCli(CliSettingsSource[SettingsT]):
    """The services' flags in the shared help style (teamtrack.help_style)."""

    def _metavar_format(self, obj: Any) -> str:
        return _placeholder_of(obj)

    def _help_format(self, field_name: str, field_info: Any, *args: Any, **kwargs: Any) -> str:
        text = restyle_notes(super()._help_format(field_name, field_info, *args, **kwargs))
        default = field_info.default
        if isinstance(default, enum.Enum):  # the value one types, not the member's name
            text = text.replace(f"[default: {default.name}]", f"[default: {default.value}]")
        return text

    def _help_format_env_vars(self, help_text: str, env_var_names: tuple[str, ...]) -> str:
        if not env_var_names:
            return help_text
        return f"{help_text} {env_note(env_var_names)}" if help_text else env_note(env_var_names)


def load_settings(
    settings_class: type[SettingsT], program: str, argv: Sequence[str] | None = None
) -> SettingsT:
    """Parse flags and environment; on bad input print one line per problem and exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        source: CliSettingsSource[SettingsT] = _ServiceCli(
            settings_class, cli_parse_args=args, cli_prog_name=program,
            cli_show_env_vars=True, formatter_class=HelpFormatter,
        )
        return settings_class(_cli_settings_source=source(args=args))  # type: ignore[call-arg]
    except ValidationError as error:
        for problem in error.errors():
            name = "-".join(str(part) for part in problem["loc"]).replace("_", "-")
            print(f"{program}: --{name}: {problem['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
