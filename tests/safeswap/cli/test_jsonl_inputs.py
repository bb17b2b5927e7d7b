"""JSONL input of `safeswap eval-gate` and `safeswap judge`: bytes the user may really have,
scores compared case by case, and the judge's sample rate coming from the settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safeswap.cli import app
from safeswap.core.evalgate import jsonl_lines
from safeswap.judge import read_pairs
from schemas import convert, encode
from schemas.events import ShadowPair
from tests.support.fake_anthropic import FakeAnthropic, pair_fields

runner = CliRunner()
SEPARATORS = ["\u2028", "\u2029", "\u0085"]


def eval_gate(base: Path, cand: Path, *args: str):
    return runner.invoke(app, ["eval-gate", "--baseline", str(base), "--candidate", str(cand), *args])


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("separator", SEPARATORS)
def test_a_raw_line_separator_inside_a_json_string_stays_one_line(tmp_path, separator):
    base = write(
        tmp_path / "b.jsonl", [{"case_id": f"a{separator}b", "passed": True}, {"case_id": "c", "passed": True}]
    )
    cand = write(
        tmp_path / "c.jsonl", [{"case_id": f"a{separator}b", "passed": True}, {"case_id": "c", "passed": True}]
    )
    assert separator in base.read_text(encoding="utf-8")  # written raw, not escaped
    result = eval_gate(base, cand, "--stakes", "high", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["common"] == 2


def test_the_judge_reads_pairs_our_own_encoder_wrote_with_a_raw_u2028(tmp_path):
    pair = convert(ShadowPair, pair_fields(1, prompt="first line\u2028second line"))
    line = encode(pair)
    assert "\u2028".encode() in line  # the project's encoder writes it raw
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(line + b"\n" + encode(convert(ShadowPair, pair_fields(2))) + b"\n")
    pairs, problems = read_pairs(path)
    assert problems == [] and [p.prompt_text for p in pairs] == ["first line\u2028second line 1", "question 2"]


@pytest.mark.parametrize(
    "content,reason",
    [
        (b'{"case_id": "a", "passed": true}\n{"case_id": "b\xff\xfe", "passed": true}\n', "not UTF-8"),
        (b'{"case_id": "a", "passed": true}\n' + b"[" * 100_000 + b"\n", "nested too deeply"),
    ],
)
def test_bytes_that_are_not_utf8_or_nest_too_deep_exit_2_naming_the_line(tmp_path, content, reason):
    base = tmp_path / "base.jsonl"
    base.write_bytes(content)
    cand = write(tmp_path / "cand.jsonl", [{"case_id": "a", "passed": True}])
    result = eval_gate(base, cand, "--stakes", "high")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # a clean exit, no traceback
    assert f"{base}:2" in result.output and reason in result.output and "Traceback" not in result.output


def test_the_judge_file_reports_bad_lines_and_keeps_the_good_ones(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps(pair_fields(1)).encode()
    path.write_bytes(
        good + b"\n\xff\xfe not utf-8\n" + b"[" * 100_000 + b"\n" + good.replace(b"pair-1", b"pair-9") + b"\n"
    )
    pairs, problems = read_pairs(path)
    assert [p.event_id for p in pairs] == ["pair-1", "pair-9"]
    assert [problem.split(": ")[0] for problem in problems] == [f"{path}:2", f"{path}:3"]
    assert "not UTF-8" in problems[0]
    assert [where for where, _, _ in jsonl_lines(path)] == [f"{path}:{n}" for n in (1, 2, 3, 4)]


def test_score_lines_compare_each_case_with_its_baseline_without_a_threshold(tmp_path):
    base = write(
        tmp_path / "b.jsonl",
        [{"case_id": "a", "score": 0.80}, {"case_id": "b", "score": 0.50}, {"case_id": "c", "score": 0.90}],
    )
    cand = write(
        tmp_path / "c.jsonl",
        [{"case_id": "a", "score": 0.78}, {"case_id": "b", "score": 0.70}, {"case_id": "c", "score": 0.90}],
    )
    strict = eval_gate(base, cand, "--stakes", "high", "--json")  # the issue's own command line
    assert strict.exit_code == 1, strict.output
    out = json.loads(strict.stdout.strip().splitlines()[-1])
    assert out["lost"] == ["a"] and out["gained"] == ["b"] and out["scored_count"] == 3
    tolerant = eval_gate(base, cand, "--stakes", "high", "--score-tolerance", "0.05", "--json")
    out = json.loads(tolerant.stdout.strip().splitlines()[-1])
    assert tolerant.exit_code == 0 and out["lost"] == [] and out["score_tolerance"] == 0.05
    low = eval_gate(base, cand, "--stakes", "low", "--json")  # lost a, gained b: net 0 < 1
    assert low.exit_code == 1
    threshold = eval_gate(base, cand, "--stakes", "high", "--pass-threshold", "0.75", "--json")
    out = json.loads(threshold.stdout.strip().splitlines()[-1])  # a: 0.80 -> 0.78 still passes 0.75
    assert threshold.exit_code == 0 and out["lost"] == [] and out["gained"] == []


def test_passed_on_one_side_and_a_score_on_the_other_is_unusable_without_a_threshold(tmp_path):
    base = write(tmp_path / "b.jsonl", [{"case_id": "a", "passed": True}])
    cand = write(tmp_path / "c.jsonl", [{"case_id": "a", "score": 0.2}])
    result = eval_gate(base, cand, "--stakes", "high")
    assert result.exit_code == 2 and "--pass-threshold" in result.output and "'a'" in result.output


@pytest.mark.parametrize("env_rate,flag,judged", [("0", [], 0), ("1", [], 3), ("0", ["--sample-rate", "1"], 3)])
def test_judge_sample_rate_defaults_to_the_setting_and_the_flag_overrides_it(tmp_path, env_rate, flag, judged):
    pairs = write(tmp_path / "pairs.jsonl", [pair_fields(i) for i in range(3)])
    with FakeAnthropic() as fake:
        env = {
            "ANTHROPIC_API_KEY": "test-key",
            "ANTHROPIC_BASE_URL": fake.base_url,
            "SAFESWAP_JUDGE_MODEL": "claude-haiku-4-5-20251001",
            "SAFESWAP_JUDGE_SAMPLE_RATE": env_rate,
        }
        result = runner.invoke(app, ["judge", str(pairs), "--json", *flag], env=env)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["judged"] == judged and summary["not_sampled"] == 3 - judged
    assert len(fake.requests) == 2 * judged
