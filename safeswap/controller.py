"""The rollout controller as pure functions: plan + statistics snapshots -> decisions.

The decide agent feeds it; tests call it directly. A rollout starts when its plan
is registered (decision ``start``: the flag client begins serving the canary
split). After each statistics snapshot the partitions' latest snapshots are
merged and every guardrail's sequential monitor looks once more. A breach whose
action is ``rollback`` publishes ``rollback`` at once (percent 0: control for
everyone); ``pause`` holds the split. Both are final until a person acts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgspec

from schemas import Decision, GuardrailEvidence, RolloutPlan, StatsSnapshot
from safeswap.stats import GuardrailMonitor, split_alpha, stat_from_dict

LIVE_STAGES = ("canary",)
FINAL_ACTIONS = ("rollback", "pause")


def plan_hash(plan: RolloutPlan) -> str:
    """Content hash of a plan: any change to a plan makes a new rollout."""
    canonical = msgspec.json.encode(msgspec.to_builtins(plan), order="sorted")
    return hashlib.sha256(canonical).hexdigest()[:16]


@dataclass
class RolloutState:
    plan: RolloutPlan
    plan_hash: str
    monitors: dict[str, GuardrailMonitor]
    stage: str = "canary"
    percent: float = 0.0
    seq: int = 0
    snapshots: dict[int, StatsSnapshot] = field(default_factory=dict)
    last_decision: Decision | None = None

    @property
    def live(self) -> bool:
        return self.stage in LIVE_STAGES


def start(plan: RolloutPlan, ts: int) -> tuple[RolloutState, Decision]:
    """Register a plan: guardrail monitors fixed now, canary split served from now."""
    alpha_each = split_alpha(plan.alpha, max(1, len(plan.guardrails)))
    monitors = {
        spec.metric: GuardrailMonitor(
            spec.metric,
            max_relative_increase=spec.max_relative_increase,
            max_absolute_increase=spec.max_absolute_increase,
            alpha=alpha_each,
            min_units_per_arm=plan.min_users_per_arm,
        )
        for spec in plan.guardrails
    }
    state = RolloutState(plan=plan, plan_hash=plan_hash(plan), monitors=monitors, percent=plan.percent)
    decision = _decide(state, ts, "start", f"canary started at {plan.percent:g}% of users", [])
    return state, decision


def merge_snapshots(snapshots: dict[int, StatsSnapshot]) -> dict[str, dict[str, object]]:
    """Add the latest snapshot of every partition: merged[variant][metric]."""
    merged: dict[str, dict[str, object]] = {}
    for snapshot in snapshots.values():
        for variant, metrics in snapshot.metrics.items():
            into = merged.setdefault(variant, {})
            for metric, stat in metrics.items():
                value = stat_from_dict(stat)
                into[metric] = into[metric] + value if metric in into else value
    return merged


def on_snapshot(state: RolloutState, snapshot: StatsSnapshot) -> Decision | None:
    """Fold one partition's snapshot in; a decision when a guardrail breaches."""
    previous = state.snapshots.get(snapshot.partition)
    if previous is not None and previous.seq >= snapshot.seq:
        return None  # a replayed or older snapshot: already counted
    state.snapshots[snapshot.partition] = snapshot
    if not state.live:
        return None
    merged = merge_snapshots(state.snapshots)
    control, candidate = merged.get("control", {}), merged.get("candidate", {})
    evidence: list[GuardrailEvidence] = []
    breaches: list[tuple[str, str]] = []
    for spec in state.plan.guardrails:
        if spec.metric not in control or spec.metric not in candidate:
            continue
        verdict = state.monitors[spec.metric].update(control[spec.metric], candidate[spec.metric])
        evidence.append(_evidence(spec.metric, verdict))
        if verdict.status == "breach":
            breaches.append((spec.action, verdict.reason))
    ts = max(s.ts for s in state.snapshots.values())
    for action in FINAL_ACTIONS:  # rollback outranks pause
        reasons = [reason for breach_action, reason in breaches if breach_action == action]
        if reasons:
            return _decide(state, ts, action, "; ".join(reasons), evidence)
    return None


def _evidence(metric: str, verdict) -> GuardrailEvidence:
    return GuardrailEvidence(
        metric=metric,
        status=verdict.status,
        estimate=verdict.estimate,
        ci_low=verdict.ci_low,
        ci_high=verdict.ci_high,
        p_value=verdict.p_value,
        threshold=verdict.threshold,
        users_control=verdict.n_control,
        users_candidate=verdict.n_candidate,
    )


def _decide(state: RolloutState, ts: int, action: str, reason: str, evidence: list[GuardrailEvidence]) -> Decision:
    state.seq += 1
    if action == "rollback":
        state.stage, state.percent = "rolled_back", 0.0
    elif action == "pause":
        state.stage = "paused"
    decision = Decision(
        rollout_id=state.plan.rollout_id,
        seq=state.seq,
        ts=ts,
        action=action,
        stage=state.stage,
        percent=state.percent,
        salt=state.plan.effective_salt,
        reason=reason,
        plan_hash=state.plan_hash,
        evidence=evidence,
    )
    state.last_decision = decision
    return decision


class PlanConflict(ValueError):
    """A different plan under a rollout id that already started."""


def on_plan(rollouts: dict[str, RolloutState], plan: RolloutPlan, ts: int) -> Decision | None:
    """Register a plan once; the same plan again is a no-op (replay), a changed one is refused."""
    current = rollouts.get(plan.rollout_id)
    if current is not None:
        if current.plan_hash == plan_hash(plan):
            return None
        raise PlanConflict(
            f"rollout {plan.rollout_id!r} already started with plan {current.plan_hash}; "
            "a started plan is immutable: give the changed plan a new rollout_id"
        )
    rollouts[plan.rollout_id], decision = start(plan, ts)
    return decision
