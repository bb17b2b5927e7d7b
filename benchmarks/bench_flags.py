"""Rollback latency of the FlagClient, with a raw aiokafka baseline from the same run.

Publishes N decisions (alternating rollback / 50% ramp) to the decisions topic and
measures, per message, the time from just before ``send_and_wait`` to:

- baseline: a bare aiokafka consumer (same fetch wait, 50 ms) getting the record;
- each of C FlagClients (C-1 on the benchmark's loop, one on its own background
  thread, as a sync app runs it) having swapped in the new state, i.e. the
  moment ``variant()`` answers differently (taken in ``on_change``, which runs
  right after the swap).

Then the per-call cost of ``variant()`` against the bare bucketing function.

Run:  python benchmarks/bench_flags.py [--messages 200] [--clients 4]
(uses SAFESWAP_BROKER if set, else starts the embedded broker).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import timeit
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from safeswap.core.assignment import assign
from safeswap.flags import FlagClient
from schemas import Decision, encode
from streams.broker import EmbeddedBroker
from streams.settings import Settings
from streams.topics import ensure_topics


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def row(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return f"{name:<38} {len(ms):>6} {statistics.median(ms):>8.1f} {pct(ms, 0.99):>8.1f} {max(ms):>8.1f}"


async def measure(settings: Settings, messages: int, clients: int) -> tuple[list[float], list[float]]:
    topic = settings.topic("decisions")
    sent_at: dict[int, float] = {}
    flag_latency: list[float] = []
    raw_latency: list[float] = []

    def watcher(decision: Decision) -> None:
        flag_latency.append(time.perf_counter() - sent_at[decision.seq])

    in_loop = [await FlagClient(settings=settings).start() for _ in range(clients - 1)]
    background = FlagClient(settings=settings).start_background()
    for flags in in_loop + [background]:
        flags.on_change(watcher)

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.broker, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=50
    )
    await consumer.start()
    await consumer.topics()
    assigned = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(assigned)
    await consumer.seek_to_end(*assigned)
    for tp in assigned:
        await consumer.position(tp)

    async def raw_tail() -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=50)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    seq = int(record.headers[0][1]) if record.headers else -1
                    if seq in sent_at:
                        raw_latency.append(now - sent_at[seq])

    tail = asyncio.create_task(raw_tail())
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, linger_ms=0)
    await producer.start()
    rng = random.Random(0)
    try:
        for seq in range(1, messages + 1):
            action, percent = ("rollback", 0.0) if seq % 2 else ("promote", 50.0)
            decision = Decision(
                rollout_id="bench",
                seq=seq,
                ts=seq,
                action=action,
                stage="rolled_back" if action == "rollback" else "ramp",
                percent=percent,
                salt="bench",
                reason="bench",
            )
            sent_at[seq] = time.perf_counter()
            await producer.send_and_wait(topic, encode(decision), key=b"bench", headers=[("seq", str(seq).encode())])
            await asyncio.sleep(rng.uniform(0.01, 0.04))  # spread sends over the fetch cycle
        deadline = time.perf_counter() + 5
        while (
            len(flag_latency) < messages * clients or len(raw_latency) < messages
        ) and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
    finally:
        tail.cancel()
        await producer.stop()
        await consumer.stop()
        for flags in in_loop:
            await flags.stop()
        background.stop_background()
    return raw_latency, flag_latency


def read_cost() -> list[tuple[str, float]]:
    flags = FlagClient(settings=Settings(broker="unused:1"))
    flags.apply(
        encode(
            Decision(
                rollout_id="r",
                seq=1,
                ts=1,
                action="promote",
                stage="ramp",
                percent=50,
                salt="r",
                reason="bench",
                shadow_percent=10,
            )
        )
    )
    users = [f"user-{i}" for i in range(1000)]

    def per_call_ns(fn) -> float:
        return min(timeit.repeat(fn, number=20, repeat=5)) / (20 * len(users)) * 1e9

    per_call_ns(lambda: [flags.variant("r", u) for u in users])  # warm-up
    return [
        ("assignment.assign (baseline)", per_call_ns(lambda: [assign("r", u, 50) for u in users])),
        ("FlagClient.variant", per_call_ns(lambda: [flags.variant("r", u) for u in users])),
        ("FlagClient.should_shadow", per_call_ns(lambda: [flags.should_shadow("r", u) for u in users])),
        ("FlagClient.variant, unknown rollout", per_call_ns(lambda: [flags.variant("x", u) for u in users])),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    base = Settings.from_env()
    embedded = None if base.broker else EmbeddedBroker().start()
    try:
        settings = base.replace(broker=base.broker or embedded.bootstrap, topic_prefix=f"bench{uuid.uuid4().hex[:6]}")
        asyncio.run(ensure_topics(settings))
        raw_latency, flag_latency = asyncio.run(measure(settings, args.messages, args.clients))
    finally:
        if embedded is not None:
            embedded.stop()
    print(
        f"decision produce -> visible, {args.messages} decisions, {args.clients} flag clients, poll 50 ms, "
        f"{settings.partitions} partitions, broker {'embedded Tansu' if embedded else settings.broker}"
    )
    print(f"{'path':<38} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    print(row("raw aiokafka consumer (baseline)", raw_latency))
    print(row("FlagClient variant() switched", flag_latency))
    print()
    print(f"{'read path':<38} {'ns/call':>8}")
    for name, ns in read_cost():
        print(f"{name:<38} {ns:>8.0f}")


if __name__ == "__main__":
    main()
