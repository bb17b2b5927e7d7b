"""The offline eval gate: does the candidate keep what the baseline passed?

``safeswap eval-gate --baseline BASE.jsonl --candidate CAND.jsonl --stakes high|low``

Input: one JSON object per line, ``{"case_id": ..., "passed": true|false}`` or
``{"case_id": ..., "score": 0.83}``. A score passes when it is at least
``--pass-threshold`` (required as soon as a line has a score and no ``passed``).
``case_id`` may be a string or an integer (compared as text). A duplicate
case_id, a line that is not a JSON object, or a missing field makes the input
unusable (exit 2, naming the file, the line and the reason).

Rules, on the cases present in both files:

- high stakes: every case that passed on the baseline must pass on the
  candidate (strict no-regression); the lost cases are listed.
- low stakes: losses are allowed when ``gained - lost >= --min-net-gain``
  (default 1); without any loss the gate passes. Lost and gained cases (the
  swaps) are listed.

Cases present on one side only are reported (``only_in_baseline``,
``only_in_candidate``) and take no part in the rule: nothing is guessed about
them. No case in common fails the gate.

Exit codes: 0 pass, 1 fail, 2 unusable input. ``--json`` prints the result as
one JSON object on the last line, with ``passed`` and ``hash`` (the sha256 of
the canonical JSON of the result without ``hash``), the form
``safeswap rollout start PLAN --eval-gate FILE`` attaches to the plan; a
high-stakes plan does not leave ``registered`` without ``passed: true``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

MAX_LISTED = 200  # lost/gained/only-in lists are cut to this many ids (counts stay exact)


class GateInputError(ValueError):
    """Unusable eval input: the message names the file, the line and the reason."""


def load_results(path: Path, pass_threshold: float | None) -> dict[str, bool]:
    """case_id -> passed, from a JSONL file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise GateInputError(f"{path}: cannot read: {exc.strerror}") from None
    results: dict[str, bool] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise GateInputError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise GateInputError(f"{where}: expected a JSON object like {{\"case_id\": \"c1\", \"passed\": true}}")
        case_id = record.get("case_id")
        if isinstance(case_id, bool) or not isinstance(case_id, (str, int)) or str(case_id) == "":
            raise GateInputError(f"{where}: case_id missing or not a string/integer")
        case_id = str(case_id)
        if case_id in results:
            raise GateInputError(f"{where}: duplicate case_id {case_id!r}")
        if "passed" in record:
            if not isinstance(record["passed"], bool):
                raise GateInputError(f"{where}: passed must be true or false, got {record['passed']!r}")
            results[case_id] = record["passed"]
        elif "score" in record:
            score = record["score"]
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise GateInputError(f"{where}: score must be a finite number, got {score!r}")
            if pass_threshold is None:
                raise GateInputError(f"{where}: a score needs --pass-threshold (a case passes when score >= it)")
            results[case_id] = score >= pass_threshold
        else:
            raise GateInputError(f"{where}: give \"passed\" (true/false) or a numeric \"score\"")
    if not results:
        raise GateInputError(f"{path}: no cases")
    return results


def gate(baseline: dict[str, bool], candidate: dict[str, bool], stakes: str, min_net_gain: int = 1) -> dict[str, Any]:
    """The gate's result (without files and hash): pure."""
    if stakes not in ("high", "low"):
        raise ValueError(f"stakes must be high or low, got {stakes!r}")
    common = sorted(set(baseline) & set(candidate))
    lost = [case for case in common if baseline[case] and not candidate[case]]
    gained = [case for case in common if candidate[case] and not baseline[case]]
    net = len(gained) - len(lost)
    if not common:
        passed, reason = False, "no case in common between baseline and candidate"
    elif stakes == "high":
        passed = not lost
        reason = ("no regression: every case the baseline passed still passes" if passed
                  else f"high stakes: {len(lost)} case(s) the baseline passed now fail")
    else:
        passed = not lost or net >= min_net_gain
        reason = (f"net change {net:+d} (gained {len(gained)}, lost {len(lost)}); "
                  f"{'at least' if passed else 'below'} --min-net-gain {min_net_gain}" if lost
                  else f"no case lost (gained {len(gained)})")
    only_baseline = sorted(set(baseline) - set(candidate))
    only_candidate = sorted(set(candidate) - set(baseline))
    return {
        "passed": passed,
        "stakes": stakes,
        "reason": reason,
        "common": len(common),
        "baseline_pass_rate": sum(baseline[c] for c in common) / len(common) if common else None,
        "candidate_pass_rate": sum(candidate[c] for c in common) / len(common) if common else None,
        "lost_count": len(lost),
        "gained_count": len(gained),
        "net_gain": net,
        "min_net_gain": min_net_gain if stakes == "low" else None,
        "lost": lost[:MAX_LISTED],
        "gained": gained[:MAX_LISTED],
        "only_in_baseline_count": len(only_baseline),
        "only_in_candidate_count": len(only_candidate),
        "only_in_baseline": only_baseline[:MAX_LISTED],
        "only_in_candidate": only_candidate[:MAX_LISTED],
    }


def result_hash(result: dict[str, Any]) -> str:
    body = {k: v for k, v in result.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_gate(baseline_path: Path, candidate_path: Path, stakes: str, min_net_gain: int = 1,
             pass_threshold: float | None = None) -> dict[str, Any]:
    """Load both files, apply the rule, attach file digests and the result hash."""
    baseline = load_results(baseline_path, pass_threshold)
    candidate = load_results(candidate_path, pass_threshold)
    result = gate(baseline, candidate, stakes, min_net_gain)
    result["pass_threshold"] = pass_threshold
    result["baseline"] = {"file": str(baseline_path), "sha256": file_sha256(baseline_path), "cases": len(baseline)}
    result["candidate"] = {"file": str(candidate_path), "sha256": file_sha256(candidate_path), "cases": len(candidate)}
    result["hash"] = result_hash(result)
    return result


def register(app) -> None:
    @app.command("eval-gate")
    def eval_gate(
        baseline: Annotated[Path, typer.Option("--baseline", help="Baseline results, JSONL: case_id + passed|score.")],
        candidate: Annotated[Path, typer.Option("--candidate", help="Candidate results, same form.")],
        stakes: Annotated[str, typer.Option("--stakes", help="high: no case may regress; low: net gain rule.")],
        min_net_gain: Annotated[int, typer.Option("--min-net-gain", help="Low stakes: gained - lost must reach this when a case is lost.")] = 1,
        pass_threshold: Annotated[Optional[float], typer.Option("--pass-threshold", help="A numeric score passes when >= this.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on the last line.")] = False,
    ) -> None:
        """Offline eval gate: exit 0 pass, 1 fail, 2 unusable input."""
        from rich.console import Console

        err = Console(stderr=True, soft_wrap=True)
        if stakes not in ("high", "low"):
            err.print(f"error: --stakes {stakes!r}: use high or low", highlight=False, markup=False)
            raise typer.Exit(2)
        try:
            result = run_gate(baseline, candidate, stakes, min_net_gain, pass_threshold)
        except GateInputError as exc:
            err.print(f"error: {exc}", highlight=False, markup=False)
            raise typer.Exit(2) from None
        verdict = "PASS" if result["passed"] else "FAIL"
        err.print(f"eval gate {verdict} ({stakes} stakes, {result['common']} cases in common): {result['reason']}",
                  highlight=False, markup=False)
        for label, key in (("lost", "lost"), ("gained", "gained"), ("only in baseline", "only_in_baseline"),
                           ("only in candidate", "only_in_candidate")):
            count = result.get(f"{key}_count", len(result[key]))
            if count:
                shown = ", ".join(result[key][:20]) + (" ..." if count > 20 else "")
                err.print(f"  {label} ({count}): {shown}", highlight=False, markup=False)
        if json_out:
            print(json.dumps(result))
        if not result["passed"]:
            raise typer.Exit(1)
