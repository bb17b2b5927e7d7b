"""`safeswap simulate` writes the whole dataset, also when rerun into the same folder.

Each run starts a fresh embedded broker, so the topics are recreated and their
offsets start at 0 again: the second run's files are a new generation, which no
earlier file may overwrite or hide, and which compaction must keep."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

import sinks

pytestmark = pytest.mark.integration

PLAN = {
    "rollout_id": "sim-data",
    "stakes": "low",
    "control": {"model": "claude-sonnet-4-5-20250929", "prompt_version": "v1"},
    "candidate": {"model": "claude-sonnet-4-6-20260301", "prompt_version": "v1"},
    "skip_shadow": "rehearsal",
    "stages": [
        {"name": "canary", "percent": 50, "min_duration": "2h", "min_users_per_arm": 50},
        {"name": "ramp", "percent": 100},
    ],
    "min_users_per_arm": 50,
    "guardrails": [{"metric": "thumbs_down_rate", "max_relative_increase": 0.5, "action": "rollback"}],
}
SCENARIO = {
    "duration": "5h",
    "users_per_hour": 300,
    "requests_per_user": 3,
    "variants": {"control": {"thumbs_down_rate": 0.1}, "candidate": {}},
}


def simulate(tmp_path: Path, data: Path) -> dict:
    plan, scenario = tmp_path / "plan.yaml", tmp_path / "scenario.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    scenario.write_text(yaml.safe_dump(SCENARIO))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFESWAP_")}  # its own broker and worker
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "safeswap",
            "simulate",
            "--plan",
            str(plan),
            "--scenario",
            str(scenario),
            "--data",
            str(data),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_simulate_twice_into_one_folder_reports_and_keeps_every_event(tmp_path: Path):
    data = tmp_path / "data"
    runs = [simulate(tmp_path, data) for _ in range(2)]
    for out in runs:
        assert out["data_dir"] == str(data) and out["events_sent"] > 1000
        # This run's rows, every event the run sent (none left unread when the worker stopped).
        assert out["rows"]["traces"] + out["rows"]["feedback"] == out["events_sent"], out["rows"]
        assert out["rows"]["decisions"] >= 1 and out["rows"]["plans"] == 1
    sent = sum(out["events_sent"] for out in runs)

    def on_disk() -> int:
        counts = sinks.count_rows(data, ["traces", "feedback"], rollout_id=PLAN["rollout_id"])
        scanned = sum(sinks.scan(name, data).select(pl.len()).collect().item() for name in counts)
        assert scanned == sum(counts.values())  # no file of the second run hidden from scan
        return scanned

    assert on_disk() == sent
    # The same event ids twice (same seed), at the same offsets: only the generation tells them apart.
    assert any(p.name.endswith("-g1.parquet") for p in (data / "traces").rglob("*.parquet"))
    report = sinks.compact(data, before=dt.date(2100, 1, 1), grace_s=0)
    assert not report.errors and report.written_files > 0
    assert on_disk() == sent  # compaction deleted nothing of either run
