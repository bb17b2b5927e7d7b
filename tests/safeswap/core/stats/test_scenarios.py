"""Realistic rollouts (safeswap.core.stats.scenarios): the generated traffic's properties, the closed
loop through the real processor and controller, determinism across worker processes, the CLI."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from safeswap.cli.stats import register
from safeswap.core.assignment import in_candidate
from safeswap.core.stats import Ratio
from safeswap.core.stats.scenarios import (
    DAY_MS,
    SCENARIOS,
    SESSION_GAP_MS,
    EventStream,
    _ratio_sums_by_look,
    fixed_split_events,
    generate_traffic,
    run_realistic,
    run_rollout,
)
from schemas import FeedbackEvent, TraceEvent

LOOK_MINUTES = 240  # a quarter of the default looks: the same closed loop, at a fraction of the cost


def _traffic(name: str, seed: int = 0, salt: str = "test-salt"):
    return generate_traffic(SCENARIOS[name], np.random.default_rng(seed), salt)


def _traces(events):
    return [e for e in events if isinstance(e, TraceEvent)]


def _visits_per_user(traces) -> np.ndarray:
    """Visits measured from the events: a user's requests not separated by the 30-minute gap."""
    by_user: dict[str, list[int]] = {}
    for trace in traces:
        by_user.setdefault(trace.user_id, []).append(trace.ts)
    return np.array([1 + int((np.diff(sorted(ts)) >= SESSION_GAP_MS).sum()) for ts in by_user.values()])


def test_visit_counts_are_heavy_tailed_and_separated_by_the_session_gap():
    name = "returning_users"
    traces = _traces(fixed_split_events(_traffic(name), SCENARIOS[name], 0))
    visits = _visits_per_user(traces)
    assert 4.0 <= visits.mean() <= 7.0
    assert visits.max() >= 30 and np.median(visits) < visits.mean()  # a long right tail
    # Within a visit requests are seconds to minutes apart; visits are more than the gap apart.
    gaps = np.concatenate(
        [np.diff(sorted(t.ts for t in traces if t.user_id == u)) for u in {t.user_id for t in traces[:3000]}]
    )
    assert np.all((gaps <= 10 * 60_000) | (gaps > SESSION_GAP_MS))

    heavy = _visits_per_user(
        _traces(fixed_split_events(_traffic("returning_users_heavy"), SCENARIOS["returning_users_heavy"], 0))
    )
    assert heavy.mean() >= 10 and heavy.max() >= 50


def test_latency_intra_user_correlation_is_about_one_half():
    name = "latency_clustered"
    traces = _traces(fixed_split_events(_traffic(name), SCENARIOS[name], 0))
    first_two: dict[str, list[float]] = {}
    for trace in traces:
        seen = first_two.setdefault(trace.user_id, [])
        if len(seen) < 2:
            seen.append(math.log(trace.latency_ms))
    pairs = np.array([p for p in first_two.values() if len(p) == 2])
    assert len(pairs) > 500
    assert 0.4 < np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1] < 0.6
    per_user = np.bincount(_traffic(name).user)
    assert per_user.min() >= 1 and per_user.max() == 20


def _daily_thumbs_down(name: str, seeds=(0, 1, 2)) -> np.ndarray:
    down, responses = np.zeros(5), np.zeros(5)
    for seed in seeds:
        events = fixed_split_events(_traffic(name, seed), SCENARIOS[name], 0)
        for event in events:
            day = min(event.ts // DAY_MS, 4)
            if isinstance(event, TraceEvent):
                responses[day] += 1
            else:
                down[day] += 1
    return down / responses


def test_weekly_cycle_shows_in_the_daily_thumbs_down_rates():
    rates = _daily_thumbs_down("ramp_weekly")
    cycle = 1 - 0.2 * np.cos(2 * np.pi * (np.arange(5) + 0.5) / 7)  # from the trough, rising
    assert np.corrcoef(rates, cycle)[0, 1] > 0.8
    assert rates[3] > 1.25 * rates[0]
    flat = _daily_thumbs_down("returning_users")
    assert flat.max() < 1.25 * flat.min()


def test_the_controller_drives_the_ramp_and_the_step_jumps_at_the_promotion_to_fifty_percent():
    events = []
    result = run_rollout("ramp_step", seed=0, run=0, look_minutes=LOOK_MINUTES, sink=events.append)
    # The decisions are the real controller's: a canary at once, promotions after the watch.
    decisions = result["decisions"]
    assert decisions[0] == ("start", "canary", 5.0, 0)
    assert decisions[1][:3] == ("promote", "ramp", 10.0) and decisions[1][3] >= DAY_MS
    assert result["rejected"] == 0 and result["users"] > 500
    promoted = [d for d in decisions if d[0] == "promote" and d[2] == 50]
    assert promoted and result["step_ts"] == promoted[0][3]
    step = result["step_ts"]
    before = [e for e in events if e.ts <= step]
    after = [e for e in events if e.ts > step + 60_000]  # feedback of earlier traces trails by seconds

    def rate(es):
        return sum(isinstance(e, FeedbackEvent) for e in es) / len(_traces(es))

    assert 0.02 < rate(before) < 0.04
    assert 2.0 < rate(after) / rate(before) < 4.5


def test_traffic_multiplier_scales_users_in_the_same_time():
    users = {
        name: np.mean([len(_traffic(name, seed).user_ids) for seed in range(3)])
        for name in ("returning_users", "traffic_0.7x", "traffic_1.3x")
    }
    assert users["traffic_1.3x"] / users["returning_users"] == pytest.approx(1.3, abs=0.06)
    assert users["traffic_0.7x"] / users["returning_users"] == pytest.approx(0.7, abs=0.06)


def test_assignment_follows_the_current_percent_and_is_sticky():
    name, salt = "returning_users", "sticky-salt"
    traffic = _traffic(name, salt=salt)
    stream = EventStream(traffic, SCENARIOS[name])
    ramp = [(0, 5.0), (DAY_MS, 10.0), (2 * DAY_MS, 50.0)]
    served: dict[str, str] = {}
    checked = 0
    while (t := stream.peek()) is not None:
        percent = [p for start, p in ramp if start <= t][-1]
        stream.set_percent(percent)
        event = stream.pop()
        if not isinstance(event, TraceEvent):
            continue
        expected = "candidate" if in_candidate(salt, event.user_id, percent) else "control"
        assert event.variant == expected
        # Sticky: once served the candidate, never control again while the split only grows.
        assert not (served.get(event.user_id) == "candidate" and event.variant == "control")
        served[event.user_id] = event.variant
        checked += 1
    assert checked == traffic.requests
    share = sum(v == "candidate" for v in served.values()) / len(served)
    assert 0.4 < share < 0.6  # the last split each user saw is mostly 50%


def test_previous_method_sums_equal_the_per_unit_ratio():
    rng = np.random.default_rng(5)
    n = 400
    t = np.sort(rng.integers(0, 10_000, n))
    unit = rng.integers(0, 60, n)
    arm = unit % 2 == 1
    d_num = rng.integers(0, 2, n).astype(float)
    d_den = rng.integers(0, 3, n).astype(float)
    looks = np.array([2_500, 5_000, 10_000])
    sums = _ratio_sums_by_look(t, unit, arm, d_num, d_den, looks)
    for j, at in enumerate(looks):
        for k, variant in enumerate((False, True)):
            mine = (t <= at) & (arm == variant)
            units = np.unique(unit[mine])
            num = [d_num[mine & (unit == u)].sum() for u in units]
            den = [d_den[mine & (unit == u)].sum() for u in units]
            expected = Ratio.from_units(num, den)
            got = sums[k][:, j]
            assert got[0] == expected.n_units
            assert got[1:] == pytest.approx(
                [expected.num, expected.num_sq, expected.den, expected.den_sq, expected.num_den]
            )


# Every scenario but the segment power one, whose 30,000 users take a minute a run (its traffic
# and code path, smaller, are tests/safeswap/core/controller/test_segments.py's).
EVERY = [name for name in SCENARIOS if name != "ab_segment_plus_50"]


# The tests sharing a module fixture run in one xdist process, so it is computed once.
@pytest.fixture(scope="module")
def every_scenario():
    return run_realistic(EVERY, runs=2, seed=0, look_minutes=LOOK_MINUTES)


@pytest.mark.xdist_group("every_scenario")
def test_every_scenario_runs_end_to_end(every_scenario):
    assert list(every_scenario["scenarios"]) == EVERY
    for name, s in every_scenario["scenarios"].items():
        assert s["runs"] == 2, name
        assert s["users_per_run"] > 300 and s["events_per_run"] > 1000, name
        assert s["rejected_events"] == 0, name
        rates = s["safeswap"]["rate"] + s["pause_rate"] + s["complete_rate"] + s["ended_rate"]
        assert rates == pytest.approx(1.0), name
        # The controller got past the canary in at least one run.
        assert any(not stage.startswith("canary") for stage in s["final_stages"]), name
        lo, hi = s["safeswap"]["ci95"]
        assert lo <= s["safeswap"]["rate"] <= hi
    assert every_scenario["plan"]["stakes"] == "low" and every_scenario["alpha"] == 0.05


def test_a_clearly_harmful_candidate_is_rolled_back():
    """The A/B plan (+20% tolerance) against a candidate with 3x the thumbs-down: at this scale a
    +50% candidate is caught in only some runs (the point of measuring it), a 3x one in every run."""
    harmful = replace(SCENARIOS["ab_thumbs_down_plus_50"], thumbs_down_effect=2.0)
    result = run_rollout("ab_thumbs_down_plus_50", seed=0, run=0, look_minutes=LOOK_MINUTES, scenario=harmful)
    assert result["outcome"] == "rolled_back" and result["rollback_causes"] == ["thumbs_down_rate"]
    assert result["decisions"][-1][:3] == ("rollback", "rolled_back", 0.0)
    assert result["stop_ts"] is not None and result["stop_ts"] < 4 * DAY_MS


def _without_timings(figures: dict) -> dict:
    return {name: {k: v for k, v in s.items() if k != "seconds_per_run"} for name, s in figures["scenarios"].items()}


@pytest.mark.xdist_group("every_scenario")
def test_results_do_not_depend_on_the_number_of_jobs(every_scenario):
    names = ["returning_users"]
    parallel = run_realistic(names, runs=2, seed=0, jobs=2, look_minutes=LOOK_MINUTES)
    serial = _without_timings(every_scenario)
    assert _without_timings(parallel) == {name: serial[name] for name in names}


def test_run_realistic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scenarios"):
        run_realistic(["nope"], runs=1, seed=0)
    with pytest.raises(ValueError, match="runs"):
        run_realistic(None, runs=0, seed=0)
    with pytest.raises(ValueError, match="jobs"):
        run_realistic(None, runs=1, seed=0, jobs=0)


def _app():
    app, plan_app = typer.Typer(), typer.Typer()
    app.add_typer(plan_app, name="plan")
    register(app, plan_app)
    return app


def test_cli_validate_stats_realistic_json():
    result = CliRunner().invoke(
        _app(),
        [
            "validate-stats",
            "--realistic",
            "--runs",
            "2",
            "--scenario",
            "returning_users",
            "--look-minutes",
            "240",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["runs"] == 2 and list(data["scenarios"]) == ["returning_users"]
    figures = data["scenarios"]["returning_users"]
    assert figures["kind"] == "aa" and {"rate", "mc_se", "ci95"} <= set(figures["safeswap"])
    assert {"rate", "mc_se"} <= set(figures["previous"])


def test_cli_validate_stats_realistic_unknown_scenario_is_one_line():
    result = CliRunner().invoke(_app(), ["validate-stats", "--realistic", "--runs", "2", "--scenario", "nope"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "nope" in result.output
