"""Emitter: how an app sends trace and feedback events, off its request path.

``emitter.trace(...)`` validates the event and puts it on a bounded in-memory
queue; a background task sends it to Kafka keyed by user_id (murmur2, like every
Java and aiokafka client, so one user's events land on one partition). It never
blocks and never raises into the caller: when the queue is full the event is
dropped, counted and logged; an invalid event is counted, logged and sent to the
dead-letter topic with the reason. ``stats`` says what happened to every event:
``sent`` counts events the broker acknowledged. Like the Java producer's
``delivery.timeout.ms``, an event that cannot be delivered (broker down, no
leader, a topic not there yet) is retried for ``SAFESWAP_EMITTER_DELIVERY_TIMEOUT_S``
before it counts as a send error; meanwhile new events wait in the buffer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_errors

from schemas import FeedbackEvent, InvalidEvent, TraceEvent, convert, encode
from streams.deadletter import dead_letter
from streams.kafka import client_options
from streams.settings import Settings

log = logging.getLogger(__name__)

# Errors that a retry cannot fix: the event fails at once instead of at the delivery timeout.
PERMANENT_ERRORS = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidTopicError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.UnsupportedVersionError,
    kafka_errors.InvalidRequiredAcksError,
    kafka_errors.ProducerClosed,
)
RETRY_BACKOFF_S = 0.5


@dataclass
class Pending:
    """An event on its way: where it goes and until when it is retried."""

    topic: str
    key: bytes | None
    value: bytes
    deadline: float = 0.0  # loop time; set when first handed to the producer


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
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(buffer or self.settings.emitter_buffer)
        self._producer: AIOKafkaProducer | None = None
        self._sender: asyncio.Task | None = None
        self._last_drop_log = 0
        self._last_error_log = 0
        self._in_flight = 0  # handed to the producer, not yet acknowledged nor failed
        self._retries: set[asyncio.Task] = set()  # failed deliveries waiting to be sent again

    async def start(self) -> Emitter:
        self._sender = asyncio.create_task(self._send_loop(), name="safeswap-emitter")
        return self

    async def stop(self, flush_timeout_s: float = 10.0) -> None:
        """Send what is queued and wait for the broker's acknowledgements (up to ``flush_timeout_s``), then close."""
        if self._sender is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_timeout_s
        try:
            await asyncio.wait_for(self._queue.join(), flush_timeout_s)
            while (self._in_flight or self._retries) and loop.time() < deadline:  # acknowledged or failed
                await asyncio.sleep(0.02)
        except TimeoutError:
            pass
        if self._queue.qsize() or self._in_flight or self._retries:
            log.warning(
                "emitter: stopping with %d events not acknowledged by the broker",
                self._queue.qsize() + self._in_flight + len(self._retries),
            )
        self._sender.cancel()
        for task in list(self._retries):
            task.cancel()
        for task in [self._sender, *self._retries]:
            try:
                await task
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
                await asyncio.wait_for(producer.stop(), max(1.0, deadline - loop.time()))
            except TimeoutError:
                sender = getattr(producer, "_sender", None)
                if sender is not None and sender.sender_task is not None:
                    sender.sender_task.cancel()
                await producer.client.close()
            # Still unacknowledged: counted as send errors, so stats account for every event.
            self.stats.send_errors += self._in_flight
            self._in_flight = 0

    async def __aenter__(self) -> Emitter:
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
            record = dead_letter(
                topic=self.settings.topic(topic),
                partition=-1,
                offset=-1,
                key=None,
                value=_best_effort_json(event),
                reason=str(exc),
                agent="emitter",
            )
            self._put(self.settings.topic("dlq"), None, record)
            return False
        except Exception as exc:  # noqa: BLE001 - an app's odd object must not fail its request
            self.stats.invalid += 1
            log.warning("emitter: could not encode event: %r", exc)
            return False

    def _put(self, topic: str, key: bytes | None, value: bytes) -> bool:
        try:
            self._queue.put_nowait(Pending(topic, key, value))
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
            producer = AIOKafkaProducer(
                **client_options(self.settings),
                linger_ms=5,
                request_timeout_ms=int(self.settings.emitter_delivery_timeout_s * 1000),
            )
            try:
                await producer.start()
                return producer
            except Exception as exc:  # noqa: BLE001 - a broker not reachable yet, in any way: retried
                await producer.stop()
                log.warning("emitter: broker %s not reachable (%s); retrying", self.settings.broker, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _send_loop(self) -> None:
        self._producer = await self._connect()
        while True:
            pending = await self._queue.get()
            pending.deadline = asyncio.get_running_loop().time() + self.settings.emitter_delivery_timeout_s
            try:
                await self._hand_over(pending)
            finally:
                self._queue.task_done()

    async def _hand_over(self, pending: Pending) -> None:
        """Give one event to the producer; its acknowledgement or failure arrives in ``_delivered``."""
        try:
            delivery = await self._producer.send(pending.topic, value=pending.value, key=pending.key)
        except asyncio.CancelledError:  # stopped while waiting for the broker: not sent
            self.stats.send_errors += 1
            raise
        except Exception as exc:  # noqa: BLE001 - any send failure is counted and reported, never raised into the app
            self._failed(pending, exc)
            return
        self._in_flight += 1
        delivery.add_done_callback(lambda f: self._delivered(pending, f))

    def _delivered(self, pending: Pending, delivery: asyncio.Future) -> None:
        self._in_flight -= 1
        if delivery.cancelled():
            self._failed(pending, asyncio.CancelledError())
        elif delivery.exception() is not None:
            self._failed(pending, delivery.exception())
        else:
            self.stats.sent += 1

    def _failed(self, pending: Pending, exc: BaseException) -> None:
        """Retry until the delivery timeout (a broker that came back without its topics
        yet, a leader moving), unless no retry can help."""
        loop = asyncio.get_running_loop()
        if (
            self._sender is not None
            and not isinstance(exc, (asyncio.CancelledError, *PERMANENT_ERRORS))
            and loop.time() + RETRY_BACKOFF_S < pending.deadline
        ):
            task = loop.create_task(self._retry(pending))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
            return
        self.stats.send_errors += 1
        # One log line per 1,000 failures: an outage longer than the delivery timeout must not flood the log.
        if self.stats.send_errors - self._last_error_log >= 1000 or self.stats.send_errors == 1:
            self._last_error_log = self.stats.send_errors
            log.warning("emitter: send to %s failed (%d events so far): %r", pending.topic, self.stats.send_errors, exc)

    async def _retry(self, pending: Pending) -> None:
        try:
            await asyncio.sleep(RETRY_BACKOFF_S)
        except asyncio.CancelledError:
            self.stats.send_errors += 1
            raise
        await self._hand_over(pending)


def _best_effort_json(event: Any) -> bytes:
    try:
        return msgspec.json.encode(event)
    except Exception:  # noqa: BLE001 - only for a log line: anything printable will do
        return repr(event).encode()
