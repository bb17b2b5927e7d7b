"""Compacted topics as views: every partition read from its beginning, the latest value
per key kept. The one way safeswap reads decisions, statuses and plans: once to their end
(``CompactedView.read_to_end``, the CLI) or tailed for as long as it runs
(``CompactedView.start``; the FlagClient uses ``assign_from_beginning`` and ``at_end``
under its own reconnect loop)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.kafka import client_options
from streams.resume import reached_end
from streams.settings import Settings

V = TypeVar("V")


class TopicMissing(LookupError):
    """The topic does not exist (yet): nothing has created safeswap's topics on this broker."""


async def assign_from_beginning(consumer: AIOKafkaConsumer, topic: str) -> dict[TopicPartition, int]:
    """Assign every partition of ``topic`` to a started consumer, from the beginning; the end
    offsets the broker reports now (``at_end`` compares with what fetches say too)."""
    await consumer.topics()  # fetches cluster metadata
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    if not partitions:
        raise TopicMissing(f"topic {topic} does not exist: run `safeswap topics create` or start a worker")
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    return await consumer.end_offsets(partitions)


async def at_end(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    """Has the consumer read every partition to the end it had when assigned?"""
    for tp, end in ends.items():
        if not reached_end(await consumer.position(tp), end, consumer.highwater(tp)):
            return False
    return True


class CompactedView(Generic[V]):
    """``latest[key]``: the newest value per key of a compacted topic. ``decode`` turns a
    record's bytes into a value or raises ``ValueError`` (the record is skipped: the worker's
    dead-letter topic has it); ``key`` names a value's key."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        decode: Callable[[bytes], V],
        key: Callable[[V], str],
        *,
        fetch_max_wait_ms: int = 100,
    ) -> None:
        self.settings, self.topic = settings, settings.topic(topic)
        self.decode, self.key = decode, key
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.latest: dict[str, V] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None

    def ingest(self, records: Any) -> None:
        for record in records:
            try:
                value = self.decode(record.value or b"")
            except ValueError:
                continue
            self.latest[self.key(value)] = value

    async def _open(self, timeout_s: float) -> dict[TopicPartition, int]:
        self._consumer = AIOKafkaConsumer(
            **client_options(self.settings),
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            request_timeout_ms=int(timeout_s * 1000),
        )
        try:
            await asyncio.wait_for(self._consumer.start(), timeout_s)
            return await assign_from_beginning(self._consumer, self.topic)
        except BaseException:
            await self._close()
            raise

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def read_to_end(self, timeout_s: float = 10.0) -> dict[str, V]:
        """Read from the beginning to the end the topic has now (or until ``timeout_s``)."""
        ends = await self._open(timeout_s)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and not await at_end(self._consumer, ends):
                for records in (await self._consumer.getmany(timeout_ms=200)).values():
                    self.ingest(records)
        finally:
            await self._close()
        return self.latest

    async def start(self, timeout_s: float = 10.0) -> CompactedView[V]:
        """Keep reading in the background: ``latest`` follows the topic."""
        await self._open(timeout_s)
        self._task = asyncio.create_task(self._tail())
        return self

    async def _tail(self) -> None:
        while True:
            for records in (await self._consumer.getmany(timeout_ms=self.fetch_max_wait_ms)).values():
                self.ingest(records)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()
