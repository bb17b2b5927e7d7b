"""The ``safeswap`` command line: the core commands here, the others in this package's
modules (each a ``register(app)``); nothing outside this package imports it.

User errors print one line (``error: <file>: <field>: <reason> (fix: ...)``) and
exit non-zero; a traceback means a bug in safeswap.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from safeswap.cli import bench, dashboard, data, evalgate, judge, replay, stats
from safeswap.cli.common import (
    NO_BROKER,
    BrokerOption,
    OwnBrokerOption,
    UserError,
    err,
    report_user_errors,
    settings_from,
)
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
rollout_app = typer.Typer(help="Start and steer rollouts; see what the controller sees.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")
app.add_typer(plan_app, name="plan")


@app.command()
def demo(
    broker: OwnBrokerOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on the last line.")] = False,
    users: Annotated[int, typer.Option(help="Simulated users at most.", min=100)] = 20_000,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.", min=5)] = 85.0,
    data: Annotated[str | None, typer.Option("--data", help="Parquet dataset folder (env SAFESWAP_DATA_DIR).")] = None,
    otlp: Annotated[
        bool,
        typer.Option(
            "--otlp",
            help="The app speaks only OpenTelemetry and OpenFeature: spans in the Collector's Kafka "
            "format, read by the worker's OTLP agent (pip install 'safeswap[otlp]').",
        ),
    ] = False,
) -> None:
    """Run the whole loop on the embedded broker: events in, rollback decision out."""
    from safeswap.tools.demo import run_demo

    if otlp:
        try:
            import openfeature.contrib.hook.opentelemetry  # noqa: F401
            import opentelemetry.exporter.otlp.proto.common
            import opentelemetry.sdk  # noqa: F401
        except ImportError as exc:
            raise UserError(
                f"--otlp needs the OpenTelemetry SDK ({exc.name} is missing): pip install 'safeswap[otlp]'"
            ) from None
    from streams.broker import BrokerError
    from streams.process import WorkerExited
    from streams.topics import TopicCreationError

    settings = settings_from(broker)
    try:
        result = run_demo(settings, max_users=users, timeout_s=timeout, json_out=json_out, data_dir=data, otlp=otlp)
    except (ConnectionError, TopicCreationError, BrokerError, WorkerExited) as exc:
        raise UserError(str(exc)) from None
    if json_out:
        print(json.dumps(result))
    if result["action"] != "rollback":
        raise typer.Exit(1)


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="Loopback port of the embedded broker.", min=1, max=65535)] = 9092,
    data: Annotated[str | None, typer.Option("--data", help="Parquet dataset folder (env SAFESWAP_DATA_DIR).")] = None,
) -> None:
    """Run a local stack without Docker until Ctrl-C: the embedded broker on 127.0.0.1:PORT, the
    topics and a worker; prints the SAFESWAP_BROKER to export for every other command."""
    from safeswap.tools.dev import PortInUse, run_dev
    from streams.broker import BrokerError
    from streams.topics import TopicCreationError

    settings = settings_from(None)
    if data:
        settings = settings.replace(data_dir=data)
    try:
        code = run_dev(settings, port, Console(soft_wrap=True))
    except (PortInUse, BrokerError, ConnectionError, TopicCreationError) as exc:
        raise UserError(str(exc)) from None
    if code:
        raise typer.Exit(code)


@app.command()
def worker(
    broker: BrokerOption = None,
    log_level: Annotated[str | None, typer.Option(help="crit|error|warn|info|debug")] = None,
) -> None:
    """Run the stream worker (Faust): outcomes, statistics and decide agents."""
    from agents.worker import run_worker

    settings = settings_from(broker, log_level=log_level)
    if not settings.broker:
        raise UserError(NO_BROKER)
    if settings.log_level not in ("crit", "error", "warn", "info", "debug"):
        raise UserError(f"--log-level {settings.log_level!r}: use one of crit|error|warn|info|debug")
    from streams.topics import TopicCreationError

    try:
        run_worker(settings)
    except (ConnectionError, TopicCreationError) as exc:
        raise UserError(str(exc)) from None


@topics_app.command("create")
def topics_create(broker: BrokerOption = None) -> None:
    """Create every safeswap topic that is missing (compacted where it must be)."""
    import asyncio

    from streams.topics import TopicCreationError
    from streams.worker import ensure_topics_with_retry

    settings = settings_from(broker)
    if not settings.broker:
        raise UserError(NO_BROKER)
    try:
        asyncio.run(ensure_topics_with_retry(settings))
    except (ConnectionError, TopicCreationError) as exc:
        raise UserError(str(exc)) from None
    err.print(f"topics ready on {settings.broker} (prefix {settings.topic_prefix})")


@schema_app.command("export")
def schema_export(
    directory: Annotated[Path, typer.Argument(help="Folder to write <type>.schema.json files into.")],
) -> None:
    """Write one JSON Schema per event type into DIRECTORY."""
    from schemas import json_schemas

    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, schema in json_schemas().items():
            (directory / f"{name}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"{directory}: cannot write schemas: {exc.strerror}") from None
    err.print(f"wrote {len(json_schemas())} schemas to {directory}")


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on the last line.")]
WaitOption = Annotated[float, typer.Option("--wait", help="Seconds to wait for the controller's answer.", min=0)]


def _load_plan(path: Path, eval_gate: Path | None = None):
    from safeswap.core.plan import load_plan

    report = load_plan(path)
    if report.plan is not None and eval_gate is not None:
        report.plan.eval_gate = _read_gate(eval_gate)
    for line in report.lines():
        err.print(line, highlight=False, markup=False)
    return report


def _plan_or_exit(path: Path, eval_gate: Path | None = None):
    """The plan, after printing its errors and warnings; exit 2 if it is refused."""
    report = _load_plan(path, eval_gate)
    if not report.ok:
        raise typer.Exit(2)
    return report.plan


def _read_gate(path: Path) -> dict:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        gate = json.loads(lines[-1])
    except (OSError, IndexError, ValueError) as exc:
        raise UserError(
            f"{path}: not an eval-gate result ({exc}); use the JSON line of `safeswap eval-gate --json`"
        ) from None
    if not isinstance(gate, dict) or "passed" not in gate:
        raise UserError(f"{path}: no 'passed' field; use the JSON line of `safeswap eval-gate --json`")
    return gate


@plan_app.command("validate")
def plan_validate(
    plan: Annotated[Path, typer.Argument(help="Plan file (YAML or JSON).")],
    json_out: JsonOption = False,
) -> None:
    """Check a rollout plan: errors refuse it (exit 2), warnings explain risks."""
    report = _load_plan(plan)
    if json_out:
        print(json.dumps(report.to_dict()))
    elif report.ok:
        err.print(
            f"ok: {report.plan.rollout_id} ({len(report.plan.stages)} stages, "
            f"{len(report.plan.guardrails)} guardrails, {len(report.warnings)} warnings)"
        )
    if not report.ok:
        raise typer.Exit(2)


def _run(coroutine):
    import asyncio

    from safeswap.tools.rollouts import RolloutError

    try:
        return asyncio.run(coroutine)
    except RolloutError as exc:
        raise UserError(str(exc)) from None


def _broker_or_fail(broker: str | None) -> Settings:
    settings = settings_from(broker)
    if not settings.broker:
        raise UserError(NO_BROKER)
    return settings


@rollout_app.command("start")
def rollout_start(
    plan: Annotated[Path, typer.Argument(help="Plan file (YAML or JSON).")],
    broker: BrokerOption = None,
    eval_gate: Annotated[
        Path | None, typer.Option("--eval-gate", help="`safeswap eval-gate --json` output to attach.")
    ] = None,
    wait: WaitOption = 15.0,
    json_out: JsonOption = False,
) -> None:
    """Validate and publish a plan; the plan is hashed and immutable from now on (a high-stakes
    plan needs --eval-gate with a passing `safeswap eval-gate --stakes high --json` result)."""
    from safeswap.core.evalgate import gate_problem
    from safeswap.tools.rollouts import start_rollout

    the_plan = _plan_or_exit(plan, eval_gate)
    gate = the_plan.eval_gate
    if isinstance(gate, dict) and gate.get("assumed_by"):
        raise UserError(
            f"{eval_gate or plan}: rollout {the_plan.rollout_id!r}: eval_gate was assumed by "
            f"{gate['assumed_by']} for a rehearsal; attach a real result (safeswap eval-gate --json)"
        )
    if the_plan.stakes == "high" and (problem := gate_problem(gate)) is not None:
        raise UserError(
            f"{eval_gate or plan}: high-stakes plan {the_plan.rollout_id!r} would wait in registered: {problem}"
        )
    outcome, decision = _run(start_rollout(_broker_or_fail(broker), the_plan, wait))
    _print_decision_result(the_plan.rollout_id, outcome, decision, json_out, wait)


def _print_decision_result(rollout_id: str, outcome: str, decision, json_out: bool, wait: float) -> None:
    from safeswap.tools.views import decision_line

    if decision is None:
        err.print(
            f"{rollout_id}: {outcome}; no decision from a worker within {wait:g} s: is `safeswap worker` running?"
        )
    else:
        err.print(f"{rollout_id}: {outcome}; {decision_line(decision)}", highlight=False)
    if json_out:
        import msgspec

        print(
            json.dumps(
                {
                    "rollout_id": rollout_id,
                    "outcome": outcome,
                    "decision": msgspec.to_builtins(decision) if decision else None,
                }
            )
        )


def _command(command: str, rollout_id: str, reason: str, broker: str | None, wait: float, json_out: bool) -> None:
    from safeswap.tools.rollouts import command_rollout

    decision = _run(command_rollout(_broker_or_fail(broker), rollout_id, command, reason, wait))
    _print_decision_result(rollout_id, f"{command} sent", decision, json_out, wait)


ReasonOption = Annotated[str, typer.Option("--reason", help="Why: recorded in the decision.")]


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: str,
    reason: ReasonOption = "",
    broker: BrokerOption = None,
    wait: WaitOption = 15.0,
    json_out: JsonOption = False,
) -> None:
    """Hold the current split until resumed."""
    _command("pause", rollout_id, reason, broker, wait, json_out)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: str,
    reason: ReasonOption = "",
    broker: BrokerOption = None,
    wait: WaitOption = 15.0,
    json_out: JsonOption = False,
) -> None:
    """Continue a paused rollout where it stopped."""
    _command("resume", rollout_id, reason, broker, wait, json_out)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: str,
    reason: ReasonOption = "",
    broker: BrokerOption = None,
    wait: WaitOption = 15.0,
    json_out: JsonOption = False,
) -> None:
    """Roll back now: control for everyone."""
    _command("abort", rollout_id, reason, broker, wait, json_out)


@rollout_app.command("status")
def rollout_status(rollout_id: str, broker: BrokerOption = None, json_out: JsonOption = False) -> None:
    """Stage, split, time and users left, each guardrail's interval, the last decision."""
    import msgspec
    from rich.console import Console

    from safeswap.tools.rollouts import rollout_states
    from safeswap.tools.views import status_view

    decisions, statuses = _run(rollout_states(_broker_or_fail(broker)))
    decision, status = decisions.get(rollout_id), statuses.get(rollout_id)
    if decision is None and status is None:
        raise UserError(f"no rollout {rollout_id!r}: `safeswap rollout list` shows the known ones")
    console = Console(stderr=json_out)
    for renderable in status_view(status, decision):
        console.print(renderable)
    if json_out:
        print(
            json.dumps(
                {
                    "rollout_id": rollout_id,
                    "status": msgspec.to_builtins(status) if status else None,
                    "decision": msgspec.to_builtins(decision) if decision else None,
                }
            )
        )


@rollout_app.command("list")
def rollout_list(broker: BrokerOption = None, json_out: JsonOption = False) -> None:
    """Every rollout the controller knows, with its stage and last action."""
    import msgspec
    from rich.console import Console

    from safeswap.tools.rollouts import rollout_states
    from safeswap.tools.views import rollout_list_table

    decisions, _ = _run(rollout_states(_broker_or_fail(broker)))
    Console(stderr=json_out).print(rollout_list_table(decisions))
    if json_out:
        print(json.dumps({"rollouts": [msgspec.to_builtins(d) for _, d in sorted(decisions.items())]}))


@app.command()
def simulate(
    plan: Annotated[Path, typer.Option("--plan", help="Rollout plan (YAML/JSON).")],
    scenario: Annotated[
        Path, typer.Option("--scenario", help="Traffic scenario (YAML/JSON): docs/rollouts.md, Rehearsing.")
    ],
    broker: OwnBrokerOption = None,
    data: Annotated[str | None, typer.Option("--data", help="Parquet dataset folder (env SAFESWAP_DATA_DIR).")] = None,
    eval_gate: Annotated[Path | None, typer.Option("--eval-gate", help="`safeswap eval-gate --json` output.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Rehearse a plan: simulated users, a real worker and flag client, days of traffic in about a minute."""
    import msgspec
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from safeswap.tools.simulate import ScenarioError, load_scenario, run_simulation
    from safeswap.tools.views import decision_line

    the_plan = _plan_or_exit(plan, eval_gate)
    try:
        loaded = load_scenario(str(scenario))
    except ScenarioError as exc:
        raise UserError(str(exc)) from None
    if the_plan.stakes == "high" and the_plan.eval_gate is None:
        from safeswap.core.evalgate import assumed_gate

        err.print("note: rehearsal assumes the offline eval gate passed (give --eval-gate to use a real result)")
        the_plan.eval_gate = assumed_gate("simulate")
    settings = settings_from(broker, data_dir=data)
    console = Console(stderr=json_out)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("simulating", total=1.0, detail="starting broker and worker...")

        def progress(done_ms: int, total_ms: int, sent: int, decision) -> None:
            where = f"{decision.stage} {decision.percent:g}%" if decision else "registered"
            bar.update(
                task,
                completed=done_ms / total_ms,
                detail=f"{done_ms / 3_600_000:.0f} h simulated, {sent:,} events, {where}",
            )

        try:
            result = run_simulation(settings, the_plan, loaded, progress=progress)
        except (RuntimeError, ConnectionError) as exc:
            raise UserError(str(exc)) from None
    for decision in result["decisions"]:
        console.print(decision_line(decision), highlight=False)
    status = result["status"]
    rows = result["rows"]  # counted by run_simulation once every event is on disk (None: a remote worker's)
    state = {
        "stage": status.stage if status else None,
        "percent": status.percent if status else None,
        "users": status.users if status else {},
        "guardrails": [msgspec.to_builtins(g) for g in status.guardrails] if status else [],
        "health": status.health if status else {},
        "shadow": status.shadow if status else {},  # the shadow analysis: pairs, judge, checks
        "live_judge": status.live_judge if status else {},  # live judge scores: monitored only
    }
    if json_out:
        print(
            json.dumps(
                {
                    "rollout_id": result["rollout_id"],
                    "decisions": [
                        {
                            "seq": d.seq,
                            "ts": d.ts,
                            "action": d.action,
                            "stage": d.stage,
                            "percent": d.percent,
                            "reason": d.reason,
                        }
                        for d in result["decisions"]
                    ],
                    "state": state,
                    "events_sent": result["events_sent"],
                    "shadow_pairs_sent": result["shadow_pairs_sent"],
                    "simulated_hours": result["simulated_hours"],
                    "seconds": result["seconds"],
                    "data_dir": result["data_dir"],
                    "rows": rows,
                }
            )
        )


replay.register(app)  # safeswap replay
stats.register(app, plan_app)  # safeswap plan size, validate-stats
data.register(app)  # safeswap query, safeswap compact
dashboard.register(app)  # safeswap dashboard
bench.register(app)  # safeswap bench (docs/performance.md)
evalgate.register(app)  # safeswap eval-gate (docs/shadow.md)
judge.register(app)  # safeswap judge (docs/shadow.md)
report_user_errors(app)


def main() -> None:
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
