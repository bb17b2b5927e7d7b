"""The shadow analysis and the controller's rule for leaving the shadow stage (pure, no Kafka)."""

from __future__ import annotations

import random

import msgspec
import pytest

from safeswap.core.controller import RolloutState, on_plan, on_snapshot, status_of
from safeswap.core.shadow_analysis import (
    DEFAULT_JUDGE_MAX_CONTROL_PREFERENCE,
    ShadowAccumulator,
    analyze,
    is_refusal,
    json_broken,
    merge,
)
from safeswap.tools.views import status_view
from schemas import GuardrailSpec, RolloutPlan, StageSpec, StatsSnapshot, VariantSpec, convert
from schemas.events import ShadowPair, ShadowSide
from tests.safeswap.core.controller.sim import Sim
from tests.support.fake_anthropic import pair_fields

HOUR = 3_600_000


def plan(margin: float | None = 0.05, **overrides) -> RolloutPlan:
    fields = dict(
        rollout_id="r1",
        stakes="low",
        control=VariantSpec(model="m-20250101", prompt_version="v1"),
        candidate=VariantSpec(model="m-20260101", prompt_version="v1"),
        stages=[
            StageSpec(
                name="shadow",
                shadow_percent=10,
                min_duration="24h",
                min_users_per_arm=100,
                judge_max_control_preference=margin,
            ),
            StageSpec(name="canary", percent=5, min_duration="24h"),
        ],
        min_users_per_arm=100,
        guardrails=[GuardrailSpec(metric="thumbs_down_rate", max_relative_increase=0.2)],
    )
    fields.update(overrides)
    return RolloutPlan(**fields)


def side(**kw) -> ShadowSide:
    return ShadowSide(**{"latency_ms": 100.0, "model_version": "m", "prompt_version": "v", **kw})


def feed_shadow(
    acc: ShadowAccumulator,
    rng: random.Random,
    n: int,
    ts: int,
    *,
    p_candidate: float,
    p_control: float,
    candidate_refusal: float = 0.0,
    judged: bool = True,
) -> None:
    for _ in range(n):
        index = acc.pairs
        refused = rng.random() < candidate_refusal
        fields = pair_fields(index, ts=ts, candidate="I'm sorry, but I can't help with that." if refused else "ok")
        pair = convert(ShadowPair, fields)
        acc.add_pair(pair)
        if not judged:
            acc.add_judge_result("disabled")
            continue
        u = rng.random()
        winner = "candidate" if u < p_candidate else "control" if u < p_candidate + p_control else "tie"
        acc.add_judge_result("judged", winner, cost_usd=0.001)


def drive(the_plan: RolloutPlan, hours: int = 40, pairs_per_hour: int = 60, **shadow_kw):
    """Outcome snapshots from the controller tests' Sim plus one shadow snapshot per hour."""
    sim, rng, acc = Sim("r1", "r1", seed=3), random.Random(7), ShadowAccumulator()
    rollouts: dict[str, RolloutState] = {}
    decisions = [on_plan(rollouts, the_plan, ts=sim.ts)]
    state = rollouts["r1"]
    for hour in range(hours):
        for snapshot in sim.step(400, state.percent):
            if (decision := on_snapshot(state, snapshot)) is not None:
                decisions.append(decision)
        if pairs_per_hour:
            feed_shadow(acc, rng, pairs_per_hour, sim.ts, **shadow_kw)
            shadow = StatsSnapshot(
                rollout_id="r1",
                partition=0,
                seq=hour + 1,
                ts=sim.ts,
                users={},
                metrics={},
                source="shadow:w1",
                shadow=acc.to_dict(),
            )
            if (decision := on_snapshot(state, shadow)) is not None:
                decisions.append(decision)
        if state.stage != "shadow":
            break
    return decisions, state


def test_shadow_promotes_when_the_judge_does_not_prefer_control_beyond_the_margin():
    decisions, state = drive(plan(0.05), p_candidate=0.45, p_control=0.25)
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow"), ("promote", "canary")]
    assert decisions[1].ts - decisions[0].ts >= 24 * HOUR or decisions[0].ts == 0


def test_shadow_holds_while_the_judge_prefers_control_and_says_why():
    decisions, state = drive(plan(0.05), hours=40, p_candidate=0.2, p_control=0.5)
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow")]
    shadow = state.last_evaluation.shadow
    assert shadow["judge"]["status"] == "breach" and not shadow["ready"]
    assert shadow["judge"]["control_preference"]["ci_low"] > 0.05
    assert "beyond the 5.0% margin" in shadow["blocking"][0]
    # rollout status carries the analysis, and the view renders it
    status = status_of(state)
    assert status.shadow["judge"]["control_wins"] > status.shadow["judge"]["candidate_wins"]
    from rich.console import Console

    console = Console(record=True, width=200)
    for renderable in status_view(status, state.last_decision):
        console.print(renderable)
    text = console.export_text()
    assert "judge" in text and "shadow_refusal" in text and "blocks promotion" in text
    # the win/tie/loss rates with their always-valid intervals, as analysed
    for key, label in (("candidate_wins", "candidate wins"), ("ties", "ties"), ("control_wins", "control wins")):
        rate = shadow["judge"]["rates"][key]
        row = next(line for line in text.splitlines() if f"judge: {label}" in line)
        assert f"{rate['estimate']:.1%} [{rate['ci_low']:.1%}, {rate['ci_high']:.1%}] always-valid" in row
        assert rate["ci_low"] < rate["estimate"] < rate["ci_high"]


def test_a_plan_margin_without_any_shadow_data_holds_the_shadow_stage():
    decisions, state = drive(plan(0.05), hours=30, pairs_per_hour=0, p_candidate=0.5, p_control=0.2)
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow")]
    assert state.last_evaluation.shadow["judge"]["status"] == "insufficient_data"


def test_a_candidate_that_refuses_more_is_held_even_without_a_judge_margin():
    decisions, state = drive(plan(None), hours=40, p_candidate=0.5, p_control=0.2, candidate_refusal=0.2)
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow")]
    refusal = next(c for c in state.last_evaluation.shadow["checks"] if c["metric"] == "refusal")
    assert refusal["status"] == "breach" and refusal["candidate"] > 0.1 and refusal["control"] == 0


def test_without_shadow_pairs_the_shadow_stage_holds_after_its_watch_and_says_why():
    decisions, state = drive(plan(None), hours=30, pairs_per_hour=0, p_candidate=0, p_control=0)
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow")]
    shadow = state.last_evaluation.shadow
    assert state.last_evaluation.stage_elapsed_s >= 24 * 3600 and not shadow["ready"]
    assert shadow["blocking"][0] == "shadow: 0 pairs, need 100"
    assert any("judge: 0 pairs judged" in reason for reason in shadow["blocking"])


def test_without_a_plan_margin_the_default_margin_holds_a_candidate_the_judge_dislikes():
    decisions, state = drive(plan(None), hours=40, p_candidate=0.2, p_control=0.5)
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow")]
    judge = state.last_evaluation.shadow["judge"]
    assert judge["status"] == "breach" and judge["margin"] == DEFAULT_JUDGE_MAX_CONTROL_PREFERENCE
    assert f"{DEFAULT_JUDGE_MAX_CONTROL_PREFERENCE:.1%} margin" in judge["reason"]
    liked, _ = drive(plan(None), hours=40, p_candidate=0.45, p_control=0.25)
    assert [(d.action, d.stage) for d in liked] == [("start", "shadow"), ("promote", "canary")]


def test_judged_pairs_are_required_unless_the_stage_says_no_judge_runs():
    unjudged = dict(p_candidate=0, p_control=0, judged=False)
    decisions, state = drive(plan(None), hours=40, **unjudged)
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow")]
    assert state.last_evaluation.shadow["judge"]["status"] == "insufficient_data"
    no_judge = plan(None)
    no_judge.stages[0] = msgspec.structs.replace(no_judge.stages[0], min_judged_pairs=0)
    decisions, state = drive(no_judge, hours=40, **unjudged)
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow"), ("promote", "canary")]
    # ... but what a judge does say still counts: a breach holds even then
    decisions, _ = drive(no_judge, hours=40, p_candidate=0.2, p_control=0.5)
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow")]


def test_min_shadow_pairs_holds_the_stage_until_that_many_pairs_are_checked():
    the_plan = plan(None)
    the_plan.stages[0] = msgspec.structs.replace(the_plan.stages[0], min_shadow_pairs=3000)
    decisions, state = drive(the_plan, hours=40, p_candidate=0.45, p_control=0.25)  # 2,400 pairs
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow")]
    shadow = state.last_evaluation.shadow
    assert shadow["blocking"][0] == "shadow: 2,400 pairs, need 3,000" and shadow["rule"]["min_shadow_pairs"] == 3000
    refusal = next(c for c in shadow["checks"] if c["metric"] == "refusal")
    assert refusal["status"] == "insufficient_data" and "need 3000 per arm" in refusal["reason"]


def test_a_relative_tail_limit_on_a_zero_control_rate_reads_as_any_increase():
    guarded = plan(None, guardrails=[GuardrailSpec(metric="error_rate_refusal", max_relative_increase=0.2)])
    decisions, state = drive(guarded, hours=40, p_candidate=0.45, p_control=0.25)
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow"), ("promote", "canary")]
    decisions, state = drive(guarded, hours=40, p_candidate=0.45, p_control=0.25, candidate_refusal=0.2)
    assert [(d.action, d.stage) for d in decisions] == [("start", "shadow")]
    refusal = next(c for c in state.last_evaluation.shadow["checks"] if c["metric"] == "refusal")
    assert refusal["status"] == "breach" and refusal["difference"] == "absolute"
    json_break = next(c for c in state.last_evaluation.shadow["checks"] if c["metric"] == "json_break")
    assert json_break["status"] == "not_applicable"  # no request expected JSON


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("min_shadow_pairs", 1, "Expected `int` >= 2"),
        ("min_judged_pairs", -1, "Expected `int` >= 0"),
    ],
)
def test_the_stage_numbers_are_validated(field, value, message):
    from safeswap.core.plan import validate_plan_data

    data = msgspec.to_builtins(plan(None))
    data["stages"][0][field] = value
    report = validate_plan_data(data)
    assert not report.ok and any(message in line and field in line for line in report.lines()), report.lines()
    data["stages"][0].pop(field)
    data["stages"][1][field] = 10
    report = validate_plan_data(data)
    assert not report.ok and any("stages[1]." + field in line for line in report.lines()), report.lines()


def test_shadow_snapshots_are_kept_apart_from_outcome_snapshots_and_survive_persistence():
    rollouts: dict[str, RolloutState] = {}
    on_plan(rollouts, plan(0.05), ts=0)
    state = rollouts["r1"]
    outcome = StatsSnapshot(rollout_id="r1", partition=0, seq=5, ts=HOUR, users={"control": 3}, metrics={})
    acc = ShadowAccumulator()
    acc.add_pair(convert(ShadowPair, pair_fields(1)))
    shadow = StatsSnapshot(
        rollout_id="r1", partition=0, seq=1, ts=HOUR, users={}, metrics={}, source="shadow:w1", shadow=acc.to_dict()
    )
    on_snapshot(state, outcome)
    on_snapshot(state, shadow)
    assert state.snapshots[0].seq == 5 and state.shadow_snapshots["shadow:w1|0"].seq == 1
    assert on_snapshot(state, shadow) is None  # replayed: ignored
    # a second worker incarnation of the same partition adds up, it does not replace
    on_snapshot(state, msgspec.structs.replace(shadow, source="shadow:w2"))
    assert state.last_evaluation.shadow["pairs"] == 2
    restored = RolloutState.from_dict(msgspec.json.decode(msgspec.json.encode(state.to_dict())))
    assert set(restored.shadow_snapshots) == {"shadow:w1|0", "shadow:w2|0"}
    assert restored.snapshots[0].seq == 5


def test_derived_tails():
    assert is_refusal(side(response_text="I'm sorry, but I can't help with that."))
    assert is_refusal(side(response_text="I cannot assist with this request."))
    assert is_refusal(side(response_text="", error="refusal"))
    assert not is_refusal(side(response_text="Sorry for the wait! Here is the answer."))
    assert not json_broken(side(response_text=' {"a": 1} '))
    assert not json_broken(side(response_text='```json\n{"a": 1}\n```'))
    assert json_broken(side(response_text='Here you go: {"a": 1}'))
    acc = ShadowAccumulator()
    acc.add_pair(convert(ShadowPair, pair_fields(1, expects_json=True, control='{"x": 1}', candidate="not json")))
    acc.add_pair(convert(ShadowPair, pair_fields(2, candidate=None, candidate_error="timeout")))
    totals = merge([acc.to_dict(), acc.to_dict()])
    cand, ctrl = totals["sides"]["candidate"], totals["sides"]["control"]
    assert (cand["json_n"], cand["json_break"], ctrl["json_break"]) == (2, 2, 0)
    assert (cand["timeout"], cand["error"], ctrl["timeout"]) == (2, 2, 0)
    assert sum(cand["latency_bins"].values()) == 2  # the timed-out side's latency is left out


@pytest.mark.parametrize(
    "wins,losses,ties,status",
    [(180, 30, 90, "ok"), (30, 180, 90, "breach"), (90, 96, 114, "undecided"), (3, 1, 1, "insufficient_data")],
)
def test_judge_summary_statuses(wins, losses, ties, status):
    counts = {"judged": wins + losses + ties, "candidate_wins": wins, "control_wins": losses, "ties": ties}
    the_plan = plan(0.05, min_users_per_arm=50, n_tune=600)
    result = analyze({"judge": counts}, the_plan, the_plan.stages[0])["judge"]
    assert result["status"] == status
    if status != "insufficient_data":
        rate = result["rates"]["candidate_wins"]
        assert rate["ci_low"] <= wins / counts["judged"] <= rate["ci_high"]
