"""safeswap eval-gate and safeswap judge as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safeswap.cli import _read_gate, app
from safeswap.core.controller import gate_refusal
from safeswap.core.evalgate import gate, result_hash
from schemas import RolloutPlan
from tests.support.fake_anthropic import FakeAnthropic, pair_fields

runner = CliRunner()


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def eval_gate(tmp_path: Path, base: list, cand: list, *args: str):
    b, c = jsonl(tmp_path / "base.jsonl", base), jsonl(tmp_path / "cand.jsonl", cand)
    return runner.invoke(app, ["eval-gate", "--baseline", str(b), "--candidate", str(c), *args])


def cases(passed: dict) -> list:
    return [{"case_id": k, "passed": v} for k, v in passed.items()]


def test_high_stakes_fails_on_any_lost_case_and_lists_it(tmp_path):
    base = cases({"a": True, "b": True, "c": False})
    result = eval_gate(tmp_path, base, cases({"a": True, "b": False, "c": True}), "--stakes", "high", "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["passed"] is False and out["lost"] == ["b"] and out["gained"] == ["c"]
    assert out["hash"] == result_hash(out) and len(out["hash"]) == 64
    ok = eval_gate(tmp_path, base, cases({"a": True, "b": True, "c": True}), "--stakes", "high", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout.strip().splitlines()[-1])["passed"] is True


def test_low_stakes_allows_losses_when_the_net_gain_is_enough(tmp_path):
    base = cases({"a": True, "b": False, "c": False, "d": True})
    cand = cases({"a": False, "b": True, "c": True, "d": True})  # lost a, gained b and c: net +1
    assert eval_gate(tmp_path, base, cand, "--stakes", "low").exit_code == 0
    assert eval_gate(tmp_path, base, cand, "--stakes", "low", "--min-net-gain", "2").exit_code == 1
    assert gate({"a": True}, {"a": True}, "low")["passed"] is True  # nothing lost, nothing gained


def test_scores_with_a_threshold_and_one_sided_cases_are_reported_not_guessed(tmp_path):
    base = [{"case_id": 1, "score": 0.9}, {"case_id": 2, "score": 0.4}, {"case_id": "only-base", "score": 1.0}]
    cand = [{"case_id": 1, "score": 0.8}, {"case_id": 2, "score": 0.75}, {"case_id": "only-cand", "score": 0.0}]
    compared = eval_gate(tmp_path, base, cand, "--stakes", "high")  # no threshold: case 1 scores lower
    assert compared.exit_code == 1 and "lost (1): 1" in compared.output
    result = eval_gate(tmp_path, base, cand, "--stakes", "high", "--pass-threshold", "0.7", "--json")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.exit_code == 0 and out["common"] == 2 and out["gained"] == ["2"]
    assert out["only_in_baseline"] == ["only-base"] and out["only_in_candidate"] == ["only-cand"]


@pytest.mark.parametrize(
    "line,reason",
    [
        ("not json", "not JSON"),
        ('{"passed": true}', "case_id"),
        ('{"case_id": "x"}', "passed"),
        ('{"case_id": "b", "passed": "yes"}', "true or false"),
        ('{"case_id": "a", "passed": true}', "duplicate"),
    ],
)
def test_unusable_input_exits_2_naming_file_line_and_reason(tmp_path, line, reason):
    result = eval_gate(tmp_path, ['{"case_id": "a", "passed": true}', line], cases({"a": True}), "--stakes", "high")
    assert result.exit_code == 2 and "base.jsonl:2" in result.output and reason in result.output
    missing = runner.invoke(
        app,
        ["eval-gate", "--baseline", str(tmp_path / "nope"), "--candidate", str(tmp_path / "nope"), "--stakes", "high"],
    )
    assert missing.exit_code == 2 and "cannot read" in missing.output


def test_the_json_line_is_what_rollout_start_attaches_and_the_controller_accepts(tmp_path):
    result = eval_gate(tmp_path, cases({"a": True}), cases({"a": True}), "--stakes", "high", "--json")
    gate_file = tmp_path / "gate.out"
    gate_file.write_text(result.stdout)
    attached = _read_gate(gate_file)
    plan = RolloutPlan(rollout_id="r", stakes="high", eval_gate=attached)
    assert gate_refusal(plan) is None and attached["hash"] == result_hash(attached)


def test_safeswap_judge_on_a_file_against_a_fake_server(tmp_path):
    rows = [
        pair_fields(1),
        pair_fields(2, control="GOOD ctl", candidate="meh"),
        pair_fields(3, prompt="[bias-A]"),
        pair_fields(4, prompt="[malformed]"),
    ]
    pairs = jsonl(tmp_path / "pairs.jsonl", rows + ['{"event_id": "broken"}'])
    with FakeAnthropic() as fake:
        env = dict(
            os.environ,
            ANTHROPIC_API_KEY="test-key",
            ANTHROPIC_BASE_URL=fake.base_url,
            SAFESWAP_JUDGE_MODEL="claude-haiku-4-5-20251001",
            SAFESWAP_JUDGE_CONCURRENCY="2",
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "safeswap",
                "judge",
                str(pairs),
                "--json",
                "--out",
                str(tmp_path / "judgments.jsonl"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k: summary[k] for k in ("pairs", "judged", "candidate_wins", "control_wins", "ties", "errors")} == {
        "pairs": 5,
        "judged": 3,
        "candidate_wins": 1,
        "control_wins": 1,
        "ties": 1,
        "errors": 2,
    }
    assert summary["cost_usd"] > 0 and summary["max_in_flight"] <= 2
    assert len(fake.requests) == 8  # 4 valid pairs x 2 orders
    assert "pairs.jsonl:5" in done.stderr and "test-key" not in done.stderr + done.stdout
    assert len((tmp_path / "judgments.jsonl").read_text().splitlines()) == 3
