"""`safeswap bench` in a tiny configuration: the JSON contract and consistent, positive figures.

No timing thresholds (the machine is shared and noisy); the figures themselves
are in docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.pipeline import JSON_KEYS, iter_events, make_events
from schemas import FeedbackEvent, TraceEvent, decode

REPO = Path(__file__).resolve().parents[2]


def test_events_are_realistic() -> None:
    events = list(iter_events(4000, users=500, text_chars=500))
    assert len(events) == 4000
    traces = [decode(TraceEvent, raw) for source, _, raw in events if source == "trace"]
    feedback = [decode(FeedbackEvent, raw) for source, _, raw in events if source == "feedback"]
    assert 0.25 < len(feedback) / len(traces) < 0.35
    assert all(len(t.response_text) == 500 for t in traces)
    assert all(t.user_id == user for (source, user, _), t in zip([e for e in events if e[0] == "trace"], traces))
    assert [ts for ts in (t.ts for t in traces)] == sorted(t.ts for t in traces)
    assert make_events(10, users=5)[0][0] == "trace"


def test_bench_tiny_run(broker: str) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "safeswap",
            "bench",
            "--json",
            "--broker",
            broker,
            "--events",
            "2000",
            "--users",
            "300",
            "--trials",
            "2",
            "--background-eps",
            "100",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert tuple(result) == JSON_KEYS  # the contract, exactly and in order
    for key in JSON_KEYS:
        assert isinstance(result[key], (int, float)) and result[key] > 0, (key, result)
    assert abs(result["pipeline_vs_bare_faust"] - result["pipeline_eps"] / result["bare_faust_eps"]) < 0.01
    assert result["decision_latency_p50_s"] <= result["decision_latency_p99_s"]
    assert any(line.startswith("pipeline, 1 worker") for line in lines[:-1])  # the table comes first


def test_otlp_bench_runs_both_paths_over_the_same_calls() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_otlp.py"), "--events", "1000", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["events"] == 1000 and result["native_eps"] > 0 and result["otlp_eps"] > 0
    assert (
        result["otlp_vs_native"] == round(result["otlp_eps"] / result["native_eps"], 3)
        or abs(result["otlp_vs_native"] - result["otlp_eps"] / result["native_eps"]) < 0.01
    )
