"""Fault: the broker disappears for 10 s while an app emits, then comes back.

The clients reach a dedicated embedded broker (Tansu) through a proxy
(``CuttableProxy``) that the broker advertises as its address. The outage
resets every connection and refuses new ones for 10 s; the broker keeps its
data, as a real cluster's broker does across a restart. (Restarting Tansu
itself would come back empty, and Tansu auto-creates a topic on the first
request for it, with one partition: acknowledged events would then land in a
topic the test recreates a moment later. That is a property of the in-memory
test broker, not a fault the product must survive.)

Proved:
- the Emitter neither blocks nor raises during the outage: every call returns a
  bool at once (a heartbeat task on the same event loop keeps ticking), events
  are buffered within the bound, and a second emitter with a small buffer counts
  its drops (queued + dropped == calls);
- the FlagClient keeps serving its last state: "hold" goes stale and keeps the
  50% split, "control" goes stale and serves control;
- when the broker is back, the Emitter delivers everything it buffered (each
  queued event exactly once, none counted as a send error), the same worker
  process (no restart) counts every event exactly once and takes a new plan to a
  decision that reaches the flag clients, which are fresh again.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import pytest

from safeswap.core.assignment import assign
from safeswap.emitter import Emitter
from safeswap.flags import FlagClient
from safeswap.tools.rollouts import start_rollout
from schemas import StatsSnapshot, TraceEvent
from streams.broker import EmbeddedBroker, free_port
from streams.process import WorkerProcess
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.faults.helpers import CuttableProxy, walk_plan
from tests.support.kafka import read_topic

pytestmark = [pytest.mark.faults, pytest.mark.integration]

OUTAGE_S = 10.0
USERS = [f"user-{i}" for i in range(400)]


def trace(n: int, user: str, rollout: str) -> TraceEvent:
    return TraceEvent(
        event_id=f"o-{n}",
        ts=int(time.time() * 1000) - 1000,
        rollout_id=rollout,
        variant="control",
        user_id=user,
        session_id="s",
        trace_id=f"ot-{n}",
        prompt_version="p1",
        model_version="m1",
        latency_ms=100.0,
        input_tokens=1,
        output_tokens=1,
        cost_usd=0.0,
        cache_hit=False,
    )


def candidates(flags: FlagClient, rollout: str) -> list[str]:
    return [u for u in USERS if flags.variant(rollout, u) == "candidate"]


def test_broker_gone_for_ten_seconds(tmp_path):
    proxy = CuttableProxy(target_port=free_port())
    broker = EmbeddedBroker(port=proxy.target_port, advertised_port=proxy.port).start()
    proxy.restore()
    unique = uuid.uuid4().hex[:8]
    (tmp_path / "state").mkdir()
    settings = Settings(
        broker=proxy.bootstrap,
        topic_prefix=f"outage{unique}",
        app_id=f"outage-{unique}",
        state_dir=str(tmp_path / "state"),
        data_dir=str(tmp_path / "data"),
        sink_datasets="",
    )
    worker = None
    hold = FlagClient(settings=settings, stale_policy="hold", max_staleness_s=1.0)
    control = FlagClient(settings=settings, stale_policy="control", max_staleness_s=1.0)
    try:
        asyncio.run(ensure_topics(settings))
        worker = WorkerProcess(settings, tmp_path / "worker.log").start()
        before = walk_plan("before")
        _, first = asyncio.run(start_rollout(settings, before, wait_s=90))
        assert first is not None and first.percent == 50, worker.log()[-3000:]
        hold.start_background()
        control.start_background()
        expected_50 = [u for u in USERS if assign(first.salt, u, 50) == "candidate"]
        assert candidates(hold, "before") == expected_50 == candidates(control, "before")

        async def app() -> dict:
            big = await Emitter(settings=settings, buffer=50_000).start()
            small = await Emitter(settings=settings, buffer=100).start()
            for n in range(50):  # delivered before the outage
                big.trace(trace(n, USERS[n], "after"))
            while big.stats.sent < 50:
                await asyncio.sleep(0.05)
            pre_outage = big.stats.sent

            ticks = 0

            async def heartbeat():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            beat = asyncio.create_task(heartbeat())
            proxy.cut()  # the broker is gone
            started, calls, small_calls, results = time.monotonic(), 0, 0, set()
            n = 1000
            while time.monotonic() - started < OUTAGE_S:
                for _ in range(20):
                    results.add(big.trace(trace(n, USERS[n % len(USERS)], "after")))
                    results.add(small.trace(trace(n + 10**6, USERS[n % len(USERS)], "small")))
                    n += 1
                    calls += 1
                    small_calls += 1
                await asyncio.sleep(0.02)
            ticks_during = ticks
            stale = (hold.is_stale(), control.is_stale())
            served = (candidates(hold, "before"), candidates(control, "before"))
            alive = worker.alive()

            proxy.restore()  # back, on the same address
            deadline = time.monotonic() + 60
            while big._queue.qsize() or small._queue.qsize():
                assert time.monotonic() < deadline, f"buffered events not delivered: {big.stats} {small.stats}"
                await asyncio.sleep(0.1)
            beat.cancel()
            await big.stop()
            await small.stop()
            return dict(
                big=big.stats,
                small=small.stats,
                calls=calls,
                small_calls=small_calls,
                results=results,
                ticks=ticks_during,
                stale=stale,
                served=served,
                alive=alive,
                pre_outage=pre_outage,
            )

        out = asyncio.run(app())
        # The Emitter never blocked nor raised: every call returned a bool while the loop kept running.
        assert out["results"] <= {True, False} and out["ticks"] > 100, out
        big, small = out["big"], out["small"]
        assert big.dropped_full == 0 and big.queued == 50 + out["calls"], big  # all buffered within its bound
        assert small.dropped_full > 0 and small.queued + small.dropped_full == out["small_calls"], small  # counted
        assert big.send_errors == 0 and small.send_errors == 0, (big, small)
        # The flag clients kept serving under their policies.
        assert out["stale"] == (True, True)
        assert out["served"] == (expected_50, [])
        assert out["alive"]

        # Back: what was buffered reaches the topic, exactly once.
        delivered = asyncio.run(
            read_topic(settings.broker, settings.topic("traces"), until_count=big.queued + small.queued, timeout_s=30)
        )
        ids = [msgspec.json.decode(r.value, type=TraceEvent).event_id for r in delivered]
        emitted_after = {f"o-{n}" for n in range(1000, 1000 + out["calls"])}
        assert emitted_after <= set(ids) and len(ids) == len(set(ids)) == big.queued + small.queued

        # The same worker process counts them and decides again.
        def counted() -> int:
            records = asyncio.run(read_topic(settings.broker, settings.topic("stats"), timeout_s=3))
            latest: dict[int, StatsSnapshot] = {}
            for record in records:
                snapshot = msgspec.json.decode(record.value, type=StatsSnapshot)
                if snapshot.rollout_id == "after" and not snapshot.source:
                    if snapshot.partition not in latest or snapshot.seq > latest[snapshot.partition].seq:
                        latest[snapshot.partition] = snapshot
            return sum(s.counts.get("control", {}).get("responses", 0) for s in latest.values())

        deadline = time.monotonic() + 90
        while counted() < big.queued:
            assert worker.alive(), worker.log()[-3000:]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"worker counted {counted()} of {big.queued} after the broker came back: " + worker.log()[-3000:]
                )
            time.sleep(1)
        assert counted() == big.queued  # each exactly once, the 50 from before the outage included
        after_plan = walk_plan("after-outage")
        _, decision = asyncio.run(start_rollout(settings, after_plan, wait_s=90))
        assert decision is not None and decision.action == "start", worker.log()[-3000:]
        for flags in (hold, control):
            flags.wait_for_sync(lambda d: d.rollout_id == "after-outage", 30)
        deadline = time.monotonic() + 30
        while hold.is_stale() or control.is_stale():
            assert time.monotonic() < deadline, (hold.stats(), control.stats())
            time.sleep(0.1)
        assert candidates(control, "after-outage") == [u for u in USERS if assign(decision.salt, u, 50) == "candidate"]
        assert worker.alive()
    finally:
        hold.stop_background()
        control.stop_background()
        if worker is not None:
            worker.stop()
        proxy.close()
        broker.stop()
