"""Users as the unit across visits, exposure cohorts per split period, CMH across cohorts,
group-sequential guardrails over the plan's watch: processor and controller together."""

from __future__ import annotations

import random

import msgspec
import numpy as np
import pytest

from safeswap.core.controller import (
    RolloutState,
    cohort_strata,
    evaluate,
    merge_cohorts,
    on_plan,
    on_snapshot,
    plan_hash,
    watch_horizon_s,
)
from safeswap.core.dedup import id_hash
from safeswap.core.metrics import UNIT_BUCKETS, M
from safeswap.core.outcomes import OutcomeProcessor
from safeswap.core.stats import Ratio
from schemas import Decision, StatsSnapshot
from schemas.events import SequentialSpec
from tests.safeswap.core.controller.test_controller import plan
from tests.support.events import NOW, T0, feedback, trace

HOUR = 3_600_000


def decision(starts: list[int], rollout: str = "r1") -> Decision:
    return Decision(
        rollout_id=rollout,
        seq=len(starts) + 1,
        ts=starts[-1] if starts else T0,
        action="promote",
        stage="ramp",
        percent=50,
        salt=rollout,
        reason="test",
        cohort_starts=starts,
    )


def test_a_new_user_is_filed_under_the_split_period_of_its_first_exposure():
    processor = OutcomeProcessor(0)
    processor.apply(trace(1, T0, user="early"), NOW)
    processor.on_decision(decision([T0 + HOUR]))
    processor.apply(trace(2, T0 + 2 * HOUR, user="late", prompt="b"), NOW)
    processor.apply(trace(3, T0 + 3 * HOUR, user="early", prompt="c"), NOW)  # back after the promotion
    assert {key: sums.users for key, sums in processor.cells.items()} == {
        ("r1", "control", 0, ""): 1,
        ("r1", "control", 1, ""): 1,
    }
    snapshot = processor.snapshot("r1", seq=1)
    assert snapshot.cohort_starts == [T0 + HOUR]
    assert snapshot.cohort_exposures == {"0": {"control": 1}, "1": {"control": 1}}
    # "early" came back in the new period but stays in its own cohort: two responses there
    assert snapshot.cohorts["0"]["control"]["thumbs_down_rate"]["den"] == 2
    assert snapshot.cohorts["1"]["control"]["thumbs_down_rate"]["den"] == 1
    # an older decision (fewer boundaries) never moves the boundaries back
    processor.on_decision(decision([]))
    assert processor.cohort_starts["r1"] == [T0 + HOUR]


def test_a_control_user_moved_to_the_candidate_keeps_counting_in_control():
    """Intention to treat: the arm and cohort of the first exposure, however the ramp moves the user."""
    processor = OutcomeProcessor(0)
    processor.apply(trace(1, T0, user="mover", variant="control"), NOW)
    processor.apply(feedback(1, 1, T0 + 1000, "thumbs_down", user="mover"), NOW)
    processor.on_decision(decision([T0 + HOUR]))
    processor.apply(trace(2, T0 + 2 * HOUR, user="mover", variant="candidate", prompt="b"), NOW)
    processor.apply(feedback(2, 2, T0 + 2 * HOUR + 1000, "thumbs_down", user="mover", variant="candidate"), NOW)
    processor.finish()
    snapshot = processor.snapshot("r1", seq=1)
    assert set(snapshot.cohorts) == {"0"} and set(snapshot.cohorts["0"]) == {"control"}
    assert snapshot.cohorts["0"]["control"]["thumbs_down_rate"]["num"] == 2  # both thumbs-down in control
    assert snapshot.users == {"control": 1, "candidate": 1}  # distinct users served each variant
    assert snapshot.first_exposures == {"control": 1}
    assert snapshot.models == {"control": {"m1": 1}, "candidate": {"m1": 1}}
    assert snapshot.crossover_users == 0  # control -> candidate is what a ramp does, not a leak


def test_a_returning_user_adds_to_the_same_bucket_after_its_state_was_released():
    processor = OutcomeProcessor(0)
    processor.apply(trace(1, T0, user="u"), NOW)
    # with no feedback yet, the watermark trails the traces by the allowed topic skew (24 h)
    processor.apply(trace(2, T0 + 30 * HOUR, user="other"), NOW)
    processor.apply(trace(3, T0 + 31 * HOUR, user="other", prompt="x"), NOW)
    assert ("r1", "u") not in processor.users  # released: only the distinct sets remember u
    processor.on_decision(decision([T0 + 30 * HOUR]))
    processor.apply(trace(4, T0 + 32 * HOUR, user="u", prompt="again"), NOW + 32 * HOUR)
    cell = processor.cells[("r1", "control", 0, "")]
    totals = cell.buckets[id_hash("u") % UNIT_BUCKETS]
    assert totals[2 * M["thumbs_down_rate"] + 1] == 2  # u's two responses, days apart, in one unit
    assert cell.users == 2 and ("r1", "control", 1, "") not in processor.cells  # u and "other", both from before


def test_bucket_sums_give_the_user_level_delta_method_variance():
    """A user never changes bucket, so the delta method over buckets estimates the user-level variance."""
    rng = np.random.default_rng(3)
    users = 200_000
    responses = rng.integers(1, 30, users).astype(float)
    downs = rng.binomial(responses.astype(int), rng.beta(0.5, 9.5, users)).astype(float)
    per_user = Ratio.from_units(downs, responses)
    buckets = rng.integers(0, UNIT_BUCKETS, users)
    y, x = np.bincount(buckets, downs, UNIT_BUCKETS), np.bincount(buckets, responses, UNIT_BUCKETS)
    bucketed = Ratio(
        n_units=UNIT_BUCKETS, num=y.sum(), num_sq=y @ y, den=x.sum(), den_sq=x @ x, num_den=x @ y, users=users
    )
    assert bucketed.n == users and bucketed.estimate == pytest.approx(per_user.estimate)
    # 1,024 buckets estimate the variance within a few percent (chi-square with 1,023 df: sd ~4.4%)
    assert bucketed.variance_of_estimate == pytest.approx(per_user.variance_of_estimate, rel=0.15)
    one_each = Ratio(
        n_units=users,
        num=per_user.num,
        num_sq=per_user.num_sq,
        den=per_user.den,
        den_sq=per_user.den_sq,
        num_den=per_user.num_den,
        users=users,
    )
    assert one_each.variance_of_unit == pytest.approx(per_user.variance_of_unit)  # one user a bucket: identical
    assert Ratio.from_dict(bucketed.to_dict()) == bucketed and "users" not in per_user.to_dict()
    with pytest.raises(ValueError, match="users must be >= n_units"):
        Ratio(n_units=5, num=1, num_sq=1, den=5, den_sq=5, num_den=1, users=4)


def _ratio(users: int, rate: float, per_user: float = 4.0) -> dict:
    """A thumbs-down Ratio of ``users`` users with ``per_user`` responses each (one user a bucket)."""
    den = users * per_user
    num = den * rate
    # per-user thumbs-down counts with a Bernoulli-like spread (variance num*(1-rate))
    num_sq = num * (1 - rate) + num * num / users
    return Ratio(
        n_units=users, num=num, num_sq=num_sq, den=den, den_sq=users * per_user**2, num_den=per_user * num, users=users
    ).to_dict()


def _snapshot(cohorts: dict, seq: int, ts: int, starts: list[int]) -> StatsSnapshot:
    pooled: dict[str, dict] = {}
    for arms in cohorts.values():
        for arm, metrics in arms.items():
            for metric, stat in metrics.items():
                have = pooled.setdefault(arm, {}).get(metric)
                pooled[arm][metric] = (
                    stat if have is None else (Ratio.from_dict(have) + Ratio.from_dict(stat)).to_dict()
                )
    return StatsSnapshot(
        rollout_id="r1",
        partition=0,
        seq=seq,
        ts=ts,
        users={
            arm: sum(
                Ratio.from_dict(s["thumbs_down_rate"]).n for a in cohorts.values() for x, s in a.items() if x == arm
            )
            for arm in pooled
        },
        metrics=pooled,
        cohorts=cohorts,
        cohort_starts=starts,
    )


def test_cohorts_remove_the_time_bias_of_a_ramp_while_the_baseline_moves():
    """A/A: 3% thumbs-down while the split was 10%, 9% after the promotion to 50%. Pooled, the
    candidate (over-represented after the jump) looks +60% worse; cohort by cohort it is equal."""
    rollouts: dict[str, RolloutState] = {}
    on_plan(
        rollouts,
        plan(
            guardrails=[
                msgspec.convert(
                    {"metric": "thumbs_down_rate", "max_relative_increase": 0.2}, type=type(plan().guardrails[0])
                )
            ],
            sequential=SequentialSpec(design="confidence_sequence"),
        ),
        ts=0,
    )
    state = rollouts["r1"]
    cohorts = {
        "0": {
            "control": {"thumbs_down_rate": _ratio(18_000, 0.03)},
            "candidate": {"thumbs_down_rate": _ratio(2_000, 0.03)},
        },
        "1": {
            "control": {"thumbs_down_rate": _ratio(10_000, 0.09)},
            "candidate": {"thumbs_down_rate": _ratio(10_000, 0.09)},
        },
    }
    snapshot = _snapshot(cohorts, seq=1, ts=T0, starts=[T0 - HOUR])
    pooled_lift = (
        Ratio.from_dict(snapshot.metrics["candidate"]["thumbs_down_rate"]).estimate
        / Ratio.from_dict(snapshot.metrics["control"]["thumbs_down_rate"]).estimate
        - 1
    )
    assert pooled_lift > 0.5  # what a pooled comparison would act on
    state.cohort_starts = [T0 - HOUR]
    on_snapshot(state, snapshot)
    verdict = state.last_evaluation.verdicts["thumbs_down_rate"]
    assert verdict.estimate == pytest.approx(0.0, abs=1e-12) and verdict.status == "ok"
    assert verdict.n_control == 28_000 and verdict.n_candidate == 12_000  # distinct users
    strata = cohort_strata(merge_cohorts(state), "thumbs_down_rate")
    assert [len(arm) for arm in strata] == [2, 2]


def test_a_promotion_starts_a_cohort_and_every_decision_carries_the_boundaries():
    from tests.safeswap.core.controller.sim import Sim
    from tests.safeswap.core.controller.test_controller import run

    decisions, state = run(plan(), Sim("r1", "r1", seed=1))
    promotions = [d for d in decisions if d.action == "promote"]
    assert promotions and state.cohort_starts == [d.ts for d in promotions]
    assert decisions[-1].cohort_starts == state.cohort_starts
    assert decisions[0].cohort_starts == []
    restored = RolloutState.from_dict(msgspec.json.decode(msgspec.json.encode(state.to_dict())))
    assert restored.cohort_starts == state.cohort_starts and restored.watch_started_ts == state.watch_started_ts


def test_group_sequential_guardrails_when_the_plan_states_its_watch():
    the_plan = plan()
    assert watch_horizon_s(the_plan) == 48 * 3600  # canary 24h + ramp 50% 24h; the 100% step has no control
    rollouts: dict[str, RolloutState] = {}
    on_plan(rollouts, the_plan, ts=0)
    monitor = rollouts["r1"].monitors["thumbs_down_rate"]
    assert monitor.gst is not None and monitor.cs_alpha == pytest.approx(monitor.alpha * 0.05)
    assert monitor.gst.to_dict()["alpha"] == pytest.approx(monitor.alpha * 0.95)
    no_horizon = plan(
        stages=[s if s.name != "ramp" else msgspec.structs.replace(s, min_duration=None) for s in the_plan.stages]
    )
    assert watch_horizon_s(no_horizon) is None
    rollouts = {}
    on_plan(rollouts, no_horizon, ts=0)
    assert rollouts["r1"].monitors["thumbs_down_rate"].gst is None  # the confidence sequence alone
    rollouts = {}
    on_plan(rollouts, plan(sequential=SequentialSpec(design="confidence_sequence")), ts=0)
    assert rollouts["r1"].monitors["thumbs_down_rate"].gst is None


def test_a_harmful_candidate_is_rolled_back_by_the_group_sequential_test_with_its_reason():
    from tests.safeswap.core.controller.sim import Behaviour, Sim
    from tests.safeswap.core.controller.test_controller import run

    decisions, state = run(
        plan(), Sim("r1", "r1", seed=2, behaviour={"control": Behaviour(), "candidate": Behaviour(thumbs_down=0.09)})
    )
    assert decisions[-1].action == "rollback"
    evidence = {e.metric: e for e in decisions[-1].evidence}["thumbs_down_rate"]
    assert evidence.status == "breach" and evidence.reason
    assert evidence.gst_spent is not None and 0 < evidence.gst_spent <= state.plan.alpha / 2 * 0.95 + 1e-12


def test_plans_without_the_sequential_section_keep_their_hash():
    import hashlib

    p = plan()
    builtins = msgspec.to_builtins(p)
    builtins.pop("sequential")
    before = hashlib.sha256(msgspec.json.encode(builtins, order="sorted")).hexdigest()[:16]
    assert plan_hash(p) == before
    assert plan_hash(plan(sequential=SequentialSpec(design="confidence_sequence"))) != before


def test_a_processor_driven_ramp_files_each_stage_under_its_own_cohort():
    """The processor and the controller together, as the worker and replay run them."""
    rng = random.Random(4)
    rollouts: dict[str, RolloutState] = {}
    the_plan = plan(
        stages=[
            msgspec.convert(
                {"name": "canary", "percent": 10, "min_duration": "1h", "min_users_per_arm": 20},
                type=type(plan().stages[0]),
            ),
            msgspec.convert({"name": "ramp", "percent": 50, "min_duration": "1h"}, type=type(plan().stages[0])),
            msgspec.convert({"name": "ramp", "percent": 100}, type=type(plan().stages[0])),
        ],
        min_users_per_arm=20,
    )
    decisions = [on_plan(rollouts, the_plan, ts=0)]
    state = rollouts["r1"]
    processor = OutcomeProcessor(0)
    n = 0
    for minute in range(0, 5 * 60):
        ts = T0 + minute * 60_000
        for _ in range(4):
            n += 1
            user = f"u{n}"
            variant = "candidate" if rng.random() * 100 < state.percent else "control"
            model = the_plan.candidate.model if variant == "candidate" else the_plan.control.model
            processor.apply(trace(n, ts, user=user, variant=variant, prompt=f"q{n}", model_version=model), NOW)
        if minute % 10 == 9:
            made = on_snapshot(state, processor.snapshot("r1", seq=minute))
            if made is not None:
                decisions.append(made)
                processor.on_decision(made)
        if state.stage in ("complete", "rolled_back", "paused"):
            break
    assert [d.action for d in decisions][:3] == ["start", "promote", "promote"], [d.reason for d in decisions]
    snapshot = processor.snapshot("r1", seq=10_000)
    assert snapshot.cohort_starts == state.cohort_starts
    assert {"0", "1"} <= set(snapshot.cohorts)
    shares = {
        c: arms["candidate"] / sum(arms.values())
        for c, arms in snapshot.cohort_exposures.items()
        if "candidate" in arms and c in ("0", "1")
    }
    assert shares["0"] == pytest.approx(0.10, abs=0.05) and shares["1"] == pytest.approx(0.50, abs=0.1)
    assert evaluate(state).health.srm_p_value > 0.001  # the new period's users at its own split


def test_a_snapshot_with_unusable_totals_never_reaches_a_decision():
    rollouts: dict[str, RolloutState] = {}
    on_plan(rollouts, plan(), ts=0)
    state = rollouts["r1"]
    good = {
        "0": {"control": {"thumbs_down_rate": _ratio(500, 0.05)}, "candidate": {"thumbs_down_rate": _ratio(500, 0.05)}}
    }
    bad = {
        "0": {
            "control": {"thumbs_down_rate": {**_ratio(500, 0.05), "num_sq": -1.0}},
            "candidate": {"thumbs_down_rate": {**_ratio(500, 0.05), "num": float("nan")}},
        }
    }
    with pytest.raises(ValueError, match="partition 0, cohort 0, control thumbs_down_rate: num_sq must be >= 0"):
        on_snapshot(state, msgspec.structs.replace(_snapshot(good, seq=1, ts=T0, starts=[]), cohorts=bad))
    assert state.snapshots == {}  # not kept: the next good snapshot decides as if it never came
    on_snapshot(state, _snapshot(good, seq=2, ts=T0, starts=[]))
    assert state.last_evaluation.verdicts["thumbs_down_rate"].status == "ok"


def test_replay_follows_recorded_decisions_for_the_cohorts():
    import json

    from safeswap.core.outcomes import OutcomeConfig
    from safeswap.tools.replay import DecisionReplay, replay_lines

    events = [trace(1, T0, user="a"), trace(2, T0 + 2 * HOUR, user="b", prompt="q")]
    recorded = decision([T0 + HOUR])
    lines = [
        json.dumps({"type": "trace", **msgspec.to_builtins(events[0])}).encode(),
        json.dumps({"type": "decision", **msgspec.to_builtins(recorded)}).encode(),
        json.dumps({"type": "trace", **msgspec.to_builtins(events[1])}).encode(),
    ]
    controller = DecisionReplay(plan())
    seen = []
    replay_lines(
        lines,
        OutcomeConfig(),
        partitions=1,
        now_ms=NOW,
        look=lambda ps: seen.append(ps[0].snapshot("r1", 1)),
        look_every=1,
        on_recorded_decision=controller.recorded,
    )
    assert controller.follows_recording and controller.summary()["cohort_starts"] == "recorded decisions"
    assert seen[-1].cohort_exposures == {"0": {"control": 1}, "1": {"control": 1}}
