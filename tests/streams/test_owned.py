"""The owned-partition consumer (streams.owned) on the embedded broker, with a toy owner.

The toy keeps, per partition, the offsets it folded, and its "checkpoints" in a dict
shared by its workers (the outcomes agent keeps them on a topic, the sinks in their
files): what the consumer must do with them is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.owned import OwnedConsumer, Resume
from streams.resume import record_mark
from streams.settings import Settings

pytestmark = pytest.mark.integration

TS = 1_000  # every record's timestamp, so a test can write the mark of any record
RECORDS = 10  # per partition


class Toy:
    """A PartitionOwner: what it folded, and a checkpoint (offset + mark) per partition."""

    def __init__(self, checkpoints: dict[TopicPartition, Resume]) -> None:
        self.checkpoints = checkpoints  # shared by every worker of the group
        self.reader: OwnedConsumer | None = None
        self.covered: dict[TopicPartition, Resume] = {}  # the owned partitions' state
        self.loading: dict[TopicPartition, Resume | None] = {}
        self.folded: list[tuple[TopicPartition, int]] = []
        self.loads: list[set[TopicPartition]] = []
        self.released: list[set[TopicPartition]] = []
        self.recreated: dict[TopicPartition, str] = {}
        self.closed_with_consumer: list[bool] = []
        self.fail_loads = 0  # how many loads raise first (a broker away)
        self.restore_at: tuple[TopicPartition, int, Resume] | None = None  # (tp, offset, checkpoint)

    @contextlib.asynccontextmanager
    async def running(self):
        yield

    async def load(self, partitions):
        self.loads.append(set(partitions))
        if self.fail_loads:
            self.fail_loads -= 1
            raise ConnectionError("the checkpoint store is away")
        self.loading = {tp: self.checkpoints.get(tp) for tp in partitions if tp not in self.covered}
        return dict(self.loading)

    def adopt(self, recreated):
        self.recreated.update(recreated)
        for tp, at in self.loading.items():
            self.covered[tp] = Resume(0, None) if at is None or tp in recreated else at

    async def fold(self, tp, records):
        for record in records:
            if self.restore_at is not None and (tp, record.offset) == self.restore_at[:2]:
                # what the outcomes agent's undo does: back to a checkpoint, mid-batch
                self.checkpoints[tp] = self.restore_at[2]
                self.restore_at = None
                self.covered.pop(tp)
                self.folded.append((tp, -1))  # where the restore happened
                await self.reader.resume({tp})
                return
            self.folded.append((tp, record.offset))
            self.covered[tp] = Resume(record.offset + 1, record_mark(record.timestamp, record.value))

    async def fetched(self):
        pass

    async def release(self, partitions):
        self.released.append(set(partitions))
        for tp in partitions:
            if tp in self.covered:
                self.checkpoints[tp] = self.covered.pop(tp)

    async def close(self):
        self.closed_with_consumer.append(self.reader.consumer is not None)
        await self.release(set(self.covered))

    def offsets(self, tp: TopicPartition) -> list[int]:
        return [offset for folded, offset in self.folded if folded == tp]


async def make_topic(bootstrap: str, partitions: int) -> str:
    topic = f"owned-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    return topic


async def produce(bootstrap: str, topic: str, partitions: int, start: int, stop: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        for partition in range(partitions):
            for i in range(start, stop):
                await producer.send(topic, value(partition, i), partition=partition, timestamp_ms=TS)
        await producer.flush()
    finally:
        await producer.stop()


def value(partition: int, i: int) -> bytes:
    return f"{partition}:{i}".encode()


def reader_for(toy: Toy, bootstrap: str, topic: str, group: str) -> OwnedConsumer:
    settings = Settings(broker=bootstrap, app_id=group)
    toy.reader = OwnedConsumer(
        settings, toy, name="toy", group_id=f"{group}.toy", topics=[topic], poll_ms=100, max_records=1_000
    )
    return toy.reader


async def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.1)


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_assignment_loads_checks_the_log_and_seeks_to_the_checkpoint(broker):
    async def scenario():
        topic = await make_topic(broker, 2)
        await produce(broker, topic, 2, 0, RECORDS)
        tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        # tp0 was checkpointed after "0:3"; tp1 has no checkpoint: the group's offset (none: the start)
        toy = Toy({tp0: Resume(4, record_mark(TS, value(0, 3)))})
        reader = reader_for(toy, broker, topic, uuid.uuid4().hex[:8])
        task = asyncio.create_task(reader.run_once())
        try:
            await wait_for(lambda: len(toy.folded) >= 16, "the records after the checkpoints")
            consumer_while_running = reader.consumer
        finally:
            await stop(task)
        return toy, reader, consumer_while_running, tp0, tp1

    toy, reader, consumer_while_running, tp0, tp1 = asyncio.run(scenario())
    assert toy.loads == [{tp0, tp1}]
    assert toy.recreated == {}
    assert toy.offsets(tp0) == list(range(4, RECORDS))  # from the checkpoint, not the log's start
    assert toy.offsets(tp1) == list(range(RECORDS))
    # shutdown: everything checkpointed while the consumer was still in the group, then it left
    assert toy.closed_with_consumer == [True] and consumer_while_running is not None and reader.consumer is None
    assert toy.checkpoints[tp0] == Resume(RECORDS, record_mark(TS, value(0, RECORDS - 1)))
    assert toy.checkpoints[tp1] == Resume(RECORDS, record_mark(TS, value(1, RECORDS - 1)))


def test_a_log_that_is_not_the_one_the_checkpoint_covers_is_read_from_its_start(broker):
    async def scenario():
        topic = await make_topic(broker, 2)
        await produce(broker, topic, 2, 0, RECORDS)
        tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        toy = Toy(
            {
                tp0: Resume(4, record_mark(TS, b"another record")),  # the topic was made again
                tp1: Resume(RECORDS + 40, record_mark(TS, value(1, RECORDS + 39))),  # the log ends before it
            }
        )
        task = asyncio.create_task(reader_for(toy, broker, topic, uuid.uuid4().hex[:8]).run_once())
        try:
            await wait_for(lambda: len(toy.folded) >= 2 * RECORDS, "both logs from their start")
        finally:
            await stop(task)
        return toy, tp0, tp1

    toy, tp0, tp1 = asyncio.run(scenario())
    assert set(toy.recreated) == {tp0, tp1}
    assert "not the one the checkpoint covered" in toy.recreated[tp0]
    assert toy.offsets(tp0) == list(range(RECORDS)) and toy.offsets(tp1) == list(range(RECORDS))


def test_a_load_that_fails_in_the_assignment_hook_is_retried_before_any_record_is_folded(broker):
    async def scenario():
        topic = await make_topic(broker, 1)
        await produce(broker, topic, 1, 0, RECORDS)
        tp0 = TopicPartition(topic, 0)
        toy = Toy({tp0: Resume(6, record_mark(TS, value(0, 5)))})
        toy.fail_loads = 1
        task = asyncio.create_task(reader_for(toy, broker, topic, uuid.uuid4().hex[:8]).run_once())
        try:
            await wait_for(lambda: len(toy.folded) >= RECORDS - 6, "the records after the checkpoint")
            await asyncio.sleep(0.5)  # room for a wrongly folded stale batch to show
        finally:
            await stop(task)
        return toy, tp0

    toy, tp0 = asyncio.run(scenario())
    assert toy.loads == [{tp0}, {tp0}]  # the hook's, which failed, then the loop's
    assert toy.offsets(tp0) == list(range(6, RECORDS))  # nothing read from the group's offset (the start)


def test_a_partition_restored_mid_stream_reads_on_from_its_checkpoint(broker):
    async def scenario():
        topic = await make_topic(broker, 1)
        await produce(broker, topic, 1, 0, RECORDS)
        tp0 = TopicPartition(topic, 0)
        toy = Toy({})
        toy.restore_at = (tp0, 6, Resume(2, record_mark(TS, value(0, 1))))
        task = asyncio.create_task(reader_for(toy, broker, topic, uuid.uuid4().hex[:8]).run_once())
        try:
            await wait_for(lambda: toy.offsets(tp0)[-1:] == [RECORDS - 1], "the restored partition's end")
            await asyncio.sleep(0.5)  # room for a wrongly folded stale batch to show
        finally:
            await stop(task)
        return toy, tp0

    toy, tp0 = asyncio.run(scenario())
    # 0..5, the restore at 6, then from the checkpoint at 2: nothing of the batch fetched before it
    assert toy.offsets(tp0) == [*range(6), -1, *range(2, RECORDS)]


def test_revocation_checkpoints_and_the_next_owner_resumes_where_it_let_go(broker):
    async def scenario():
        topic = await make_topic(broker, 2)
        await produce(broker, topic, 2, 0, RECORDS)
        tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        checkpoints: dict[TopicPartition, Resume] = {}
        group = uuid.uuid4().hex[:8]
        first, second = Toy(checkpoints), Toy(checkpoints)
        tasks = [asyncio.create_task(reader_for(first, broker, topic, group).run_once())]
        try:
            await wait_for(lambda: len(first.folded) >= 2 * RECORDS, "the first worker's records")
            tasks.append(asyncio.create_task(reader_for(second, broker, topic, group).run_once()))
            await wait_for(lambda: len(first.covered) == 1 and len(second.covered) == 1, "a partition each")
            await produce(broker, topic, 2, RECORDS, 2 * RECORDS)
            await wait_for(
                lambda: len(first.folded) + len(second.folded) >= 4 * RECORDS, "the records after the rebalance"
            )
        finally:
            for task in tasks:
                await stop(task)
        return first, second, tp0, tp1

    first, second, tp0, tp1 = asyncio.run(scenario())
    assert {tp0, tp1} in first.released  # its partitions were checkpointed when the second joined
    assert set(second.loads[0]) | set(first.loads[-1]) == {tp0, tp1}
    for tp in (tp0, tp1):
        # every record folded exactly once, by one worker or the other
        assert sorted(first.offsets(tp) + second.offsets(tp)) == list(range(2 * RECORDS)), tp
