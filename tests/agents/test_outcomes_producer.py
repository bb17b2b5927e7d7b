"""The outcomes agent's batched producer: every record, keyed and partitioned as documented."""

from __future__ import annotations

import asyncio
import dataclasses

import msgspec
from aiokafka.partitioner import DefaultPartitioner

from agents.outcomes import OutcomeProducer
from schemas import OutcomeRecord
from tests.support.kafka import read_topic


def outcome(i: int) -> OutcomeRecord:
    return OutcomeRecord(
        event_id=f"outcome-t{i}",
        ts=1_700_000_000_000 + i,
        rollout_id="r1",
        trace_id=f"t{i}",
        variant="candidate" if i % 2 else "control",
        user_id=f"user-{i % 37}",
        session_id=f"s{i % 37}",
        prompt_version="p1",
        model_version="m1",
        latency_ms=100.0 + i,
        cost_usd=0.001,
        cache_hit=False,
        error="none",
        thumbs_up=False,
        thumbs_down=i % 5 == 0,
        edited=False,
        retried=False,
        follow_up=True,
        session_last=False,
        abandoned=False,
    )


def test_outcome_records_arrive_once_each_on_their_user_ids_partition_in_order(settings):
    # A 4 KB batch limit makes most partitions fill several batches in one send_outcomes.
    small = dataclasses.replace(settings, producer_max_batch_bytes=4096)
    topic = settings.topic("outcomes")
    records = [outcome(i) for i in range(600)]

    async def main() -> list:
        producer = OutcomeProducer(small, topic)
        await producer.start()
        try:
            producer.add(records[:250])
            await producer.send_outcomes()
            producer.add(records[250:])
            await producer.flush()  # sends what is pending, then waits for delivery
        finally:
            await producer.stop()
        return await read_topic(settings.broker, topic, until_count=len(records))

    messages = asyncio.run(main())
    assert len(messages) == len(records)
    partitions = sorted({m.partition for m in messages})
    assert len(partitions) > 1, "the user ids spread over several partitions"
    expected_partition = DefaultPartitioner()
    all_partitions = list(range(settings.partitions))
    by_partition: dict[int, list[int]] = {}
    for message in messages:
        decoded = msgspec.json.decode(message.value, type=OutcomeRecord)
        assert message.key == decoded.user_id.encode()
        assert message.partition == expected_partition(message.key, all_partitions, all_partitions)
        by_partition.setdefault(message.partition, []).append(int(decoded.trace_id[1:]))
    assert sorted(i for seq in by_partition.values() for i in seq) == list(range(len(records)))
    for sequence in by_partition.values():
        assert sequence == sorted(sequence), "per partition, records keep the order they were added in"
