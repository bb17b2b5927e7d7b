"""Outcomes agent: traces + feedback -> per-partition outcome statistics snapshots (docs/metrics.md).

A thin loop over :class:`safeswap.core.outcomes.OutcomeProcessor`, one per source
partition (both topics are keyed by user_id with the same partition count, so
partition *p* of each holds the same users).

Why its own consumer, not a Faust stream
----------------------------------------
Faust delivers every message through its conductor one at a time: a
``wait_first`` over four futures, a channel queue, an event, an ack. On these
machines that costs ~110 us per message, more than the whole outcome step
(~25 us, ``benchmarks/bench_outcomes.py step``): over Faust, the pipeline reached
0.46-0.59x a bare Faust agent that does nothing (docs/performance.md). So the
agent runs in the Faust worker like the sinks, as a task with **its own aiokafka
consumer** in the group ``<app_id>.outcomes`` (``streams.owned.OwnedConsumer``,
which owns the group membership, the resume and the fetch loop), and folds each
fetched batch in one pass. The group uses the range assignor, which gives
partition *p* of both topics to the same member (co-partitioning, which Faust's
assignor did before). Faust still runs the decide and judge agents, the timers
and the producer.

Exactly-once effect on at-least-once delivery -- the state persistence design
-----------------------------------------------------------------------------
A Faust table write per event costs more than the rest of the loop (about 3,600
writes/s on a 2-core machine, faust-streaming 0.15), so the state is not kept in a
table. Instead:

1. **The state is plain Python in memory** (OutcomeProcessor: users, joins,
   sessions, dedup ids, per-variant sums) and it *includes the source offsets it
   covers* (``processor.offsets[topic]`` = next offset to read).
2. **Checkpoint = whole partition state + those offsets, in one atomic unit**,
   every ``checkpoint_every_events`` events or ``checkpoint_interval_s`` seconds,
   on revocation and on clean shutdown, written to the compacted topic
   ``<prefix>.checkpoints`` (streams.checkpoint: chunked, two alternating slots,
   a head record written last, sha256-verified). Before the state is taken, the
   producer is flushed, so every DLQ record of the covered events is delivered
   first. The state is taken by ``fork()`` under the lock (a copy-on-write image,
   milliseconds) and encoded and written in the background while events go on;
   one checkpoint per partition is in flight at a time, and a revoked partition
   waits for its checkpoint before it is handed over.
3. **On (re)assignment** of partition *p* the agent loads *p*'s last checkpoint
   and **seeks** traces-*p* and feedback-*p* to the checkpoint's offsets (the
   start of the log when there is none), so the gap between checkpoint and crash
   is re-read. The consumer (streams/owned.py) first reads the record just before
   those offsets and compares it with the one the state last folded
   (streams/resume.py): another record, or a log that no longer reaches the
   offsets, means the topic was recreated and is read from its start. The consumer
   is ours, so the seek cannot race anyone's fetcher (aiokafka drops what it
   fetched before a seek). After each checkpoint its offsets are committed to the
   group, for lag tools; the checkpoint is the truth.
4. **Replaying the gap is idempotent**: the restored state is exactly the state
   after the checkpoint's offsets, and events below those offsets are skipped by
   offset; event-id dedup inside the state covers repeats the producers made.
   Snapshots carry ``seq`` = the sum of the covered offsets, so a re-published
   snapshot never outranks a newer one at the decide agent, across restarts too.

What a crash costs: re-reading at most one checkpoint interval of input.
Tansu has no transactions, so nothing here relies on them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import faust
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.partitioner import DefaultPartitioner

from safeswap.core.outcomes import FEEDBACK, TRACE, OutcomeConfig, OutcomeProcessor
from safeswap.flags import FlagClient
from schemas import Decision, OutcomeRecord, encode
from streams.checkpoint import CheckpointWriter, ForkedEncoding, decode_state, ensure_checkpoint_topic, read_latest
from streams.deadletter import DeadLetters
from streams.kafka import client_options
from streams.owned import OwnedConsumer, Resume
from streams.resume import record_mark
from streams.settings import Settings

log = logging.getLogger(__name__)
POLL_MS = 100
MAX_RECORDS = 1_000  # per fetch: a batch is folded under the lock, so this bounds how long snapshots wait


def restore_processor(payload: bytes, config: OutcomeConfig) -> OutcomeProcessor | None:
    """The processor a checkpoint holds, or None (logged with the reason) when it cannot be
    loaded: written by a safeswap of another state version (``OutcomeProcessor.STATE_VERSION``),
    or not a state payload at all (e.g. a pickle from before version 5)."""
    import gc

    collecting = gc.isenabled()
    gc.disable()  # loading builds millions of objects and no cycle: a collection meanwhile only scans them
    try:
        processor = OutcomeProcessor.from_state(decode_state(payload), config)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint: rebuild the partition, never crash
        log.warning("outcomes: checkpoint not loaded: %s: %s", type(exc).__name__, exc)
        return None
    finally:
        if collecting:
            gc.enable()
    processor.collect_outcomes = True
    return processor


@dataclass
class Owned:
    processor: OutcomeProcessor
    writer: CheckpointWriter
    # A checkpoint encodes the whole partition (in a forked child, but on the same
    # two cores): its cost sets how often it may run (see checkpoint_due).
    last_checkpoint: float = 0.0  # time.monotonic()
    encode_s: float = 0.0  # how long the last one took to encode
    writing: asyncio.Task | None = None  # the checkpoint being encoded and written
    published: float = 0.0  # time.monotonic() of the last statistics snapshot

    def writing_done(self) -> bool:
        return self.writing is None or self.writing.done()


CHECKPOINT_COST_FACTOR = 20


class OutcomesService:
    """The per-partition states of traces + feedback, folded from the owned-partition consumer
    ``reader`` (streams.owned: it calls ``load``, ``adopt``, ``fold``, ``release``, ``close``)."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.stats_topic, self.outcomes_topic = settings.topic("stats"), settings.topic("outcomes")
        self.producer: OutcomeProducer | None = None
        self.dead_letters = DeadLetters(app, settings, agent="outcomes")
        self.traces, self.feedback = settings.topic("traces"), settings.topic("feedback")
        self.checkpoint_topic = settings.topic("checkpoints")
        self.config = OutcomeConfig.from_settings(settings)
        self.owned: dict[int, Owned] = {}
        self.loading: dict[int, Owned] = {}  # loaded, owned once both topics are sought (``adopt``)
        # (topic, partition, offset) -> reason: events whose step raised (see ``undo``)
        self.failed: dict[tuple[str, int, int], str] = {}
        # The consumer of traces + feedback; its lock: one batch, one publish or one checkpoint at a time.
        self.reader = OwnedConsumer(
            settings,
            self,
            name="outcomes",
            group_id=f"{settings.app_id}.outcomes",
            topics=[self.traces, self.feedback],
            poll_ms=POLL_MS,
            max_records=MAX_RECORDS,
            partition_assignment_strategy=(RangePartitionAssignor,),  # partition p of both topics together
            fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
        )
        # The decisions topic, read like the apps' flag clients read it: where each rollout's
        # split periods begin (its exposure cohorts), passed to every partition's processor.
        self.flags: FlagClient | None = None

    def on_decision(self, decision: Decision) -> None:
        for state in self.owned.values():
            state.processor.on_decision(decision)

    def learn_decisions(self, processor: OutcomeProcessor) -> None:
        if self.flags is not None:
            for decision in self.flags.decisions().values():
                processor.on_decision(decision)

    # -- output -----------------------------------------------------------------------------
    async def publish(self, state: Owned) -> None:
        processor = state.processor
        state.published = time.monotonic()
        assert self.producer is not None
        for snapshot in processor.take_dirty_snapshots(seq=sum(processor.offsets.values())):
            await self.producer.send(self.stats_topic, snapshot.rollout_id.encode(), encode(snapshot))

    # -- checkpoints ------------------------------------------------------------------------
    async def checkpoint(self, partition: int, state: Owned) -> asyncio.Task:
        """Take the partition's state now (the caller holds the lock) and write it in the background."""
        processor = state.processor
        await self.publish(state)
        # Outcome records and DLQ records of covered events are delivered before the checkpoint.
        assert self.producer is not None
        await self.producer.flush()
        await self.app.producer.flush()
        processor.events_since_checkpoint = 0
        state.last_checkpoint = time.monotonic()
        encoding = ForkedEncoding.start(processor.to_state)  # the state as of now, whatever happens next
        state.writing = asyncio.create_task(self.write_checkpoint(partition, state, encoding, dict(processor.offsets)))
        return state.writing

    async def write_checkpoint(self, partition: int, state: Owned, encoding: ForkedEncoding, offsets: dict) -> None:
        try:
            payload = await encoding.payload()
            state.encode_s = encoding.encode_s

            async def send(key: bytes, value: bytes) -> int:
                metadata = await self.app.producer.send_and_wait(
                    self.checkpoint_topic, key, value, partition, None, None
                )
                return metadata.offset

            head = await state.writer.write(send, payload)
            log.info(
                "outcomes: checkpoint %s[%d] generation %d: %s bytes, offsets %s (encoded in %.2f s, loop held %.3f s)",
                self.checkpoint_topic,
                partition,
                head["generation"],
                f"{len(payload):,}",
                offsets,
                encoding.encode_s,
                encoding.blocked_s,
            )
        except Exception:  # a lost checkpoint only lengthens the replay after a crash
            log.exception("outcomes: checkpoint of partition %d failed", partition)
            return
        await self.commit(offsets, partition)

    async def commit(self, offsets: dict[str, int], partition: int) -> None:
        """The checkpoint's offsets as the group's committed offsets: for lag tools only."""
        if partition not in self.owned:
            return
        try:
            await self.reader.commit({TopicPartition(topic, partition): offset for topic, offset in offsets.items()})
        except Exception as exc:  # noqa: BLE001 - mid-rebalance, say: the checkpoint still holds
            log.debug("outcomes: offset commit of partition %d skipped: %r", partition, exc)

    def checkpoint_due(self, state: Owned, interval_s: float) -> bool:
        """One checkpoint in flight per partition, and at most ~5% of a core goes to
        encoding them: a partition whose last one took 2 s to encode waits at least
        40 s. A longer gap only means a longer replay after a crash (idempotent),
        never a wrong result."""
        return state.writing_done() and time.monotonic() - state.last_checkpoint >= max(
            interval_s, CHECKPOINT_COST_FACTOR * state.encode_s
        )

    def fresh(self, partition: int) -> Owned:
        processor = OutcomeProcessor(partition, self.config)
        processor.collect_outcomes = True
        self.learn_decisions(processor)
        return Owned(processor, CheckpointWriter(partition))

    # -- the hot path -----------------------------------------------------------------------
    async def fold(self, tp: TopicPartition, records: list) -> None:
        """One fetched batch of one partition, then its snapshot if due (the reader holds the lock)."""
        await self.fold_batch(tp, records)
        await self.publish_if_due(tp.partition)

    async def fold_batch(self, tp: TopicPartition, records: list) -> None:
        """Fold one fetched batch of one partition (the caller holds the lock). Stops when the
        partition is restored from its checkpoint (``undo``): the reader drops what else was
        fetched for it, its topics are read again from the checkpoint."""
        state = self.owned.get(tp.partition)
        if state is None:
            return  # not loaded: the reader loads and seeks before it hands over records
        processor = state.processor
        topic, partition = tp.topic, tp.partition
        source = TRACE if topic == self.traces else FEEDBACK
        covered = processor.offsets.get(topic, 0)
        producer = self.producer
        assert producer is not None
        for record in records:
            offset = record.offset
            if offset < covered:
                continue  # already in the state: the checkpoint covers it
            if offset > covered:
                # aiokafka drops batches fetched before a seek, so a gap means the log no longer
                # holds those offsets (retention, compaction): nothing left to read
                log.warning(
                    "outcomes: %s[%d] continues at %d but the state covers only up to %d: offsets "
                    "%d..%d are no longer in the log",
                    topic,
                    partition,
                    offset,
                    covered,
                    covered,
                    offset - 1,
                )
            origin = (topic, partition, offset, record.key, record.value)
            failed = self.failed.get((topic, partition, offset))
            if failed is not None:  # its step raised once: counted as invalid, already in the DLQ
                processor.reject_invalid(failed)
                reason = None
            else:
                try:
                    reason = processor.fold_raw(source, record.value or b"", int(time.time() * 1000), origin)
                except Exception as exc:  # a bug must not stop the partition, nor leave it half-updated
                    log.exception("outcomes: failed on %s[%s]@%s", topic, partition, offset)
                    await self.undo(tp, record, f"internal error: {exc!r}")
                    return
            covered = processor.offsets[topic] = offset + 1
            processor.log_marks[topic] = record_mark(record.timestamp, record.value)
            if reason is not None:
                await self.dead_letters.send_record(topic, partition, offset, record.key, record.value, reason)
            if processor.outcome_records:  # responses that became final: their records
                producer.add(processor.outcome_records)
                processor.outcome_records = []
            while processor.rejected:
                (r_topic, r_partition, r_offset, r_key, r_value), why = processor.rejected.pop(0)
                await self.dead_letters.send_record(r_topic, r_partition, r_offset, r_key, r_value, why)
            if processor.events_since_snapshot >= self.settings.snapshot_every_events:
                await producer.send_outcomes()  # the records before the snapshot that counts them
                await self.publish(state)
            if processor.events_since_checkpoint >= self.settings.checkpoint_every_events and self.checkpoint_due(
                state, 0.0
            ):
                await self.checkpoint(partition, state)
        await producer.send_outcomes()

    async def undo(self, tp: TopicPartition, record: Any, error: str) -> None:
        """An event whose step raised: the partition's state may hold part of it. Send the event
        to the DLQ once, then restore the partition from its last checkpoint and read on from
        there, skipping that event (counted once, as invalid): the state is as if the event had
        been rejected on arrival. Costs a replay of one checkpoint interval; bugs are rare."""
        partition = tp.partition
        state = self.owned.pop(partition)
        reason = f"{error}; the event was skipped and the partition restored from its last checkpoint"
        self.failed[(tp.topic, partition, record.offset)] = reason
        await self.dead_letters.send_record(tp.topic, partition, record.offset, record.key, record.value, reason)
        if state.writing is not None:  # never two writers on one checkpoint partition
            try:
                await state.writing
            except Exception:
                log.exception("outcomes: checkpoint of partition %d failed", partition)
        # loads the checkpoint and seeks both topics to its offsets
        await self.reader.resume({TopicPartition(topic, partition) for topic in (self.traces, self.feedback)})

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """A producer of its own for each run of the reader; the decisions topic read from the first."""
        self.producer = producer = OutcomeProducer(self.settings, self.outcomes_topic)
        if self.flags is None:
            self.flags = FlagClient(settings=self.settings)
            self.flags.on_change(self.on_decision)
            await self.flags.start()
        try:
            await producer.start()
            yield
        finally:
            await producer.stop()

    async def fetched(self) -> None:
        """Nothing after a poll: snapshots are published per batch (``fold``) and by the timer."""

    async def run(self) -> None:
        try:
            await self.reader.run()
        finally:
            if self.flags is not None:
                await self.flags.stop()

    # -- partitions moving between workers --------------------------------------------------
    async def close(self) -> None:
        """Checkpoint and let go of every partition (shutdown, or the reader's loop failed)."""
        for partition in sorted(self.owned):
            async with self.reader.lock:
                await self.release_partition(partition)

    async def release(self, partitions: set[TopicPartition]) -> None:
        """Revoked: checkpoint and let go of their source partitions (the reader holds the lock)."""
        for partition in sorted({tp.partition for tp in partitions}):
            await self.release_partition(partition)

    async def release_partition(self, partition: int) -> None:
        state = self.owned.pop(partition, None)
        if state is None:
            return
        try:
            if state.writing is not None:  # never two writers on one checkpoint partition
                await state.writing
            if state.processor.events_since_checkpoint:
                await (await self.checkpoint(partition, state))
        except Exception:  # the next owner replays from the previous checkpoint
            log.exception("outcomes: checkpoint on revocation of partition %d failed", partition)

    async def load(self, partitions: set[TopicPartition]) -> dict[TopicPartition, Resume | None]:
        """Load each new source partition's checkpoint: where both of its topics resume (the
        reader holds the lock, checks the logs, seeks, then calls ``adopt``). Raises when a
        checkpoint cannot be read."""
        settings = self.settings
        # A state whose partition is no longer assigned belongs to another worker now: dropped
        # without a checkpoint (its revocation already wrote one).
        for gone in set(self.owned) - {tp.partition for tp in self.reader.assignment()}:
            self.owned.pop(gone)
        new = sorted({tp.partition for tp in partitions} - set(self.owned))
        self.loading = {}
        if not new:
            return {}
        await ensure_checkpoint_topic(
            client_options(settings), self.checkpoint_topic, settings.partitions, settings.replication_factor
        )
        loaded: dict[int, Owned] = {}
        for partition in new:
            found = await read_latest(client_options(settings), self.checkpoint_topic, partition)
            if found is None:
                loaded[partition] = self.fresh(partition)
            else:
                payload, head = found
                processor = restore_processor(payload, self.config)
                if processor is None:
                    # Written by another safeswap version: its state has another shape. Rebuild
                    # from the topics' start (exact while the broker still holds them).
                    log.warning(
                        "outcomes: partition %d: the checkpoint cannot be loaded by this safeswap "
                        "(it reads state version %s; the line above says why): rebuilding the partition "
                        "from the start of its topics (metrics cover only what the broker still retains)",
                        partition,
                        OutcomeProcessor.STATE_VERSION,
                    )
                    processor, found = self.fresh(partition).processor, None
                self.learn_decisions(processor)
                loaded[partition] = Owned(processor, CheckpointWriter(partition, head["generation"]))
            log.warning(
                "outcomes: partition %d resumes at %s (%s)",
                partition,
                dict(loaded[partition].processor.offsets),
                "from checkpoint" if found else "no checkpoint",
            )
        self.loading = loaded
        return {
            TopicPartition(topic, partition): Resume(
                state.processor.offsets.get(topic, 0), state.processor.log_marks.get(topic)
            )
            for partition, state in loaded.items()
            for topic in (self.traces, self.feedback)
        }

    def adopt(self, recreated: dict[TopicPartition, str]) -> None:
        """Own the loaded partitions, both topics sought; a recreated topic's state starts at 0."""
        for tp, evidence in recreated.items():
            log.warning(
                "outcomes: %s[%d]: %s: the topic was recreated; reading it from its start",
                tp.topic,
                tp.partition,
                evidence,
            )
            self.loading[tp.partition].processor.offsets[tp.topic] = 0
        self.owned.update(self.loading)
        self.loading = {}

    # -- timers -----------------------------------------------------------------------------
    async def publish_if_due(self, partition: int) -> None:
        """A partition's snapshot once ``snapshot_interval_s`` has passed (the caller holds the
        lock). Checked after every batch, so a busy partition does not wait for the timer
        (which waits for the lock); the timer covers partitions with nothing new to read."""
        state = self.owned.get(partition)
        if (
            state is not None
            and state.processor.dirty
            and time.monotonic() - state.published >= self.settings.snapshot_interval_s
        ):
            await self.publish(state)

    async def publish_due(self) -> None:
        for partition in list(self.owned):
            async with self.reader.lock:
                await self.publish_if_due(partition)

    async def checkpoint_due_partitions(self) -> None:
        for partition in list(self.owned):
            async with self.reader.lock:
                state = self.owned.get(partition)
                if (
                    state is not None
                    and state.processor.events_since_checkpoint
                    and self.checkpoint_due(state, self.settings.checkpoint_interval_s)
                ):
                    await self.checkpoint(partition, state)
            await asyncio.sleep(0)  # one partition at a time: events and snapshots go on between them


class OutcomeProducer:
    """The outcomes agent's own producer: outcome records go out as whole batches.

    A fetched batch of 1,000 events makes ~800 outcome records. Sent one by one (through
    Faust's Topic.send, or even aiokafka's ``send``), each cost a future, an accumulator
    append and Faust's bookkeeping: ~15% of a loaded worker's event loop. Here they are
    encoded into one ``BatchBuilder`` per partition (the partition aiokafka's default
    partitioner would pick for the user_id key, so the topic is keyed as documented) and
    submitted with one ``send_batch``.
    """

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self.producer = AIOKafkaProducer(
            **client_options(settings),
            acks="all",
            linger_ms=settings.producer_linger_ms,
            max_batch_size=settings.producer_max_batch_bytes,
        )
        self.partitioner = DefaultPartitioner()
        self.partitions: list[int] = []
        self.pending: list[OutcomeRecord] = []

    async def start(self) -> None:
        await self.producer.start()
        self.partitions = sorted(await self.producer.partitions_for(self.topic))

    async def stop(self) -> None:
        await self.producer.stop()

    def add(self, records: list[OutcomeRecord]) -> None:
        self.pending.extend(records)

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        """One record (statistics snapshots), sent like any other."""
        sent = await self.producer.send(topic, value, key=key)
        sent.add_done_callback(_log_failed_send)

    async def send_outcomes(self) -> None:
        """Send what ``add`` collected, one batch per partition (more when one fills up)."""
        if not self.pending:
            return
        records, self.pending = self.pending, []
        partitions, partition_of = self.partitions, self.partitioner
        batches: dict[int, Any] = {}
        producer = self.producer
        for outcome in records:
            key = outcome.user_id.encode()
            partition = partition_of(key, partitions, partitions)
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = producer.create_batch()
            value = encode(outcome)
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start another
                await self._submit(batch, partition)
                batch = batches[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        for partition, batch in batches.items():
            await self._submit(batch, partition)

    async def _submit(self, batch: Any, partition: int) -> None:
        sent = await self.producer.send_batch(batch, self.topic, partition=partition)
        sent.add_done_callback(_log_failed_send)

    async def flush(self) -> None:
        await self.send_outcomes()
        await self.producer.flush()


def _log_failed_send(sent: asyncio.Future) -> None:
    """A record the producer gave up on (after its retries) is logged, not lost silently."""
    if not sent.cancelled() and sent.exception() is not None:
        log.error("outcomes: records could not be produced: %r", sent.exception())


def register(app: faust.App, settings: Settings) -> OutcomesService:
    service = OutcomesService(app, settings)

    @app.task
    async def outcomes() -> None:
        await service.run()

    @app.timer(settings.snapshot_interval_s / 4)  # publishes only what is due (publish_if_due)
    async def publish_snapshots() -> None:
        await service.publish_due()

    @app.timer(settings.checkpoint_interval_s)
    async def checkpoint_partitions() -> None:
        await service.checkpoint_due_partitions()

    return service
