"""Fault: the worker is SIGKILLed at three seeded-random points of a stream.

Two workers read the same events at the same time, each on its own topics and
consumer groups: a *reference* that is never interrupted, and a *victim* killed
(SIGKILL: no revocation, no final checkpoint, no sink flush) three times and
restarted each time. The split points are drawn from a fixed seed, so a failure
reproduces. At each kill the victim has state its last checkpoint does not cover
(checkpoints every 150 events) and Parquet rows it has not flushed (files of at
most 200 rows, no time-driven flush), so every restart really replays.

Proved: the merged per-variant metrics of the victim equal the reference's (and
both equal the offline replay), the decisions (seq, action, stage, percent) are
the same, a decision republished after a replay says what the first one said,
and the Parquet datasets hold every produced trace and feedback exactly once.
"""

from __future__ import annotations

import asyncio
import random

import polars as pl
import pytest

import sinks
from safeswap.core.outcomes import merged_snapshot_values
from safeswap.tools.rollouts import start_rollout
from streams.process import WorkerProcess
from tests.agents.test_outcomes import (
    ROLLOUT,
    end_offsets,
    expected,
    jsonl,
    latest_snapshots,
    produce_lines,
    rollout_tail,
    wait_until_covered,
)
from tests.faults.helpers import by_seq, decisions, fresh_settings, wait_until, walk_plan
from tests.support.events import assert_same_metrics, simulated_events

# Once flaky (Faust resumed a partition past the checkpoint's offsets); the outcomes
# agent now has its own consumer and seeks to the checkpoint itself (agents/outcomes.py).
pytestmark = [pytest.mark.faults, pytest.mark.integration]

SEED = 20261126
KILLS = 3
WORKER = dict(
    checkpoint_every_events=150,
    checkpoint_interval_s=600.0,
    sink_datasets="traces,feedback,decisions",
    sink_max_rows=200,
    sink_max_age_s=600.0,
    sink_idle_s=600.0,
)


def split_points(n: int, rng: random.Random) -> list[int]:
    """KILLS distinct cut points, each chunk at least 5% of the stream."""
    while True:
        cuts = sorted(rng.sample(range(1, n), KILLS))
        bounds = [0, *cuts, n]
        if min(b - a for a, b in zip(bounds, bounds[1:])) >= n // 20:
            return cuts


def test_three_sigkills_change_nothing(broker, tmp_path):
    rng = random.Random(SEED)
    events = simulated_events(seed=SEED % 1000, users=600, text_len=60)
    lines = jsonl(events)
    cuts = split_points(len(lines), rng)
    chunks = [lines[a:b] for a, b in zip([0, *cuts], [*cuts, len(lines)])]
    # The rollout's own event time moves on too, so the canary's watch passes however late
    # the controller first sees it (tests/faults/helpers.py, walk_plan).
    tail_events = rollout_tail(4, events[-1].ts, ROLLOUT)
    tail = jsonl(tail_events)

    reference = fresh_settings(broker, tmp_path, "ref")
    victim = fresh_settings(broker, tmp_path, "victim")
    started: list[WorkerProcess] = []

    def start(settings, name):
        worker = WorkerProcess(settings.replace(**WORKER), tmp_path / f"{name}-{len(started)}.log").start()
        started.append(worker)
        return worker

    try:
        ref_worker = start(reference, "ref")
        worker = start(victim, "victim")
        plan = walk_plan(ROLLOUT)
        for settings in (reference, victim):  # the plan first: every snapshot reaches a live rollout
            outcome, first = asyncio.run(start_rollout(settings, plan, wait_s=90))
            assert first is not None and first.action == "start", (outcome, first, started[-1].log()[-2000:])

        for index, chunk in enumerate(chunks):
            for settings in (reference, victim):
                asyncio.run(produce_lines(settings.broker, settings, chunk))
            if index == len(chunks) - 1:
                break
            ends = asyncio.run(end_offsets(victim))

            def caught_up(ends=ends):
                seen = asyncio.run(latest_snapshots(victim, ROLLOUT))
                return all(p in seen and seen[p].seq >= ends[p] for p in ends if ends[p])

            wait_until(caught_up, 120, f"the victim to process chunk {index}", worker.log)
            worker.kill()  # SIGKILL
            worker = start(victim, "victim")

        for settings in (reference, victim):
            asyncio.run(produce_lines(settings.broker, settings, tail))
        got = asyncio.run(wait_until_covered(victim, worker, timeout_s=150))
        want = asyncio.run(wait_until_covered(reference, ref_worker, timeout_s=60))
        assert ref_worker.alive() and worker.alive()

        # Metrics: victim == uninterrupted reference == offline replay.
        replayed = expected(lines + tail, victim)["rollouts"][ROLLOUT]["variants"]
        assert_same_metrics(merged_snapshot_values(want.values()), replayed)
        assert_same_metrics(merged_snapshot_values(got.values()), merged_snapshot_values(want.values()))
        assert "from checkpoint" in worker.log()  # the last restart resumed from a checkpoint

        # Decisions: the same (seq, action, stage, percent), none contradicting another.
        def complete(settings):
            return any(d.action == "complete" for d in decisions(settings, ROLLOUT))

        wait_until(lambda: complete(reference), 60, "the reference's complete decision", ref_worker.log)
        wait_until(lambda: complete(victim), 60, "the victim's complete decision", worker.log)
        assert by_seq(decisions(victim, ROLLOUT)) == by_seq(decisions(reference, ROLLOUT))
        assert [row[1] for row in by_seq(decisions(reference, ROLLOUT))] == ["start", "promote", "complete"]
    finally:
        for process in started:
            process.stop()  # SIGINT: the sinks flush what they hold

    # Parquet: every produced trace and feedback exactly once.
    produced = {
        "traces": {e.event_id for e in events + tail_events if e.rollout_id == ROLLOUT and hasattr(e, "latency_ms")},
        "feedback": {
            e.event_id for e in events + tail_events if e.rollout_id == ROLLOUT and not hasattr(e, "latency_ms")
        },
    }
    for dataset, ids in produced.items():
        frame = sinks.scan(dataset, victim.data_dir).filter(pl.col("rollout_id") == ROLLOUT).collect()
        assert frame.height == len(ids), (dataset, frame.height, len(ids))
        assert frame["event_id"].n_unique() == len(ids) and set(frame["event_id"]) == ids, dataset
        everything = sinks.scan(dataset, victim.data_dir).collect()
        assert everything.select(pl.struct("kafka_partition", "kafka_offset").n_unique()).item() == everything.height
    written = sinks.scan("decisions", victim.data_dir).collect()
    assert written.select(pl.struct("kafka_partition", "kafka_offset").n_unique()).item() == written.height
