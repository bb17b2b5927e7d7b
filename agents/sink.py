"""Sink agents: every dataset's topic -> Parquet files (sinks/), offsets committed after the rename.

Hosted by the Faust worker (``register(app, settings)`` from ``create_app``), but
consuming with **its own consumer group** ``<app_id>.sink`` through aiokafka,
with manual commits. Why not Faust streams in the app's group: a consumer group
has one committed offset per partition, shared by every agent of the app, and
the outcomes agent moves it on assignment (it commits its checkpoint's offsets,
agents/outcomes.py). A sink in the same group would be re-positioned past rows
it had not written yet: data loss after a crash. Its own group also lets the
sink commit exactly what is on disk, and reads ~10x faster than a Faust stream.

The loop (one task, ``streams.owned.OwnedConsumer``): ``getmany`` -> per record,
decode + validate into a row tuple and append it to its (dataset, partition)
buffer -> flush what rotation says is due -> commit ``last_offset + 1`` of every
flushed partition. Records that do not decode go to the DLQ
(``agent="sink:<dataset>"``), never into the dataset.

Offsets and crashes (the file protocol is in sinks/writer.py): the writer's
checkpoint, written after the rename, is the truth. On assignment every
partition is **sought to checkpoint + 1** (the group's committed offset only
matters when there is no checkpoint), after rolling a half-done flush forward;
on revocation its buffers are flushed and committed first; on shutdown
(SIGINT) everything buffered is flushed. After a SIGKILL the next owner
resumes right after the last file: every record lands exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import faust
import msgspec
from aiokafka import TopicPartition

from sinks.datasets import DATASETS, Dataset
from sinks.writer import Layout, PartitionWriter, Rotation
from streams.deadletter import DeadLetters
from streams.owned import OwnedConsumer, Resume
from streams.settings import Settings

log = logging.getLogger(__name__)

POLL_MS = 200
# Datasets whose topic an agent of the worker reads with the same decoder: that agent sends a bad
# record to the DLQ; the sink only skips it (counted in its `invalid`). Others: the sink does.
DEAD_LETTERED_BY = {
    "traces": "outcomes",
    "feedback": "outcomes",
    "shadow": "judge",
    "plans": "decide",
    "stats": "decide",
    "dlq": "nobody: the DLQ's own sink would loop",
}
MAX_RECORDS = 10_000


def selected(settings: Settings) -> list[Dataset]:
    """The datasets ``settings.sink_datasets`` asks for ("all", "", or comma-separated names).
    An unknown name is logged and ignored: a typo must not stop the worker."""
    wanted = settings.sink_datasets.strip()
    if wanted == "all":
        return list(DATASETS.values())
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    for name in names:
        if name not in DATASETS:
            log.error("SAFESWAP_SINK_DATASETS: unknown dataset %r ignored (known: all, %s)", name, ", ".join(DATASETS))
    return [DATASETS[name] for name in names if name in DATASETS]


class DatasetSink:
    """The writers of one dataset, one per Kafka partition this worker owns."""

    def __init__(
        self, settings: Settings, dataset: Dataset, layout: Layout, rotation: Rotation, dead_letters: DeadLetters | None
    ) -> None:
        self.dataset = dataset
        self.layout = layout
        self.rotation = rotation
        self.topic = settings.topic(dataset.topic)
        self.dead_letters = dead_letters
        self.writers: dict[int, PartitionWriter] = {}
        self.invalid = 0
        self.row_of = dataset.row
        self.needs_time = dataset.time_field is None
        self.struct_name = dataset.struct.__name__

    def open(self, partition: int) -> PartitionWriter:
        """A writer rebuilt from the partition's checkpoint (rolls a half-done flush forward)."""
        writer = PartitionWriter(self.layout, self.dataset, partition, self.rotation)
        self.writers[partition] = writer
        return writer

    def consume(self, partition: int, records: list, rejects: list) -> None:
        """The hot path: append a fetched batch of one partition to its buffer."""
        writer = self.writers.get(partition) or self.open(partition)
        row_of = self.row_of
        for record in records:
            offset = record.offset
            if writer.seen(offset):
                continue  # already in the dataset
            value = record.value
            writer.tail = (record.timestamp, value)
            if value is None:  # a tombstone on a compacted topic: nothing to store
                writer.pass_over(offset)
                continue
            try:
                row = row_of(value)
                if self.needs_time:
                    row = row + (record.timestamp,)
            except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:  # bad UTF-8 in a string
                writer.pass_over(offset)
                rejects.append((self, record, f"invalid {self.struct_name}: {exc}"))
                continue
            except Exception as exc:  # never leave the loop
                log.exception("sink %s: failed on %s[%s]@%s", self.dataset.name, record.topic, partition, offset)
                writer.pass_over(offset)
                rejects.append((self, record, f"internal error: {exc!r}"))
                continue
            writer.append(row, offset, len(value))
        # a full buffer is written by the caller's next flush_due

    def _flush(self, writer: PartitionWriter) -> bool:
        try:
            writer.flush()
            return True
        except Exception:  # keep the buffer and try again on the next pass
            log.exception("sink %s[%d]: flush failed; retrying", self.dataset.name, writer.partition)
            return False

    def flush(self, partitions: set[int] | None = None, *, force: bool = False, now: float | None = None) -> None:
        for writer in self._to_flush(partitions, force, time.monotonic() if now is None else now):
            self._flush(writer)

    def _to_flush(self, partitions: set[int] | None, force: bool, now: float) -> list[PartitionWriter]:
        """The writers holding rows that are due (or any rows, with ``force``)."""
        return [
            writer
            for partition, writer in list(self.writers.items())
            if (partitions is None or partition in partitions)
            and writer.first is not None
            and (force or writer.due(now))
        ]

    async def flush_due(self, now: float) -> None:
        """Write the due buffers in a thread: building and compressing a file takes
        hundreds of milliseconds, which must not stop the outcomes and decide agents
        on the event loop (pyarrow releases the GIL for most of it)."""
        for writer in self._to_flush(None, False, now):
            await asyncio.to_thread(self._flush, writer)

    def committable(self, partitions: set[int] | None = None) -> dict[TopicPartition, int]:
        return {
            TopicPartition(self.topic, partition): writer.last_offset + 1
            for partition, writer in self.writers.items()
            if writer.last_offset >= 0 and (partitions is None or partition in partitions)
        }


class SinkService:
    """The writers of every selected dataset, fed by one owned-partition consumer ``reader``
    (streams.owned: it calls ``load``, ``adopt``, ``fold``, ``fetched``, ``release``, ``close``)."""

    def __init__(self, app: faust.App, settings: Settings, datasets: list[Dataset]) -> None:
        self.app = app
        self.settings = settings
        layout = Layout(settings.data_dir)
        rotation = Rotation.from_settings(settings)
        self.sinks = {
            settings.topic(ds.topic): DatasetSink(
                settings,
                ds,
                layout,
                rotation,
                # One DLQ record per bad message: a topic an agent reads is dead-lettered by that agent,
                # and the DLQ's own sink must not write its rejects back to the DLQ (a loop).
                DeadLetters(app, settings, agent=f"sink:{ds.name}") if ds.name not in DEAD_LETTERED_BY else None,
            )
            for ds in datasets
        }
        self.rejects: list = []  # (sink, record, reason) of the batch in hand
        # The consumer of every dataset's topic; its lock: a flush in its thread and a rebalance
        # never touch a writer together.
        self.reader = OwnedConsumer(
            settings,
            self,
            name="sink",
            group_id=f"{settings.app_id}.sink",
            topics=list(self.sinks),
            poll_ms=POLL_MS,
            max_records=MAX_RECORDS,
        )

    # -- partitions moving between workers --------------------------------------------
    async def release(self, revoked: set[TopicPartition]) -> None:
        """Revoked: their buffers flushed and committed, their writers dropped (the reader holds the lock)."""
        for sink in self.sinks.values():
            mine = {tp.partition for tp in revoked if tp.topic == sink.topic}
            if mine:
                sink.flush(mine, force=True)
        await self.commit()
        for sink in self.sinks.values():
            for tp in revoked:
                if tp.topic == sink.topic:
                    sink.writers.pop(tp.partition, None)

    async def load(self, assigned: set[TopicPartition]) -> dict[TopicPartition, Resume | None]:
        """A writer per partition, rebuilt from its files (a half-done flush rolled forward): it
        resumes after the last offset written (none written: at the group's committed offset)."""
        writers = {tp: self.sinks[tp.topic].open(tp.partition) for tp in assigned}
        return {
            tp: Resume(writer.last_offset + 1, writer.fingerprint) if writer.last_offset >= 0 else None
            for tp, writer in writers.items()
        }

    def adopt(self, recreated_logs: dict[TopicPartition, str]) -> None:
        for tp, evidence in recreated_logs.items():
            recreated(self.sinks[tp.topic].writers[tp.partition], evidence)

    # -- the loop -------------------------------------------------------------------------
    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()  # the writers need nothing more

    async def fold(self, tp: TopicPartition, records: list) -> None:
        self.sinks[tp.topic].consume(tp.partition, records, self.rejects)

    async def fetched(self) -> None:
        """The batch's rejects to the DLQ, the due buffers to files, their offsets committed."""
        rejects, self.rejects = self.rejects, []
        for sink, record, reason in rejects:
            await _reject(sink, record, reason)
        now = time.monotonic()
        async with self.reader.lock:
            for sink in self.sinks.values():
                await sink.flush_due(now)
        await self.commit()

    async def commit(self) -> None:
        offsets: dict[TopicPartition, int] = {}
        for sink in self.sinks.values():
            offsets.update(sink.committable())
        try:
            await self.reader.commit(offsets)
        except Exception as exc:  # noqa: BLE001 - the checkpoint is the truth; the group offset is for lag only
            log.warning("sink: offset commit failed (%s); the checkpoints still hold", exc)

    def flush_all(self) -> None:
        for sink in self.sinks.values():
            sink.flush(force=True)

    async def close(self) -> None:
        """Shutdown (SIGINT cancels the reader) or a crash of its loop: write what is buffered
        first (synchronous, so a second cancel cannot cut it short)."""
        self.rejects = []  # their records are read again by the next run
        self.flush_all()
        try:
            await asyncio.wait_for(self.commit(), 5.0)
        finally:
            for sink in self.sinks.values():
                sink.writers.clear()

    async def run(self) -> None:
        await self.reader.run()


def recreated(writer: PartitionWriter, evidence: str) -> None:
    """The topic was deleted and created again: its offsets restart at 0, so the partition
    is written afresh as a new generation; what the old topic's files hold stays."""
    generation = writer.reset()
    log.warning(
        "sink %s[%d]: %s: the topic was recreated; writing it from offset 0 as generation %d "
        "(new files part-%d-<first>-<last>-g%d.parquet; the earlier generations' files stay in %s)",
        writer.dataset.name,
        writer.partition,
        evidence,
        generation,
        writer.partition,
        generation,
        writer.layout.root(writer.dataset),
    )


async def _reject(sink: DatasetSink, record: Any, reason: str) -> None:
    sink.invalid += 1
    if sink.dead_letters is None:  # in the DLQ by the agent that reads the topic (DEAD_LETTERED_BY)
        log.info(
            "sink %s: unreadable record %s[%s]@%s skipped (dead-lettered by %s): %s",
            sink.dataset.name,
            record.topic,
            record.partition,
            record.offset,
            DEAD_LETTERED_BY.get(sink.dataset.name),
            reason,
        )
        return
    try:
        await sink.dead_letters.send(record, reason)
    except Exception:
        log.exception("sink %s: could not send a dead letter", sink.dataset.name)


def register(app: faust.App, settings: Settings) -> SinkService | None:
    """Start the sinks of ``settings.sink_datasets`` with the worker (none: nothing starts)."""
    datasets = selected(settings)
    if not datasets:
        return None
    service = SinkService(app, settings, datasets)

    @app.task
    async def sinks() -> None:
        await service.run()

    return service
