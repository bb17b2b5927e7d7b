"""Outcomes agent: traces + feedback -> per-partition outcome statistics snapshots (docs/metrics.md).

A thin loop over :class:`safeswap.outcomes.OutcomeProcessor`, one per source
partition (both topics are keyed by user_id with the same partition count, so
partition *p* of each holds the same users).

Exactly-once effect on at-least-once delivery -- the state persistence design
-----------------------------------------------------------------------------
A Faust table write per event costs more than the rest of the loop (~3,600/s,
FIELD_NOTES), so the state is not kept in a table. Instead:

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
3. **On (re)assignment** of partition *p* (Faust's ``on_partitions_assigned``
   signal: the consumer is paused and Faust has not yet done its "seek to
   committed" of the recovery step), the agent loads *p*'s last checkpoint and
   **commits the checkpoint's offsets** for traces-*p* and feedback-*p* to the
   consumer group (0 when there is none). Faust's recovery then seeks every
   partition to its committed offset (``Consumer.perform_seek``) and sets its read
   offsets from them, so the gap between checkpoint and crash is re-read. Seeking
   from inside the agent loop instead would race with the fetcher's in-flight
   batch (it advances ``_read_offset`` past the seek target and then drops the
   re-read messages), which is why the commit happens in the assignment hook.
4. **Replaying the gap is idempotent**: the restored state is exactly the state
   after the checkpoint's offsets, and events below those offsets are skipped by
   offset; event-id dedup inside the state covers repeats the producers made.
   Snapshots carry ``seq`` = the sum of the covered offsets, so a re-published
   snapshot never outranks a newer one at the decide agent, across restarts too.

What a crash costs: re-reading at most one checkpoint interval of input.
Faust's own offset commits still happen (they are overridden on assignment),
and ``processing_guarantee`` stays ``at_least_once`` (Tansu has no transactions).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import TP

from agents.dlq import DeadLetters
from safeswap.outcomes import FEEDBACK, TRACE, OutcomeConfig, OutcomeProcessor
from schemas import encode
from streams.app import raw_topic
from streams.kafka import client_options
from streams.checkpoint import CheckpointWriter, ForkedEncoding, decode_state, ensure_checkpoint_topic, read_latest
from streams.deadletter import dead_letter
from streams.settings import Settings

log = logging.getLogger(__name__)
DLQ_VALUE_LIMIT = 256 * 1024  # larger originals are cut in the DLQ record (the producer's max is ~1 MB)


@dataclass
class Owned:
    processor: OutcomeProcessor
    writer: CheckpointWriter
    # A checkpoint pickles the whole partition (in a forked child, but on the same
    # two cores): its cost sets how often it may run (see checkpoint_due).
    last_checkpoint: float = 0.0  # time.monotonic()
    encode_s: float = 0.0  # how long the last one took to encode
    writing: asyncio.Task | None = None  # the checkpoint being encoded and written

    def writing_done(self) -> bool:
        return self.writing is None or self.writing.done()


CHECKPOINT_COST_FACTOR = 20
STALL_CHECK_S = 5.0  # how long a partition's state may stand still while its log has more (read_stalled_gaps)


def register(app: faust.App, settings: Settings) -> None:
    inputs = raw_topic(app, settings, "traces", "feedback")
    stats_topic = raw_topic(app, settings, "stats")
    outcomes_topic = raw_topic(app, settings, "outcomes")
    dead_letters = DeadLetters(app, settings, agent="outcomes")
    traces_name, feedback_name = settings.topic("traces"), settings.topic("feedback")
    checkpoint_topic = settings.topic("checkpoints")
    config = OutcomeConfig.from_settings(settings)
    owned: dict[int, Owned] = {}
    lock = asyncio.Lock()  # one event, one publish or one checkpoint at a time

    async def dead_letter_to(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
                             reason: str) -> None:
        value = value or b""
        if len(value) > DLQ_VALUE_LIMIT:
            reason += f" (original of {len(value):,} bytes cut to its first {DLQ_VALUE_LIMIT:,} in this record)"
            value = value[:DLQ_VALUE_LIMIT]
        dead_letters.count += 1
        log.warning("outcomes: dead letter from %s[%s]@%s: %s", topic, partition, offset, reason[:300])
        record = dead_letter(topic=topic, partition=partition, offset=offset, key=key, value=value,
                             reason=reason, agent="outcomes")
        await dead_letters.topic.send(key=key, value=record)

    async def publish(state: Owned) -> None:
        processor = state.processor
        for snapshot in processor.take_dirty_snapshots(seq=sum(processor.offsets.values())):
            await stats_topic.send(key=snapshot.rollout_id.encode(), value=encode(snapshot))

    async def checkpoint(partition: int, state: Owned) -> asyncio.Task:
        """Take the partition's state now (the caller holds the lock) and write it in the background."""
        processor = state.processor
        await publish(state)
        await app.producer.flush()  # DLQ records of covered events are delivered before the checkpoint
        processor.events_since_checkpoint = 0
        state.last_checkpoint = time.monotonic()
        encoding = ForkedEncoding.start(processor)  # the state as of now, whatever happens next
        state.writing = asyncio.create_task(write_checkpoint(partition, state, encoding, dict(processor.offsets)))
        return state.writing

    async def write_checkpoint(partition: int, state: Owned, encoding: ForkedEncoding, offsets: dict) -> None:
        try:
            payload = await encoding.payload()
            state.encode_s = encoding.encode_s

            async def send(key: bytes, value: bytes) -> int:
                metadata = await app.producer.send_and_wait(checkpoint_topic, key, value, partition, None, None)
                return metadata.offset

            head = await state.writer.write(send, payload)
            log.info("outcomes: checkpoint %s[%d] generation %d: %s bytes, offsets %s (encoded in %.2f s, "
                     "loop held %.3f s)", checkpoint_topic, partition, head["generation"], f"{len(payload):,}",
                     offsets, encoding.encode_s, encoding.blocked_s)
        except Exception:  # a lost checkpoint only lengthens the replay after a crash
            log.exception("outcomes: checkpoint of partition %d failed", partition)

    def checkpoint_due(state: Owned, interval_s: float) -> bool:
        """One checkpoint in flight per partition, and at most ~5% of a core goes to
        encoding them: a partition whose last one took 2 s to encode waits at least
        40 s. A longer gap only means a longer replay after a crash (idempotent),
        never a wrong result."""
        return state.writing_done() and \
            time.monotonic() - state.last_checkpoint >= max(interval_s, CHECKPOINT_COST_FACTOR * state.encode_s)

    def fresh(partition: int) -> Owned:
        processor = OutcomeProcessor(partition, config)
        processor.collect_outcomes = True
        return Owned(processor, CheckpointWriter(partition))

    async def fold(state: Owned, topic: str, partition: int, offset: int, key: bytes | None,
                   value: bytes | None) -> None:
        """One source message into the partition's state (the caller holds the lock)."""
        processor = state.processor
        source = TRACE if topic == traces_name else FEEDBACK
        origin = (topic, partition, offset, key, value)
        try:
            reason = processor.fold_raw(source, value or b"", int(time.time() * 1000), origin)
        except Exception as exc:  # a bug must not stop the partition: DLQ it, go on
            log.exception("outcomes: failed on %s[%s]@%s", topic, partition, offset)
            reason = processor.reject_invalid(f"internal error: {exc!r}")
        processor.offsets[topic] = offset + 1
        if reason is not None:
            await dead_letter_to(topic, partition, offset, key, value, reason)
        if processor.outcome_records:  # responses that became final: their records
            records, processor.outcome_records = processor.outcome_records, []
            for record in records:
                await outcomes_topic.send(key=record.user_id.encode(), value=encode(record))
        while processor.rejected:
            (r_topic, r_partition, r_offset, r_key, r_value), why = processor.rejected.pop(0)
            await dead_letter_to(r_topic, r_partition, r_offset, r_key, r_value, why)
        if processor.events_since_snapshot >= settings.snapshot_every_events:
            await publish(state)
        if processor.events_since_checkpoint >= settings.checkpoint_every_events and checkpoint_due(state, 0.0):
            await checkpoint(partition, state)

    async def fill_gap(state: Owned, topic: str, partition: int, start: int, stop: int,
                       why: str = "resumed at {stop} but the state covers only up to {start}") -> None:
        """Fold offsets ``start..stop-1``, read directly from Kafka.

        After an assignment Faust resumes each partition at the group's committed
        offset. The assignment hook commits the checkpoint's offsets, but Faust's
        recovery can seek before the hook has committed (the hook reads every
        checkpoint first; found by tests/faults/test_sigkill.py), and then the
        stream starts *after* the checkpoint: the events between the checkpoint
        and Faust's last commit would never reach the state. Such a gap between
        the state's offset and the first message is read here instead, with a
        consumer of its own (a seek would race Faust's fetcher)."""
        log.warning("outcomes: %s[%d] %s: reading the gap", topic, partition, why.format(start=start, stop=stop))
        consumer = AIOKafkaConsumer(**client_options(settings), group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            consumer.seek(tp, start)
            while state.processor.offsets.get(topic, 0) < stop:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                records = [r for r in batch.get(tp, []) if r.offset < stop]
                if not records and await consumer.position(tp) >= stop:
                    break  # nothing left below stop (deleted by retention, say)
                for record in records:
                    if record.offset >= state.processor.offsets.get(topic, 0):
                        await fold(state, topic, partition, record.offset, record.key, record.value)
        finally:
            await consumer.stop()

    @app.agent(inputs, name="outcomes", concurrency=1)
    async def outcomes(stream: faust.StreamT) -> None:
        async for event in stream.events():
            message = event.message
            try:
                async with lock:
                    state = owned.get(message.partition)
                    if state is None:  # not seen through the assignment hook (e.g. test_context)
                        state = owned[message.partition] = fresh(message.partition)
                    covered = state.processor.offsets.get(message.topic, 0)
                    if message.offset < covered:
                        continue  # already in the state: the checkpoint covers it
                    if message.offset > covered:
                        await fill_gap(state, message.topic, message.partition, covered, message.offset)
                    await fold(state, message.topic, message.partition, message.offset, message.key,
                               message.value)
            except Exception:  # never leave the loop (Faust would skip the event and restart us)
                log.exception("outcomes: failed around %s[%s]@%s", message.topic, message.partition, message.offset)

    @app.timer(settings.snapshot_interval_s)
    async def publish_snapshots() -> None:
        for partition in list(owned):
            async with lock:
                state = owned.get(partition)
                if state is not None and state.processor.dirty:
                    await publish(state)

    stalled_at: dict[tuple[str, int], int] = {}

    @app.timer(STALL_CHECK_S)
    async def read_stalled_gaps() -> None:
        """A partition whose state has not moved for a whole check while its log has
        more is read directly. Faust can start a resumed partition past messages it
        dropped in a rebalance race (seen with tests/faults/test_sigkill.py); fill_gap
        catches that on the next message, but a topic with no next message (no more
        feedback, say) would wait forever. Reading ahead of Faust is safe: the
        messages Faust delivers later are below the state's offsets and skipped."""
        tps = [TP(topic, p) for p in list(owned) for topic in (traces_name, feedback_name)]
        if not tps:
            return
        try:
            ends = await app.consumer.highwaters(*tps)
        except Exception as exc:  # the consumer is rebalancing or the broker is away: next time
            log.debug("outcomes: stall check skipped: %r", exc)
            return
        for tp in tps:
            end = ends.get(tp)
            async with lock:
                state = owned.get(tp.partition)
                if state is None or end is None:
                    continue
                covered = state.processor.offsets.get(tp.topic, 0)
                if end > covered and stalled_at.get(tp) == covered:
                    await fill_gap(state, tp.topic, tp.partition, covered, end,
                                   why="has messages up to {stop} but the state has stayed at {start}")
                stalled_at[tp] = state.processor.offsets.get(tp.topic, 0)

    @app.timer(settings.checkpoint_interval_s)
    async def checkpoint_partitions() -> None:
        for partition in list(owned):
            async with lock:
                state = owned.get(partition)
                if state is not None and state.processor.events_since_checkpoint and \
                        checkpoint_due(state, settings.checkpoint_interval_s):
                    await checkpoint(partition, state)
            await asyncio.sleep(0)  # one partition at a time: events and snapshots go on between them

    @app.on_partitions_revoked.connect
    async def on_revoked(sender, revoked, **kwargs) -> None:  # noqa: ARG001
        for partition in sorted({tp.partition for tp in revoked if tp.topic == traces_name}):
            async with lock:
                state = owned.pop(partition, None)
                if state is None:
                    continue
                try:
                    if state.writing is not None:  # never two writers on one checkpoint partition
                        await state.writing
                    if state.processor.events_since_checkpoint:
                        await (await checkpoint(partition, state))
                except Exception:  # the next owner replays from the previous checkpoint
                    log.exception("outcomes: checkpoint on revocation of partition %d failed", partition)

    async def forget_recreated_topics(partitions: set[int]) -> None:
        """A log that now ends before the offset a state has covered was recreated
        (an empty broker came back, a topic was deleted and made again): read it
        from its start, or every new event would pass for one already counted."""
        if not partitions:
            return
        consumer = AIOKafkaConsumer(**client_options(settings), group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            ends = await consumer.end_offsets([TopicPartition(t, p) for t in (traces_name, feedback_name)
                                               for p in partitions])
        finally:
            await consumer.stop()
        for tp, end in ends.items():
            offsets = owned[tp.partition].processor.offsets
            if end < offsets.get(tp.topic, 0):
                log.warning("outcomes: %s[%d] now ends at %d, before the %d this state covers: the topic was "
                            "recreated; reading it from its start", tp.topic, tp.partition, end, offsets[tp.topic])
                offsets[tp.topic] = 0

    @app.on_partitions_assigned.connect
    async def on_assigned(sender, assigned, **kwargs) -> None:  # noqa: ARG001
        partitions = {tp.partition for tp in assigned if tp.topic == traces_name}
        async with lock:
            for gone in set(owned) - partitions:
                owned.pop(gone)
            await forget_recreated_topics(partitions & set(owned))
            new = sorted(partitions - set(owned))
            if not new:
                return
            await ensure_checkpoint_topic(client_options(settings), checkpoint_topic, settings.partitions,
                                          settings.replication_factor)
            commit: dict[TP, int] = {}
            for partition in new:
                found = await read_latest(client_options(settings), checkpoint_topic, partition)
                if found is None:
                    state = fresh(partition)
                else:
                    payload, head = found
                    processor = decode_state(payload)
                    processor.config = config
                    processor.collect_outcomes = True
                    state = Owned(processor, CheckpointWriter(partition, head["generation"]))
                owned[partition] = state
                for topic in (traces_name, feedback_name):
                    commit[TP(topic, partition)] = state.processor.offsets.get(topic, 0)
                log.warning("outcomes: partition %d resumes at %s (%s)", partition,
                            {tp.topic: offset for tp, offset in commit.items() if tp.partition == partition},
                            "from checkpoint" if found else "no checkpoint")
            await app.consumer._commit(commit)  # Faust's recovery then seeks to these offsets
