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
    "stages": [{"name": "canary", "percent": 50, "min_duration": "4h", "min_users_per_arm": 300},
               {"name": "ramp", "percent": 80, "min_duration": "3h"},
               {"name": "ramp", "percent": 100}],
    "min_users_per_arm": 100,
    "guardrails": [{"metric": "thumbs_down_rate", "max_relative_increase": 0.05, "action": "rollback"},
                   {"metric": "error_rate", "max_relative_increase": 0.5, "action": "pause"}],
}
CONTROL = {"thumbs_down_rate": 0.2, "error_rate": 0.01}


def simulate(tmp_path: Path, scenario: dict, plan: dict = PLAN) -> dict:
    plan_path, scenario_path = tmp_path / "plan.yaml", tmp_path / "scenario.yaml"
    plan_path.write_text(yaml.safe_dump(plan))
    scenario_path.write_text(yaml.safe_dump(scenario))
    env = dict(os.environ)
    env.pop("SAFESWAP_BROKER", None)  # the command starts its own embedded broker and worker
    result = subprocess.run(
        [sys.executable, "-m", "safeswap", "simulate", "--plan", str(plan_path), "--scenario", str(scenario_path),
         "--data", str(tmp_path / "data"), "--json"],
        capture_output=True, text=True, env=env, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def actions(out: dict) -> list[tuple[str, str, float]]:
    return [(d["action"], d["stage"], d["percent"]) for d in out["decisions"]]


def scenario(candidate: dict | None = None, faults: list | None = None, **fields) -> dict:
    return {"duration": "30h", "users_per_hour": 500, "requests_per_user": 3,
            "variants": {"control": CONTROL, "candidate": candidate or {}}, "faults": faults or [], **fields}


@pytest.mark.integration
def test_a_a_rollout_walks_every_stage_and_completes(tmp_path):
    out = simulate(tmp_path, scenario())
    assert actions(out) == [("start", "canary", 50), ("promote", "ramp", 80), ("promote", "ramp", 100),
                            ("complete", "complete", 100)]
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
    from safeswap.simulate import ScenarioError, arm_models, load_scenario

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(scenario(candidate={"thumbs_down_rate": 0.3}, faults=[
        {"kind": "model_switch", "variant": "candidate", "at": "3d", "model": "m-20260415"}])))
    loaded = load_scenario(str(good))
    arms = arm_models(loaded)
    assert arms["candidate"].thumbs_down == 0.3 and arms["candidate"].error == CONTROL["error_rate"]  # copied
    bad = tmp_path / "bad.yaml"
    bad.write_text("duration: 3 days\nusers_per_hour: 10\nfaults:\n  - {kind: drop_events, variant: candidate, shares: 0.1}\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(str(bad))
    assert f"{bad}:4: faults[0].shares: unknown field" in str(info.value)
    bad.write_text("duration: 3 days\n")
    with pytest.raises(ScenarioError, match="duration: '3 days' is not a duration"):
        load_scenario(str(bad))
