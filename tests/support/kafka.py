"""Small Kafka helpers for tests: produce raw bytes, read a whole topic."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.resume import reached_end


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key, value in messages:
            await producer.send(topic, value=value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str, *, until_count: int = 0, timeout_s: float = 30.0) -> list:
    """Every message of ``topic`` from the beginning; waits until ``until_count`` are there."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        messages: list = []
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                messages.extend(records)
            end = await consumer.end_offsets(partitions)  # short on Tansu: reached_end adds the fetch's end
            caught_up = all(
                [reached_end(await consumer.position(tp), end[tp], consumer.highwater(tp)) for tp in partitions]
            )
            if (caught_up and len(messages) >= until_count) or asyncio.get_running_loop().time() > deadline:
                return messages
    finally:
        await consumer.stop()
