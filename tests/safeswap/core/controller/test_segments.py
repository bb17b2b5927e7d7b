"""Segment guardrails: a regression confined to one segment rolls back, named; the budget keeps
the plan's alpha; a segment too small to test says so; values beyond the cap are listed."""

from __future__ import annotations

from dataclasses import replace

import msgspec
import pytest

from safeswap.core.controller import RolloutState, alpha_split, on_plan, on_snapshot, status_of
from safeswap.core.outcomes import OutcomeProcessor
from safeswap.core.stats.scenarios import SCENARIOS, run_rollout, summarise
from safeswap.tools.views import status_view
from schemas import RolloutPlan
from tests.support.events import NOW, T0, feedback, trace

HOUR = 3_600_000


def plan(**fields) -> RolloutPlan:
    base = {
        "rollout_id": "r1",
        "stakes": "low",
        "stages": [{"name": "canary", "percent": 50, "min_duration": "30d"}, {"name": "ramp", "percent": 100}],
        "alpha": 0.05,
        "min_users_per_arm": 30,
        "guardrails": [{"metric": "thumbs_down_rate", "max_relative_increase": 0.2, "action": "rollback"}],
        "segments": ["locale"],
        "max_segment_values": 4,
    }
    return msgspec.convert({**base, **fields}, RolloutPlan)


def test_the_budget_shares_the_plans_alpha():
    guarded = plan(
        guardrails=[
            {"metric": "thumbs_down_rate", "action": "rollback"},
            {"metric": "error_rate", "action": "rollback"},
        ],
        segments=["locale", "tier"],
        max_segment_values=8,
    )
    population, segment = alpha_split(guarded)
    assert population == pytest.approx(0.025 / 2)
    assert segment == pytest.approx(0.025 / (2 * 2 * 8))
    # every test the plan can run, at most: 2 population + 2 x 2 x 8 segment ones
    assert 2 * population + 2 * 2 * 8 * segment == pytest.approx(guarded.alpha)
    assert alpha_split(plan(segments=[])) == (0.05, 0.0)


def run(the_plan: RolloutPlan, users: list[tuple[str, str, float]], seed: int = 3) -> tuple[RolloutState, list]:
    """users: (locale, variant, thumbs-down probability) per user; one trace (+ maybe a thumbs-down) each."""
    import random

    rng = random.Random(seed)
    rollouts: dict = {}
    processor = OutcomeProcessor(0)
    decisions = [on_plan(rollouts, the_plan, ts=T0)]
    processor.on_decision(decisions[0])
    state = rollouts["r1"]
    for n, (locale, variant, p) in enumerate(users, start=1):
        ts = T0 + n * 1000
        processor.apply(trace(n, ts, user=f"u{n}", variant=variant, segment={"locale": locale}), NOW)
        if rng.random() < p:
            processor.apply(feedback(n, n, ts + 500, "thumbs_down", user=f"u{n}", variant=variant), NOW)
        if n % 500 == 0:
            decision = on_snapshot(state, processor.snapshot("r1", seq=n))
            if decision is not None:
                decisions.append(decision)
                if decision.action == "rollback":
                    break
    return state, decisions


def traffic(n: int, harm: dict[str, float]) -> list[tuple[str, str, float]]:
    locales = ["en", "en", "en", "es", "es", "ja", "de", "fr", "en", "es"]
    out = []
    for i in range(n):
        locale = locales[i % len(locales)]
        variant = "candidate" if (i // len(locales)) % 2 else "control"
        p = 0.1 * (1 + harm.get(locale, 0.0)) if variant == "candidate" else 0.1
        out.append((locale, variant, p))
    return out


def test_a_regression_in_one_segment_rolls_back_naming_it():
    state, decisions = run(plan(max_segment_values=8), traffic(30_000, {"ja": 3.0}))
    rollback = decisions[-1]
    assert rollback.action == "rollback", [d.reason for d in decisions]
    assert "in locale=ja" in rollback.reason and "thumbs_down_rate" in rollback.reason
    breached = [e for e in rollback.segment_evidence if e.status == "breach"]
    assert [(e.segment, e.metric) for e in breached] == [("locale=ja", "thumbs_down_rate")]
    # the whole population's guardrail did not see it: the segment test is what caught it
    assert all(e.status != "breach" for e in rollback.evidence)
    assert rollback.segments == ["locale"] and rollback.segment_metrics == ["thumbs_down_rate"]


def test_small_segments_say_they_are_too_small_and_values_beyond_the_cap_are_listed():
    # de is a tenth of users: 25 per arm at 500 users, below min_users_per_arm
    state, _ = run(plan(max_segment_values=3), traffic(500, {}))
    status = status_of(state)
    tested = {e.segment for e in status.segment_guardrails}
    assert len(tested) == 3 and status.segments_untested  # 5 locales, 3 slots
    assert set(status.segments_untested) | tested == {"locale=en", "locale=es", "locale=ja", "locale=de", "locale=fr"}
    small = [e for e in status.segment_guardrails if e.status == "insufficient_data"]
    assert small and all("need 30 per arm" in e.reason and f"in {e.segment}" in e.reason for e in small)
    # rollout status shows the table, the small segments' reason and what was not tested
    from rich.console import Console

    console = Console(width=200, record=True)
    for item in status_view(status, state.last_decision):
        console.print(item)
    text = console.export_text()
    assert "segment guardrails" in text and "not tested (beyond max_segment_values)" in text
    assert "need 30 per arm" in text


def test_segment_monitors_survive_a_restart_of_the_decide_agent():
    state, _ = run(plan(), traffic(3000, {}))
    assert state.segment_monitors
    restored = RolloutState.from_dict(msgspec.json.decode(msgspec.json.encode(state.to_dict())))
    assert {s: {m: x.to_dict() for m, x in ms.items()} for s, ms in restored.segment_monitors.items()} == {
        s: {m: x.to_dict() for m, x in ms.items()} for s, ms in state.segment_monitors.items()
    }


def test_a_plan_without_segments_keeps_no_segment_state():
    state, decisions = run(plan(segments=[]), traffic(2000, {"ja": 3.0}))
    assert not state.segment_monitors and all(not d.segment_evidence and not d.segments for d in decisions)


def test_closed_loop_rollout_rolls_back_naming_the_harmed_locale():
    """The validation scenario's traffic (returning users, a ramp) through the worker's code, smaller
    and with a larger harm so one run shows it."""
    scenario = replace(SCENARIOS["ab_segment_plus_50"], users=4000, min_users_per_arm=40, thumbs_down_effect=4.0)
    result = run_rollout("ab_segment_plus_50", seed=2, run=0, scenario=scenario, look_minutes=180)
    assert result["outcome"] == "rolled_back"
    assert "thumbs_down_rate in locale=ja" in result["rollback_causes"]
    summary = summarise("ab_segment_plus_50", [result, {**result, "outcome": "complete", "rollback_causes": []}])
    assert summary["segment_named"]["rate"] == 0.5 and summary["safeswap"]["rate"] == 0.5
