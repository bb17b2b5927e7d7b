"""``safeswap replay``: the outcomes logic offline (safeswap.tools.replay)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from safeswap.core.outcomes import OutcomeConfig
from safeswap.tools.replay import DecisionReplay, replay_lines, result_table, short_values
from streams.settings import Settings


def register(app: typer.Typer) -> None:
    @app.command()
    def replay(
        events: Annotated[Path, typer.Argument(help="JSONL file: one trace or feedback event per line, field `type`.")],
        plan: Annotated[Path | None, typer.Option("--plan", help="Rollout plan (YAML/JSON) to evaluate.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on the last line.")] = False,
        partitions: Annotated[
            int | None, typer.Option(help="Partitions to route users to (default: settings).", min=1)
        ] = None,
    ) -> None:
        """Compute the outcome metrics of a JSONL file of events offline (no Kafka)."""
        from rich.console import Console

        from safeswap.cli.common import UserError

        try:
            settings = Settings.from_env()
        except ValueError as exc:
            raise UserError(str(exc)) from None
        err = Console(stderr=True, emoji=False)  # ":100:" in "file:100: ..." is not an emoji
        try:
            handle = events.open("rb")
        except OSError as exc:
            raise UserError(
                f"{events}: cannot read the events file: {exc.strerror} "
                "(fix: pass a JSONL file with one trace or feedback event per line)"
            ) from None

        def report(line_no: Any, reason: str) -> None:  # every rejected line, however many
            err.print(
                f"{events}:{line_no}: skipped: {short_values(reason)}", highlight=False, markup=False, soft_wrap=True
            )

        controller = None
        pinned = None
        if plan is not None:
            from safeswap.core.plan import load_plan

            loaded = load_plan(plan)
            for line in loaded.lines():
                err.print(line, highlight=False, markup=False, soft_wrap=True)
            if not loaded.ok:
                raise typer.Exit(2)
            controller = DecisionReplay(loaded.plan)
            pinned = (
                loaded.plan.rollout_id,
                {"control": loaded.plan.control.model, "candidate": loaded.plan.candidate.model},
            )
        with handle:
            result = replay_lines(
                handle,
                OutcomeConfig.from_settings(settings),
                partitions or settings.partitions,
                report=report,
                look=controller.look if controller else None,
                pinned=pinned,
                on_recorded_decision=controller.recorded if controller else None,
                decisions=list(controller.decisions) if controller else (),
            )
        if controller is not None:
            result["plan"] = controller.summary()
            from safeswap.tools.views import decision_line

            for decision in controller.decisions:
                err.print(decision_line(decision), highlight=False, markup=False, soft_wrap=True)
            for guardrail in result["plan"]["guardrails"]:  # where the rollout stands, guardrail by guardrail
                err.print(
                    f"guardrail {guardrail['status']}: {guardrail['reason']}",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )
        if json_out:
            sys.stdout.write(json.dumps(result) + "\n")
        else:
            Console().print(result_table(result))
