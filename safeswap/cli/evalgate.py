"""``safeswap eval-gate``: the offline eval gate (safeswap.core.evalgate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from safeswap.cli.common import UserError
from safeswap.core.evalgate import GateInputError, run_gate


def register(app) -> None:
    @app.command("eval-gate")
    def eval_gate(
        baseline: Annotated[Path, typer.Option("--baseline", help="Baseline results, JSONL: case_id + passed|score.")],
        candidate: Annotated[Path, typer.Option("--candidate", help="Candidate results, same form.")],
        stakes: Annotated[str, typer.Option("--stakes", help="high: no case may regress; low: net gain rule.")],
        min_net_gain: Annotated[
            int, typer.Option("--min-net-gain", help="Low stakes: gained - lost must reach this when a case is lost.")
        ] = 1,
        pass_threshold: Annotated[
            float | None,
            typer.Option(
                "--pass-threshold", help="A numeric score passes when >= this (default: compare each case's scores)."
            ),
        ] = None,
        score_tolerance: Annotated[
            float,
            typer.Option(
                "--score-tolerance",
                min=0,
                help="Scores without --pass-threshold: a case regresses when the candidate scores lower than the baseline by more than this.",
            ),
        ] = 0.0,
        json_out: Annotated[
            bool, typer.Option("--json", help="Print the result as one JSON object on the last line.")
        ] = False,
    ) -> None:
        """Offline eval gate: exit 0 pass, 1 fail, 2 unusable input."""
        from rich.console import Console

        err = Console(stderr=True, soft_wrap=True)
        if stakes not in ("high", "low"):
            raise UserError(f"--stakes {stakes!r}: use high or low")
        try:
            result = run_gate(baseline, candidate, stakes, min_net_gain, pass_threshold, score_tolerance)
        except GateInputError as exc:
            raise UserError(str(exc)) from None
        verdict = "PASS" if result["passed"] else "FAIL"
        err.print(
            f"eval gate {verdict} ({stakes} stakes, {result['common']} cases in common): {result['reason']}",
            highlight=False,
            markup=False,
        )
        for label, key in (
            ("lost", "lost"),
            ("gained", "gained"),
            ("only in baseline", "only_in_baseline"),
            ("only in candidate", "only_in_candidate"),
        ):
            count = result.get(f"{key}_count", len(result[key]))
            if count:
                shown = ", ".join(result[key][:20]) + (" ..." if count > 20 else "")
                err.print(f"  {label} ({count}): {shown}", highlight=False, markup=False)
        if json_out:
            print(json.dumps(result))
        if not result["passed"]:
            raise typer.Exit(1)
