"""The ``safeswap`` command line.

User errors print one line (``error: <file>: <field>: <reason> (fix: ...)``) and
exit non-zero; a traceback means a bug in safeswap.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from streams.settings import Settings

app = typer.Typer(
    name="safeswap",
    help="Ship LLM prompt changes and model bumps like risky migrations.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
topics_app = typer.Typer(help="Kafka topics safeswap reads and writes.", no_args_is_help=True)
schema_app = typer.Typer(help="Wire contracts: JSON Schemas for emitters in other languages.", no_args_is_help=True)
plan_app = typer.Typer(help="Rollout plans: size them, validate them.", no_args_is_help=True)
app.add_typer(schema_app, name="schema")
app.add_typer(topics_app, name="topics")
app.add_typer(plan_app, name="plan")

err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the width

BrokerOption = Annotated[
    Optional[str],
    typer.Option("--broker", help="Kafka bootstrap host:port (env SAFESWAP_BROKER); empty: the embedded broker."),
]


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def settings_from(broker: str | None = None, **overrides) -> Settings:
    try:
        return Settings.from_env(broker=broker, **overrides)
    except ValueError as exc:
        raise UserError(str(exc)) from None


@app.command()
def demo(
    broker: BrokerOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on the last line.")] = False,
    users: Annotated[int, typer.Option(help="Simulated users at most.", min=100)] = 20_000,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.", min=5)] = 85.0,
    data: Annotated[Optional[str], typer.Option("--data", help="Parquet dataset folder (env SAFESWAP_DATA_DIR).")] = None,
) -> None:
    """Run the whole loop on the embedded broker: events in, rollback decision out."""
    from safeswap.demo import run_demo

    result = run_demo(settings_from(broker), max_users=users, timeout_s=timeout, json_out=json_out, data_dir=data)
    if json_out:
        print(json.dumps(result))
    if result["action"] != "rollback":
        raise typer.Exit(1)


@app.command()
def worker(
    broker: BrokerOption = None,
    log_level: Annotated[Optional[str], typer.Option(help="crit|error|warn|info|debug")] = None,
) -> None:
    """Run the stream worker (Faust): outcomes, statistics and decide agents."""
    from streams.worker import run_worker

    settings = settings_from(broker, log_level=log_level)
    if not settings.broker:
        raise UserError("no broker: set SAFESWAP_BROKER=host:port or pass --broker (the worker does not start one)")
    if settings.log_level not in ("crit", "error", "warn", "info", "debug"):
        raise UserError(f"--log-level {settings.log_level!r}: use one of crit|error|warn|info|debug")
    run_worker(settings)


@topics_app.command("create")
def topics_create(broker: BrokerOption = None) -> None:
    """Create every safeswap topic that is missing (compacted where it must be)."""
    import asyncio

    from streams.worker import ensure_topics_with_retry

    settings = settings_from(broker)
    if not settings.broker:
        raise UserError("no broker: set SAFESWAP_BROKER=host:port or pass --broker")
    try:
        asyncio.run(ensure_topics_with_retry(settings))
    except ConnectionError as exc:
        raise UserError(str(exc)) from None
    err.print(f"topics ready on {settings.broker} (prefix {settings.topic_prefix})")


@schema_app.command("export")
def schema_export(directory: Annotated[Path, typer.Argument(help="Folder to write <type>.schema.json files into.")]) -> None:
    """Write one JSON Schema per event type into DIRECTORY."""
    from schemas import json_schemas

    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, schema in json_schemas().items():
            (directory / f"{name}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"{directory}: cannot write schemas: {exc.strerror}") from None
    err.print(f"wrote {len(json_schemas())} schemas to {directory}")


def _register_extensions() -> None:
    __import__("safeswap.replay").replay.register(app)
    try:
        from safeswap.stats import cli as stats_cli
    except ImportError:
        return
    stats_cli.register(app, plan_app)
    __import__("sinks.cli").cli.register(app)  # safeswap query, safeswap compact


_register_extensions()


def main() -> None:
    try:
        app(standalone_mode=True)
    except UserError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
