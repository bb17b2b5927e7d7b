"""Live judge scores: what the LLM judge says of live canary and ramp responses, per variant.

Pure functions over plain data (docs/shadow.md "Live judge scores"):

- :class:`LiveScoreAccumulator` folds the judge's results for the live responses of
  one (rollout, partition) into per-variant counts and per-user score sums;
  ``to_dict()`` is what the judge agent publishes as the ``live_judge`` field of a
  ``StatsSnapshot`` with ``source="live_judge:<worker>"`` (:data:`SOURCE_PREFIX`).
- :func:`merge` adds those dicts: partitions hold disjoint users (traces are keyed
  by user_id), so counts and the per-user statistics add up.
- :func:`summarize` gives, per variant, the mean score with users as the unit
  (each user's mean score, averaged over users: a user who sent 50 scored requests
  counts once), the responses scored and the users, and the always-valid interval
  of candidate - control at the plan's alpha (``safeswap.core.stats.sequential_compare``
  on the two ``Mean`` statistics, absolute difference in score points).

The scores are monitored, never a decision input: the controller keeps these
snapshots apart, takes no look when one arrives and no rule reads them
(:data:`ROLE` says so wherever they are shown).

What the interval does not adjust for: a worker that restarts starts new per-user
sums (a new incarnation), so a user scored by both incarnations counts as two
users; a user a ramp moves to the candidate counts in each arm that served a scored
response; the arms are not compared cohort by cohort as the guardrails are.
"""

from __future__ import annotations

import math
from typing import Any

from safeswap.core.stats import Mean, sequential_compare
from schemas.events import LIVE_SCORE_MAX, LIVE_SCORE_MIN

SOURCE_PREFIX = "live_judge:"
ROLE = "monitored, not a decision input"
# The rollout stages whose live responses are scored.
SCORED_STAGES = ("canary", "ramp")
COUNTS = ("traces", "scored", "not_sampled", "not_scoreable", "budget_skipped", "malformed", "errors")
# A judge result's status -> the count it adds to (see safeswap.judge.JudgeResult).
STATUS_COUNT = {
    "scored": "scored",
    "not_sampled": "not_sampled",
    "not_scoreable": "not_scoreable",
    "budget": "budget_skipped",
    "malformed": "malformed",
    "error": "errors",
}


def _empty_variant() -> dict[str, Any]:
    return {**{key: 0 for key in COUNTS}, "cost_usd": 0.0, "scores": {}}


class LiveScoreAccumulator:
    """Counts and per-user score sums of one (rollout, partition), per variant."""

    def __init__(self) -> None:
        self.ts = 0
        self.variants: dict[str, dict[str, Any]] = {}
        self.users: dict[str, dict[str, list[float]]] = {}  # variant -> user_id -> [score sum, scores]

    def _variant(self, variant: str) -> dict[str, Any]:
        found = self.variants.get(variant)
        if found is None:
            found = self.variants[variant] = _empty_variant()
        return found

    def add_trace(self, variant: str, ts: int) -> None:
        """A live response of the rollout offered to the judge (scored or not)."""
        self._variant(variant)["traces"] += 1
        self.ts = max(self.ts, ts)

    def add_result(
        self, variant: str, status: str, user_id: str | None = None, score: int | None = None, cost_usd: float = 0.0
    ) -> None:
        """What became of it: ``status`` of the judge's result; a score with its user when scored."""
        into = self._variant(variant)
        into["cost_usd"] += cost_usd
        key = STATUS_COUNT.get(status)
        if key is None:
            raise ValueError(f"unknown live judge status {status!r}: use one of {sorted(STATUS_COUNT)}")
        if key == "scored":
            if score is None or user_id is None:
                raise ValueError("a scored response needs its score and user")
            sums = self.users.setdefault(variant, {}).setdefault(user_id, [0.0, 0])
            sums[0] += score
            sums[1] += 1
            into["scores"][str(score)] = into["scores"].get(str(score), 0) + 1
        into[key] += 1

    def to_dict(self) -> dict[str, Any]:
        variants = {}
        for variant, counts in self.variants.items():
            out = {**counts, "scores": dict(counts["scores"])}
            users = self.users.get(variant)
            if users:  # each user's mean score is one unit
                means = [total / n for total, n in users.values()]
                out["score"] = Mean(len(means), math.fsum(means), math.fsum(m * m for m in means)).to_dict()
            variants[variant] = out
        return {"ts": self.ts, "variants": variants}


def validate(live_judge: dict[str, Any]) -> None:
    """Raise ValueError naming what is wrong with a snapshot's ``live_judge`` (it is never kept then)."""
    if not isinstance(live_judge, dict) or not isinstance(live_judge.get("variants", {}), dict):
        raise ValueError("live_judge must be {ts, variants: {variant: {...}}}")
    for variant, part in live_judge.get("variants", {}).items():
        if not isinstance(part, dict):
            raise ValueError(f"live_judge {variant}: expected an object, got {type(part).__name__}")
        for key in COUNTS:
            value = part.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"live_judge {variant} {key}: expected a count, got {value!r:.50}")
        cost = part.get("cost_usd", 0.0)
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost < 0:
            raise ValueError(f"live_judge {variant} cost_usd: expected USD >= 0, got {cost!r:.50}")
        scores = part.get("scores", {})
        if not isinstance(scores, dict) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in scores.values()
        ):
            raise ValueError(f"live_judge {variant} scores: expected {{score: count}}")
        if part.get("score") is not None:
            try:
                Mean.from_dict(part["score"])
            except (ValueError, TypeError) as exc:
                raise ValueError(f"live_judge {variant} score: {exc}") from None


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Add the ``live_judge`` dicts of several snapshots (validated ones): counts, costs and the
    score histogram add, the per-user ``Mean`` statistics add (disjoint users); ts is the latest."""
    total: dict[str, Any] = {"ts": 0, "variants": {}}
    means: dict[str, Mean] = {}
    for part in parts:
        if not part:
            continue
        total["ts"] = max(total["ts"], part.get("ts", 0))
        for variant, counts in (part.get("variants") or {}).items():
            into = total["variants"].setdefault(variant, _empty_variant())
            for key in COUNTS:
                into[key] += counts.get(key, 0)
            into["cost_usd"] += counts.get("cost_usd", 0.0)
            for score, n in (counts.get("scores") or {}).items():
                into["scores"][score] = into["scores"].get(score, 0) + n
            if counts.get("score"):
                mean = Mean.from_dict(counts["score"])
                means[variant] = means[variant] + mean if variant in means else mean
    for variant, mean in means.items():
        total["variants"][variant]["score"] = mean.to_dict()
    return total


def summarize(merged: dict[str, Any], plan) -> dict[str, Any]:
    """Per-variant mean scores (users as the unit) and the always-valid interval of
    candidate - control at the plan's alpha: the ``live_judge`` of a rollout's status."""
    variants: dict[str, dict[str, Any]] = {}
    stats: dict[str, Mean] = {}
    for variant in ("control", "candidate"):
        part = (merged.get("variants") or {}).get(variant) or _empty_variant()
        mean = Mean.from_dict(part["score"]) if part.get("score") else Mean(0, 0.0, 0.0)
        stats[variant] = mean
        variants[variant] = {
            "mean": mean.estimate if mean.n else None,
            "scored": part["scored"],
            "users": mean.n,
            **{key: part[key] for key in COUNTS if key != "scored"},
            "cost_usd": part["cost_usd"],
            "scores": {str(s): part["scores"].get(str(s), 0) for s in range(LIVE_SCORE_MIN, LIVE_SCORE_MAX + 1)},
        }
    control, candidate = stats["control"], stats["candidate"]
    need = max(2, plan.min_users_per_arm)
    fewest = min(control.n, candidate.n)
    difference = None
    if fewest < need:
        reason = f"no interval yet: {fewest:,} users scored in the smaller arm, needs {need:,}"
    else:
        result = sequential_compare(
            control, candidate, alpha=plan.alpha, n_tune=plan.n_tune, difference="absolute", alternative="two-sided"
        )
        # A difference of scores cannot leave +-(max - min): the interval is cut to that range
        # (intersecting with the possible values keeps it always-valid).
        span = LIVE_SCORE_MAX - LIVE_SCORE_MIN
        low, high = max(-span, result.ci_low), min(span, result.ci_high)
        difference = {
            "estimate": result.estimate,
            "ci_low": low,
            "ci_high": high,
            "alpha": plan.alpha,
            "users_control": control.n,
            "users_candidate": candidate.n,
        }
        reason = (
            f"candidate - control {result.estimate:+.2f} points, always-valid {1 - plan.alpha:.0%} interval "
            f"[{low:+.2f}, {high:+.2f}] ({control.n:,} / {candidate.n:,} users)"
        )
    budget_skipped = sum(v["budget_skipped"] for v in variants.values())
    return {
        "role": ROLE,
        "scale": [LIVE_SCORE_MIN, LIVE_SCORE_MAX],
        "ts": merged.get("ts", 0),
        "variants": variants,
        "difference": difference,
        "reason": reason,
        "budget_skipped": budget_skipped,
        "budget": (
            f"judge budget reached: {budget_skipped:,} sampled responses were not scored "
            "(SAFESWAP_JUDGE_BUDGET_USD per rollout, shared with the shadow judge)"
            if budget_skipped
            else ""
        ),
        "cost_usd": sum(v["cost_usd"] for v in variants.values()),
    }


__all__ = [
    "COUNTS",
    "LiveScoreAccumulator",
    "ROLE",
    "SCORED_STAGES",
    "SOURCE_PREFIX",
    "merge",
    "summarize",
    "validate",
]
