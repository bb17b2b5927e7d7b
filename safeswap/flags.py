"""FlagClient: which variant a user sees, from the compacted decisions topic.

It reads ``safeswap.decisions`` from the beginning (the last decision per
rollout is the rollout's current state), then tails it with a short fetch wait
(``poll_ms``, 50 ms), so a rollback reaches every client within a fraction of a
second of being published.

Serving rules (``variant(rollout_id, user_id)``):

- unknown rollout, no state yet, broker unreachable at start, or still reading
  the existing state: ``"control"``. A starting client serves nothing until it
  has read the topic up to the end offsets it found when it connected, so it
  never serves a decision that a later one on the topic already superseded.
- ``rollback`` (action) or ``rolled_back`` (stage): control for everyone,
  whatever ``percent`` says.
- otherwise the decision's ``percent`` with the bucketing contract of
  :mod:`safeswap.core.assignment`. Buckets are fixed per (salt, user), so raising the
  percentage only adds users (5% -> 10% -> 50% keeps every 5% user in the
  candidate), ``pause`` holds whatever split the pause decision carries (the
  controller republishes the current percent), and ``complete`` (percent 100)
  serves the candidate, now the new version, to everyone. The controller keeps
  ``salt`` constant for a rollout's lifetime; a new salt reshuffles users.

Shadow (``should_shadow(rollout_id, user_id)``): during shadow the app serves
control and, for a share ``shadow_percent`` of users, also sends the request to
the candidate in the background. The shadow draw must not pick the canary's
users systematically, so it uses a distinct salt derivation (cross-language
contract, like the variant bucket)::

    shadow bucket = int.from_bytes(SHA-256(salt + ":shadow" + ":" + user_id)[:8], "big") % 10_000
    shadowed  iff  shadow bucket < round(shadow_percent * 100)  and the user is served control

(that is ``assignment.bucket(salt + ":shadow", user_id)``). A user served the
candidate is never shadowed: there would be nothing to compare.

Freshness and the stale policy. The client knows how fresh its state is from
the last *successful fetch* on every partition of the topic (the consumer
long-polls even when no decision arrives, so this is a heartbeat, not the time
of the last message). ``staleness_s()`` is the time since every partition last
answered. When it exceeds ``max_staleness_s`` (default 300 s) the state is
*stale* and ``stale_policy`` decides:

- ``"hold"`` (default): keep serving the last known split. A broker blip or a
  rolling restart of the Kafka cluster must not flip a 50% ramp back to control
  for half the users (they would see their answers change twice, and the
  metrics of both arms would be polluted by the flip-flop).
- ``"control"``: serve control (and shadow nobody) until the state is fresh
  again. Choose it when serving a candidate that may already have been rolled
  back is worse than reverting everyone: high-stakes rollouts (a model with
  safety or cost risk), or an app whose network path to Kafka is often cut.

Decisions that do not decode or validate (bad JSON, a missing field, a percent
outside 0-100) are counted (``decode_errors``, ``last_error``) and ignored: the
client keeps its last good state. A tombstone (null value) for a rollout removes
it (control), as a client started after compaction would see it.

Threads. The current state is an immutable dict swapped atomically on every
change; ``variant()``, ``should_shadow()`` and ``decision()`` are lock-free
reads of it (a dict lookup plus one SHA-256), safe from any thread. Writers
(the tail, ``apply()``) serialise on a lock; ``on_change`` listeners run on the
writer's thread, in decision order. Async apps ``await flags.start()`` or use
``async with``; sync apps (Flask, Django, worker threads) call
``flags.start_background()`` (or ``with FlagClient(...) as flags:``), which runs
the tail on a daemon thread with its own event loop, and ``stop_background()``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from aiokafka import AIOKafkaConsumer, TopicPartition

from safeswap.core.assignment import assign, in_candidate
from schemas import Decision, InvalidEvent, decode
from streams.compacted import assign_from_beginning, at_end
from streams.kafka import client_options
from streams.settings import Settings

log = logging.getLogger(__name__)

Listener = Callable[[Decision], None]

STALE_POLICIES: tuple[str, ...] = ("hold", "control")
SHADOW_SALT_SUFFIX = ":shadow"
DEFAULT_MAX_STALENESS_S = 300.0


def rolled_back(decision: Decision) -> bool:
    """True when the decision means "control for everyone" whatever its percent."""
    return decision.action == "rollback" or decision.stage == "rolled_back"


def _problem(decision: Decision) -> str | None:
    """Why a decoded decision cannot be served, or None."""
    if not decision.rollout_id:
        return "empty rollout_id"
    for name in ("percent", "shadow_percent"):
        value = getattr(decision, name)
        if not (0.0 <= value <= 100.0):  # also refuses NaN
            return f"{name}={value!r} outside 0-100"
    return None


class FlagClient:
    """``async with FlagClient(broker) as flags: flags.variant("support-bot", user_id)``.

    Sync apps: ``flags = FlagClient(broker).start_background()`` ... ``flags.stop_background()``.
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        settings: Settings | None = None,
        poll_ms: int = 50,
        stale_policy: str = "hold",
        max_staleness_s: float = DEFAULT_MAX_STALENESS_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if stale_policy not in STALE_POLICIES:
            raise ValueError(f"stale_policy must be one of {STALE_POLICIES}, not {stale_policy!r}")
        if not max_staleness_s > 0:
            raise ValueError(f"max_staleness_s must be > 0, not {max_staleness_s!r}")
        self.settings = settings or Settings.from_env(broker=broker)
        if broker:
            self.settings = self.settings.replace(broker=broker)
        self.poll_ms = poll_ms
        self.stale_policy = stale_policy
        self.max_staleness_s = float(max_staleness_s)
        self._stale_control = stale_policy == "control"
        self._clock = clock
        # Counters (written under the lock, readable any time).
        self.decode_errors = 0
        self.last_error: str | None = None
        self.applied = 0
        self.ignored_older = 0
        self.tombstones = 0
        # The state: never mutated, replaced whole (readers need no lock).
        self._state: dict[str, Decision] = {}
        self._listeners: tuple[Listener, ...] = ()
        self._lock = threading.RLock()
        # Serving and freshness. A client fed only by apply() serves at once and
        # never goes stale; start() (or mark_fresh()) turns freshness tracking on.
        self._serving = True
        self._tracking = False
        self._fresh_at: float | None = None
        # The tail.
        self._consumer: AIOKafkaConsumer | None = None
        self._tail: asyncio.Task | None = None
        self._caught_up: asyncio.Event | None = None
        self._end_offsets: dict[TopicPartition, int] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- reading state (lock-free, any thread) ---------------------------------
    def variant(self, rollout_id: str, user_id: str) -> str:
        """``"control"`` or ``"candidate"`` for this user now."""
        decision = self._state.get(rollout_id)
        if decision is None or not self._serving or decision.percent <= 0 or rolled_back(decision):
            return "control"
        if self._stale_control and self.is_stale():
            return "control"
        return assign(decision.salt, user_id, decision.percent)

    def should_shadow(self, rollout_id: str, user_id: str) -> bool:
        """True when this (control) user's request should also go to the candidate in the background."""
        decision = self._state.get(rollout_id)
        if decision is None or not self._serving or decision.shadow_percent <= 0 or rolled_back(decision):
            return False
        if self._stale_control and self.is_stale():
            return False
        if decision.percent > 0 and in_candidate(decision.salt, user_id, decision.percent):
            return False  # served the candidate: nothing to compare (same snapshot as the checks above)
        return in_candidate(decision.salt + SHADOW_SALT_SUFFIX, user_id, decision.shadow_percent)

    def decision(self, rollout_id: str) -> Decision | None:
        """The latest decision for a rollout, or None."""
        return self._state.get(rollout_id)

    def decisions(self) -> Mapping[str, Decision]:
        """A read-only view of the current state (one consistent snapshot)."""
        return MappingProxyType(self._state)

    @property
    def serving(self) -> bool:
        """False while a started client has not yet read the existing state (it serves control)."""
        return self._serving

    def staleness_s(self) -> float:
        """Seconds since the state was last confirmed current (0 when not tracked, inf if never)."""
        if not self._tracking:
            return 0.0
        fresh_at = self._fresh_at
        if fresh_at is None:
            return math.inf
        return max(0.0, self._clock() - fresh_at)

    def is_stale(self) -> bool:
        return self.staleness_s() > self.max_staleness_s

    def mark_fresh(self, at: float | None = None) -> None:
        """Record that the state was confirmed current at ``at`` (``clock()`` time, default now).

        The tail calls it after every successful fetch; an app that feeds
        decisions itself through ``apply()`` may call it to get staleness tracking.
        """
        self._tracking = True
        self._fresh_at = self._clock() if at is None else at

    def stats(self) -> dict[str, object]:
        return {
            "rollouts": len(self._state),
            "applied": self.applied,
            "ignored_older": self.ignored_older,
            "decode_errors": self.decode_errors,
            "tombstones": self.tombstones,
            "last_error": self.last_error,
            "serving": self._serving,
            "staleness_s": self.staleness_s(),
            "stale": self.is_stale(),
            "stale_policy": self.stale_policy,
        }

    # -- listeners ---------------------------------------------------------------
    def on_change(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(decision)`` for every new decision, on the writer's thread.

        Returns a function that removes the listener.
        """
        with self._lock:
            self._listeners = self._listeners + (listener,)

        def remove() -> None:
            with self._lock:
                listeners = list(self._listeners)
                if listener in listeners:
                    listeners.remove(listener)
                self._listeners = tuple(listeners)

        return remove

    async def wait_for(self, predicate: Callable[[Decision], bool], timeout_s: float) -> Decision:
        """Wait until a decision satisfies ``predicate`` (for demos and tests)."""
        loop = asyncio.get_running_loop()
        found: asyncio.Future[Decision] = loop.create_future()

        def resolve(decision: Decision) -> None:
            if not found.done():
                found.set_result(decision)

        def check(decision: Decision) -> None:
            if predicate(decision):
                if _running_loop() is loop:  # on the waiting loop's own thread
                    resolve(decision)
                else:
                    loop.call_soon_threadsafe(resolve, decision)

        remove = self.on_change(check)
        try:
            for decision in list(self._state.values()):
                if predicate(decision):
                    resolve(decision)
                    break
            return await asyncio.wait_for(found, timeout_s)
        finally:
            remove()

    def wait_for_sync(self, predicate: Callable[[Decision], bool], timeout_s: float) -> Decision:
        """Blocking ``wait_for`` for sync apps and tests; raises TimeoutError."""
        done = threading.Event()
        found: list[Decision] = []

        def check(decision: Decision) -> None:
            if not done.is_set() and predicate(decision):
                found.append(decision)
                done.set()

        remove = self.on_change(check)
        try:
            for decision in list(self._state.values()):
                check(decision)
            if not done.wait(timeout_s):
                raise TimeoutError(f"no matching decision within {timeout_s}s")
            return found[0]
        finally:
            remove()

    # -- writing state -------------------------------------------------------------
    def apply(self, raw: bytes | None, key: bytes | None = None) -> Decision | None:
        """Fold one raw decision in; older sequence numbers never overwrite newer.

        ``raw=None`` with a ``key`` is a tombstone: the rollout is removed.
        Returns the decision if it changed the state, else None.
        """
        applied = self._ingest([(key, raw)])
        return applied[0] if applied else None

    def _ingest(self, messages: Iterable[tuple[bytes | None, bytes | None]]) -> list[Decision]:
        """Decode a batch, fold it into one new state swapped in once, then notify listeners."""
        parsed: list[Decision | str] = []  # a Decision, or a rollout_id to remove
        errors: list[str] = []
        for key, raw in messages:
            if raw is None:
                if key:
                    parsed.append(key.decode("utf-8", errors="replace"))
                else:
                    errors.append("tombstone without a key")
                continue
            try:
                decision = decode(Decision, raw)
            except InvalidEvent as exc:
                errors.append(str(exc))
                continue
            problem = _problem(decision)
            if problem:
                errors.append(f"invalid Decision for {decision.rollout_id!r}: {problem}")
                continue
            parsed.append(decision)
        applied: list[Decision] = []
        with self._lock:
            for error in errors:
                self.decode_errors += 1
                self.last_error = error
                log.warning("flag client: ignored a decision that does not decode: %s", error)
            if not parsed:
                return applied
            state = dict(self._state)
            for item in parsed:
                if isinstance(item, str):
                    if state.pop(item, None) is not None:
                        self.tombstones += 1
                    continue
                current = state.get(item.rollout_id)
                if current is not None and current.seq >= item.seq:
                    self.ignored_older += 1
                    continue
                state[item.rollout_id] = item
                applied.append(item)
            self.applied += len(applied)
            self._state = state  # the atomic swap readers see
            listeners = self._listeners
            for decision in applied:
                for listener in listeners:
                    try:
                        listener(decision)
                    except Exception:
                        log.exception("flag client: on_change listener failed")
        return applied

    # -- async lifecycle -------------------------------------------------------------
    async def start(self, catch_up_timeout_s: float = 10.0) -> FlagClient:
        """Start tailing; waits until the existing state is read (or the timeout: then control)."""
        if self._tail is not None:
            return self
        self._tracking = True
        self._serving = False
        self._caught_up = asyncio.Event()
        self._tail = asyncio.create_task(self._run(), name="safeswap-flag-client")
        try:
            await asyncio.wait_for(self._caught_up.wait(), catch_up_timeout_s)
        except TimeoutError:
            log.warning("flag client: no state from %s yet; serving control", self.settings.broker)
        return self

    async def stop(self) -> None:
        if self._thread is not None and threading.current_thread() is not self._thread:
            await asyncio.to_thread(self.stop_background)
            return
        await self._stop_tail()

    async def _stop_tail(self) -> None:
        if self._tail is not None:
            self._tail.cancel()
            try:
                await self._tail
            except asyncio.CancelledError:
                pass
            self._tail = None
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await _close(consumer)

    async def __aenter__(self) -> FlagClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- sync lifecycle (a daemon thread with its own event loop) ----------------------
    def start_background(self, catch_up_timeout_s: float = 10.0) -> FlagClient:
        """Run the tail on a daemon thread; returns once the state is read (or the timeout)."""
        if self._thread is not None:
            return self
        started = threading.Event()
        failures: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                try:
                    loop.run_until_complete(self.start(catch_up_timeout_s))
                except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                    failures.append(exc)
                    return
                finally:
                    started.set()
                loop.run_forever()  # until stop_background() stops it
                loop.run_until_complete(self._stop_tail())
            finally:
                loop.close()
                self._loop = None

        self._thread = threading.Thread(target=run, name="safeswap-flag-client", daemon=True)
        self._thread.start()
        started.wait()
        if failures:
            self._thread.join()
            self._thread = None
            raise failures[0]
        return self

    def stop_background(self, timeout_s: float = 10.0) -> None:
        """Stop the background tail and its thread (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:  # closed meanwhile
                pass
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("flag client: background thread did not stop within %ss", timeout_s)
        self._thread = None

    def __enter__(self) -> FlagClient:
        return self.start_background()

    def __exit__(self, *exc: object) -> None:
        self.stop_background()

    # -- the tail ----------------------------------------------------------------------
    async def _connect(self) -> AIOKafkaConsumer:
        topic = self.settings.topic("decisions")
        delay = 0.2
        while True:
            consumer = AIOKafkaConsumer(
                **client_options(self.settings),
                group_id=None,
                enable_auto_commit=False,
                fetch_max_wait_ms=self.poll_ms,
                request_timeout_ms=10_000,
            )
            try:
                await consumer.start()
                self._end_offsets = await assign_from_beginning(consumer, topic)
                return consumer
            except Exception as exc:  # noqa: BLE001 - any read failure: retried while the last state is served
                await _close(consumer)
                log.warning("flag client: %s not readable (%s); retrying, serving last state", topic, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _run(self) -> None:
        while True:
            self._consumer = consumer = await self._connect()
            try:
                await self._tail_loop(consumer)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Reconnect and re-read: sequence numbers make the replay harmless.
                log.exception("flag client: tail failed; reconnecting, serving last state")
                self._consumer = None
                await _close(consumer)
                await asyncio.sleep(0.5)

    async def _tail_loop(self, consumer: AIOKafkaConsumer) -> None:
        partitions = list(self._end_offsets)
        last_poll: dict[TopicPartition, int | None] = {tp: None for tp in partitions}
        confirmed_at: dict[TopicPartition, float | None] = {tp: None for tp in partitions}
        while True:
            batches = await consumer.getmany(timeout_ms=self.poll_ms)
            if batches:
                self._ingest((m.key, m.value) for messages in batches.values() for m in messages)
            if not self._serving and await at_end(consumer, self._end_offsets):
                self._serving = True
                self._caught_up.set()
            # Freshness: a fetch answered on a partition (with or without records)
            # is a heartbeat; the state is as fresh as the least recent partition.
            now = self._clock()
            for tp in partitions:
                polled = consumer.last_poll_timestamp(tp)
                if polled is not None and polled != last_poll[tp]:
                    last_poll[tp] = polled
                    confirmed_at[tp] = now
            if self._serving and all(t is not None for t in confirmed_at.values()):
                self._fresh_at = min(confirmed_at.values())  # type: ignore[type-var]


async def _close(consumer: AIOKafkaConsumer, timeout_s: float = 5.0) -> None:
    """Stop a consumer without raising: with the broker gone, aiokafka's fetcher
    close lets the CancelledError of its own in-flight fetch escape."""
    try:
        await asyncio.wait_for(consumer.stop(), timeout_s)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are being cancelled ourselves
    except Exception as exc:  # noqa: BLE001 - stopping: nothing left to protect
        log.warning("flag client: consumer did not stop cleanly: %r", exc)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
