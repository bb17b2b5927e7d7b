"""The outcomes agent on the embedded broker: same metrics as replay, bad input to the DLQ,
and the same metrics after a SIGKILL mid-stream (checkpoint + offsets committed on assignment)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import msgspec
import pytest

from safeswap.core.outcomes import OutcomeConfig, OutcomeProcessor, merged_snapshot_values
from safeswap.tools.replay import partition_for, replay_lines
from schemas import DeadLetter, StatsSnapshot
from streams.checkpoint import read_latest
from tests.support.events import T0, assert_same_metrics, jsonl, simulated_events, trace
from tests.support.kafka import read_topic

pytestmark = pytest.mark.integration
ROLLOUT = "r1"
FLUSH = "zz-flush"  # traffic of another rollout that moves every partition's watermark past the end


def flush_events(partitions: int, ts: int, rollout: str = FLUSH):
    """One trace + feedback per partition, 4 h after the data, from users hashed to each partition
    (of the FLUSH rollout by default; of another one to move that rollout's own event time)."""
    from tests.support.events import feedback

    name = "flush" if rollout == FLUSH else f"tail-{rollout}"
    out, found = [], {}
    n = 0
    while len(found) < partitions:
        user = f"{name}-{n}"
        found.setdefault(partition_for(user, partitions), user)
        n += 1
    for p, user in sorted(found.items()):
        out.append(trace(f"{name}-{p}", ts, user=user, rollout=rollout))
        out.append(feedback(f"{name}-{p}", f"{name}-{p}", ts, "copy", user=user, rollout=rollout))
    return out


def rollout_tail(partitions: int, last_ts: int, rollout: str):
    """The rollout's own traffic 4 h after ``last_ts``, then FLUSH's 2 h later (which closes the
    tail's sessions): a stage's watch then passes however late the controller first looks."""
    tail_ts = last_ts + 4 * 3600_000
    return flush_events(partitions, tail_ts, rollout) + flush_events(partitions, tail_ts + 2 * 3600_000)


async def produce_lines(bootstrap: str, settings, lines: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_request_size=20_000_000)
    await producer.start()
    try:
        for line in lines:
            try:
                head = json.loads(line)
            except ValueError:
                head = {"type": "trace", "user_id": "x"}  # undecodable: to the traces topic
            topic = settings.topic("traces" if head["type"] == "trace" else "feedback")
            key = head.get("user_id", "x").encode()
            await producer.send(topic, value=line, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def end_offsets(settings) -> dict[int, int]:
    """Per partition, the traces' plus the feedback's end offset: a snapshot covering all of
    them has ``seq`` at least this. From the records (log_ends), not ListOffsets alone."""
    from aiokafka import TopicPartition

    from streams.resume import log_ends

    tps = [TopicPartition(settings.topic(t), p) for t in ("traces", "feedback") for p in range(settings.partitions)]
    ends = await log_ends({"bootstrap_servers": settings.broker}, tps)
    return {p: sum(ends[tp] for tp in tps if tp.partition == p) for p in range(settings.partitions)}


async def latest_snapshots(settings, rollout: str) -> dict[int, StatsSnapshot]:
    latest: dict[int, StatsSnapshot] = {}
    for record in await read_topic(settings.broker, settings.topic("stats"), timeout_s=5):
        snapshot = msgspec.json.decode(record.value, type=StatsSnapshot)
        if snapshot.rollout_id == rollout and (
            snapshot.partition not in latest or snapshot.seq > latest[snapshot.partition].seq
        ):
            latest[snapshot.partition] = snapshot
    return latest


async def wait_until_covered(settings, worker, timeout_s: float = 90) -> dict[int, StatsSnapshot]:
    """Until every partition's flush snapshot covers all offsets of its two source partitions."""
    ends = await end_offsets(settings)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        flushed = await latest_snapshots(settings, FLUSH)
        if all(p in flushed and flushed[p].seq >= ends[p] for p in ends):
            await asyncio.sleep(1.5)  # the rollout's own snapshots were published in the same round
            return await latest_snapshots(settings, ROLLOUT)
        assert worker.alive(), worker.log()[-3000:]
        await asyncio.sleep(0.5)
    raise AssertionError(f"worker did not cover {ends}: {worker.log()[-3000:]}")


def expected(lines, settings):
    return replay_lines(lines, OutcomeConfig.from_settings(settings), settings.partitions)


def test_streaming_equals_replay_and_bad_input_goes_to_the_dlq(settings, worker_factory):
    events = simulated_events(seed=11, users=400, text_len=300)
    bad = [
        b"{not json",
        json.dumps({"type": "trace", "user_id": "u-bad", "event_id": "x"}).encode(),
        jsonl([trace("future", int(time.time() * 1000) + 10 * 3600_000, user="u-future")])[0],
        jsonl([trace("huge", T0, user="u-huge", response_text="z" * 3_000_000)])[0],
    ]
    lines = jsonl(events) + bad + jsonl(flush_events(settings.partitions, events[-1].ts + 4 * 3600_000))
    worker = worker_factory()
    asyncio.run(produce_lines(settings.broker, settings, lines))
    streamed = asyncio.run(wait_until_covered(settings, worker))
    want = expected(lines, settings)
    assert want["events"]["invalid"] == len(bad)
    assert_same_metrics(merged_snapshot_values(streamed.values()), want["rollouts"][ROLLOUT]["variants"])
    assert want["rollouts"][ROLLOUT]["variants"]["control"]["sessions"] > 50  # sessions did close

    dead = asyncio.run(read_topic(settings.broker, settings.topic("dlq"), until_count=len(bad), timeout_s=20))
    records = [msgspec.json.decode(r.value, type=DeadLetter) for r in dead]
    records = [r for r in records if r.agent == "outcomes"]  # other agents (sinks) read the traces too
    assert len(records) == len(bad), [(r.partition, r.offset, r.reason[:80]) for r in records]
    reasons = " | ".join(r.reason for r in records)
    assert "invalid" in reasons and "future_timestamp" in reasons and "too_large" in reasons
    by_value = {base64.b64decode(r.value_b64)[:64]: r for r in records}
    for line in bad[:3]:
        record = by_value[line[:64]]
        assert base64.b64decode(record.value_b64) == line and record.offset >= 0
        assert record.topic == settings.topic("traces")
    assert worker.alive()


def test_sigkill_mid_stream_then_restart_gives_the_same_metrics(settings, worker_factory):
    checkpoints = dict(checkpoint_every_events=150, checkpoint_interval_s=600.0)
    events = simulated_events(seed=12, users=500, text_len=120)
    half = len(events) // 2
    first, rest = jsonl(events[:half]), jsonl(events[half:])
    rest = rest[:100] + rest[:100] + rest[100:]  # a producer retrying a batch: repeats must not count
    tail = jsonl(flush_events(settings.partitions, events[-1].ts + 4 * 3600_000))

    worker = worker_factory(**checkpoints)
    asyncio.run(produce_lines(settings.broker, settings, first))
    ends = asyncio.run(end_offsets(settings))

    async def processed_first_half(deadline: float) -> dict[int, int]:
        while time.monotonic() < deadline:
            seen = {p: s.seq for p, s in (await latest_snapshots(settings, ROLLOUT)).items()}
            if all(seen.get(p, 0) >= ends[p] for p in ends):
                return seen
            await asyncio.sleep(0.3)
        raise AssertionError(worker.log()[-3000:])

    seen = asyncio.run(processed_first_half(time.monotonic() + 90))
    worker.kill()  # SIGKILL: no revocation, no final checkpoint
    heads = {
        p: asyncio.run(read_latest({"bootstrap_servers": settings.broker}, settings.topic("checkpoints"), p))
        for p in ends
    }
    from streams.checkpoint import decode_state

    covered = {p: (0 if found is None else sum(decode_state(found[0]).offsets.values())) for p, found in heads.items()}
    assert any(covered[p] < seen[p] for p in ends), (covered, seen)  # a gap to replay really existed
    assert any(covered[p] > 0 for p in ends)  # and a checkpoint to resume from

    asyncio.run(produce_lines(settings.broker, settings, rest + tail))
    restarted = worker_factory(**checkpoints)
    streamed = asyncio.run(wait_until_covered(settings, restarted, timeout_s=120))
    want = expected(first + rest + tail, settings)
    assert want["events"]["duplicates"] == 100
    assert_same_metrics(merged_snapshot_values(streamed.values()), want["rollouts"][ROLLOUT]["variants"])
    assert "from checkpoint" in restarted.log()


def test_a_checkpoint_this_version_cannot_load_is_logged_and_its_partition_rebuilt(settings, worker_factory):
    """Old-format (pickle) and other-version checkpoints that claim to cover every event: loaded,
    they would skip them all; refused, the partitions are rebuilt from their topics' start."""
    import pickle
    import zlib

    from aiokafka import AIOKafkaProducer, TopicPartition

    from streams.checkpoint import CheckpointWriter, encode_state, ensure_checkpoint_topic
    from streams.resume import log_ends

    events = simulated_events(seed=13, users=200, text_len=100)
    lines = jsonl(events) + jsonl(flush_events(settings.partitions, events[-1].ts + 4 * 3600_000))
    asyncio.run(produce_lines(settings.broker, settings, lines))
    client = {"bootstrap_servers": settings.broker}
    sources = (settings.topic("traces"), settings.topic("feedback"))

    async def write_unloadable_checkpoints() -> None:
        ends = await log_ends(client, [TopicPartition(t, p) for t in sources for p in range(settings.partitions)])
        topic = settings.topic("checkpoints")
        await ensure_checkpoint_topic(client, topic, settings.partitions, settings.replication_factor)
        producer = AIOKafkaProducer(**client, max_request_size=20_000_000)
        await producer.start()
        try:
            for p in range(settings.partitions):
                covered = OutcomeProcessor(p)
                covered.offsets = {t: ends[TopicPartition(t, p)] for t in sources}
                if p % 2:
                    payload = encode_state(msgspec.structs.replace(covered.to_state(), version=4))
                else:  # the format before state version 5
                    payload = zlib.compress(pickle.dumps(covered, protocol=pickle.HIGHEST_PROTOCOL), 1)

                async def send(key: bytes, value: bytes, p: int = p) -> int:
                    return (await producer.send_and_wait(topic, value, key=key, partition=p)).offset

                await CheckpointWriter(p).write(send, payload)
        finally:
            await producer.stop()

    asyncio.run(write_unloadable_checkpoints())
    worker = worker_factory()
    streamed = asyncio.run(wait_until_covered(settings, worker))
    want = expected(lines, settings)
    assert_same_metrics(merged_snapshot_values(streamed.values()), want["rollouts"][ROLLOUT]["variants"])
    log = worker.log()
    assert log.count("checkpoint not loaded") >= settings.partitions, log[-3000:]
    assert (
        "not a state payload" in log
        and f"state version 4, this safeswap reads version {OutcomeProcessor.STATE_VERSION}" in log
    )
