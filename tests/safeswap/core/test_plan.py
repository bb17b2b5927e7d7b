"""Plan files: every refusal names the field, the line and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from safeswap.core.plan import load_plan, parse_duration

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "plan.yaml"
GOOD = EXAMPLE.read_text()


def write(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_documented_example_plan_is_valid():
    report = load_plan(EXAMPLE)
    assert report.ok, report.lines()
    assert [s.name for s in report.plan.stages] == ["shadow", "canary", "ramp", "ramp", "ramp"]


@pytest.mark.parametrize(
    ("change", "path", "line", "words"),
    [
        (("alpha: 0.05", "alpha: 0.05\nalpah: 0.1"), "alpah", 14, "unknown field"),
        (
            ("{name: ramp,   percent: 50, min_duration: 48h}", "{name: ramp,   percent: 8, min_duration: 48h}"),
            "stages[3].percent",
            11,
            "does not go up",
        ),
        (("{name: ramp,   percent: 100}", "{name: ramp,   percent: 120}"), "stages[4].percent", 12, "<= 100"),
        (("min_duration: 48h", "min_duration: two days"), "stages[3].min_duration", 11, "not a duration"),
        (("claude-sonnet-4-6-20260301", "claude-sonnet-4-5"), "candidate.model", 5, "allow_unpinned"),
        (
            ("prompt_version: v41}\n# optional", "prompt_version: v42}\n# optional"),
            "candidate",
            5,
            "allow_multiple_changes",
        ),
        (("metric: error_rate,", "metric: eror_rate,"), "guardrails[1].metric", 16, "unknown metric"),
    ],
)
def test_refusals_name_field_line_and_fix(tmp_path, change, path, line, words):
    old, new = change
    assert old in GOOD
    report = load_plan(write(tmp_path, GOOD.replace(old, new, 1)))
    assert not report.ok
    issue = next(i for i in report.errors if i.path == path)
    assert issue.line == line and words in issue.message


def test_missing_stages_and_missing_shadow_are_refused(tmp_path):
    no_stages = "\n".join(line for line in GOOD.splitlines() if not line.startswith("  - {name") and line != "stages:")
    report = load_plan(write(tmp_path, no_stages))
    assert any(i.path == "stages" and "missing" in i.message for i in report.errors)
    no_shadow = GOOD.replace("  - {name: shadow, shadow_percent: 10, min_duration: 24h, min_users_per_arm: 500}\n", "")
    report = load_plan(write(tmp_path, no_shadow))
    assert any("shadow stage" in i.message for i in report.errors)
    report = load_plan(write(tmp_path, no_shadow + 'skip_shadow: "offline evals cover this path fully"\n'))
    assert report.ok, report.lines()


def test_short_watch_periods_are_warnings_that_explain_why(tmp_path):
    report = load_plan(write(tmp_path, GOOD.replace("percent: 5,  min_duration: 24h", "percent: 5,  min_duration: 2h")))
    assert report.ok
    messages = " ".join(i.message for i in report.warnings)
    assert "time-of-day" in messages and "weekday/weekend" in messages


def test_json_plans_and_yaml_syntax_errors(tmp_path):
    import yaml

    as_json = write(tmp_path, json.dumps(yaml.safe_load(GOOD)), "plan.json")
    assert load_plan(as_json).ok
    broken = load_plan(write(tmp_path, "rollout_id: x\nstages: [\n"))
    assert not broken.ok and "not valid YAML" in broken.errors[0].message and broken.errors[0].line


def test_durations():
    assert parse_duration("24h") == 86_400
    assert parse_duration("1d12h") == 129_600
    assert parse_duration("90m") == 5_400
    assert parse_duration("1w") == 604_800
    for bad in ("", "24", "h", "24 hours", "-1h"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_cli_validate_exit_codes_and_one_line_per_error(tmp_path):
    bad = write(tmp_path, GOOD.replace("percent: 50", "percent: 8").replace("eror", "x"))
    result = subprocess.run(
        [sys.executable, "-m", "safeswap", "plan", "validate", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {bad}:11: stages[3].percent: 8 does not go up from 10: percentages must increase stage after stage"
    ]
    ok = subprocess.run(
        [sys.executable, "-m", "safeswap", "plan", "validate", str(EXAMPLE), "--json"], capture_output=True, text=True
    )
    assert ok.returncode == 0
    assert json.loads(ok.stdout.splitlines()[-1])["ok"] is True
    missing = subprocess.run(
        [sys.executable, "-m", "safeswap", "plan", "validate", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "file not found" in missing.stderr


@pytest.mark.parametrize(
    ("model", "pinned"),
    [
        ("claude-sonnet-4-5-20250929", True),
        ("gpt-4o-2024-08-06", True),
        ("my-model@v3", True),
        ("claude-sonnet-4-6", True),  # Anthropic's ids from 4.6 on are the snapshots themselves
        ("claude-sonnet-4-5", False),  # an alias of claude-sonnet-4-5-20250929
        ("claude-3-7-sonnet-latest", False),
        ("gpt-4o", False),
    ],
)
def test_pinned_models(model, pinned):
    from safeswap.core.plan import is_pinned

    assert is_pinned(model) is pinned


LOW_STAKES_NO_SHADOW = """
rollout_id: {rollout}
stakes: low
control:   {{model: claude-sonnet-4-5-20250929, prompt_version: v41, {control}}}
candidate: {{model: claude-sonnet-4-5-20250929, prompt_version: v41, {candidate}}}
stages:
  - {{name: canary, percent: 5, min_duration: 24h}}
  - {{name: ramp, percent: 100}}
guardrails:
  - {{metric: thumbs_down_rate, max_relative_increase: 0.2, action: rollback}}
"""


@pytest.mark.parametrize(
    ("control", "candidate", "words"),
    [
        ("tools_version: t1", "tools_version: t2", "a tool-definition change (treat it as a major change"),
        (
            "retrieval_version: r1",
            "retrieval_version: r2, retrieval_index: docs-index-20261130",
            "a retrieval change (an indexing migration plus a model swap",
        ),
    ],
)
def test_tool_and_retrieval_changes_need_a_shadow_stage_like_a_model_change(tmp_path, control, candidate, words):
    text = LOW_STAKES_NO_SHADOW.format(rollout="r", control=control, candidate=candidate)
    report = load_plan(write(tmp_path, text))
    refusal = next(i for i in report.errors if i.path == "stages")
    assert words in refusal.message and "needs a shadow stage" in refusal.message and "skip_shadow" in refusal.message
    assert load_plan(write(tmp_path, text + "skip_shadow: tools replayed on a week of traffic\n")).ok
    # a prompt change alone, low stakes, may go to users without shadowing
    prompt_only = LOW_STAKES_NO_SHADOW.format(rollout="r", control="tools_version: t1", candidate="tools_version: t1")
    assert load_plan(
        write(tmp_path, prompt_only.replace("prompt_version: v41, tools", "prompt_version: v42, tools", 1))
    ).ok


@pytest.mark.parametrize(
    ("index", "words"),
    [
        ("", "missing: a retrieval change must pin the candidate's index"),
        (", retrieval_index: docs-index-latest", "does not name one version of the index"),
    ],
)
def test_a_retrieval_change_pins_the_candidates_index(tmp_path, index, words):
    text = LOW_STAKES_NO_SHADOW.format(
        rollout="r", control="retrieval_version: r1", candidate=f"retrieval_version: r2{index}"
    )
    report = load_plan(write(tmp_path, text + "skip_shadow: shadowed offline\n"))
    issue = next(i for i in report.errors if i.path == "candidate.retrieval_index")
    assert words in issue.message
    pinned = text.replace("retrieval_version: r2", "retrieval_version: r2, retrieval_index: docs-index@v7", 1)
    if index:
        pinned = text.replace(index, ", retrieval_index: docs-index@v7")
    assert load_plan(write(tmp_path, pinned + "skip_shadow: shadowed offline\n")).ok


def test_segment_guardrails_validate_keys_and_say_what_the_budget_costs(tmp_path):
    report = load_plan(Path(__file__).resolve().parents[3] / "examples" / "plan-segments.yaml")
    assert report.ok, report.lines()
    assert report.plan.segments == ["locale"]
    budget = next(w for w in report.warnings if w.path == "segments")
    assert "8 segment tests" in budget.message and "0.0031 each" in budget.message
    doubled = load_plan(write(tmp_path, GOOD + "segments: [locale, locale]\n"))
    assert not doubled.ok and any(e.path == "segments" and "twice" in e.message for e in doubled.errors)
    many = load_plan(write(tmp_path, GOOD + "segments: [a, b, c, d]\n"))
    assert not many.ok and any(e.path == "segments" for e in many.errors)
    bad_key = load_plan(write(tmp_path, GOOD + 'segments: ["two words"]\n'))
    assert not bad_key.ok
    unguarded = GOOD.split("guardrails:")[0] + "segments: [locale]\n"
    report = load_plan(write(tmp_path, unguarded))
    assert any(e.path == "segments" and "add guardrails" in e.message for e in report.errors)
