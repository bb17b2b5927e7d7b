"""Sinks on the embedded broker: SIGKILL while writing, restart, every event exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

import sinks
from tests.faults.helpers import dead_letters
from tests.support.kafka import produce
from tests.support.sinks import raw, trace

pytestmark = pytest.mark.integration

BAD = [b"\x00 not json", b'{"event_id": "x", "ts": 1}', b'{"event_id": "y", "latency_ms": -3}']


def traces(first: int, n: int) -> list[tuple[bytes, bytes]]:
    return [(f"u{i % 50}".encode(), raw(trace(i, user=f"u{i % 50}"))) for i in range(first, first + n)]


def wait_until(condition, timeout_s: float, what: str, log=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log()[-3000:]}")
        time.sleep(0.05)


class Reader(threading.Thread):
    """Scans the dataset in a loop while the worker writes: any error is a visible partial file."""

    def __init__(self, data_dir: str) -> None:
        super().__init__(daemon=True)
        self.data_dir, self.errors, self.scans, self.stop = data_dir, [], 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                sinks.scan("traces", self.data_dir).select(pl.len()).collect()
                self.scans += 1
            except Exception as exc:  # noqa: BLE001
                self.errors.append(repr(exc))
            time.sleep(0.02)


def test_sigkill_while_writing_then_restart_leaves_every_event_exactly_once(settings, worker_factory):
    # Small files (many flushes to interrupt); no time-driven flush, so the last rows of
    # the second run are written only by the shutdown flush (SIGINT).
    sink = dict(sink_datasets="traces,dlq", sink_max_rows=300, sink_max_age_s=300.0, sink_idle_s=300.0)
    data = settings.data_dir
    first, second = traces(0, 6000), traces(6000, 2000)
    asyncio.run(produce(settings.broker, settings.topic("traces"), first + [(b"bad", value) for value in BAD]))
    reader = Reader(data)
    reader.start()
    try:
        worker = worker_factory(**sink)
        wait_until(lambda: sinks.count_rows(data, ["traces"])["traces"] >= 300, 60, "a first file", worker.log)
        worker.kill()  # SIGKILL, mid-stream
        killed_at = sinks.count_rows(data, ["traces"])["traces"]
        print("killed with rows on disk:", killed_at, file=sys.stderr)
        for path in Path(data, "traces").rglob("*"):
            assert path.is_dir() or (path.name.startswith("part-") and path.suffix == ".parquet"), path
            if path.is_file():
                pq.ParquetFile(path).metadata  # noqa: B018 (every visible file is complete)

        asyncio.run(produce(settings.broker, settings.topic("traces"), second))
        restarted = worker_factory(**sink)
        total = len(first) + len(second)
        floor = total - 4 * 299  # every full file written; at most 299 rows per partition still buffered
        wait_until(lambda: sinks.count_rows(data, ["traces"])["traces"] >= floor, 90, "the replay", restarted.log)
        stable = -1
        while stable != sinks.count_rows(data, ["traces"])["traces"]:
            stable = sinks.count_rows(data, ["traces"])["traces"]
            time.sleep(2.0)
        # The outcomes agent (which dead-letters the bad traces) may trail the sink on a busy machine.
        wait_until(
            lambda: len([d for d in dead_letters(settings, timeout_s=5) if d.agent == "outcomes"]) >= len(BAD),
            90,
            "the outcomes agent's dead letters",
            restarted.log,
        )
        restarted.stop()  # SIGINT: the worker flushes what it holds before it exits
        assert restarted.process.returncode is not None
    finally:
        reader.stop.set()
        reader.join()
    assert not reader.errors and reader.scans > 10, reader.errors[:3]

    frame = sinks.scan("traces", data).collect()
    produced = {f"t-{i}" for i in range(total)}
    assert frame.height == total, (killed_at, frame.height, restarted.log()[-2000:])
    assert frame["event_id"].n_unique() == total and set(frame["event_id"]) == produced
    assert frame.select(pl.struct("kafka_partition", "kafka_offset").n_unique()).item() == total
    # The bad traces are in the DLQ from the outcomes agent, which reads the same topic; the sink skips them.
    letters = sinks.scan("dlq", data).collect()
    dead = letters.filter(pl.col("agent") == "outcomes")
    assert dead.height >= len(BAD) and dead["topic"].unique().to_list() == [settings.topic("traces")]
    assert "latency_ms" in " ".join(dead["reason"])
    assert letters.filter(pl.col("agent") == "sink:traces").height == 0
    assert not any(Path(data, "_staging", "traces").iterdir())


def test_demo_writes_the_dataset_and_reports_rows_twice_into_the_same_folder(tmp_path: Path):
    """Two demo runs (two fresh embedded brokers, offsets from 0 again) into one data folder: the
    Emitter's, then the app that speaks only OpenTelemetry and OpenFeature (``--otlp``), whose
    spans reach the same rollback and the same last-line JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFESWAP_")}
    results = []
    for extra in ([], ["--otlp"]):
        run = subprocess.run(
            [sys.executable, "-m", "safeswap", "demo", "--json", *extra, "--data", str(tmp_path / "data")],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    assert set(results[0]) == set(results[1])  # --otlp prints the same JSON
    assert results[1]["action"] == "rollback" and results[1]["rows"]["dlq"] == 0  # every span mapped
    for result in results:
        assert result["data_dir"] == str(tmp_path / "data")
        rows = result["rows"]
        assert set(rows) == {
            "traces",
            "feedback",
            "outcomes",
            "stats",
            "decisions",
            "plans",
            "shadow",
            "judgments",
            "live_scores",
            "dlq",
        }
        assert rows["traces"] + rows["feedback"] == result["events_sent"]
        assert rows["plans"] == 1 and rows["decisions"] >= 2 and rows["stats"] >= 1
    timeline = sinks.decision_timeline(tmp_path / "data", rollout_id=results[1]["rollout_id"]).collect()
    assert timeline["action"].to_list()[-1] == "rollback"
    assert sinks.scan("traces", tmp_path / "data").select(pl.col("rollout_id").n_unique()).collect().item() == 2
