"""The owned-partition consumer: the worker's own consumers, for agents that keep state per partition.

The outcomes agent and the sinks read Kafka with their own aiokafka consumer, in
their own group, instead of a Faust stream (docs/architecture.md, "The worker's own
consumers"). What that takes is the same for both, and lives here, the way Kafka
Streams' StreamThread owns the partitions for the processing code:

- **assignment** -> ``owner.load`` (the agent's checkpoint: where each partition
  resumes and a mark of the last record it saw) -> the log checked at that offset
  (``streams.resume``: a log that is not the one the state covers was recreated, and
  is read from offset 0) -> ``consumer.seek`` -> ``owner.adopt``;
- **a fetched batch** -> ``owner.fold`` per partition, then ``owner.fetched``;
- **revocation** -> ``owner.release`` (checkpoint and let go);
- **shutdown, or the loop failed** -> ``owner.close`` (checkpoint everything), then
  the consumer leaves the group; after a failure the loop starts again with a new
  consumer (``run_restarting``).

The seek is ours, so it cannot race anyone's fetcher: aiokafka drops what it
fetched for a partition before its seek, and records of a batch already in hand
for a partition sought since (``moved``) are dropped here. Should loading fail
inside the assignment hook (the broker away, say; aiokafka only logs a hook's
error), the loop loads those partitions before it folds any of their records.

The agent keeps its state and its effects (``PartitionOwner``); committed group
offsets only feed lag tools: the owner's checkpoint is the truth.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, NamedTuple, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from streams.kafka import client_options
from streams.resume import probe_logs, same_log
from streams.settings import Settings

log = logging.getLogger(__name__)


class Resume(NamedTuple):
    """Where a partition's saved state resumes."""

    offset: int  # the next offset to read (0: the log's start, nothing to check)
    mark: list[int] | None  # record_mark of the record at offset - 1 (None: not kept)


class PartitionOwner(Protocol):
    """What an agent hands :class:`OwnedConsumer`: its state per partition and what to do with records.

    ``load``, ``adopt``, ``fold`` and ``release`` run under the consumer's ``lock``;
    ``fetched`` and ``close`` take it where they need it."""

    def running(self) -> AbstractAsyncContextManager[Any]:
        """What the folds need while a consumer runs (the outcomes agent's producer)."""

    async def load(self, partitions: set[TopicPartition]) -> dict[TopicPartition, Resume | None]:
        """Read the saved state of newly assigned partitions, not yet owned. Where each
        resumes (None: at the group's committed offset); a partition may bring others
        (both topics of one source partition)."""

    def adopt(self, recreated: dict[TopicPartition, str]) -> None:
        """The loaded partitions are sought: own them. ``recreated``: the partitions whose log is
        not the one the state covers (with the evidence), now read from offset 0."""

    async def fold(self, tp: TopicPartition, records: list) -> None:
        """One fetched batch of one owned partition."""

    async def fetched(self) -> None:
        """After every poll, with records or not (what is due)."""

    async def release(self, partitions: set[TopicPartition]) -> None:
        """Revoked: checkpoint them and let go (the next owner resumes from the checkpoint)."""

    async def close(self) -> None:
        """Shutdown, or the loop failed: checkpoint everything owned and let go."""


class OwnedConsumer(ConsumerRebalanceListener):
    """One aiokafka consumer in group ``group_id`` over ``topics``, owning its partitions for
    ``owner``; it is its consumer's rebalance listener."""

    def __init__(
        self,
        settings: Settings,
        owner: PartitionOwner,
        *,
        name: str,
        group_id: str,
        topics: list[str],
        poll_ms: int,
        max_records: int,
        **options: Any,
    ) -> None:
        """``options``: more AIOKafkaConsumer arguments (an assignor, fetch_max_wait_ms)."""
        self.settings = settings
        self.owner = owner
        self.name = name
        self.group_id = group_id
        self.topics = topics
        self.poll_ms = poll_ms
        self.max_records = max_records
        self.options = options
        self.consumer: AIOKafkaConsumer | None = None  # None between runs
        self.lock = asyncio.Lock()  # one load, fold or release at a time; the owner's timers take it too
        self.on_batch: list[Callable[[str, int], None]] = []  # (topic, messages read): /metrics
        self.pending: set[TopicPartition] = set()  # assigned, not loaded yet (the hook failed)
        self.moved: set[TopicPartition] = set()  # sought since the batch in hand was fetched
        self.committed: dict[TopicPartition, int] = {}  # by this run's consumer

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment()) if self.consumer is not None else set()

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit to the group the offsets that moved since this consumer's last commit (for lag
        tools). Nothing without a consumer; raises what the commit raises."""
        consumer = self.consumer
        changed = {tp: offset for tp, offset in offsets.items() if self.committed.get(tp) != offset}
        if not changed or consumer is None:
            return
        await consumer.commit(changed)
        self.committed.update(changed)

    # -- partitions moving between workers ---------------------------------------------------
    async def on_partitions_revoked(self, revoked: Any) -> None:
        revoked = set(revoked)
        async with self.lock:
            self.pending -= revoked
            await self.owner.release(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        assigned = set(assigned)
        async with self.lock:
            self.pending = set(assigned)
            try:
                await self.resume(assigned)
            except Exception:  # aiokafka would log and go on: the loop loads them before any record counts
                log.exception(
                    "%s: loading the checkpoints of %s failed; retrying from the loop",
                    self.name,
                    sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned),
                )

    async def resume(self, partitions: set[TopicPartition]) -> None:
        """Load the partitions' state, check each log at the offset it resumes from, seek there
        and hand them to the owner (the caller holds the lock). Raises when loading fails.

        Also how an owner restores a partition from its checkpoint mid-stream."""
        consumer = self.consumer
        assert consumer is not None
        positions = await self.owner.load(set(partitions))
        # Is each log still the one the state covers? Read from the records at the state's
        # offsets, not the broker's reported end offset (streams/resume.py).
        checked = {tp: at.offset - 1 for tp, at in positions.items() if at is not None and at.offset > 0}
        probes = await probe_logs(client_options(self.settings), checked)
        recreated: dict[TopicPartition, str] = {}
        for tp, at in positions.items():
            if at is None:
                continue  # no state of its own: the group's committed offset
            offset = at.offset
            if tp in checked:
                same, evidence = same_log(offset - 1, at.mark, probes[tp])
                if not same:
                    # An empty broker came back, or the topic was deleted and made again: read it
                    # from its start, or every new event would pass for one already counted.
                    recreated[tp] = evidence
                    offset = 0
            # seek, not seek_to_beginning: it also drops records already fetched past the offset
            # (a partition restored mid-stream); below the log's start the consumer resets to it
            consumer.seek(tp, offset)
            self.moved.add(tp)  # a batch in hand was fetched from elsewhere
        self.pending -= set(partitions) | set(positions)
        self.owner.adopt(recreated)

    # -- the loop --------------------------------------------------------------------------
    async def run_once(self) -> None:
        """One consumer, from joining the group to leaving it (shutdown cancels it)."""
        settings = self.settings
        owner = self.owner
        async with owner.running():
            self.consumer = consumer = AIOKafkaConsumer(
                **client_options(settings),
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=int(settings.session_timeout_s * 1000),
                heartbeat_interval_ms=int(settings.heartbeat_interval_s * 1000),
                rebalance_timeout_ms=int(settings.rebalance_timeout_s * 1000),
                max_poll_records=self.max_records,
                **self.options,
            )
            self.committed, self.pending, self.moved = {}, set(), set()
            try:
                await consumer.start()
                try:
                    consumer.subscribe(topics=list(self.topics), listener=self)
                    while True:
                        batch = await consumer.getmany(timeout_ms=self.poll_ms, max_records=self.max_records)
                        self.moved = set()  # aiokafka returns nothing fetched before a seek
                        for tp, records in batch.items():
                            async with self.lock:
                                if tp in self.pending:
                                    # The assignment hook failed (the broker was away, say): load the
                                    # state now and seek; aiokafka then fetches from the state's offsets.
                                    await self.resume(self.pending)
                                if tp in self.moved or tp not in consumer.assignment():
                                    continue  # sought since the fetch, or revoked: read again from the checkpoint
                                await owner.fold(tp, records)
                            for observe in self.on_batch:
                                observe(tp.topic, len(records))
                            await asyncio.sleep(0)  # the owner's timers between batches
                        await owner.fetched()
                finally:
                    await owner.close()  # shutdown (SIGINT cancels this task) or a crash of the loop
            finally:
                self.consumer = None
                await consumer.stop()

    async def run(self) -> None:
        """For the worker's lifetime: a failed run is logged and started again with a new consumer."""
        await run_restarting(self.run_once, self.name)


RESTART_DELAY_S = 2.0


async def run_restarting(run_once: Callable[[], Awaitable[None]], name: str) -> None:
    """Run a consumer loop for the worker's lifetime: a failure is logged and the loop
    starts again (with a new consumer) after RESTART_DELAY_S; cancellation stops it."""
    while True:
        try:
            await run_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: consumer loop failed; restarting in %.0f s", name, RESTART_DELAY_S)
            await asyncio.sleep(RESTART_DELAY_S)
