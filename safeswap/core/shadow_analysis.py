"""Shadow analysis: what shadow pairs and the judge say about the candidate, per rollout.

Pure functions over plain data (docs/shadow.md):

- :class:`ShadowAccumulator` folds shadow pairs and judge results of one
  (rollout, partition) into plain counts and sums (``to_dict()``), which the
  judge agent publishes as the ``shadow`` field of a ``StatsSnapshot`` with
  ``source="shadow:<worker>"``. Counts add up, so :func:`merge` is a sum.
- :func:`analyze` turns the merged counts into the shadow analysis: judge
  win/tie/loss rates and the control preference with always-valid intervals,
  the tail checks (refusal, JSON break, timeout, any error), cost and latency
  (mean and p95), and whether the shadow stage may be promoted.

Derived per side of a pair (never sent by the app):

- refusal: ``error == "refusal"`` or the answer opens like a refusal
  (:data:`REFUSAL_OPENINGS`, first 200 characters, case-insensitive);
- JSON break: the request ``expects_json``, the side answered (no error) and the
  answer (whitespace stripped, one surrounding Markdown code fence allowed) does
  not parse as JSON;
- timeout: ``error == "timeout"``; error: any error other than ``refusal``.

Statistics. The unit is the shadow pair (requests from one user are treated as
independent: with many requests per user the intervals are somewhat too narrow).
Tails, cost and latency compare the two sides with the guardrail monitors of
``safeswap.core.stats`` (always-valid, one-sided); both sides answer the same
requests, so the two-sample variance is conservative. The judge's control
preference is ``(control wins - candidate wins) / judged pairs`` (a tie counts
0), with a one-sample asymptotic confidence sequence (Waudby-Smith et al.). The
alpha of the plan is split (Bonferroni) over the judge and the tail/cost/latency
checks.

Promotion out of shadow (``ready``) needs evidence, not just the absence of a
breach (:func:`stage_rule` gives the stage's numbers and their defaults):

- at least ``min_shadow_pairs`` pairs (default: the plan's ``min_users_per_arm``);
- every enforced check ``ok``: enough pairs on both sides and no breach
  (``not_applicable`` only for JSON breaks when no request expected JSON).
  Tails are always enforced (tolerance from the plan's guardrail on the matching
  outcome metric, else 0: any detected increase); cost and latency when the plan
  guards them. A relative tolerance on a control value of 0 (no refusals yet)
  is undefined, so such a check falls back to an absolute tolerance of 0;
- the judge ``ok``: at least ``min_judged_pairs`` judged pairs (default: the
  plan's ``min_users_per_arm``) and the always-valid upper bound of the control
  preference at or below ``judge_max_control_preference`` (default
  :data:`DEFAULT_JUDGE_MAX_CONTROL_PREFERENCE`). ``min_judged_pairs: 0`` says
  in the plan that no judge runs: then only a judge breach holds the stage.
"""

from __future__ import annotations

import bisect
import math
import re
from typing import Any

from safeswap.core.stats import GuardrailMonitor, LatencyHistogram, Mean, Proportion, split_alpha
from safeswap.core.stats.sequential import cs_halfwidth, sequential_rho

REFUSAL_OPENINGS = re.compile(
    r"^\W*(i'm sorry,? but|i am sorry,? but|sorry,? (but )?i (can't|cannot)|i (can't|cannot|won't|will not|am unable to|"
    r"am not able to|'m unable to|'m not able to) (help|assist|comply|provide|do that|fulfil|fulfill|answer|support)|"
    r"i must decline|as an ai[^.]{0,40}(can't|cannot))",
    re.IGNORECASE,
)
TAILS = ("refusal", "json_break", "timeout", "error")
# The outcome metric whose plan guardrail sets each shadow check's tolerance.
PLAN_METRIC = {
    "refusal": "error_rate_refusal",
    "json_break": "error_rate_parse_error",
    "timeout": "error_rate_timeout",
    "error": "error_rate",
    "cost_usd_mean": "cost_usd_mean",
    "latency_ms_mean": "latency_ms_mean",
    "latency_ms_p95": "latency_ms_p95",
}
# The judge may prefer control by at most this share of judged pairs ((control wins -
# candidate wins) / judged) when the shadow stage does not say: small enough to catch
# a worse candidate, large enough that an equal one is shown within it in a few
# hundred judged pairs (a 20 USD budget buys well over a thousand).
DEFAULT_JUDGE_MAX_CONTROL_PREFERENCE = 0.10
_HIST = LatencyHistogram.empty()
_EDGES = [float(edge) for edge in _HIST.edges]
_SIDE_KEYS = (
    "n",
    "refusal",
    "timeout",
    "error",
    "json_n",
    "json_break",
    "cost_sum",
    "cost_sq",
    "latency_sum",
    "latency_sq",
)
_JUDGE_KEYS = ("judged", "candidate_wins", "control_wins", "ties", "malformed", "errors", "not_judged", "cost_usd")


def is_refusal(side) -> bool:
    if side.error == "refusal":
        return True
    return (
        bool(side.response_text)
        and side.error == "none"
        and REFUSAL_OPENINGS.match(side.response_text[:200]) is not None
    )


def json_broken(side) -> bool:
    """For a side that answered a JSON request: True when the answer is not JSON."""
    import json

    text = (side.response_text or "").strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.S)
    if fenced:
        text = fenced.group(1)
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def _empty_side() -> dict[str, Any]:
    return {**{key: 0 for key in _SIDE_KEYS}, "latency_bins": {}}


class ShadowAccumulator:
    """Counts and sums of one (rollout, partition): pairs folded in, judge results folded in."""

    def __init__(self) -> None:
        self.pairs = 0
        self.ts = 0
        self.sides = {"control": _empty_side(), "candidate": _empty_side()}
        self.judge = {key: 0 for key in _JUDGE_KEYS}
        self.judge["cost_usd"] = 0.0

    def add_pair(self, pair) -> None:
        self.pairs += 1
        self.ts = max(self.ts, pair.ts)
        for name in ("control", "candidate"):
            side, into = getattr(pair, name), self.sides[name]
            into["n"] += 1
            into["refusal"] += is_refusal(side)
            into["timeout"] += side.error == "timeout"
            into["error"] += side.error not in ("none", "refusal")
            if pair.expects_json:
                into["json_n"] += 1
                into["json_break"] += side.error == "none" and json_broken(side)
            into["cost_sum"] += side.cost_usd
            into["cost_sq"] += side.cost_usd * side.cost_usd
            if side.error != "timeout":  # a timeout's latency is the timeout, not the model's
                into["latency_sum"] += side.latency_ms
                into["latency_sq"] += side.latency_ms * side.latency_ms
                index = str(bisect.bisect_right(_EDGES, side.latency_ms))
                into["latency_bins"][index] = into["latency_bins"].get(index, 0) + 1

    def add_judge_result(self, status: str, winner: str | None = None, cost_usd: float = 0.0) -> None:
        """``status``: judged | malformed | error | anything else (not judged: sampling, budget, no answer)."""
        self.judge["cost_usd"] += cost_usd
        if status == "judged":
            self.judge["judged"] += 1
            self.judge[{"candidate": "candidate_wins", "control": "control_wins"}.get(winner or "", "ties")] += 1
        elif status == "malformed":
            self.judge["malformed"] += 1
        elif status == "error":
            self.judge["errors"] += 1
        else:
            self.judge["not_judged"] += 1

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "ts": self.ts, "sides": self.sides, "judge": dict(self.judge)}


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Add the shadow dicts of several snapshots (counts and sums add; ts is the latest)."""
    total: dict[str, Any] = {
        "pairs": 0,
        "ts": 0,
        "sides": {"control": _empty_side(), "candidate": _empty_side()},
        "judge": {key: 0 for key in _JUDGE_KEYS},
    }
    for part in parts:
        if not part:
            continue
        total["pairs"] += part.get("pairs", 0)
        total["ts"] = max(total["ts"], part.get("ts", 0))
        for name, side in part.get("sides", {}).items():
            into = total["sides"].setdefault(name, _empty_side())
            for key in _SIDE_KEYS:
                into[key] += side.get(key, 0)
            for index, count in side.get("latency_bins", {}).items():
                into["latency_bins"][index] = into["latency_bins"].get(index, 0) + count
        for key in _JUDGE_KEYS:
            total["judge"][key] += part.get("judge", {}).get(key, 0)
    return total


def _histogram(bins: dict[str, int]) -> LatencyHistogram:
    counts = [0] * len(_HIST.counts)
    for index, count in bins.items():
        counts[int(index)] += count
    return LatencyHistogram(tuple(counts), _HIST.lo, _HIST.hi, _HIST.bins_per_decade)


def _side_stats(side: dict[str, Any]) -> dict[str, Any]:
    timed = side["n"] - side["timeout"]
    return {
        "refusal": Proportion(side["n"], side["refusal"]),
        "json_break": Proportion(side["json_n"], side["json_break"]),
        "timeout": Proportion(side["n"], side["timeout"]),
        "error": Proportion(side["n"], side["error"]),
        "cost_usd_mean": Mean(side["n"], side["cost_sum"], side["cost_sq"]),
        "latency_ms_mean": Mean(timed, side["latency_sum"], side["latency_sq"]),
        "latency_ms_p95": _histogram(side["latency_bins"]),
    }


def _rate(stat: Proportion) -> float | None:
    return stat.successes / stat.n if stat.n else None


def _value(stat) -> float | None:
    try:
        if isinstance(stat, LatencyHistogram):
            return stat.quantile(0.95) if stat.n else None
        return stat.estimate if stat.n else None
    except ValueError:
        return None


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _interval(estimate: float, variance: float, n: int, alpha: float, n_tune: float, one_sided: bool) -> float:
    rho = sequential_rho(alpha, n_tune, one_sided=one_sided)
    return cs_halfwidth(variance, n, alpha, rho, one_sided=one_sided) if variance > 0 else 0.0


def stage_rule(plan, stage=None) -> dict[str, Any]:
    """The shadow stage's promotion numbers, defaults filled in (docs/shadow.md)."""

    def given(name: str):
        return getattr(stage, name, None) if stage is not None else None

    margin = given("judge_max_control_preference")
    min_pairs, min_judged = given("min_shadow_pairs"), given("min_judged_pairs")
    return {
        "judge_max_control_preference": DEFAULT_JUDGE_MAX_CONTROL_PREFERENCE if margin is None else margin,
        "min_shadow_pairs": plan.min_users_per_arm if min_pairs is None else min_pairs,
        "min_judged_pairs": plan.min_users_per_arm if min_judged is None else min_judged,
    }


def analyze(shadow: dict[str, Any], plan, stage=None) -> dict[str, Any]:
    """The shadow analysis of merged counts under a plan (and its shadow stage)."""
    rule = stage_rule(plan, stage)
    margin, min_pairs = rule["judge_max_control_preference"], rule["min_shadow_pairs"]
    guards = {spec.metric: spec for spec in plan.guardrails}
    checks = [name for name in PLAN_METRIC]
    alpha_each = split_alpha(plan.alpha, len(checks) + 1)
    sides = shadow.get("sides") or {}
    control = _side_stats(sides.get("control") or _empty_side())
    candidate = _side_stats(sides.get("candidate") or _empty_side())

    results = []
    for name in checks:
        spec = guards.get(PLAN_METRIC[name])
        is_tail = name in TAILS
        enforced = is_tail or spec is not None
        relative = spec.max_relative_increase if spec is not None else None
        absolute = spec.max_absolute_increase if spec is not None else None
        if is_tail and relative is None and absolute is None:
            absolute = 0.0  # any detected increase in refusals, JSON breaks, timeouts or errors
        a, b = control[name], candidate[name]
        if relative is not None and isinstance(a, (Proportion, Mean)) and a.n and _value(a) == 0:
            # No refusals (or cost) on control yet: a relative change is undefined and
            # would hold the stage for ever; any detected increase is the honest reading.
            relative, absolute = None, 0.0
        monitor = GuardrailMonitor(
            f"shadow_{name}",
            max_relative_harm=relative,
            max_absolute_harm=absolute,
            direction="increase",
            alpha=alpha_each,
            min_units_per_arm=max(2, min_pairs),
            n_tune=plan.n_tune,
        )
        if name == "json_break" and a.n == 0 and b.n == 0 and shadow.get("pairs", 0):
            verdict, status = None, "not_applicable"  # no request expected JSON: nothing to break
        elif a.n == 0 or b.n == 0:
            verdict, status = None, "insufficient_data"
        else:
            try:
                verdict = monitor.update(a, b)
            except ValueError:
                verdict = None
            status = verdict.status if verdict else "insufficient_data"
        results.append(
            {
                "metric": name,
                "enforced": enforced,
                "status": status,
                "control": _finite(_value(a)),
                "candidate": _finite(_value(b)),
                "estimate": _finite(verdict.estimate) if verdict else None,
                "ci_low": _finite(verdict.ci_low) if verdict else None,
                "ci_high": _finite(verdict.ci_high) if verdict else None,
                "threshold": monitor.threshold,
                "difference": monitor.difference,
                "n": min(a.n, b.n),
                "reason": (
                    verdict.reason
                    if verdict
                    else f"shadow_{name}: no request expected JSON"
                    if status == "not_applicable"
                    else f"shadow_{name}: no data yet"
                ),
            }
        )

    judge = judge_summary(shadow.get("judge") or {}, alpha_each, plan.n_tune, rule["min_judged_pairs"], margin)
    pairs = shadow.get("pairs", 0)
    blocking = [f"shadow: {pairs:,} pairs, need {min_pairs:,}"] if pairs < min_pairs else []
    # Like the canary's guardrails: every enforced check must have looked and be ok.
    blocking += [r["reason"] for r in results if r["enforced"] and r["status"] not in ("ok", "not_applicable")]
    if judge["status"] == "breach" or (rule["min_judged_pairs"] > 0 and judge["status"] != "ok"):
        blocking.append(judge["reason"])
    return {
        "pairs": pairs,
        "ts": shadow.get("ts", 0),
        "judge": judge,
        "checks": results,
        "ready": not blocking,
        "blocking": blocking,
        "alpha_each": alpha_each,
        "rule": rule,
    }


def judge_summary(counts: dict[str, Any], alpha: float, n_tune: float, min_units: int, margin: float) -> dict[str, Any]:
    """Win/tie/loss rates and the control preference with always-valid intervals; ``status``
    ok | breach | undecided | insufficient_data against the margin."""
    judged = int(counts.get("judged", 0))
    wins, losses, ties = (int(counts.get(k, 0)) for k in ("candidate_wins", "control_wins", "ties"))
    out: dict[str, Any] = {
        "judged": judged,
        "candidate_wins": wins,
        "control_wins": losses,
        "ties": ties,
        "malformed": int(counts.get("malformed", 0)),
        "errors": int(counts.get("errors", 0)),
        "not_judged": int(counts.get("not_judged", 0)),
        "cost_usd": float(counts.get("cost_usd", 0.0)),
        "margin": margin,
        "rates": {},
        "control_preference": None,
    }
    if judged < 2:
        out["status"] = "insufficient_data"
        out["reason"] = f"judge: {judged} pairs judged, need {max(2, min_units):,}"
        return out
    for key, count in (("candidate_wins", wins), ("ties", ties), ("control_wins", losses)):
        p = count / judged
        hw = _interval(p, p * (1 - p), judged, alpha, n_tune, one_sided=False)
        out["rates"][key] = {"estimate": p, "ci_low": max(0.0, p - hw), "ci_high": min(1.0, p + hw)}
    # Control preference: mean of +1 (control wins), -1 (candidate wins), 0 (tie).
    mean = (losses - wins) / judged
    variance = max(((losses + wins) - judged * mean * mean) / (judged - 1), 0.0)
    upper = mean + _interval(mean, variance, judged, alpha, n_tune, one_sided=True)
    lower = mean - _interval(mean, variance, judged, alpha, n_tune, one_sided=True)
    out["control_preference"] = {"estimate": mean, "ci_low": max(-1.0, lower), "ci_high": min(1.0, upper)}
    limit = f"the {margin:.1%} margin"
    head = (
        f"judge prefers control by {mean:+.1%} of {judged:,} judged pairs "
        f"(always-valid CI {max(-1.0, lower):+.1%}..{min(1.0, upper):+.1%}; "
        f"{wins:,} candidate / {ties:,} tie / {losses:,} control)"
    )
    if judged < min_units:
        out["status"], out["reason"] = "insufficient_data", f"judge: {judged:,} pairs judged, need {min_units:,}"
    elif lower > margin:
        out["status"], out["reason"] = "breach", f"{head} beyond {limit}"
    elif upper <= margin:
        out["status"], out["reason"] = "ok", f"{head} within {limit}"
    else:
        out["status"], out["reason"] = "undecided", f"{head}: not yet shown within {limit}"
    return out
