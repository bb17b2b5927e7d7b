"""Where a consumer resumes: the verdict on a checkpoint's log (pure) and the probes on the embedded broker."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.resume import LogProbe, log_ends, probe_logs, reached_end, record_mark, same_log

MARK = record_mark(1_000, b"the record")


@pytest.mark.parametrize(
    ("probe", "same", "says"),
    [
        (LogProbe(7, MARK, 20), True, "is the one"),
        (LogProbe(7, record_mark(1_000, b"another record"), 20), False, "not the one"),
        (LogProbe(7, record_mark(2_000, b"the record"), 20), False, "not the one"),
        (LogProbe(0, record_mark(5, b"x"), 3), False, "came back at offset 0"),  # a real Kafka's reset to the start
        (LogProbe(None, None, 3), False, "ends at offset 3"),  # Tansu: nothing there, the log is shorter
        (LogProbe(12, record_mark(5, b"x"), 20), True, "no longer in the log"),  # retention or compaction
        (LogProbe(None, None, None), True, "nothing to read"),  # no answer: trust the offsets
    ],
)
def test_same_log_verdicts(probe, same, says):
    verdict, evidence = same_log(7, MARK, probe)
    assert verdict is same and says in evidence


def test_without_a_mark_a_log_that_reaches_the_offset_is_the_same():
    assert same_log(7, None, LogProbe(7, record_mark(9, b"anything"), 8))[0] is True
    assert same_log(7, None, LogProbe(None, None, 7))[0] is False


def test_reached_end_waits_for_the_fetch_high_watermark():
    assert not reached_end(1, 1, None)  # no fetch answer yet
    assert not reached_end(1, 1, 5)  # the broker reported 1, the log holds 5
    assert reached_end(5, 1, 5) and reached_end(0, 0, 0)


async def _produce_batches(bootstrap: str, topic: str, batches: list[list[bytes]], partition: int = 0) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
    await producer.start()
    try:
        for batch in batches:
            for value in batch:
                await producer.send(topic, value, partition=partition, timestamp_ms=1_000)
            await producer.flush()  # one produce request per batch
    finally:
        await producer.stop()


async def _scenario(bootstrap: str) -> dict:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("resume-a", 2, 1), NewTopic("resume-b", 1, 1)])
    finally:
        await admin.close()
    await _produce_batches(bootstrap, "resume-a", [[b"a0", b"a1", b"a2", b"a3", b"a4"], [b"a5"], [b"a6", b"a7"]])
    await _produce_batches(bootstrap, "resume-b", [[b"b0", b"b1", b"b2", b"b3", b"b4", b"b5", b"b6", b"b7"]])
    a0, a1, b0 = TopicPartition("resume-a", 0), TopicPartition("resume-a", 1), TopicPartition("resume-b", 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        reported = await consumer.end_offsets([a0, a1, b0])
    finally:
        await consumer.stop()
    client = {"bootstrap_servers": bootstrap}
    return {
        "reported": reported,
        "true": await log_ends(client, [a0, a1, b0]),
        "probes": await probe_logs(client, {a0: 3, a1: 3, b0: 3}, timeout_s=5),
    }


def test_probes_read_the_log_not_the_reported_end(broker):
    found = asyncio.run(_scenario(broker))
    a0, a1, b0 = TopicPartition("resume-a", 0), TopicPartition("resume-a", 1), TopicPartition("resume-b", 0)
    assert found["true"] == {a0: 8, a1: 0, b0: 8}
    assert found["reported"][b0] < 8  # the embedded broker's short answer after a batch (docs/faults.md)
    probes = found["probes"]
    # A checkpoint that covered resume-a[0] up to "a3": the same log.
    assert probes[a0] == LogProbe(3, record_mark(1_000, b"a3"), 8)
    assert same_log(3, record_mark(1_000, b"a3"), probes[a0])[0]
    # The same offsets in another log (a topic made again with other records): not the same.
    assert not same_log(3, record_mark(1_000, b"a3"), probes[b0])[0]
    # An empty partition where the checkpoint had reached offset 3: a new log.
    assert probes[a1] == LogProbe(None, None, 0) and not same_log(3, None, probes[a1])[0]
