"""One simulated rollout for the whole module: broker (session fixture), a worker
with /metrics on a free port, and a short closed-loop simulation whose Parquet
dataset the recorded dashboard reads. Everything started here is stopped here."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import msgspec
import pytest

from safeswap.dashboard.server import Dashboard
from safeswap.tools.simulate import Scenario, closed_loop
from schemas import RolloutPlan
from sinks.read import wait_for_rows
from streams.broker import free_port
from streams.process import WorkerProcess
from streams.settings import Settings
from streams.topics import ensure_topics

# A canary that watches for two days: it is still live when the simulation ends,
# so a test can steer it (abort) and watch the page change.
PLAN = {
    "rollout_id": "dash-<b>bold</b>",
    "stakes": "low",
    "description": "dashboard test <script>alert('x')</script>",
    "control": {"model": "claude-sonnet-4-5-20250929", "prompt_version": "v41"},
    "candidate": {"model": "claude-sonnet-4-6-20260301", "prompt_version": "v42<img src=x>"},
    "skip_shadow": "rehearsal",
    "stages": [
        {"name": "canary", "percent": 30, "min_duration": "2d", "min_users_per_arm": 50},
        {"name": "ramp", "percent": 100},
    ],
    "min_users_per_arm": 30,
    "guardrails": [
        {"metric": "thumbs_down_rate", "max_relative_increase": 0.5, "action": "rollback"},
        {"metric": "latency_ms_p95", "max_relative_increase": 0.5, "action": "pause"},
    ],
}
SCENARIO = {
    "duration": "10h",
    "step": "2h",
    "users_per_hour": 150,
    "requests_per_user": 2,
    "variants": {"control": {"thumbs_down_rate": 0.1}, "candidate": {"thumbs_down_rate": 0.12}},
}


@pytest.fixture(scope="module")
def simulated(broker: str, tmp_path_factory: pytest.TempPathFactory):
    root: Path = tmp_path_factory.mktemp("dashboard")
    unique = uuid.uuid4().hex[:8]
    settings = Settings(
        broker=broker,
        topic_prefix=f"d{unique}",
        app_id=f"safeswap-dash-{unique}",
        state_dir=str(root / "state"),
        data_dir=str(root / "data"),
        snapshot_interval_s=0.2,
        status_interval_s=0.2,
        sink_idle_s=0.5,
        metrics_port=free_port(),
    )
    asyncio.run(ensure_topics(settings))
    worker = WorkerProcess(settings, root / "worker.log").start()
    try:
        plan = msgspec.convert(PLAN, RolloutPlan)
        scenario = msgspec.convert(SCENARIO, Scenario)
        result = asyncio.run(closed_loop(settings, plan, scenario))
        decisions = result["decisions"]
        assert decisions, f"no decision reached the flag client; worker log:\n{worker.log()[-3000:]}"
        wait_for_rows(
            settings.data_dir, {("decisions",): len(decisions), ("stats",): 5}, rollout_id=plan.rollout_id, timeout_s=30
        )
        yield {"settings": settings, "plan": plan, "result": result, "worker": worker, "root": root}
    finally:
        worker.stop()


@pytest.fixture
def dashboard_factory():
    """Start dashboards (each on its own loop thread, free loopback port); all stopped at teardown."""
    started: list[Dashboard] = []

    def start(settings: Settings, data_dir: str | None = None, **overrides) -> Dashboard:
        board = Dashboard(
            settings.replace(**overrides) if overrides else settings, data_dir=data_dir, host="127.0.0.1", port=0
        )
        started.append(board.run_in_thread())
        return board

    yield start
    for board in started:
        board.stop_thread()
