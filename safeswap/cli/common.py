"""What every ``safeswap`` command shares: the error type and console, the broker
options, and settings read from the environment (a misconfiguration is a user error)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

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
    """A mistake the user can fix: one line ``error: <what> (fix: ...)`` on stderr, exit code 2.
    Raised anywhere below a command; ``report_user_errors`` prints it (no traceback)."""


def report_user_errors(app: typer.Typer) -> typer.Typer:
    """Every command of ``app`` and of its groups prints a ``UserError`` as one line and exits 2:
    the one way user errors reach the terminal, in ``safeswap`` and in any app a module's
    ``register`` adds its commands to."""
    for info in app.registered_commands:
        if info.callback is not None and not hasattr(info.callback, "__wrapped__"):
            info.callback = _reporting(info.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            report_user_errors(group.typer_instance)
    return app


def _reporting(command: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(command)  # typer reads the options from the wrapped signature
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            print_error(exc)
            raise typer.Exit(2) from None
        except ValueError as exc:  # a broken file in the data folder, from any command that reads it
            from sinks.read import UnreadableFile

            if not isinstance(exc, UnreadableFile):
                raise
            print_error(exc)
            raise typer.Exit(2) from None

    return run


def print_error(exc: Exception) -> None:
    """``error: <line>`` for each line of the message, which is printed as it is (a path or a
    value in square brackets is not taken for console markup)."""
    for line in str(exc).splitlines() or [""]:
        err.print(Text.assemble(("error:", "red"), " ", line), highlight=False)


def settings_from(broker: str | None = None, **overrides) -> Settings:
    from streams.kafka import client_options

    try:
        settings = Settings.from_env(broker=broker, **overrides)
        client_options(settings)  # a security misconfiguration is a user error, said before any connection
    except (ValueError, OSError) as exc:
        raise UserError(str(exc)) from None
    return settings
