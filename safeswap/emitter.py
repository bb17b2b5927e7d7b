"""Emitter: how an app sends trace and feedback events, off its request path.

``emitter.trace(...)`` validates the event and puts it on a bounded in-memory
queue; a background task sends it to Kafka keyed by user_id (murmur2, like every
Java and aiokafka client, so one user's events land on one partition). It never
blocks and never raises into the caller: when the queue is full the event is
dropped, counted and logged; an invalid event is counted, logged and sent to the
dead-letter topic with the reason. ``stats`` says what happened to every event.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer

from schemas import FeedbackEvent, InvalidEvent, TraceEvent, convert, encode
from streams.deadletter import dead_letter
from streams.kafka import client_options
from streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class EmitterStats:
    queued: int = 0
    sent: int = 0
    dropped_full: int = 0
    invalid: int = 0
    send_errors: int = 0


class Emitter:
    """Async, non-blocking event emitter. Use as ``async with Emitter(broker) as emitter:``."""

    def __init__(self, broker: str | None = None, *, settings: Settings | None = None, buffer: int | None = None):
        self.settings = settings or Settings.from_env(broker=broker)
        if broker:
            self.settings = self.settings.replace(broker=broker)
        self.stats = EmitterStats()
        self._queue: asyncio.Queue[tuple[str, bytes, bytes]] = asyncio.Queue(buffer or self.settings.emitter_buffer)
        self._producer: AIOKafkaProducer | None = None
        self._sender: asyncio.Task | None = None
        self._last_drop_log = 0

    async def start(self) -> "Emitter":
        self._sender = asyncio.create_task(self._send_loop(), name="safeswap-emitter")
        return self

    async def stop(self, flush_timeout_s: float = 10.0) -> None:
        """Send what is queued (up to ``flush_timeout_s``), then close."""
        if self._sender is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), flush_timeout_s)
        except asyncio.TimeoutError:
            log.warning("emitter: %d events not sent before stop", self._queue.qsize())
        self._sender.cancel()
        try:
            await self._sender
        except asyncio.CancelledError:
            pass
        self._sender = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> "Emitter":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def trace(self, event: TraceEvent | dict[str, Any]) -> bool:
        """Queue a trace event; False if it was invalid or dropped (never raises)."""
        return self._emit("traces", TraceEvent, event)

    def feedback(self, event: FeedbackEvent | dict[str, Any]) -> bool:
        """Queue a feedback event; False if it was invalid or dropped (never raises)."""
        return self._emit("feedback", FeedbackEvent, event)

    def shadow_pair(self, event: Any) -> bool:
        """Queue a shadow pair (safeswap.shadow); False if it was invalid or dropped (never raises)."""
        from schemas.events import ShadowPair

        return self._emit("shadow", ShadowPair, event)

    def _emit(self, topic: str, event_type: type[msgspec.Struct], event: Any) -> bool:
        try:
            if not isinstance(event, event_type):
                event = convert(event_type, event)
            return self._put(self.settings.topic(topic), event.user_id.encode(), encode(event))
        except InvalidEvent as exc:
            self.stats.invalid += 1
            log.warning("emitter: invalid event sent to the dead-letter topic: %s", exc)
            record = dead_letter(topic=self.settings.topic(topic), partition=-1, offset=-1, key=None,
                                 value=_best_effort_json(event), reason=str(exc), agent="emitter")
            self._put(self.settings.topic("dlq"), None, record)
            return False
        except Exception as exc:  # an app's odd object must not fail its request
            self.stats.invalid += 1
            log.warning("emitter: could not encode event: %r", exc)
            return False

    def _put(self, topic: str, key: bytes | None, value: bytes) -> bool:
        try:
            self._queue.put_nowait((topic, key, value))
            self.stats.queued += 1
            return True
        except asyncio.QueueFull:
            self.stats.dropped_full += 1
            # One log line per 1,000 drops: a full buffer must not flood the log too.
            if self.stats.dropped_full - self._last_drop_log >= 1000 or self.stats.dropped_full == 1:
                self._last_drop_log = self.stats.dropped_full
                log.warning("emitter: buffer full, %d events dropped so far", self.stats.dropped_full)
            return False

    async def _connect(self) -> AIOKafkaProducer:
        delay = 0.2
        while True:
            producer = AIOKafkaProducer(**client_options(self.settings), linger_ms=5, request_timeout_ms=10_000)
            try:
                await producer.start()
                return producer
            except Exception as exc:
                await producer.stop()
                log.warning("emitter: broker %s not reachable (%s); retrying", self.settings.broker, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _send_loop(self) -> None:
        self._producer = await self._connect()
        while True:
            topic, key, value = await self._queue.get()
            try:
                await self._producer.send(topic, value=value, key=key)
                self.stats.sent += 1
            except Exception as exc:
                self.stats.send_errors += 1
                log.warning("emitter: send to %s failed: %r", topic, exc)
            finally:
                self._queue.task_done()


def _best_effort_json(event: Any) -> bytes:
    try:
        return msgspec.json.encode(event)
    except Exception:
        return repr(event).encode()
