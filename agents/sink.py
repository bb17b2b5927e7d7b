"""Sink agents: every dataset's topic -> Parquet files (sinks/), offsets committed after the rename.

One agent per dataset (``sink-<dataset>``), each a thin loop: decode + validate one
record into a row tuple, append it to its partition's buffer, hold its ack.
Records that do not decode go to the DLQ (``agent="sink:<dataset>"``), never into
the dataset. A buffer becomes files on rotation (rows, bytes, age, idle), by the
agent itself when full or by the ``sink-flush`` task for time-driven rotation.

Offsets and crashes (the protocol is in sinks/writer.py):

* The stream runs with ``noack()``: a record's ack (and so Faust's offset commit,
  which only advances over contiguous acks) happens after its file was renamed
  into the dataset and the partition checkpoint written.
* After a crash Kafka redelivers from the last committed offset; the writer
  skips what its checkpoint says is already written (and rolls a half-done
  flush forward), so every record is in the dataset exactly once.
* Faust waits for every unacked record before a rebalance and at shutdown
  (``stream_wait_empty``); the flush task sees ``app.rebalancing`` /
  ``app.should_stop`` and flushes everything at once, so neither waits for the
  age rotation. After an assignment every writer is rebuilt from its checkpoint
  (another worker may have written the partition meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import time

import faust
import msgspec

from agents.dlq import DeadLetters
from sinks.datasets import DATASETS, Dataset
from sinks.writer import Layout, PartitionWriter, Rotation
from streams.app import raw_topic
from streams.settings import Settings

log = logging.getLogger(__name__)

FLUSH_TICK_S = 0.2


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


def _ack_all(tokens: list) -> None:
    for event in tokens:
        if event is not None:
            event.ack()


class DatasetSink:
    """The writers of one dataset, one per Kafka partition this worker owns."""

    def __init__(self, app: faust.App, settings: Settings, dataset: Dataset, layout: Layout, rotation: Rotation):
        self.app = app
        self.dataset = dataset
        self.layout = layout
        self.rotation = rotation
        self.topic_name = settings.topic(dataset.topic)
        self.writers: dict[int, PartitionWriter] = {}
        self.invalid = 0

    def writer(self, partition: int) -> PartitionWriter:
        writer = self.writers.get(partition)
        if writer is None:
            writer = PartitionWriter(self.layout, self.dataset, partition, self.rotation, on_commit=_ack_all)
            self._check_topic_reset(writer)
            self.writers[partition] = writer
        return writer

    def _check_topic_reset(self, writer: PartitionWriter) -> None:
        """Offsets never go back in a live topic: a checkpoint beyond the log's end means the
        topic was recreated (e.g. the embedded broker restarted). Start that partition afresh."""
        if writer.last_offset < 0:
            return
        try:
            highwater = self.app.consumer.highwater(faust.types.TP(self.topic_name, writer.partition))
        except Exception:  # not known yet: nothing to compare
            return
        if highwater is not None and 0 <= highwater <= writer.last_offset:
            log.error("sink %s[%d]: checkpoint at offset %d but the topic ends at %d: the topic was "
                      "recreated; writing it afresh (files with the same names are overwritten)",
                      self.dataset.name, writer.partition, writer.last_offset, highwater)
            writer.reset()

    def flush(self, urgent: bool, now: float) -> None:
        for writer in list(self.writers.values()):
            if writer.first is not None and (urgent or writer.due(now)):
                try:
                    writer.flush()
                except Exception:  # keep the buffer (unacked) and try again next tick
                    log.exception("sink %s[%d]: flush failed; retrying", self.dataset.name, writer.partition)

    def forget(self) -> None:
        """After an assignment: rebuild writers from their checkpoints on the next record."""
        for writer in self.writers.values():
            if writer.first is not None:
                log.warning("sink %s[%d]: dropping %d unflushed records after a rebalance (Kafka "
                            "redelivers them)", self.dataset.name, writer.partition, len(writer.tokens))
                writer.discard()
        self.writers.clear()


def register(app: faust.App, settings: Settings) -> list[DatasetSink]:
    datasets = selected(settings)
    if not datasets:
        return []
    layout = Layout(settings.data_dir)
    rotation = Rotation.from_settings(settings)
    sinks = [DatasetSink(app, settings, dataset, layout, rotation) for dataset in datasets]
    for sink in sinks:
        _register_agent(app, settings, sink)

    @app.task
    async def sink_flush() -> None:
        # A plain loop, not app.timer: timers stop with the app, but this must keep
        # flushing while Faust waits for acks at shutdown and during a rebalance.
        while True:
            await asyncio.sleep(FLUSH_TICK_S)
            urgent = bool(app.rebalancing or app.should_stop)
            now = time.monotonic()
            for sink in sinks:
                sink.flush(urgent, now)

    @app.on_partitions_assigned.connect
    async def sink_reassigned(app: faust.App, assigned: set, **kwargs) -> None:
        for sink in sinks:
            sink.forget()

    return sinks


def _register_agent(app: faust.App, settings: Settings, sink: DatasetSink) -> None:
    dataset = sink.dataset
    topic = raw_topic(app, settings, dataset.topic)
    # The DLQ's own sink must not write its rejects back to the DLQ (a loop).
    dead_letters = DeadLetters(app, settings, agent=f"sink:{dataset.name}") if dataset.name != "dlq" else None
    struct_name = dataset.struct.__name__
    needs_time = dataset.time_field is None
    row_of = dataset.row

    @app.agent(topic, name=f"sink-{dataset.name}", concurrency=1)
    async def sink_agent(stream: faust.StreamT) -> None:
        async for event in stream.noack().events():
            message = event.message
            writer = sink.writers.get(message.partition) or sink.writer(message.partition)
            offset = message.offset
            if writer.seen(offset):
                event.ack()  # already in the dataset: a redelivery after a crash
                continue
            value = message.value
            if value is None:  # a tombstone on a compacted topic: nothing to store
                writer.pass_over(offset, event)
                continue
            try:
                row = row_of(value)
                if needs_time:
                    row = row + (int(message.timestamp * 1000),)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                writer.pass_over(offset, event)
                await _reject(sink, dead_letters, message, f"invalid {struct_name}: {exc}")
                continue
            except Exception as exc:  # never leave the loop
                log.exception("sink %s: failed on %s[%s]@%s", dataset.name, message.topic, message.partition, offset)
                writer.pass_over(offset, event)
                await _reject(sink, dead_letters, message, f"internal error: {exc!r}")
                continue
            writer.append(row, offset, len(value), event)
            if writer.full():
                try:
                    writer.flush()
                except Exception:
                    log.exception("sink %s[%d]: flush failed; the flush task retries", dataset.name, writer.partition)


async def _reject(sink: DatasetSink, dead_letters: DeadLetters | None, message, reason: str) -> None:
    sink.invalid += 1
    if dead_letters is None:
        log.error("sink %s: unreadable record %s[%s]@%s skipped: %s", sink.dataset.name, message.topic,
                  message.partition, message.offset, reason)
        return
    try:
        await dead_letters.send(message, reason)
    except Exception:
        log.exception("sink %s: could not send a dead letter", sink.dataset.name)
