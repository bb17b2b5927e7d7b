"""Where a consumer resumes: a checkpoint's offsets, checked against the log itself.

A checkpoint (the outcomes agent's state, a sink's files) covers a partition up to
an offset. Before reading on from there, the worker asks whether the log is still
the one the checkpoint covered, or a topic deleted and created again (an embedded
broker started afresh, a topic reset by hand), whose offsets begin at 0 again.

The answer comes from the records, never from the end offset a broker reports:
the embedded Tansu broker answers ``ListOffsets`` with the base offset of the last
produce *batch* + 1 (5 records in one batch: offsets 0-4, reported end 1), while
its fetch responses carry the right high watermark (docs/faults.md). So
:func:`probe_logs` reads the record at the checkpoint's last offset and the high
watermark that comes with the fetch, and :func:`same_log` (pure) decides:

- the record there is the one the checkpoint saw (its :func:`record_mark`): same log;
- the log now ends at or before that offset, or reading from it came back at an
  earlier offset (a real Kafka resets an out-of-range position to the start): a
  new log, to read from its start;
- the first record is past the offset (retention or compaction removed it): the
  same log, with those records gone;
- no mark to compare (a checkpoint written before marks existed): the same log
  when it reaches past the offset.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the pure part (marks, verdicts) loads without a Kafka client
    from aiokafka import TopicPartition

__all__ = ["LogProbe", "log_ends", "probe_logs", "reached_end", "record_mark", "same_log"]


def record_mark(timestamp: int, value: bytes | None) -> list[int]:
    """What a checkpoint keeps of the last record it covers: [timestamp, crc32 of the value]."""
    return [int(timestamp), zlib.crc32(value or b"")]


@dataclass(frozen=True)
class LogProbe:
    """What reading a partition from an offset found."""

    offset: int | None  # of the first record read (None: nothing there)
    mark: list[int] | None  # that record's record_mark
    highwater: int | None  # the log's end, from the fetch response (None: no answer in time)


def same_log(last_offset: int, mark: list[int] | None, probe: LogProbe) -> tuple[bool, str]:
    """Is the log the one a checkpoint covered up to ``last_offset`` (inclusive), whose record
    there had ``mark``? ``(same, evidence)``: the evidence is a sentence for the log."""
    if probe.offset is None:
        if probe.highwater is not None and probe.highwater <= last_offset:
            return False, f"the log ends at offset {probe.highwater}, before the checkpoint's offset {last_offset}"
        return True, f"nothing to read at offset {last_offset} yet"
    if probe.offset < last_offset:
        return False, (
            f"reading from the checkpoint's offset {last_offset} came back at offset {probe.offset}: "
            "the log no longer reaches it"
        )
    if probe.offset > last_offset:
        return True, f"offsets up to {probe.offset - 1} are no longer in the log (retention or compaction)"
    if mark is not None and probe.mark != list(mark):
        return False, f"the record at the checkpoint's offset {last_offset} is not the one the checkpoint covered"
    return True, f"the record at offset {last_offset} is the one the checkpoint covered"


def reached_end(position: int, reported_end: int, highwater: int | None) -> bool:
    """Has a reader at ``position`` read the whole log? Only once a fetch has answered for the
    partition (``highwater`` known, the consumer's ``highwater(tp)``): the end the broker
    reported may be short of it."""
    return highwater is not None and position >= max(reported_end, highwater)


async def probe_logs(
    client: dict[str, Any], offsets: dict[TopicPartition, int], timeout_s: float = 10.0
) -> dict[TopicPartition, LogProbe]:
    """Read each partition from its offset with a consumer of its own (no group): the first
    record there and the high watermark. A partition without an answer in ``timeout_s``
    gets ``LogProbe(None, None, None)``, which :func:`same_log` takes for the same log."""
    from aiokafka import AIOKafkaConsumer

    found: dict[TopicPartition, LogProbe] = {}
    if not offsets:
        return found
    consumer = AIOKafkaConsumer(
        **client, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=100
    )
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        for tp, offset in offsets.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while len(found) < len(offsets) and time.monotonic() < deadline:
            batch = await consumer.getmany(*[tp for tp in offsets if tp not in found], timeout_ms=200, max_records=1)
            for tp, records in batch.items():
                if records and tp not in found:
                    first = records[0]
                    found[tp] = LogProbe(
                        first.offset, record_mark(first.timestamp, first.value), consumer.highwater(tp)
                    )
            for tp in offsets:
                highwater = consumer.highwater(tp)
                # An empty answer with a high watermark at or below the offset: nothing is there.
                if tp not in found and highwater is not None and highwater <= offsets[tp]:
                    found[tp] = LogProbe(None, None, highwater)
            await asyncio.sleep(0)
        return {tp: found.get(tp, LogProbe(None, None, None)) for tp in offsets}
    finally:
        await consumer.stop()


async def log_ends(
    client: dict[str, Any], partitions: list[TopicPartition], timeout_s: float = 10.0
) -> dict[TopicPartition, int]:
    """Each partition's end offset (the next offset to be written), correct on brokers whose
    ``ListOffsets`` undercounts (see the module docstring): the reported end, raised to the
    high watermark a fetch from just before it returns."""
    from aiokafka import AIOKafkaConsumer

    if not partitions:
        return {}
    consumer = AIOKafkaConsumer(**client, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        reported = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    probes = await probe_logs(client, {tp: max(0, end - 1) for tp, end in reported.items() if end > 0}, timeout_s)
    return {tp: max(end, (probes[tp].highwater or 0) if tp in probes else 0) for tp, end in reported.items()}
