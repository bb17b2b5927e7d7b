"""Live judge scores are monitored, never a decision input: the controller shows them in the
status and decides exactly as it would without them, however bad they are."""

from __future__ import annotations

import msgspec
import pytest

from safeswap.core.controller import RolloutState, on_plan, on_snapshot, status_of
from safeswap.core.live_scores import LiveScoreAccumulator
from schemas import StatsSnapshot, encode
from tests.safeswap.core.controller.sim import Behaviour, Sim
from tests.safeswap.core.controller.test_controller import plan


def live_snapshot(
    rollout_id: str, partition: int, seq: int, ts: int, users: int, scores: dict[str, int]
) -> StatsSnapshot:
    """``users`` users per variant on ``partition``, each scored ``scores[variant]`` (and one point
    more for every other user, so the arms have spread)."""
    accumulator = LiveScoreAccumulator()
    for variant, score in scores.items():
        for user in range(users):
            accumulator.add_trace(variant, ts)
            accumulator.add_result(variant, "scored", f"{variant}-{partition}-{user}", score + user % 2, 0.002)
    return StatsSnapshot(
        rollout_id=rollout_id,
        partition=partition,
        seq=seq,
        ts=ts,
        users={},
        metrics={},
        source="live_judge:worker1",
        live_judge=accumulator.to_dict(),
    )


def drive(the_plan, *, live_scores: dict[str, int] | None, hours: int = 120, sim_behaviour=None):
    """The controller hour by hour (as test_controller.run does), with live judge snapshots
    after each hour's statistics when ``live_scores`` is given."""
    sim = Sim("r1", "r1", seed=7, behaviour=sim_behaviour or {"control": Behaviour(), "candidate": Behaviour()})
    rollouts: dict[str, RolloutState] = {}
    decisions = [on_plan(rollouts, the_plan, ts=sim.ts)]
    state = rollouts[the_plan.rollout_id]
    for hour in range(hours):
        for snapshot in sim.step(400, state.percent):
            if decision := on_snapshot(state, snapshot):
                decisions.append(decision)
        if live_scores is not None and state.stage in ("canary", "ramp"):
            for partition in range(4):
                snapshot = live_snapshot("r1", partition, hour + 1, sim.ts, 10 + hour, live_scores)
                assert on_snapshot(state, snapshot) is None  # never a decision
        if state.stage in ("rolled_back", "complete", "paused"):
            break
    return decisions, state


def steps(decisions) -> list[tuple]:
    return [(d.seq, d.ts, d.action, d.stage, d.percent, d.reason) for d in decisions]


def test_a_terrible_live_judge_score_causes_no_rollback_pause_or_hold():
    # Control scored 9-10, the candidate 1-2 by the judge; the outcome metrics are healthy.
    with_scores, state = drive(plan(), live_scores={"control": 9, "candidate": 1})
    without, _ = drive(plan(), live_scores=None)
    assert steps(with_scores) == steps(without)  # the same decisions, at the same event times
    assert [d.action for d in with_scores] == ["start", "promote", "promote", "complete"]
    live = status_of(state).live_judge
    assert live["role"] == "monitored, not a decision input"
    assert live["difference"]["ci_high"] < -7  # the judge is sure the candidate is far worse
    per_partition = live["variants"]["candidate"]["users"] // 4  # the latest snapshot's users, scored 1 or 2
    assert live["variants"]["candidate"]["mean"] == pytest.approx(1 + (per_partition // 2) / per_partition)
    assert live["variants"]["control"]["users"] == live["variants"]["candidate"]["users"] > 100


def test_a_breach_on_the_outcome_metrics_still_rolls_back_with_live_scores_beside_it():
    worse = {"control": Behaviour(), "candidate": Behaviour(thumbs_down=0.12)}
    with_scores, _ = drive(plan(), live_scores={"control": 3, "candidate": 9}, sim_behaviour=worse)
    without, _ = drive(plan(), live_scores=None, sim_behaviour=worse)
    assert steps(with_scores) == steps(without) and with_scores[-1].action == "rollback"
    assert "thumbs_down_rate" in with_scores[-1].reason and "judge" not in with_scores[-1].reason


def test_live_snapshots_take_no_look_and_a_malformed_one_is_refused_before_it_is_kept():
    rollouts: dict[str, RolloutState] = {}
    on_plan(rollouts, plan(), ts=1)
    state = rollouts["r1"]
    good = live_snapshot("r1", 0, 1, 5_000, 3, {"control": 8, "candidate": 2})
    assert on_snapshot(state, good) is None
    assert state.now_ts == 0 and state.last_evaluation is None and state.stage_started_ts == 0  # no look
    assert on_snapshot(state, msgspec.structs.replace(good, seq=1, live_judge={})) is None  # older: ignored
    bad = msgspec.structs.replace(good, seq=2, live_judge={"variants": {"control": {"scored": -4}}})
    with pytest.raises(ValueError, match="live judge snapshot of 'r1' from partition 0: live_judge control scored"):
        on_snapshot(state, bad)
    assert state.live_judge_snapshots["live_judge:worker1|0"].seq == 1
    assert status_of(state).live_judge["variants"]["control"]["scored"] == 3
    assert status_of(state).shadow == {}  # not mistaken for shadow statistics


def test_the_live_snapshots_survive_the_decide_agents_table():
    rollouts: dict[str, RolloutState] = {}
    on_plan(rollouts, plan(), ts=1)
    state = rollouts["r1"]
    on_snapshot(state, live_snapshot("r1", 1, 4, 9_000, 5, {"control": 6, "candidate": 7}))
    restored = RolloutState.from_dict(msgspec.json.decode(msgspec.json.encode(state.to_dict())))
    assert status_of(restored).live_judge == status_of(state).live_judge != {}
    assert encode(status_of(restored))  # the status still encodes for the status topic


def test_rollout_status_prints_the_judge_score_by_variant_and_its_role():
    from rich.console import Console

    from safeswap.tools.views import status_view

    rollouts: dict[str, RolloutState] = {}
    start = on_plan(rollouts, plan(), ts=1)
    state = rollouts["r1"]
    console = Console(record=True, width=250)
    for renderable in status_view(status_of(state), start):
        console.print(renderable)
    assert "judge score by variant" not in console.export_text()  # nothing scored: no table
    on_snapshot(state, live_snapshot("r1", 0, 1, 5_000, 150, {"control": 8, "candidate": 3}))
    status = status_of(state)
    for renderable in status_view(status, start):
        console.print(renderable)
    text = console.export_text()
    assert "judge score by variant, 1-10 (monitored, not a decision input)" in text
    assert "8.50" in text and "3.50" in text and "150" in text  # means, scored and users per variant
    assert "candidate - control -5.00 points, always-valid 95% interval" in text
    # --json: the same summary under status.live_judge
    assert msgspec.to_builtins(status)["live_judge"]["variants"]["candidate"]["mean"] == 3.5
