"""The controller's state machine as pure functions, driven by simulated snapshots."""

from __future__ import annotations

import msgspec
import pytest

from safeswap.core.controller import PlanConflict, RolloutState, on_command, on_plan, on_snapshot, plan_hash
from safeswap.core.evalgate import gate, result_hash
from schemas import GuardrailSpec, RolloutPlan, StageSpec, VariantSpec, encode
from tests.safeswap.core.controller.sim import Behaviour, Sim

CONTROL = VariantSpec(model="m-20250101", prompt_version="v1")
CANDIDATE = VariantSpec(model="m-20260101", prompt_version="v1")


def plan(**overrides) -> RolloutPlan:
    fields = dict(
        rollout_id="r1",
        stakes="low",
        control=CONTROL,
        candidate=CANDIDATE,
        skip_shadow="tests",
        stages=[
            StageSpec(name="canary", percent=5, min_duration="24h", min_users_per_arm=200),
            StageSpec(name="ramp", percent=50, min_duration="24h"),
            StageSpec(name="ramp", percent=100),
        ],
        min_users_per_arm=100,
        guardrails=[
            GuardrailSpec(metric="thumbs_down_rate", max_relative_increase=0.2, action="rollback"),
            GuardrailSpec(metric="error_rate", max_relative_increase=0.5, action="pause"),
        ],
    )
    fields.update(overrides)
    return RolloutPlan(**fields)


def gate_result(baseline: dict | None = None, candidate: dict | None = None, stakes: str = "high") -> dict:
    """What `safeswap eval-gate --json` prints (and `rollout start --eval-gate` attaches)."""
    result = gate(baseline or {"a": True, "b": False}, candidate or {"a": True, "b": True}, stakes)
    result["hash"] = result_hash(result)
    return result


def run(the_plan: RolloutPlan, sim: Sim, *, hours: int = 120, users_per_hour: int = 400, until=None):
    """Drive the controller hour by hour, serving the split it decides; returns decisions and state."""
    rollouts: dict[str, RolloutState] = {}
    decisions = [on_plan(rollouts, the_plan, ts=sim.ts)]
    state = rollouts[the_plan.rollout_id]
    for _ in range(hours):
        for snapshot in sim.step(users_per_hour, state.percent):
            decision = on_snapshot(state, snapshot)
            if decision:
                decisions.append(decision)
        if state.stage in ("rolled_back", "complete", "paused") or (until and until(state)):
            break
    return decisions, state


def test_healthy_candidate_walks_every_stage_in_event_time_and_completes():
    decisions, state = run(plan(), Sim("r1", "r1", seed=1))
    assert [(d.action, d.stage, d.percent) for d in decisions] == [
        ("start", "canary", 5),
        ("promote", "ramp", 50),
        ("promote", "ramp", 100),
        ("complete", "complete", 100),
    ]
    assert [d.seq for d in decisions] == [1, 2, 3, 4]
    # each promotion only after the stage's 24 h of event time
    assert decisions[1].ts - decisions[0].ts >= 24 * 3_600_000
    assert decisions[2].ts - decisions[1].ts >= 24 * 3_600_000
    assert all(e.status == "ok" for e in decisions[1].evidence)
    assert "promoted" in decisions[1].reason and decisions[1].control["model"] == "m-20250101"


def test_no_promotion_before_min_users_per_arm():
    the_plan = plan(
        stages=[
            StageSpec(name="canary", percent=5, min_duration="1h", min_users_per_arm=5000),
            StageSpec(name="ramp", percent=100),
        ]
    )
    decisions, state = run(the_plan, Sim("r1", "r1", seed=2), hours=40)
    assert [d.action for d in decisions] == ["start"]  # 40 h x 400 users x 5% is ~800 candidates < 5000
    assert state.stage == "canary"


def test_worse_candidate_is_rolled_back_during_canary_with_evidence():
    sim = Sim(
        "r1", "r1", seed=3, behaviour={"control": Behaviour(thumbs_down=0.05), "candidate": Behaviour(thumbs_down=0.15)}
    )
    decisions, state = run(plan(), sim, users_per_hour=2000)
    last = decisions[-1]
    assert (last.action, last.stage, last.percent) == ("rollback", "rolled_back", 0.0)
    assert [d.stage for d in decisions[:-1]] == ["canary"]  # caught before any ramp
    breach = next(e for e in last.evidence if e.metric == "thumbs_down_rate")
    assert breach.status == "breach" and breach.ci_low > 0.2
    assert "thumbs_down_rate" in last.reason
    # nothing after the end: more snapshots do not decide again
    assert on_snapshot(state, sim.step(500, state.percent)[0]) is None


def test_guardrail_with_pause_action_pauses_and_holds_the_split():
    sim = Sim("r1", "r1", seed=4, behaviour={"control": Behaviour(error=0.02), "candidate": Behaviour(error=0.10)})
    decisions, state = run(plan(), sim, users_per_hour=2000)
    last = decisions[-1]
    assert (last.action, last.stage, last.percent) == ("pause", "paused", 5)
    assert "error_rate" in last.reason


def test_sample_ratio_mismatch_pauses():
    sim = Sim("r1", "r1", seed=5, extra_candidate_share=0.02)  # 7% served where 5% was asked
    decisions, state = run(plan(), sim, users_per_hour=2000)
    assert decisions[-1].action == "pause" and "sample ratio mismatch" in decisions[-1].reason
    assert decisions[-1].health["srm_p_value"] < 0.001


def test_crossover_pauses():
    sim = Sim("r1", "r1", seed=6, crossover_share=0.5)
    decisions, state = run(plan(), sim, users_per_hour=1000)
    assert decisions[-1].action == "pause" and "crossover_max" in decisions[-1].reason


def test_served_model_drift_in_an_arm_pauses():
    sim = Sim("r1", "r1", seed=7, behaviour={"control": Behaviour(), "candidate": Behaviour(model="m-alias-latest")})
    decisions, state = run(plan(), sim, users_per_hour=2000)
    assert decisions[-1].action == "pause"
    assert "candidate served 100.0%" in decisions[-1].reason and "m-alias-latest" in decisions[-1].reason


def test_one_arm_losing_events_pauses():
    sim = Sim(
        "r1",
        "r1",
        seed=8,
        behaviour={"control": Behaviour(responses=(1, 5)), "candidate": Behaviour(responses=(1, 5), drop_share=0.3)},
    )
    decisions, state = run(
        plan(stages=[StageSpec(name="canary", percent=50, min_duration="30d")]), sim, users_per_hour=2000
    )
    assert decisions[-1].action == "pause" and "losing events" in decisions[-1].reason


def test_cache_hit_skew_is_flagged_not_acted_on():
    sim = Sim(
        "r1", "r1", seed=9, behaviour={"control": Behaviour(cache_hit=0.2), "candidate": Behaviour(cache_hit=0.6)}
    )
    the_plan = plan(stages=[StageSpec(name="canary", percent=50, min_duration="30d")])
    decisions, state = run(the_plan, sim, hours=10, users_per_hour=1000)
    assert [d.action for d in decisions] == ["start"]
    assert state.last_evaluation.health.cache_skew["skewed"] is True


def test_high_stakes_plan_waits_for_a_passing_eval_gate_then_starts_in_shadow():
    stages = [
        StageSpec(name="shadow", shadow_percent=10, min_duration="24h", min_users_per_arm=100),
        StageSpec(name="canary", percent=5, min_duration="24h"),
    ]
    rollouts: dict = {}
    held = on_plan(rollouts, plan(stakes="high", stages=stages, skip_shadow=None), ts=0)
    assert (held.action, held.stage, held.percent) == ("hold", "registered", 0)
    gated = plan(rollout_id="r2", stakes="high", stages=stages, skip_shadow=None, eval_gate=gate_result())
    started = on_plan(rollouts, gated, ts=0)
    assert (started.action, started.stage, started.percent, started.shadow_percent) == ("start", "shadow", 0, 10)


def test_shadow_promotes_to_canary_after_its_watch_once_shadow_pairs_are_in():
    from safeswap.core.shadow_analysis import ShadowAccumulator
    from schemas import StatsSnapshot, convert
    from schemas.events import ShadowPair
    from tests.support.fake_anthropic import pair_fields

    stages = [
        StageSpec(name="shadow", shadow_percent=10, min_duration="24h", min_users_per_arm=100),
        StageSpec(name="canary", percent=5, min_duration="24h"),
    ]
    sim = Sim("r1", "r1", seed=10)
    decisions, state = run(plan(stages=stages), sim, hours=30, until=lambda s: s.stage == "canary")
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow")]  # time and users, no evidence
    assert "0 pairs, need 100" in state.last_evaluation.shadow["blocking"][0]
    shadow = ShadowAccumulator()
    for index in range(150):
        shadow.add_pair(convert(ShadowPair, pair_fields(index, ts=sim.ts)))
        shadow.add_judge_result("judged", "candidate" if index % 2 else "tie")
    on_snapshot(
        state,
        StatsSnapshot(
            rollout_id="r1",
            partition=0,
            seq=1,
            ts=sim.ts,
            users={},
            metrics={},
            source="shadow:w1",
            shadow=shadow.to_dict(),
        ),
    )
    promoted = state.last_decision
    assert (promoted.action, promoted.stage, promoted.shadow_percent, promoted.percent) == ("promote", "canary", 0, 5)


def test_operator_commands_pause_resume_abort():
    rollouts: dict = {}
    on_plan(rollouts, plan(), ts=0)
    state = rollouts["r1"]
    paused = on_command(state, "pause", "investigating", ts=10)
    assert (paused.action, paused.stage, paused.percent) == ("pause", "paused", 5)
    assert on_command(state, "pause", "", ts=11) is None  # already paused
    resumed = on_command(state, "resume", "", ts=12)
    assert (resumed.action, resumed.stage) == ("resume", "canary")
    aborted = on_command(state, "abort", "bad vibes", ts=13)
    assert (aborted.action, aborted.stage, aborted.percent) == ("rollback", "rolled_back", 0)
    assert "bad vibes" in aborted.reason
    assert [paused.seq, resumed.seq, aborted.seq] == [2, 3, 4]
    with pytest.raises(ValueError, match="unknown command"):
        on_command(state, "explode", "", ts=14)


def test_same_inputs_same_decisions_and_state_survives_a_restart_midway():
    def collect(restart_at: int | None):
        sim = Sim("r1", "r1", seed=11, behaviour={"control": Behaviour(), "candidate": Behaviour(thumbs_down=0.09)})
        rollouts: dict = {}
        out = [on_plan(rollouts, plan(), ts=sim.ts)]
        for hour in range(60):
            if hour == restart_at:  # what the decide agent's table gives back after a crash
                rollouts["r1"] = RolloutState.from_dict(
                    msgspec.json.decode(msgspec.json.encode(rollouts["r1"].to_dict()))
                )
            for snapshot in sim.step(1000, rollouts["r1"].percent):
                if (decision := on_snapshot(rollouts["r1"], snapshot)) is not None:
                    out.append(decision)
        return [encode(d) for d in out]

    straight = collect(None)
    assert straight == collect(None)
    assert straight == collect(restart_at=20)
    assert len(straight) >= 2


def test_replayed_snapshot_is_ignored_and_changed_plan_refused():
    rollouts: dict = {}
    on_plan(rollouts, plan(), ts=0)
    assert on_plan(rollouts, plan(), ts=5) is None
    with pytest.raises(PlanConflict, match="immutable"):
        on_plan(rollouts, plan(alpha=0.01), ts=5)
    sim = Sim("r1", "r1", seed=12)
    first = sim.step(100, 5)[0]
    second = sim.step(100, 5)[0]
    state = rollouts["r1"]
    on_snapshot(state, second)
    on_snapshot(state, first)
    assert state.snapshots[first.partition].seq == second.seq
    assert plan_hash(plan()) != plan_hash(plan(alpha=0.01))


def latency_plan():
    return plan(
        stages=[StageSpec(name="canary", percent=50, min_duration="30d")],
        guardrails=[GuardrailSpec(metric="latency_ms_p95", max_relative_increase=0.10, action="pause")],
    )


def test_latency_guardrail_is_judged_within_cache_strata_so_a_cache_skew_does_not_pause():
    # The candidate hits the cache less: its overall p95 is much worse, but within
    # each stratum it is as fast as control. Not a model effect: no pause.
    sim = Sim(
        "r1", "r1", seed=13, behaviour={"control": Behaviour(cache_hit=0.6), "candidate": Behaviour(cache_hit=0.3)}
    )
    decisions, state = run(latency_plan(), sim, hours=8, users_per_hour=500)
    assert [d.action for d in decisions] == ["start"]
    assert set(state.monitors) == {"latency_ms_p95_cache_hit", "latency_ms_p95_cache_miss"}
    assert state.last_evaluation.health.cache_skew["skewed"] is True


def test_latency_guardrail_breaches_when_a_stratum_is_slower():
    sim = Sim("r1", "r1", seed=14, behaviour={"control": Behaviour(), "candidate": Behaviour(latency_miss_ms=2400)})
    decisions, state = run(latency_plan(), sim, hours=8, users_per_hour=500)
    assert decisions[-1].action == "pause" and "latency_ms_p95_cache_miss" in decisions[-1].reason


def test_status_before_any_statistics_says_it_waits_and_what_the_stage_needs():
    from rich.console import Console

    from safeswap.core.controller import status_of
    from safeswap.tools.views import status_view

    rollouts: dict[str, RolloutState] = {}
    start = on_plan(rollouts, plan(), ts=1_796_000_000_000)  # a plan arrives at wall-clock time
    status = status_of(rollouts["r1"])
    assert (status.stage_min_duration_s, status.stage_min_users) == (24 * 3600, 200)
    console = Console(record=True, width=250)
    for renderable in status_view(status, start):
        console.print(renderable)
    text = console.export_text()
    assert "waiting for statistics" in text and "1970" not in text
    assert "needs 24.0 h" in text and "need 200" in text and "h left" not in text
