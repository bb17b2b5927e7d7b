"""An event whose outcome step raises halfway leaves nothing behind: all or nothing.

The outcomes agent runs in this process on the embedded broker, with one feedback
event's step made to raise *after* it changed the partition's state. The agent
sends that event to the DLQ once, restores the partition from its last checkpoint
and reads on, skipping it: the metrics equal the replay of the stream without that
event, and the event is counted once, as invalid.
"""

from __future__ import annotations

import asyncio
import base64
import time

import msgspec
import pytest

from agents.outcomes import OutcomesService
from safeswap.core.outcomes import OutcomeProcessor, merged_snapshot_values
from schemas import DeadLetter
from streams.app import create_app
from tests.agents.test_outcomes import (
    ROLLOUT,
    end_offsets,
    expected,
    flush_events,
    jsonl,
    latest_snapshots,
    produce_lines,
)
from tests.faults.helpers import fresh_settings
from tests.support.events import assert_same_metrics, simulated_events

pytestmark = pytest.mark.integration


class CapturedTopic:
    """The dead-letter topic as the agent sees it (in a worker, a Faust topic the running app
    sends through; ``tests/faults/test_bad_input.py`` covers that path end to end)."""

    def __init__(self) -> None:
        self.sent: list = []

    async def send(self, key, value) -> None:
        self.sent.append(value)


async def _run(settings, lines: list[bytes]) -> tuple[dict, dict, list]:
    service = OutcomesService(create_app(settings), settings)
    service.dead_letters.topic = dlq = CapturedTopic()
    task = asyncio.create_task(service.reader.run_once())

    async def publish_timer() -> None:  # the worker's snapshot timer (agents/outcomes.py, register)
        while True:
            await asyncio.sleep(settings.snapshot_interval_s)
            await service.publish_due()

    timer = asyncio.create_task(publish_timer())
    try:
        await produce_lines(settings.broker, settings, lines)
        ends = await end_offsets(settings)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen = await latest_snapshots(settings, ROLLOUT)
            if all(p in seen and seen[p].seq >= ends[p] for p in ends if ends[p]):
                break
            assert not task.done() and not timer.done(), (task, timer)
            await asyncio.sleep(0.5)
        else:
            raise AssertionError(f"the agent did not cover {ends}: { ({p: s.seq for p, s in seen.items()}) }")
        counts = {"read": 0, "invalid": 0}
        async with service.reader.lock:
            for state in service.owned.values():
                for name in counts:
                    counts[name] += state.processor.counts[name]
        return seen, counts, [msgspec.json.decode(value, type=DeadLetter) for value in dlq.sent]
    finally:
        timer.cancel()
        task.cancel()
        await asyncio.gather(timer, task, return_exceptions=True)


def test_a_step_that_raises_halfway_is_undone_dead_lettered_once_and_counted_once(broker, tmp_path, monkeypatch):
    # No checkpoint is written here (the Faust app that carries them is not running): the
    # partition is restored from the start of its topics, the path a first failure takes; the
    # restore from a checkpoint is the one every restart takes (tests/faults/).
    settings = fresh_settings(broker, tmp_path, "undo").replace(
        checkpoint_every_events=10**9, checkpoint_interval_s=10**6, snapshot_interval_s=0.2
    )
    events = simulated_events(seed=11, users=120, text_len=30)
    thumbs_down = [e for e in events if getattr(e, "kind", None) == "thumbs_down"]
    bad = thumbs_down[len(thumbs_down) // 2]  # one that moves a guarded metric
    original = OutcomeProcessor._on_feedback

    def raises_after_the_step(self, event, now_ms, origin=None):
        result = original(self, event, now_ms, origin)  # the state has changed ...
        if event.event_id == bad.event_id:
            raise RuntimeError("a bug after the state changed")  # ... and then the step fails
        return result

    monkeypatch.setattr(OutcomeProcessor, "_on_feedback", raises_after_the_step)
    flush = jsonl(flush_events(settings.partitions, events[-1].ts + 2 * 3600_000))  # closes every session
    seen, counts, dead = asyncio.run(_run(settings, jsonl(events) + flush))

    failed = [d for d in dead if "internal error" in d.reason]
    assert len(failed) == 1, [d.reason for d in dead]
    assert f'"{bad.event_id}"'.encode() in base64.b64decode(failed[0].value_b64)
    assert "restored from its last checkpoint" in failed[0].reason
    assert counts == {"read": len(events) + len(flush), "invalid": 1}
    monkeypatch.undo()  # the replays below run the real step
    without = expected(jsonl([e for e in events if e.event_id != bad.event_id]) + flush, settings)
    assert_same_metrics(merged_snapshot_values(seen.values()), without["rollouts"][ROLLOUT]["variants"])
    with_it = expected(jsonl(events) + flush, settings)["rollouts"][ROLLOUT]["variants"]
    assert with_it != without["rollouts"][ROLLOUT]["variants"]  # the event mattered: undoing it shows
