"""A high-stakes plan leaves `registered` only with a real, passing, high-stakes gate; while it
waits there the gate (and only the gate) may be attached by publishing the plan again."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import yaml

from safeswap.core.controller import PlanConflict, RolloutState, on_plan
from safeswap.core.evalgate import assumed_gate, result_hash
from safeswap.core.plan import load_plan
from schemas import StageSpec, encode
from tests.safeswap.core.controller.test_controller import gate_result, plan
from tests.support.kafka import produce

EXAMPLE = Path(__file__).resolve().parents[4] / "examples" / "plan.yaml"
STAGES = [
    StageSpec(name="shadow", shadow_percent=10, min_duration="24h", min_users_per_arm=100),
    StageSpec(name="canary", percent=5, min_duration="24h"),
]


def high(**overrides):
    return plan(stakes="high", stages=STAGES, skip_shadow=None, **overrides)


def rehashed(result: dict, **changes) -> dict:
    forged = {**{k: v for k, v in result.items() if k != "hash"}, **changes}
    return {**forged, "hash": result_hash(forged)}


@pytest.mark.parametrize(
    "attached,why",
    [
        (None, "no offline eval gate"),
        ({"passed": True}, "hash does not match"),  # hand-written
        ({**gate_result(), "passed": True, "lost": []}, None),  # sanity: untouched real result
        (rehashed(gate_result(), lost_count=1, lost=["b"]), "lost 1 case"),  # losses, hash recomputed
        (gate_result({"a": True, "b": True}, {"a": False, "b": True}), "did not pass"),
        (gate_result({"a": True, "b": False}, {"a": False, "b": True}, stakes="low"), "--stakes 'low'"),
        ({**gate_result(), "lost_count": 0, "reason": "edited"}, "hash does not match"),
    ],
)
def test_only_an_unedited_passing_high_stakes_result_opens_registered(attached, why):
    rollouts: dict[str, RolloutState] = {}
    decision = on_plan(rollouts, high(eval_gate=attached), ts=0)
    if why is None:
        assert (decision.action, decision.stage) == ("start", "shadow")
    else:
        assert (decision.action, decision.stage, decision.percent) == ("hold", "registered", 0)
        assert why in decision.reason, decision.reason


def test_a_low_stakes_result_with_losses_and_a_bogus_hash_does_not_start_a_high_stakes_plan():
    low = gate_result({"a": True, "b": False, "c": False}, {"a": False, "b": True, "c": True}, stakes="low")
    assert low["passed"] is True and low["lost_count"] == 1
    decision = on_plan({}, high(eval_gate={**low, "hash": "0" * 64}), ts=0)
    assert decision.stage == "registered" and "hash" in decision.reason
    decision = on_plan({}, high(eval_gate=rehashed(low)), ts=0)
    assert decision.stage == "registered" and "--stakes 'low'" in decision.reason


def test_a_plan_waiting_in_registered_takes_its_gate_later_and_only_its_gate():
    rollouts: dict[str, RolloutState] = {}
    held = on_plan(rollouts, high(), ts=0)
    assert held.stage == "registered"
    with pytest.raises(PlanConflict, match="immutable"):
        on_plan(rollouts, high(alpha=0.01, eval_gate=gate_result()), ts=1)  # more than the gate changed
    still = on_plan(rollouts, high(eval_gate={"passed": True}), ts=2)  # a new gate, still not a valid one
    assert (still.action, still.stage, still.seq) == ("hold", "registered", 2) and "hash" in still.reason
    started = on_plan(rollouts, high(eval_gate=gate_result()), ts=3)
    assert (started.action, started.stage, started.shadow_percent, started.seq) == ("start", "shadow", 10, 3)
    assert started.plan_hash == rollouts["r1"].plan_hash != held.plan_hash
    assert on_plan(rollouts, high(eval_gate=gate_result()), ts=4) is None  # the same again: a replay
    with pytest.raises(PlanConflict):  # out of registered: immutable again, gate included
        on_plan(rollouts, high(eval_gate=gate_result({"a": True}, {"a": True})), ts=5)
    restored = RolloutState.from_dict(msgspec.json.decode(msgspec.json.encode(rollouts["r1"].to_dict())))
    assert restored.plan.eval_gate == gate_result() and restored.stage == "shadow"


def test_rehearsals_assume_a_gate_the_controller_accepts():
    assert on_plan({}, high(eval_gate=assumed_gate("simulate")), ts=0).stage == "shadow"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "safeswap", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        timeout=120,
    )


def write_plan(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(changes)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "gate_text,why",
    [
        (None, "no offline eval gate"),
        (json.dumps({"passed": True}), "hash does not match"),
        (json.dumps(assumed_gate("simulate")), "assumed by simulate"),
    ],
)
def test_rollout_start_refuses_a_high_stakes_plan_without_a_passing_gate_in_one_line(tmp_path, gate_text, why):
    args = ["rollout", "start", str(write_plan(tmp_path)), "--broker", "127.0.0.1:9"]  # never reached
    if gate_text is not None:
        (tmp_path / "gate.out").write_text(gate_text + "\n")
        args += ["--eval-gate", str(tmp_path / "gate.out")]
    done = cli(*args)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and why in errors[0] and "support-bot-sonnet" in errors[0]
    assert "Traceback" not in done.stderr


@pytest.mark.integration
def test_a_plan_stuck_in_registered_starts_when_rollout_start_attaches_its_gate(settings, worker_factory, tmp_path):
    worker_factory()
    path = write_plan(tmp_path, rollout_id="gated")
    stuck = load_plan(path).plan  # published without a gate (by hand, or by an older safeswap)
    asyncio.run(produce(settings.broker, settings.topic("plans"), [(b"gated", encode(stuck))]))
    env = {"SAFESWAP_BROKER": settings.broker, "SAFESWAP_TOPIC_PREFIX": settings.topic_prefix}
    for _ in range(60):  # the worker's first decision on it
        listed = cli("rollout", "list", "--json", env=env)
        if listed.returncode == 0 and json.loads(listed.stdout.strip().splitlines()[-1])["rollouts"]:
            break
    [held] = json.loads(listed.stdout.strip().splitlines()[-1])["rollouts"]
    assert (held["stage"], held["action"]) == ("registered", "hold")
    gate_file = tmp_path / "gate.out"
    gate_file.write_text(json.dumps(gate_result()) + "\n")
    done = cli("rollout", "start", str(path), "--eval-gate", str(gate_file), "--json", "--wait", "60", env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["outcome"] == "gate attached"
    assert (out["decision"]["action"], out["decision"]["stage"], out["decision"]["shadow_percent"]) == (
        "start",
        "shadow",
        10,
    )
    changed = write_plan(tmp_path, rollout_id="gated", alpha=0.01)
    refused = cli("rollout", "start", str(changed), "--eval-gate", str(gate_file), env=env)
    assert refused.returncode == 2 and "immutable" in refused.stderr
