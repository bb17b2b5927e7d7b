"""What every ``safeswap`` command shares: the error type and console, the broker
options, and settings read from the environment (a misconfiguration is a user error)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from streams.settings import Settings

err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the width

BrokerOption = Annotated[
    str | None,
    typer.Option(
        "--broker",
        help="Kafka bootstrap host:port (env SAFESWAP_BROKER); required: `safeswap dev` runs "
        "a local broker and worker and prints it.",
    ),
]
# demo and simulate bring their own broker when none is given.
OwnBrokerOption = Annotated[
    str | None,
    typer.Option(
        "--broker",
        help="Kafka bootstrap host:port (env SAFESWAP_BROKER); empty: start the embedded broker for this run.",
    ),
]
NO_BROKER = (
    "no broker: set SAFESWAP_BROKER=host:port or pass --broker (`safeswap dev` runs a local broker and "
    "worker without Docker and prints the address)"
)


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def settings_from(broker: str | None = None, **overrides) -> Settings:
    from streams.kafka import client_options

    try:
        settings = Settings.from_env(broker=broker, **overrides)
        client_options(settings)  # a security misconfiguration is a user error, said before any connection
    except (ValueError, OSError) as exc:
        raise UserError(str(exc)) from None
    return settings
