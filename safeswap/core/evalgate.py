"""The offline eval gate: does the candidate keep what the baseline passed?

``safeswap eval-gate --baseline BASE.jsonl --candidate CAND.jsonl --stakes high|low``

Input: one JSON object per line, ``{"case_id": ..., "passed": true|false}`` or
``{"case_id": ..., "score": 0.83}``. Scores are compared case by case: a case
is lost when the candidate scores lower than the baseline by more than
``--score-tolerance`` (default 0), gained when higher by more than it. With
``--pass-threshold`` a score instead passes when it is at least the threshold.
``case_id`` may be a string or an integer (compared as text). A duplicate
case_id, a line that is not UTF-8 or not a JSON object, a missing field, or a
case with ``passed`` on one side and a score on the other (without
``--pass-threshold``) makes the input unusable (exit 2, naming the file, the
line and the reason).

Rules, on the cases present in both files:

- high stakes: every case that passed on the baseline must pass on the
  candidate, and no score may drop beyond the tolerance (strict
  no-regression); the lost cases are listed.
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
high-stakes plan does not leave ``registered`` without an attached result that
passed, ran with ``--stakes high``, lost no case and whose hash recomputes
(:func:`gate_problem`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAX_LISTED = 200  # lost/gained/only-in lists are cut to this many ids (counts stay exact)


class GateInputError(ValueError):
    """Unusable eval input: the message names the file, the line and the reason."""


def jsonl_lines(path: Path) -> Iterator[tuple[str, str | None, str | None]]:
    """``(where, text, problem)`` for each non-blank line of a JSONL file, ``where`` = ``file:line``.

    The one way safeswap reads JSONL input (the eval gate, ``safeswap judge``):
    split the bytes on ``\\n`` only, because ``str.splitlines`` also splits on
    U+2028, U+2029 and U+0085, which JSON strings may hold raw (our own encoder
    writes U+2028 raw). A line that is not UTF-8 gives ``text=None`` and the
    problem instead of an exception. OSError (a missing file) is the caller's.
    """
    data = Path(path).read_bytes()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield where, None, f"not UTF-8 ({exc.reason} at byte {exc.start + 1} of the line): save the file as UTF-8"
            continue
        if text.strip():
            yield where, text, None


def parse_json(text: str) -> tuple[Any, str | None]:
    """``(value, None)`` or ``(None, why it is not JSON)``; never raises (deep nesting included)."""
    try:
        return json.loads(text), None
    except ValueError as exc:
        return None, f"not JSON ({getattr(exc, 'msg', exc)})"
    except RecursionError:
        return None, "not usable JSON (nested too deeply)"


def load_results(path: Path, pass_threshold: float | None = None) -> dict[str, bool | float]:
    """case_id -> passed (bool) or score (float), from a JSONL file; with ``pass_threshold``
    a score becomes ``score >= pass_threshold``."""
    results: dict[str, bool | float] = {}
    for case_id, (passed, score) in load_cases(path).items():
        if passed is None and pass_threshold is not None:
            passed = score >= pass_threshold
        results[case_id] = passed if passed is not None else score
    return results


def load_cases(path: Path) -> dict[str, tuple[bool | None, float | None]]:
    """case_id -> (passed or None, score or None), from a JSONL file."""
    try:
        lines = list(jsonl_lines(path))
    except OSError as exc:
        raise GateInputError(f"{path}: cannot read: {exc.strerror}") from None
    results: dict[str, tuple[bool | None, float | None]] = {}
    for where, line, problem in lines:
        if problem is None:
            record, problem = parse_json(line)
        if problem is not None:
            raise GateInputError(f"{where}: {problem}")
        if not isinstance(record, dict):
            raise GateInputError(f'{where}: expected a JSON object like {{"case_id": "c1", "passed": true}}')
        case_id = record.get("case_id")
        if isinstance(case_id, bool) or not isinstance(case_id, (str, int)) or str(case_id) == "":
            raise GateInputError(f"{where}: case_id missing or not a string/integer")
        case_id = str(case_id)
        if case_id in results:
            raise GateInputError(f"{where}: duplicate case_id {case_id!r}")
        if "passed" in record:
            if not isinstance(record["passed"], bool):
                raise GateInputError(f"{where}: passed must be true or false, got {record['passed']!r}")
            results[case_id] = (record["passed"], None)
        elif "score" in record:
            score = record["score"]
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise GateInputError(f"{where}: score must be a finite number, got {score!r}")
            results[case_id] = (None, float(score))
        else:
            raise GateInputError(f'{where}: give "passed" (true/false) or a numeric "score"')
    if not results:
        raise GateInputError(f"{path}: no cases")
    return results


def regressed(baseline: bool | float, candidate: bool | float, tolerance: float = 0.0) -> tuple[bool, bool]:
    """(lost, gained) for one case: pass/fail flips, or scores apart by more than ``tolerance``."""
    if isinstance(baseline, bool) and isinstance(candidate, bool):
        return baseline and not candidate, candidate and not baseline
    if isinstance(baseline, bool) or isinstance(candidate, bool):
        raise ValueError("a case with passed on one side and a score on the other")
    return candidate < baseline - tolerance, candidate > baseline + tolerance


def gate(
    baseline: dict[str, bool | float],
    candidate: dict[str, bool | float],
    stakes: str,
    min_net_gain: int = 1,
    score_tolerance: float = 0.0,
) -> dict[str, Any]:
    """The gate's result (without files and hash): pure.

    A case is lost when it passed on the baseline and fails on the candidate, or,
    for scores, when the candidate's is lower than the baseline's by more than
    ``score_tolerance`` (gained: the other way round)."""
    if stakes not in ("high", "low"):
        raise ValueError(f"stakes must be high or low, got {stakes!r}")
    common = sorted(set(baseline) & set(candidate))
    flips = {case: regressed(baseline[case], candidate[case], score_tolerance) for case in common}
    lost = [case for case in common if flips[case][0]]
    gained = [case for case in common if flips[case][1]]
    scored = [case for case in common if not isinstance(baseline[case], bool)]
    judged_by_pass = [case for case in common if isinstance(baseline[case], bool)]
    net = len(gained) - len(lost)
    if not common:
        passed, reason = False, "no case in common between baseline and candidate"
    elif stakes == "high":
        passed = not lost
        reason = (
            "no regression: every case the baseline passed still passes"
            if passed
            else f"high stakes: {len(lost)} case(s) the baseline passed now fail"
            + (f" or score lower by more than {score_tolerance:g}" if scored else "")
        )
    else:
        passed = not lost or net >= min_net_gain
        reason = (
            f"net change {net:+d} (gained {len(gained)}, lost {len(lost)}); "
            f"{'at least' if passed else 'below'} --min-net-gain {min_net_gain}"
            if lost
            else f"no case lost (gained {len(gained)})"
        )
    only_baseline = sorted(set(baseline) - set(candidate))
    only_candidate = sorted(set(candidate) - set(baseline))
    return {
        "passed": passed,
        "stakes": stakes,
        "reason": reason,
        "common": len(common),
        "baseline_pass_rate": (
            sum(baseline[c] for c in judged_by_pass) / len(judged_by_pass) if judged_by_pass else None
        ),
        "candidate_pass_rate": (
            sum(candidate[c] for c in judged_by_pass) / len(judged_by_pass) if judged_by_pass else None
        ),
        "scored_count": len(scored),
        "score_tolerance": score_tolerance if scored else None,
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


def run_gate(
    baseline_path: Path,
    candidate_path: Path,
    stakes: str,
    min_net_gain: int = 1,
    pass_threshold: float | None = None,
    score_tolerance: float = 0.0,
) -> dict[str, Any]:
    """Load both files, apply the rule, attach file digests and the result hash."""
    baseline = load_results(baseline_path, pass_threshold)
    candidate = load_results(candidate_path, pass_threshold)
    for case in sorted(set(baseline) & set(candidate)):
        if isinstance(baseline[case], bool) != isinstance(candidate[case], bool):
            raise GateInputError(
                f"{candidate_path}: case {case!r} has a score on one side and passed on the other: "
                "give --pass-threshold to turn scores into pass/fail"
            )
    result = gate(baseline, candidate, stakes, min_net_gain, score_tolerance)
    result["pass_threshold"] = pass_threshold
    result["baseline"] = {"file": str(baseline_path), "sha256": file_sha256(baseline_path), "cases": len(baseline)}
    result["candidate"] = {"file": str(candidate_path), "sha256": file_sha256(candidate_path), "cases": len(candidate)}
    result["hash"] = result_hash(result)
    return result


def gate_problem(result: Any) -> str | None:
    """Why an attached gate result does not let a high-stakes plan leave ``registered``; None when it does.

    The result must be the unedited output of ``safeswap eval-gate --stakes high``
    that passed: its hash recomputes, it is high stakes and lost no case."""
    if not isinstance(result, dict):
        return "no offline eval gate attached (safeswap eval-gate --stakes high --json, then rollout start --eval-gate FILE)"
    if result.get("hash") != result_hash(result):
        return "the attached eval-gate result was edited or hand-written (its hash does not match): attach the output of safeswap eval-gate --json"
    if result.get("stakes") != "high":
        return (
            f"the attached eval gate ran with --stakes {result.get('stakes')!r}: a high-stakes plan needs --stakes high"
        )
    if result.get("passed") is not True:
        return f"the attached eval gate did not pass: {result.get('reason', 'no reason given')}"
    if result.get("lost_count", 0) or result.get("lost"):
        return f"the attached eval gate lost {result.get('lost_count') or len(result['lost'])} case(s): a high-stakes plan allows none"
    return None


def assumed_gate(by: str) -> dict[str, Any]:
    """A passing high-stakes result for rehearsals (simulate, replay) that have no eval set;
    ``rollout start`` refuses it."""
    result: dict[str, Any] = {
        "passed": True,
        "stakes": "high",
        "reason": f"assumed by {by} (a rehearsal)",
        "lost_count": 0,
        "lost": [],
        "assumed_by": by,
    }
    result["hash"] = result_hash(result)
    return result
