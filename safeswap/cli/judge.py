"""``safeswap judge``: judge shadow pairs offline (safeswap.judge)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from safeswap.judge import Judge, JudgeResult, JudgeUnavailable, encode_judgment, judge_pairs, read_pairs, summary
from schemas.events import ShadowPair
from streams.settings import Settings


def register(app) -> None:
    @app.command("judge")
    def judge_command(
        pairs_file: Annotated[
            Path, typer.Argument(help="Shadow pairs, one JSON object per line (the shadow topic's form).")
        ],
        out: Annotated[Path | None, typer.Option("--out", help="Write the judgments here (JSONL).")] = None,
        sample_rate: Annotated[
            float | None,
            typer.Option(
                "--sample-rate", min=0, max=1, help="Share of pairs judged (default SAFESWAP_JUDGE_SAMPLE_RATE)."
            ),
        ] = None,
        json_out: Annotated[
            bool, typer.Option("--json", help="Print the summary as one JSON object on the last line.")
        ] = False,
    ) -> None:
        """Judge a file of shadow pairs with the judge the worker uses (ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL)."""
        from rich.console import Console

        err = Console(stderr=True, soft_wrap=True)

        def fail(message: str) -> None:
            err.print(f"error: {message}", highlight=False, markup=False)
            raise typer.Exit(2)

        try:
            settings = Settings.from_env()
        except ValueError as exc:
            fail(str(exc))
        if not settings.anthropic_api_key:
            fail("ANTHROPIC_API_KEY is not set: the judge needs an Anthropic API key")
        try:
            pairs, problems = read_pairs(pairs_file)
        except OSError as exc:
            fail(f"{pairs_file}: cannot read: {exc.strerror}")
        for problem in problems:
            err.print(f"skipped {problem}", highlight=False, markup=False)
        try:
            judge = Judge(settings, sample_rate=sample_rate)
        except (JudgeUnavailable, ValueError, OSError) as exc:
            fail(str(exc))
        lines: list[str] = []

        def on_result(pair: ShadowPair, result: JudgeResult) -> None:
            if result.judgment is not None:
                lines.append(encode_judgment(result.judgment))
            elif result.status in ("malformed", "error", "budget"):
                err.print(f"{pair.event_id}: {result.status}: {result.reason}", highlight=False, markup=False)

        asyncio.run(judge_pairs(judge, pairs, on_result))
        if out is not None:
            out.write_text("".join(line + "\n" for line in lines))
        result = summary(judge.stats, len(problems))
        err.print(
            f"judged {result['judged']} of {result['pairs']} pairs: {result['candidate_wins']} candidate, "
            f"{result['ties']} tie, {result['control_wins']} control; {result['errors']} errors; "
            f"{result['cost_usd']:.4f} USD ({judge.model})",
            highlight=False,
            markup=False,
        )
        if json_out:
            print(json.dumps(result))
