"""Settings read once at each service's entry point: flags first, then `TEAMTRACK_*` variables.

Every setting `some_name` is both the flag `--some-name` and the variable
`TEAMTRACK_SOME_NAME`. Library code never reads settings: services receive plain arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict

ENV_PREFIX = "TEAMTRACK_"


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


def load_settings(
    settings_class: type[SettingsT], program: str, argv: Sequence[str] | None = None
) -> SettingsT:
    """Parse flags and environment; on bad input print one line per problem and exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        source: CliSettingsSource[SettingsT] = CliSettingsSource(
            settings_class, cli_parse_args=args, cli_prog_name=program
        )
        return settings_class(_cli_settings_source=source(args=args))  # type: ignore[call-arg]
    except ValidationError as error:
        for problem in error.errors():
            name = "-".join(str(part) for part in problem["loc"]).replace("_", "-")
            print(f"{program}: --{name}: {problem['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
