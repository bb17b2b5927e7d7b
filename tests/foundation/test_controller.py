"""The first guardrail path as pure functions: no Kafka."""

import random

import pytest

from safeswap.controller import PlanConflict, on_plan, on_snapshot, plan_hash
from safeswap.metrics import PartitionStats
from schemas import FeedbackEvent, GuardrailSpec, RolloutPlan, TraceEvent

PLAN = RolloutPlan(
    rollout_id="r1", percent=20, min_users_per_arm=100,
    guardrails=[GuardrailSpec(metric="thumbs_down_rate", max_relative_increase=0.2, action="rollback")],
)


def feed(partitions: list[PartitionStats], users: int, rates: dict[str, float], seed: int, start: int = 0):
    rng = random.Random(seed)
    for i in range(start, start + users):
        variant = "candidate" if i % 2 else "control"
        common = dict(rollout_id="r1", variant=variant, user_id=f"u{i}", session_id=f"s{i}")
        state = partitions[i % len(partitions)]
        for request in range(rng.randint(1, 3)):
            trace_id = f"t{i}-{request}"
            state.apply_trace(TraceEvent(event_id=trace_id, ts=i * 1000, trace_id=trace_id, prompt_version="v1",
                                         model_version="m", latency_ms=1, input_tokens=1, output_tokens=1,
                                         cost_usd=0, cache_hit=False, **common))
            if rng.random() < rates[variant]:
                state.apply_feedback(FeedbackEvent(event_id=f"f{trace_id}", ts=i * 1000, trace_id=trace_id,
                                                   kind="thumbs_down", **common))


def run(rates, users=6000, seed=1):
    rollouts = {}
    start = on_plan(rollouts, PLAN, ts=0)
    partitions = [PartitionStats(p) for p in range(4)]
    decisions = []
    for step in range(0, users, 500):
        feed(partitions, 500, rates, seed=seed + step, start=step)
        for state in partitions:
            for snapshot in state.take_dirty_snapshots():
                decision = on_snapshot(rollouts["r1"], snapshot)
                if decision:
                    decisions.append(decision)
    return start, decisions, rollouts["r1"]


def test_plan_start_serves_the_canary_split():
    rollouts = {}
    decision = on_plan(rollouts, PLAN, ts=5)
    assert (decision.action, decision.stage, decision.percent, decision.seq) == ("start", "canary", 20, 1)
    assert decision.salt == "r1" and decision.plan_hash == plan_hash(PLAN)
    assert on_plan(rollouts, PLAN, ts=6) is None  # replay of the same plan: no-op


def test_changed_plan_under_a_started_id_is_refused():
    rollouts = {}
    on_plan(rollouts, PLAN, ts=0)
    changed = RolloutPlan(rollout_id="r1", percent=50, guardrails=PLAN.guardrails)
    with pytest.raises(PlanConflict, match="immutable"):
        on_plan(rollouts, changed, ts=1)


def test_clearly_worse_candidate_is_rolled_back_with_evidence():
    _, decisions, state = run({"control": 0.05, "candidate": 0.20})
    assert [d.action for d in decisions] == ["rollback"]
    rollback = decisions[0]
    assert rollback.percent == 0 and rollback.stage == "rolled_back" and rollback.seq == 2
    evidence = rollback.evidence[0]
    assert evidence.metric == "thumbs_down_rate" and evidence.status == "breach"
    assert evidence.ci_low > 0.2  # the always-valid interval is above the allowed +20%
    assert evidence.users_control >= 100 and evidence.users_candidate >= 100
    assert "thumbs_down_rate" in rollback.reason


def test_equal_variants_are_not_rolled_back():
    for seed in range(3):
        _, decisions, state = run({"control": 0.05, "candidate": 0.05}, seed=seed * 100)
        assert decisions == []
        assert state.stage == "canary"


def test_replayed_snapshot_is_ignored():
    rollouts = {}
    on_plan(rollouts, PLAN, ts=0)
    partition = PartitionStats(0)
    feed([partition], 50, {"control": 0.0, "candidate": 0.0}, seed=1)
    first = partition.snapshot("r1")
    feed([partition], 50, {"control": 0.0, "candidate": 0.0}, seed=2, start=50)
    second = partition.snapshot("r1")
    on_snapshot(rollouts["r1"], second)
    on_snapshot(rollouts["r1"], first)  # older: must not replace the newer one
    assert rollouts["r1"].snapshots[0].seq == second.seq


def test_repeated_event_ids_count_once():
    once, twice = PartitionStats(0), PartitionStats(0)
    feed([once], 200, {"control": 0.3, "candidate": 0.3}, seed=9)
    feed([twice], 200, {"control": 0.3, "candidate": 0.3}, seed=9)
    feed([twice], 200, {"control": 0.3, "candidate": 0.3}, seed=9)  # at-least-once redelivery
    assert once.snapshot("r1").metrics == twice.snapshot("r1").metrics
