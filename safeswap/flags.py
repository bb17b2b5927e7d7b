"""FlagClient: which variant a user sees, from the compacted decisions topic.

It reads ``safeswap.decisions`` from the beginning (the last decision per
rollout is the rollout's current state), then tails it. ``variant()`` is a
lock-free dictionary lookup plus one SHA-256, safe to call from any thread.

Fail-safe: an unknown rollout, no state yet, or an unreachable broker means
``"control"``; after a rollback, control for everyone. A decision that does not
decode is counted and ignored: the client keeps its last good state.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from safeswap.assignment import assign
from schemas import Decision, InvalidEvent, decode
from streams.settings import Settings

log = logging.getLogger(__name__)

Listener = Callable[[Decision], None]


class FlagClient:
    """``async with FlagClient(broker) as flags: flags.variant("support-bot", user_id)``."""

    def __init__(self, broker: str | None = None, *, settings: Settings | None = None, poll_ms: int = 50):
        self.settings = settings or Settings.from_env(broker=broker)
        if broker:
            self.settings = self.settings.replace(broker=broker)
        self.poll_ms = poll_ms
        self.decode_errors = 0
        self._decisions: dict[str, Decision] = {}
        self._listeners: list[Listener] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._tail: asyncio.Task | None = None
        self._caught_up = asyncio.Event()

    # -- reading state -------------------------------------------------------
    def variant(self, rollout_id: str, user_id: str) -> str:
        """``"control"`` or ``"candidate"`` for this user now."""
        decision = self._decisions.get(rollout_id)
        if decision is None or decision.percent <= 0:
            return "control"
        return assign(decision.salt, user_id, decision.percent)

    def decision(self, rollout_id: str) -> Decision | None:
        """The latest decision for a rollout, or None."""
        return self._decisions.get(rollout_id)

    def on_change(self, listener: Listener) -> None:
        """Call ``listener(decision)`` for every new decision (from the client's task)."""
        self._listeners.append(listener)

    # -- lifecycle -------------------------------------------------------------
    async def start(self, catch_up_timeout_s: float = 10.0) -> "FlagClient":
        """Start tailing; waits until the existing state is read (or the timeout: then control)."""
        self._tail = asyncio.create_task(self._run(), name="safeswap-flag-client")
        try:
            await asyncio.wait_for(self._caught_up.wait(), catch_up_timeout_s)
        except asyncio.TimeoutError:
            log.warning("flag client: no state from %s yet; serving control", self.settings.broker)
        return self

    async def stop(self) -> None:
        if self._tail is not None:
            self._tail.cancel()
            try:
                await self._tail
            except asyncio.CancelledError:
                pass
            self._tail = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def __aenter__(self) -> "FlagClient":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(self, predicate: Callable[[Decision], bool], timeout_s: float) -> Decision:
        """Wait until a decision satisfies ``predicate`` (for demos and tests)."""
        found: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()

        def check(decision: Decision) -> None:
            if not found.done() and predicate(decision):
                found.set_result(decision)

        for decision in list(self._decisions.values()):
            check(decision)
        self._listeners.append(check)
        try:
            return await asyncio.wait_for(found, timeout_s)
        finally:
            self._listeners.remove(check)

    # -- the tail ----------------------------------------------------------------
    def apply(self, raw: bytes) -> Decision | None:
        """Fold one raw decision in; older sequence numbers never overwrite newer."""
        try:
            decision = decode(Decision, raw)
        except InvalidEvent as exc:
            self.decode_errors += 1
            log.warning("flag client: ignored a decision that does not decode: %s", exc)
            return None
        current = self._decisions.get(decision.rollout_id)
        if current is not None and current.seq >= decision.seq:
            return None
        self._decisions[decision.rollout_id] = decision
        for listener in list(self._listeners):
            try:
                listener(decision)
            except Exception:
                log.exception("flag client: on_change listener failed")
        return decision

    async def _connect(self) -> AIOKafkaConsumer:
        topic = self.settings.topic("decisions")
        delay = 0.2
        while True:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.settings.broker,
                group_id=None,
                enable_auto_commit=False,
                fetch_max_wait_ms=self.poll_ms,
                request_timeout_ms=10_000,
            )
            try:
                await consumer.start()
                await consumer.topics()  # fetches cluster metadata
                partitions = consumer.partitions_for_topic(topic)
                if not partitions:
                    raise RuntimeError(f"topic {topic} not found")
                assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
                consumer.assign(assigned)
                await consumer.seek_to_beginning(*assigned)
                self._end_offsets = await consumer.end_offsets(assigned)
                return consumer
            except Exception as exc:
                await consumer.stop()
                log.warning("flag client: %s not readable (%s); retrying, serving last state", topic, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _run(self) -> None:
        self._consumer = consumer = await self._connect()
        while True:
            batches = await consumer.getmany(timeout_ms=self.poll_ms)
            for messages in batches.values():
                for message in messages:
                    self.apply(message.value)
            if not self._caught_up.is_set() and all(
                await asyncio.gather(*(self._reached(tp, end) for tp, end in self._end_offsets.items()))
            ):
                self._caught_up.set()

    async def _reached(self, tp: TopicPartition, end: int) -> bool:
        return await self._consumer.position(tp) >= end
