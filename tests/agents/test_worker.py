"""Integration on the embedded broker: Emitter -> worker -> decision -> FlagClient."""

from __future__ import annotations

import asyncio
import base64
import random

import msgspec
import pytest

from safeswap.emitter import Emitter
from safeswap.flags import FlagClient
from safeswap.tools.demo import demo_plan, simulated_events
from schemas import DeadLetter, TraceEvent, encode
from tests.support.kafka import produce, read_topic

pytestmark = pytest.mark.integration


async def run_until_rollback(settings, rollout_id: str, timeout_s: float = 90.0):
    rng = random.Random(3)
    async with Emitter(settings=settings) as emitter, FlagClient(settings=settings) as flags:
        await produce(settings.broker, settings.topic("plans"), [(rollout_id.encode(), encode(demo_plan(rollout_id)))])
        start = await flags.wait_for(lambda d: d.rollout_id == rollout_id, timeout_s)
        assert start.action == "start" and start.percent == demo_plan(rollout_id).stages[0].percent
        served_candidate = 0
        index = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while flags.decision(rollout_id).action != "rollback" and loop.time() < deadline:
            for _ in range(100):
                variant, events = simulated_events(flags, rollout_id, index, 1_000_000 + index, rng)
                served_candidate += variant == "candidate"
                index += 1
                for event in events:
                    (emitter.trace if isinstance(event, TraceEvent) else emitter.feedback)(event)
            await asyncio.sleep(0.05)
        decision = flags.decision(rollout_id)
        after = sum(flags.variant(rollout_id, f"user-{i}") == "candidate" for i in range(index))
        return decision, served_candidate, after, emitter.stats


def test_worse_candidate_is_rolled_back_and_flag_client_switches_users_to_control(settings, worker_factory):
    worker = worker_factory()
    decision, served_candidate, after, stats = asyncio.run(run_until_rollback(settings, "pipeline-1"))
    assert decision.action == "rollback", worker.log()[-2000:]
    assert served_candidate > 100  # the candidate really was served before
    assert after == 0  # and nobody is served it after the rollback
    assert decision.evidence and decision.evidence[0].ci_low > decision.evidence[0].threshold
    assert stats.dropped_full == 0 and stats.invalid == 0


def test_bad_input_goes_to_the_dlq_with_its_origin_and_the_worker_keeps_deciding(settings, worker_factory):
    worker = worker_factory()
    garbage = {
        "traces": b"\x00\x01 not json",
        "feedback": b'{"event_id": "f1", "kind": "thumbs_sideways"}',
        "plans": b'{"rollout_id": "x", "percent": 500}',
        "stats": b"[1, 2, 3]",
    }

    async def scenario():
        for name, value in garbage.items():
            await produce(settings.broker, settings.topic(name), [(b"k-" + name.encode(), value)])
        outcome = await run_until_rollback(settings, "pipeline-dlq")
        dead = await read_topic(settings.broker, settings.topic("dlq"), until_count=len(garbage))
        return outcome, dead

    (decision, *_), dead = asyncio.run(scenario())
    assert decision.action == "rollback", worker.log()[-2000:]
    records = [msgspec.json.decode(message.value, type=DeadLetter) for message in dead]
    by_topic = {record.topic: record for record in records}
    assert set(by_topic) == {settings.topic(name) for name in garbage}
    for name, value in garbage.items():
        record = by_topic[settings.topic(name)]
        assert base64.b64decode(record.value_b64) == value  # the original bytes
        assert base64.b64decode(record.key_b64) == b"k-" + name.encode()
        assert record.offset >= 0 and record.partition >= 0 and record.reason
    assert "thumbs_sideways" in by_topic[settings.topic("feedback")].reason
    assert "percent" in by_topic[settings.topic("plans")].reason
    assert worker.alive()
