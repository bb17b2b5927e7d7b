"""Whole-partition checkpoints on a compacted topic: crash-safe state without per-event table writes.

Layout: topic ``<prefix>.checkpoints`` with the same partition count as the
sources; source partition *p* writes only checkpoint partition *p*. One
checkpoint = its payload (the partition state as a ``schemas.PartitionState``,
msgpack-encoded and zlib'd; it includes the source offsets it covers) cut into
chunks of at most ``CHUNK_BYTES``, written under keys ``p:<slot>:<i>`` (two
slots, alternating, so a crash halfway through a write never damages the
previous checkpoint), then one *head* record ``p:head`` naming the generation,
the slot, the chunks' offsets and a sha256. A checkpoint exists once its head
is written; the reader takes the last head in the partition (it is the last
record but for a write cut short by a crash) and verifies every chunk against
it. Compaction keeps the log at ~2 checkpoints per partition on a real Kafka
cluster (Tansu does not compact: reading the last head seeks from the end, so
history does not slow recovery).

The payload is plain data: it names no Python class or module, so moving code
leaves checkpoints readable. One of another ``version`` (``schemas.STATE_VERSION``)
or that does not decode is refused with :class:`UnreadableCheckpoint`.

Building and encoding the state of a partition holding ~50k users takes seconds
(the cost is the size of the state), so the worker does it in a forked child
(:class:`ForkedEncoding`): ``fork()`` freezes a copy-on-write image of the state
at a consistent point in a few milliseconds, the child builds the struct and
writes its encoding into a pipe, and the parent's event loop goes on folding
events meanwhile.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import signal
import time
import zlib
from collections.abc import Awaitable, Callable

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas import STATE_VERSION, PartitionState, StateVersion
from streams.resume import log_ends

CHUNK_BYTES = 512 * 1024
FORMAT = 1


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(PartitionState)
_version_decoder = msgspec.msgpack.Decoder(StateVersion)


class UnreadableCheckpoint(ValueError):
    """A payload this version cannot load; the message says why."""


def encode_state(state: PartitionState) -> bytes:
    return zlib.compress(_encoder.encode(state), 1)


def decode_state(payload: bytes) -> PartitionState:
    """The state a payload holds; UnreadableCheckpoint if it is of another version or does not decode."""
    try:
        raw = zlib.decompress(payload)
        version = _version_decoder.decode(raw).version  # first: another version may have another shape
    except (zlib.error, msgspec.DecodeError) as exc:
        raise UnreadableCheckpoint(f"not a state payload ({exc})") from exc
    if version != STATE_VERSION:
        raise UnreadableCheckpoint(f"state version {version}, this safeswap reads version {STATE_VERSION}")
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise UnreadableCheckpoint(f"state version {version} does not decode ({exc})") from exc


class ForkedEncoding:
    """``encode_state(build())`` computed by a forked child; ``await payload()`` for the bytes.

    ``build`` (e.g. ``OutcomeProcessor.to_state``) runs in the child, which sees the
    state as it was at ``start`` (copy-on-write), whatever the parent does to it
    afterwards. Where fork is unavailable the state is encoded at once, in the caller. ``blocked_s``: how long ``start`` held the caller;
    ``encode_s``: how long the encoding took (known after ``payload``)."""

    def __init__(self) -> None:
        self.pid = 0
        self.read_fd = -1
        self.inline: bytes | None = None
        self.blocked_s = 0.0
        self.encode_s = 0.0
        self._started = 0.0

    @classmethod
    def start(cls, build: Callable[[], PartitionState]) -> ForkedEncoding:
        self = cls()
        self._started = time.monotonic()
        if not hasattr(os, "fork"):
            self.inline = encode_state(build())
            self.blocked_s = self.encode_s = time.monotonic() - self._started
            return self
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: encode, write, exit -- never back into the parent's code
            code = 1
            try:
                gc.disable()  # a collection would touch (and copy) every page of the parent's heap
                os.close(read_fd)
                signal.set_wakeup_fd(-1)  # signals to the child must not wake the parent's loop
                for number in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(number, signal.SIG_DFL)
                view = memoryview(encode_state(build()))
                while view:
                    view = view[os.write(write_fd, view) :]
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        self.pid, self.read_fd = pid, read_fd
        self.blocked_s = time.monotonic() - self._started
        return self

    async def payload(self) -> bytes:
        """The encoded state; raises RuntimeError if the child failed."""
        if self.inline is not None:
            return self.inline
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**20)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(self.read_fd, "rb", buffering=0)
        )
        try:
            data = await reader.read()
        finally:
            transport.close()
        _, status = await loop.run_in_executor(None, os.waitpid, self.pid, 0)
        self.encode_s = time.monotonic() - self._started
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"checkpoint encoder (pid {self.pid}) failed: exit status {status}")
        return data


def chunks_of(payload: bytes) -> list[bytes]:
    return [payload[i : i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)] or [b""]


async def ensure_checkpoint_topic(client: dict, topic: str, partitions: int, replication: int) -> None:
    """``client``: aiokafka client options (streams.kafka.client_options)."""
    admin = AIOKafkaAdminClient(**client)
    await admin.start()
    try:
        if topic not in set(await admin.list_topics()):
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            name=topic,
                            num_partitions=partitions,
                            replication_factor=replication,
                            topic_configs={"cleanup.policy": "compact"},
                        )
                    ]
                )
            except Exception as exc:  # created meanwhile by another worker
                if "exist" not in str(exc).lower():
                    raise
    finally:
        await admin.close()


Send = Callable[[bytes, bytes], Awaitable[int]]  # (key, value) -> offset, delivered


class CheckpointWriter:
    """Writes checkpoints of one partition through ``send`` (awaits delivery)."""

    def __init__(self, partition: int, generation: int = 0) -> None:
        self.partition = partition
        self.generation = generation

    async def write(self, send: Send, payload: bytes) -> dict:
        self.generation += 1
        slot = self.generation % 2
        offsets = []
        for index, chunk in enumerate(chunks_of(payload)):
            key = f"{self.partition}:{slot}:{index}".encode()
            offsets.append(await send(key, self.generation.to_bytes(8, "big") + chunk))
        head = {
            "format": FORMAT,
            "generation": self.generation,
            "slot": slot,
            "chunks": offsets,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "bytes": len(payload),
        }
        await send(f"{self.partition}:head".encode(), json.dumps(head).encode())
        return head


async def read_latest(client: dict, topic: str, partition: int, timeout_ms: int = 10_000) -> tuple[bytes, dict] | None:
    """The newest complete checkpoint of ``partition``: (payload, head), or None if there is none."""
    consumer = AIOKafkaConsumer(**client, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        end = (await log_ends(client, [tp]))[tp]  # not end_offsets alone: Tansu reports it short
        begin = (await consumer.beginning_offsets([tp]))[tp]
        head, window, stop = None, 16, end
        while head is None and stop > begin:
            start = max(begin, stop - window)
            records = await _read_range(consumer, tp, start, stop, timeout_ms)
            for record in reversed(records):
                if record.key == f"{partition}:head".encode():
                    head = json.loads(record.value)
                    break
            stop, window = start, window * 4
        if head is None:
            return None
        parts = []
        for index, offset in enumerate(head["chunks"]):
            records = await _read_range(consumer, tp, offset, offset + 1, timeout_ms)
            record = records[0] if records else None
            if (
                record is None
                or record.key != f"{partition}:{head['slot']}:{index}".encode()
                or int.from_bytes(record.value[:8], "big") != head["generation"]
            ):
                raise RuntimeError(
                    f"checkpoint {topic}[{partition}] generation {head['generation']}: "
                    f"chunk {index} at offset {offset} is missing or overwritten"
                )
            parts.append(record.value[8:])
        payload = b"".join(parts)
        if hashlib.sha256(payload).hexdigest() != head["sha256"]:
            raise RuntimeError(f"checkpoint {topic}[{partition}] generation {head['generation']}: sha256 mismatch")
        return payload, head
    finally:
        await consumer.stop()


async def _read_range(consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, stop: int, timeout_ms: int) -> list:
    consumer.seek(tp, start)
    records: list = []
    waited = 0
    while (not records or records[-1].offset < stop - 1) and waited < timeout_ms:
        batch = await consumer.getmany(tp, timeout_ms=200, max_records=max(1, stop - start))
        got = batch.get(tp, [])
        if not got:
            waited += 200
        records.extend(r for r in got if r.offset < stop)
        if got and got[-1].offset >= stop - 1:
            break
    return records
