"""Emitter: how an app sends trace and feedback events, off its request path.

``emitter.trace(...)`` validates the event and puts it on a bounded in-memory
queue; a background task sends it to Kafka keyed by user_id (murmur2, like every
Java and aiokafka client, so one user's events land on one partition). It never
blocks and never raises into the caller: when the queue is full the event is
dropped, counted and logged; an invalid event is counted, logged and sent to the
dead-letter topic with the reason. ``stats`` says what happened to every event:
``sent`` counts events the broker acknowledged. Like the Java producer's
``delivery.timeout.ms``, an event that cannot be delivered (broker down, no
leader) is retried by the producer for ``SAFESWAP_EMITTER_DELIVERY_TIMEOUT_S``
before it counts as a send error; meanwhile new events wait in the buffer.
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
        self._last_error_log = 0
        self._in_flight = 0  # handed to the producer, not yet acknowledged nor failed

    async def start(self) -> "Emitter":
        self._sender = asyncio.create_task(self._send_loop(), name="safeswap-emitter")
        return self

    async def stop(self, flush_timeout_s: float = 10.0) -> None:
        """Send what is queued and wait for the broker's acknowledgements (up to ``flush_timeout_s``), then close."""
        if self._sender is None:
            return
        deadline = asyncio.get_running_loop().time() + flush_timeout_s
        try:
            await asyncio.wait_for(self._queue.join(), flush_timeout_s)
            if self._producer is not None:
                await asyncio.wait_for(self._producer.flush(), max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            log.warning("emitter: %d events not sent before stop", self._queue.qsize())
        self._sender.cancel()
        try:
            await self._sender
        except asyncio.CancelledError:
            pass
        self._sender = None
        self.stats.send_errors += self._queue.qsize()  # never handed to the producer
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                # aiokafka's stop() waits for every batch (up to the delivery timeout): keep the bound.
                await asyncio.wait_for(producer.stop(), max(1.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                # Unacknowledged events count as send errors: stats must account for every event.
                log.warning("emitter: closed with %d events the broker had not acknowledged", self._in_flight)
                self.stats.send_errors += self._in_flight
                self._in_flight = 0
                sender = getattr(producer, "_sender", None)
                if sender is not None and sender.sender_task is not None:
                    sender.sender_task.cancel()
                await producer.client.close()

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
            # request_timeout_ms is also how long aiokafka keeps retrying a batch: the delivery timeout.
            producer = AIOKafkaProducer(**client_options(self.settings), linger_ms=5,
                                        request_timeout_ms=int(self.settings.emitter_delivery_timeout_s * 1000))
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
                delivery = await self._producer.send(topic, value=value, key=key)
                self._in_flight += 1
                delivery.add_done_callback(lambda f, topic=topic: self._delivered(topic, f))
            except asyncio.CancelledError:  # stopped while waiting for the broker: not sent
                self.stats.send_errors += 1
                raise
            except Exception as exc:
                self._send_failed(topic, exc)
            finally:
                self._queue.task_done()

    def _delivered(self, topic: str, delivery: asyncio.Future) -> None:
        self._in_flight -= 1
        if delivery.cancelled():
            self._send_failed(topic, asyncio.CancelledError())
        elif delivery.exception() is not None:
            self._send_failed(topic, delivery.exception())
        else:
            self.stats.sent += 1

    def _send_failed(self, topic: str, exc: BaseException) -> None:
        self.stats.send_errors += 1
        # One log line per 1,000 failures: an outage longer than the delivery timeout must not flood the log.
        if self.stats.send_errors - self._last_error_log >= 1000 or self.stats.send_errors == 1:
            self._last_error_log = self.stats.send_errors
            log.warning("emitter: send to %s failed after the delivery timeout (%d events so far): %r",
                        topic, self.stats.send_errors, exc)


def _best_effort_json(event: Any) -> bytes:
    try:
        return msgspec.json.encode(event)
    except Exception:
        return repr(event).encode()
