"""Shared pieces of the fault suite: plans, producing with offsets, reading the DLQ and decisions."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaProducer

from schemas import DeadLetter, Decision, RolloutPlan
from streams.broker import free_port
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.support.kafka import read_topic


def fresh_settings(broker: str, tmp_path: Path, name: str, **overrides) -> Settings:
    """Settings with their own topic prefix, consumer group and folders, topics created."""
    unique = uuid.uuid4().hex[:8]
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    settings = Settings(
        broker=broker,
        topic_prefix=f"f{name}{unique}",
        app_id=f"safeswap-fault-{name}-{unique}",
        state_dir=str(tmp_path / name / "state"),
        data_dir=str(tmp_path / name / "data"),
        **overrides,
    )
    asyncio.run(ensure_topics(settings))
    return settings


def walk_plan(rollout_id: str) -> RolloutPlan:
    """A low-stakes plan whose decisions do not depend on when the controller looks:
    canary 50% for 30 min of event time, then 100% (no split to check), then complete.
    The guardrail tolerates +300%: on A/A traffic it is ``ok`` at every look.

    A stage's watch starts at the first snapshot the controller sees in it, and a fast
    worker may publish that one late in the data: a test must end with events of this
    rollout well past 30 min later (``rollout_tail`` in tests/agents/test_outcomes.py), or "complete"
    depends on the worker's speed."""
    return msgspec.convert(
        {
            "rollout_id": rollout_id,
            "stakes": "low",
            "skip_shadow": "fault suite",
            "control": {"model": "m1", "prompt_version": "p1"},
            "candidate": {"model": "m1", "prompt_version": "p1"},
            "allow_unpinned": True,
            "stages": [
                {"name": "canary", "percent": 50, "min_duration": "30m", "min_users_per_arm": 50},
                {"name": "ramp", "percent": 100},
            ],
            "min_users_per_arm": 50,
            "guardrails": [{"metric": "thumbs_down_rate", "max_relative_increase": 3.0, "action": "rollback"}],
            "health": {"model_drift": "ignore"},
        },
        RolloutPlan,
    )


async def produce_many(
    settings: Settings, messages: list[tuple[str, bytes | None, bytes]]
) -> list[tuple[str, int, int]]:
    """Produce ``(short topic, key, value)`` in order; returns each message's (full topic, partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, linger_ms=5, max_request_size=32_000_000)
    await producer.start()
    try:
        futures = [await producer.send(settings.topic(topic), value=value, key=key) for topic, key, value in messages]
        await producer.flush()
        out = []
        for future in futures:
            metadata = await future
            out.append((metadata.topic, metadata.partition, metadata.offset))
        return out
    finally:
        await producer.stop()


def dead_letters(settings: Settings, until_count: int = 0, timeout_s: float = 30.0) -> list[DeadLetter]:
    records = asyncio.run(
        read_topic(settings.broker, settings.topic("dlq"), until_count=until_count, timeout_s=timeout_s)
    )
    return [msgspec.json.decode(r.value, type=DeadLetter) for r in records]


def decisions(settings: Settings, rollout_id: str) -> list[Decision]:
    records = asyncio.run(read_topic(settings.broker, settings.topic("decisions"), timeout_s=5))
    out = [msgspec.json.decode(r.value, type=Decision) for r in records if r.value is not None]
    return [d for d in out if d.rollout_id == rollout_id]


def by_seq(found: list[Decision]) -> list[tuple[int, str, str, float]]:
    """One (seq, action, stage, percent) per seq; a republished decision (after a replay)
    must say exactly what the first one said."""
    seen: dict[int, tuple[int, str, str, float]] = {}
    for d in found:
        row = (d.seq, d.action, d.stage, d.percent)
        assert seen.setdefault(d.seq, row) == row, (
            f"seq {d.seq} published twice with different content: {seen[d.seq]} vs {row}"
        )
    return [seen[seq] for seq in sorted(seen)]


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, log: Callable[[], str] = lambda: ""):
    """Poll ``condition`` until truthy (returned); a clear failure after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{log()[-3000:]}")
        time.sleep(0.3)


def latest_snapshots(settings: Settings, rollout: str) -> dict:
    """The latest outcome snapshot per source partition; undecodable stats records are skipped."""
    from schemas import StatsSnapshot

    latest: dict = {}
    for record in asyncio.run(read_topic(settings.broker, settings.topic("stats"), timeout_s=5)):
        try:
            snapshot = msgspec.json.decode(record.value, type=StatsSnapshot)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            continue
        if (
            snapshot.rollout_id == rollout
            and not snapshot.source
            and snapshot.seq > 1
            and (snapshot.partition not in latest or snapshot.seq > latest[snapshot.partition].seq)
        ):
            latest[snapshot.partition] = snapshot
    return latest


def wait_until_covered(settings: Settings, worker, rollout: str, flush: str, timeout_s: float) -> dict:
    """Like tests/outcomes' helper, tolerant of bad records on the stats topic."""
    from tests.agents.test_outcomes import end_offsets

    ends = asyncio.run(end_offsets(settings))
    wait_until(
        lambda: (lambda f: all(p in f and f[p].seq >= ends[p] for p in ends))(latest_snapshots(settings, flush)),
        timeout_s,
        f"the worker to cover {ends}",
        worker.log,
    )
    time.sleep(1.5)  # the rollout's own snapshots were published in the same round
    return latest_snapshots(settings, rollout)


class CuttableProxy:
    """A TCP forwarder on loopback in front of a broker: ``cut()`` resets every
    connection and refuses new ones until ``restore()``, on the same port. To the
    clients the broker is gone; the broker keeps its data, like a real cluster's
    broker that restarts or drops off the network."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cuttable-proxy", daemon=True)
        self._thread.start()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, coro) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def restore(self) -> CuttableProxy:
        self._call(self._listen())
        return self

    def cut(self) -> None:
        self._call(self._cut())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._connections):
            writer.transport.abort()  # RST: clients notice at once
        self._connections.clear()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._connections |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(1 << 16):
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                sink.transport.abort()
                self._connections.discard(sink)

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
