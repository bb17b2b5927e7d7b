"""`safeswap rollout ...` against a real worker on the embedded broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "plan.yaml"


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SAFESWAP_BROKER=settings.broker, SAFESWAP_TOPIC_PREFIX=settings.topic_prefix)
    return subprocess.run(
        [sys.executable, "-m", "safeswap", *args], capture_output=True, text=True, env=env, timeout=120
    )


def last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_start_status_pause_resume_abort_list(settings, worker_factory, tmp_path):
    worker_factory()
    plan = yaml.safe_load(EXAMPLE.read_text())
    plan.update(rollout_id="cli-rollout", stakes="low")
    plan["stages"] = plan["stages"][1:]  # no shadow:
    plan["skip_shadow"] = "rehearsal of the CLI"
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))

    started = last_json(cli(settings, "rollout", "start", str(path), "--json", "--wait", "60"))
    assert started["outcome"] == "started"
    assert (started["decision"]["action"], started["decision"]["stage"], started["decision"]["percent"]) == (
        "start",
        "canary",
        5,
    )

    again = last_json(cli(settings, "rollout", "start", str(path), "--json", "--wait", "5"))
    assert again["outcome"] == "already started" and again["decision"]["seq"] == 1

    changed = dict(plan, alpha=0.01)
    path.write_text(yaml.safe_dump(changed))
    refused = cli(settings, "rollout", "start", str(path))
    assert refused.returncode == 2 and "immutable" in refused.stderr and "Traceback" not in refused.stderr

    status = last_json(cli(settings, "rollout", "status", "cli-rollout", "--json"))
    assert status["status"]["stage"] == "canary" and status["status"]["stages"][0] == "canary 5%"
    assert status["decision"]["seq"] == 1

    paused = last_json(cli(settings, "rollout", "pause", "cli-rollout", "--reason", "looking", "--json"))
    assert (paused["decision"]["action"], paused["decision"]["stage"], paused["decision"]["percent"]) == (
        "pause",
        "paused",
        5,
    )
    resumed = last_json(cli(settings, "rollout", "resume", "cli-rollout", "--json"))
    assert (resumed["decision"]["action"], resumed["decision"]["stage"]) == ("resume", "canary")
    aborted = last_json(cli(settings, "rollout", "abort", "cli-rollout", "--reason", "drill", "--json"))
    assert (aborted["decision"]["action"], aborted["decision"]["percent"]) == ("rollback", 0)
    assert "drill" in aborted["decision"]["reason"]

    listed = last_json(cli(settings, "rollout", "list", "--json"))
    assert [(r["rollout_id"], r["stage"], r["seq"]) for r in listed["rollouts"]] == [("cli-rollout", "rolled_back", 4)]

    unknown = cli(settings, "rollout", "status", "nope")
    assert unknown.returncode == 2 and "rollout list" in unknown.stderr
