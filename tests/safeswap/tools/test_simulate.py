"""`safeswap simulate`: the closed loop (real FlagClient, worker and controller) proves the controller."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PLAN = {
    "rollout_id": "sim",
    "stakes": "low",
    "control": {"model": "claude-sonnet-4-5-20250929", "prompt_version": "v41"},
    "candidate": {"model": "claude-sonnet-4-6-20260301", "prompt_version": "v41"},
    "skip_shadow": "rehearsal",
    "stages": [
        {"name": "canary", "percent": 50, "min_duration": "4h", "min_users_per_arm": 300},
        {"name": "ramp", "percent": 80, "min_duration": "3h"},
        {"name": "ramp", "percent": 100},
    ],
    "min_users_per_arm": 100,
    "guardrails": [
        {"metric": "thumbs_down_rate", "max_relative_increase": 0.05, "action": "rollback"},
        {"metric": "error_rate", "max_relative_increase": 0.5, "action": "pause"},
    ],
}
CONTROL = {"thumbs_down_rate": 0.2, "error_rate": 0.01}


def simulate(tmp_path: Path, scenario: dict, plan: dict = PLAN) -> dict:
    plan_path, scenario_path = tmp_path / "plan.yaml", tmp_path / "scenario.yaml"
    plan_path.write_text(yaml.safe_dump(plan))
    scenario_path.write_text(yaml.safe_dump(scenario))
    env = dict(os.environ)
    env.pop("SAFESWAP_BROKER", None)  # the command starts its own embedded broker and worker
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "safeswap",
            "simulate",
            "--plan",
            str(plan_path),
            "--scenario",
            str(scenario_path),
            "--data",
            str(tmp_path / "data"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def actions(out: dict) -> list[tuple[str, str, float]]:
    return [(d["action"], d["stage"], d["percent"]) for d in out["decisions"]]


def scenario(candidate: dict | None = None, faults: list | None = None, **fields) -> dict:
    return {
        "duration": "30h",
        "users_per_hour": 500,
        "requests_per_user": 3,
        "variants": {"control": CONTROL, "candidate": candidate or {}},
        "faults": faults or [],
        **fields,
    }


@pytest.mark.integration
def test_a_a_rollout_walks_every_stage_and_completes(tmp_path):
    out = simulate(tmp_path, scenario())
    assert actions(out) == [
        ("start", "canary", 50),
        ("promote", "ramp", 80),
        ("promote", "ramp", 100),
        ("complete", "complete", 100),
    ]
    assert [d["seq"] for d in out["decisions"]] == [1, 2, 3, 4]
    assert all(d["reason"] and d["ts"] > 0 for d in out["decisions"])
    assert out["state"]["stage"] == "complete"
    assert out["rows"]["traces"] > 0 and out["rows"]["decisions"] >= 4 and out["data_dir"]
    assert out["rows"]["outcomes"] > 0  # final per-response outcomes reach their dataset


@pytest.mark.integration
def test_thirty_percent_more_thumbs_down_rolls_back_during_canary(tmp_path):
    out = simulate(tmp_path, scenario(candidate={"thumbs_down_rate": 0.26}))
    assert actions(out)[0] == ("start", "canary", 50)
    assert actions(out)[-1] == ("rollback", "rolled_back", 0)
    assert [a for a, *_ in actions(out)] == ["start", "rollback"]  # never left the canary
    assert "thumbs_down_rate" in out["decisions"][-1]["reason"]


@pytest.mark.integration
def test_ten_percent_of_one_arms_events_lost_pauses(tmp_path):
    out = simulate(tmp_path, scenario(faults=[{"kind": "drop_events", "variant": "candidate", "share": 0.10}]))
    assert actions(out)[-1][:2] == ("pause", "paused")
    reason = out["decisions"][-1]["reason"]
    assert "losing events" in reason or "sample ratio mismatch" in reason


@pytest.mark.integration
def test_model_switch_mid_rollout_pauses(tmp_path):
    switch = {"kind": "model_switch", "variant": "candidate", "at": "3h", "model": "claude-sonnet-4-6-20260415"}
    out = simulate(tmp_path, scenario(faults=[switch]))
    assert actions(out)[-1][:2] == ("pause", "paused")
    assert "claude-sonnet-4-6-20260415" in out["decisions"][-1]["reason"]


@pytest.mark.integration
def test_assignment_by_request_pauses_on_crossover(tmp_path):
    out = simulate(tmp_path, scenario(faults=[{"kind": "assign_by_request"}]))
    assert actions(out)[-1][:2] == ("pause", "paused")
    assert "crossover_max" in out["decisions"][-1]["reason"]


def test_scenario_files_are_checked_with_field_and_line(tmp_path):
    from safeswap.tools.simulate import ScenarioError, arm_models, load_scenario

    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump(
            scenario(
                candidate={"thumbs_down_rate": 0.3},
                faults=[{"kind": "model_switch", "variant": "candidate", "at": "3d", "model": "m-20260415"}],
            )
        )
    )
    loaded = load_scenario(str(good))
    arms = arm_models(loaded)
    assert arms["candidate"].thumbs_down == 0.3 and arms["candidate"].error == CONTROL["error_rate"]  # copied
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "duration: 3 days\nusers_per_hour: 10\nfaults:\n  - {kind: drop_events, variant: candidate, shares: 0.1}\n"
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(str(bad))
    assert f"{bad}:4: faults[0].shares: unknown field" in str(info.value)
    bad.write_text("duration: 3 days\n")
    with pytest.raises(ScenarioError, match="duration: '3 days' is not a duration"):
        load_scenario(str(bad))


# -- the shadow stage ----------------------------------------------------------------------
SHADOW_PLAN = {
    "rollout_id": "sim-shadow",
    "stakes": "low",
    "control": {"model": "claude-sonnet-4-5-20250929", "prompt_version": "v41"},
    "candidate": {"model": "claude-sonnet-4-6-20260301", "prompt_version": "v41"},
    "stages": [
        {
            "name": "shadow",
            "shadow_percent": 50,
            "min_duration": "2h",
            "min_users_per_arm": 100,
            "min_shadow_pairs": 300,
            "min_judged_pairs": 300,
            "judge_max_control_preference": 0.25,
        },
        {"name": "canary", "percent": 50, "min_duration": "3h", "min_users_per_arm": 200},
        {"name": "ramp", "percent": 100},
    ],
    "min_users_per_arm": 100,
    "guardrails": [
        {"metric": "thumbs_down_rate", "max_relative_increase": 0.05, "action": "rollback"},
        {"metric": "error_rate", "max_relative_increase": 0.5, "action": "pause"},
    ],
}


def shadow_traffic(scenario_fields: dict, shadow_percent: float = 50.0):
    """One hour of a scenario's traffic under a shadow decision, from a FlagClient fed by apply()."""
    import msgspec

    from safeswap.core.plan import validate_plan_data
    from safeswap.flags import FlagClient
    from safeswap.tools.simulate import Scenario, Traffic
    from schemas import Decision, encode
    from streams.settings import Settings

    plan = validate_plan_data(SHADOW_PLAN).plan
    flags = FlagClient(settings=Settings(broker="unused:1"))
    flags.apply(
        encode(
            Decision(
                rollout_id=plan.rollout_id,
                seq=1,
                ts=1,
                action="start",
                stage="shadow",
                percent=0.0,
                salt=plan.salt or plan.rollout_id,
                reason="test",
                shadow_percent=shadow_percent,
            )
        )
    )
    scenario_obj = msgspec.convert(scenario_fields, Scenario)
    start = 1_767_225_600_000
    return flags, plan, Traffic(scenario_obj, plan, plan.rollout_id, start).step(flags, start, 3_600_000)


def test_shadow_stage_pairs_each_shadowed_request_with_the_candidates_answer_users_see_control():
    from safeswap.core.shadow_analysis import json_broken
    from safeswap.tools.judge_sim import CANDIDATE_TAG
    from schemas import FeedbackEvent, TraceEvent
    from schemas.events import ShadowPair

    fields = scenario(
        candidate={"refusal_rate": 0.1, "json_valid_rate": 0.5, "latency_ms": {"median": 2000, "p95": 5000}},
        expects_json_share=0.3,
    )
    flags, plan, events = shadow_traffic(fields)
    traces = {e.trace_id: e for e in events if isinstance(e, TraceEvent)}
    pairs = [e for e in events if isinstance(e, ShadowPair)]
    assert {e.variant for e in events if isinstance(e, (TraceEvent, FeedbackEvent))} == {"control"}  # unseen
    shadowed = {t.user_id for t in traces.values() if flags.should_shadow(plan.rollout_id, t.user_id)}
    assert 0 < len(shadowed) < len({t.user_id for t in traces.values()})
    # every request of a shadowed user, and only those, is paired with the trace the user got
    assert sorted(p.request_id for p in pairs) == sorted(t.trace_id for t in traces.values() if t.user_id in shadowed)
    for pair in pairs:
        trace = traces[pair.request_id]
        assert (pair.user_id, pair.ts, pair.prompt_text) == (trace.user_id, trace.ts, trace.prompt_text)
        assert (pair.control.latency_ms, pair.control.cost_usd, pair.control.model_version) == (
            trace.latency_ms,
            trace.cost_usd,
            trace.model_version,
        )
        assert pair.candidate.model_version == plan.candidate.model
        if pair.candidate.response_text is not None:
            assert CANDIDATE_TAG in pair.candidate.response_text
    candidate = [p.candidate for p in pairs]
    control = [p.control for p in pairs]
    assert sum(s.error == "refusal" for s in candidate) > sum(s.error == "refusal" for s in control) == 0

    json_pairs = [p for p in pairs if p.expects_json]
    assert 0 < len(json_pairs) < len(pairs)
    broken = {
        side: sum(getattr(p, side).error == "none" and json_broken(getattr(p, side)) for p in json_pairs)
        for side in ("control", "candidate")
    }
    assert broken["candidate"] > broken["control"] == 0
    assert sum(s.latency_ms for s in candidate) > sum(s.latency_ms for s in control)  # slower candidate model
    # the candidate's answers draw from their own stream: the users' traffic is the same unshadowed
    _, _, unshadowed = shadow_traffic(fields, shadow_percent=0.0)
    assert [e for e in events if not isinstance(e, ShadowPair)] == unshadowed


def test_simulated_judge_follows_the_judge_block_in_both_orders_through_the_real_judge():
    import asyncio

    from safeswap.judge import Judge, judge_pairs
    from safeswap.tools.judge_sim import SimulatedJudge
    from schemas.events import ShadowPair
    from streams.settings import Settings

    _, _, events = shadow_traffic(scenario(candidate={"refusal_rate": 0.05}))
    pairs = [e for e in events if isinstance(e, ShadowPair)]
    by_id = {p.event_id: p for p in pairs}
    for candidate_wins, control_wins in ((0.1, 0.6), (0.5, 0.2)):
        with SimulatedJudge(candidate_wins, control_wins) as endpoint:
            judge = Judge(Settings(anthropic_api_key="placeholder", anthropic_base_url=endpoint.base_url))
            results = asyncio.run(judge_pairs(judge, pairs))
        judgments = [r.judgment for r in results if r.judgment is not None]
        assert len(judgments) == judge.stats.judged > 0 and endpoint.calls == 2 * len(judgments)
        assert judge.stats.errors == judge.stats.malformed == 0
        wins = {w: sum(j.winner == w for j in judgments) / len(judgments) for w in ("candidate", "control", "tie")}
        assert abs(wins["candidate"] - candidate_wins) < 0.1 and abs(wins["control"] - control_wins) < 0.1
        for j in judgments:  # both orders named the same variant (A/B by position), or both said tie
            assert {j.verdict_control_first, j.verdict_candidate_first} in ({"A", "B"}, {"tie"})
            if by_id[j.pair_event_id].candidate.error == "refusal":
                assert j.winner == "control"
        assert judge.stats.cost_usd == pytest.approx(sum(j.cost_usd for j in judgments)) and judge.stats.cost_usd > 0


def shadow_scenario(judge: dict, **fields) -> dict:
    return {
        "duration": "10h",
        "users_per_hour": 300,
        "requests_per_user": 2,
        "variants": {"control": CONTROL, "candidate": {}},
        "judge": judge,
        **fields,
    }


@pytest.mark.integration
def test_rehearsal_passes_shadow_on_pairs_and_judgments_then_serves_the_candidate(tmp_path):
    out = simulate(tmp_path, shadow_scenario({"candidate_wins": 0.35, "control_wins": 0.35}), plan=SHADOW_PLAN)
    steps = actions(out)
    assert steps[0] == ("start", "shadow", 0) and steps[1] == ("promote", "canary", 50)
    rule, shadow = SHADOW_PLAN["stages"][0], out["state"]["shadow"]
    assert shadow["pairs"] >= rule["min_shadow_pairs"] and shadow["judge"]["judged"] >= rule["min_judged_pairs"]
    assert shadow["pairs"] == out["shadow_pairs_sent"] == out["rows"]["shadow"]
    assert out["rows"]["judgments"] >= rule["min_judged_pairs"]
    # the shadowed users were served control only; the candidate was served after the promotion
    import polars as pl

    def dataset(name: str) -> pl.LazyFrame:
        return pl.scan_parquet(
            f"{out['data_dir']}/{name}/**/*.parquet",
            hive_partitioning=True,
            hidden_file_prefix=[".", "_"],
            missing_columns="insert",
            extra_columns="ignore",
        )

    shadowed = dataset("shadow").select("user_id").unique()
    served = dataset("traces").join(shadowed, on="user_id").select("variant").unique().collect()
    assert served["variant"].to_list() == ["control"]
    assert dataset("traces").filter(pl.col("variant") == "candidate").select(pl.len()).collect().item() > 0
    # the recorded dashboard replays the controller from the dataset: it too leaves shadow on the recorded pairs
    from safeswap.dashboard.sources import load_recorded

    view = load_recorded(out["data_dir"]).view(SHADOW_PLAN["rollout_id"])
    assert view["stage_index"] > 0 and all(g["points"] for g in view["guardrails"])


@pytest.mark.integration
def test_a_candidate_the_judge_dislikes_holds_in_shadow_with_the_judges_reason(tmp_path):
    out = simulate(
        tmp_path, shadow_scenario({"candidate_wins": 0.1, "control_wins": 0.6}, duration="6h"), plan=SHADOW_PLAN
    )
    assert actions(out) == [("start", "shadow", 0)]
    assert out["state"]["stage"] == "shadow"
    judge = out["state"]["shadow"]["judge"]
    assert judge["status"] == "breach" and judge["judged"] >= SHADOW_PLAN["stages"][0]["min_judged_pairs"]
    assert any(reason.startswith("judge prefers control") for reason in out["state"]["shadow"]["blocking"])


def test_traffic_goes_out_never_further_behind_than_the_lead_and_past_each_step_end():
    # Sessions outlive a step. Their turns up to the lead past the step's end go with it (so the
    # watermark passes the end and a stage ending there is promoted before the next step's users
    # are assigned); later ones wait for their step, so nothing sent is more than the lead behind
    # the newest event sent before it (the outcomes agent dead-letters events beyond its lateness).
    flags, plan, _ = shadow_traffic(scenario(), shadow_percent=0.0)
    import msgspec

    from safeswap.tools.simulate import Scenario, Traffic

    start, step, lead = 1_767_225_600_000, 600_000, 150_000
    traffic = Traffic(msgspec.convert(scenario(users_per_hour=600), Scenario), plan, plan.rollout_id, start, lead)
    sent, newest = [], 0
    for index in range(12):
        end = start + (index + 1) * step
        events = traffic.step(flags, end - step, step)
        assert [e.ts for e in events] == sorted(e.ts for e in events)
        assert all(e.ts < end + lead for e in events)
        assert events[0].ts > newest - lead  # never late
        assert max(e.ts for e in events) >= end  # the watermark passes the step's end
        newest = max(newest, events[-1].ts)
        sent.extend(events)
    assert traffic.later and min(e.ts for e in traffic.later) >= start + 12 * step + lead  # still to happen
    ids = [e.event_id for e in sent + traffic.later]
    assert len(ids) == len(set(ids))
    # every feedback event's trace was sent before it (or waits with it)
    traces = {e.trace_id for e in sent + traffic.later if type(e).__name__ == "TraceEvent"}
    assert {e.trace_id for e in sent if type(e).__name__ == "FeedbackEvent"} <= traces


@pytest.mark.integration
def test_a_candidate_that_breaks_one_locale_rolls_back_naming_it(tmp_path):
    """Fine on average (+45% thumbs-down, within the +50% allowed), +150% for Japanese users."""
    plan = {
        **PLAN,
        "guardrails": [{"metric": "thumbs_down_rate", "max_relative_increase": 0.5, "action": "rollback"}],
        "segments": ["locale"],
    }
    segments = [{"key": "locale", "shares": {"en": 0.5, "ja": 0.3, "de": 0.2}}]
    out = simulate(
        tmp_path,
        scenario(segments=segments, segment_variants={"locale=ja": {"candidate": {"thumbs_down_rate": 0.5}}}),
        plan,
    )
    rollback = out["decisions"][-1]
    assert rollback["action"] == "rollback", actions(out)
    assert "in locale=ja" in rollback["reason"] and "locale=en" not in rollback["reason"]
    import polars as pl

    import sinks

    traces = pl.read_parquet(sinks.list_files(Path(out["data_dir"]) / "traces"))
    locales = traces["segment_json"].str.json_decode().struct.field("locale")  # each trace's segment, on disk
    assert set(locales.unique()) == {"en", "ja", "de"} and locales.null_count() == 0
