"""``safeswap bench``: the pipeline's throughput, scaling, decision latency and memory.

Every figure is printed next to baselines measured in the same run on the same
broker and the same events, because the machines this runs on are noisy:

* ``raw_aiokafka_eps``: one aiokafka consumer reading both input topics with
  ``getmany`` and decoding every value with msgspec (the floor of any Python
  consumer), in the bench process;
* ``bare_faust_eps``: a bare Faust agent (``BARE_APP``: ``async for`` over the
  events, nothing else) as its own worker process;
* ``pipeline_eps``: one real ``safeswap worker`` process (outcomes + decide +
  Parquet sinks into a temp folder) over the same events. The workers join their
  group on empty topics first, then the bench produces the events and goes
  idle; the rate is taken from the end of producing to the statistics snapshot
  that covers the last event (a snapshot's ``seq`` is the sum of the source
  offsets it covers per partition), so group joins are not counted, and the
  bench process uses no CPU while it is measured (it only tails the stats
  topic). The sinks' progress (their group's committed offsets) is reported
  next to it;
* ``two_workers_vs_one``: the same with two worker processes in one group
  (4 partitions, 2 each);
* ``rss_mb_per_100k_users``: the one-worker run's VmRSS after the events minus
  before them (joined, empty), per 100k users active at the end (users whose
  state the outcomes agent still holds: last event within the session gap / join
  TTL of the newest event time), with the RSS curve sampled during the run;
* ``decision_latency_p50_s`` / ``_p99_s``: per trial, a fresh rollout (canary
  50%, ``min_users_per_arm`` N, guardrail ``error_rate`` max absolute increase
  0.05, rollback) gets N control users (20% errors) and N-1 candidate users (80%
  errors); when the controller's status shows them all, the bench produces the
  N-th candidate user's error trace and times until a FlagClient's
  ``on_change`` fires with the rollback and ``variant()`` serves control to a
  candidate user. Below N users per arm the guardrail has no verdict, so that
  event is the one that crosses the boundary. Background traffic
  (``--background-eps``, default 5,000 events/s) on another rollout runs all
  along, into the same worker.

Events are realistic: 500-character responses, 30% of traces with feedback,
100k users, keyed by user_id (murmur2, like every Java/aiokafka producer).

``benchmarks/bench_outcomes.py`` imports ``make_events`` and ``BARE_APP`` from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

T0 = 1_700_000_000_000
WORDS = ["alpha", "beta", "gamma", "delta", "kafka", "faust", "token", "model", "prompt", "answer"]
TRACE, FEEDBACK = "trace", "feedback"  # the same names as safeswap.core.outcomes (not imported: keep this light)
JSON_KEYS = (
    "pipeline_eps",
    "bare_faust_eps",
    "raw_aiokafka_eps",
    "pipeline_vs_bare_faust",
    "two_workers_vs_one",
    "decision_latency_p50_s",
    "decision_latency_p99_s",
    "rss_mb_per_100k_users",
)
MEAN_STEP_MS = 20.5  # make_events advances event time by 1..40 ms per trace


# -- events ---------------------------------------------------------------------------------
def _texts(rng: random.Random, text_chars: int, count: int = 2048) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(text_chars // 5))[:text_chars] for _ in range(count)]


def iter_events(
    n_events: int,
    users: int,
    seed: int = 1,
    text_chars: int = 500,
    t0: int = T0,
    feedback_share: float = 0.3,
    rollout_id: str = "bench",
) -> Iterator[tuple[str, str, bytes]]:
    """(source, user_id, raw bytes) in event-time order: each user sends requests 20-200 s apart on average
    (``users`` distinct ids drawn at random); ``feedback_share`` of traces get one feedback event 2 s later."""
    from schemas import FeedbackEvent, TraceEvent, encode

    rng = random.Random(seed)
    texts = _texts(rng, text_chars)
    prompts = [rng.choice(WORDS) * 5 for _ in range(64)]
    made = 0
    ts = t0
    i = 0
    while made < n_events:
        user = f"user-{rng.randrange(users)}"
        variant = "candidate" if zlib.crc32(user.encode()) & 1 else "control"
        text = texts[rng.randrange(len(texts))]
        trace = TraceEvent(
            event_id=f"e{i}",
            ts=ts,
            rollout_id=rollout_id,
            variant=variant,
            user_id=user,
            session_id="s",
            trace_id=f"t{i}",
            prompt_version="p",
            model_version="m",
            latency_ms=rng.lognormvariate(6, 0.5),
            input_tokens=100,
            output_tokens=200,
            cost_usd=0.001,
            cache_hit=rng.random() < 0.3,
            prompt_text=prompts[rng.randrange(len(prompts))],
            response_text=text,
        )
        yield TRACE, user, encode(trace)
        made += 1
        if made < n_events and rng.random() < feedback_share:
            kind = rng.choice(["thumbs_down", "thumbs_up", "edit", "retry", "copy"])
            yield (
                FEEDBACK,
                user,
                encode(
                    FeedbackEvent(
                        event_id=f"f{i}",
                        ts=ts + 2000,
                        trace_id=f"t{i}",
                        user_id=user,
                        session_id="s",
                        rollout_id=rollout_id,
                        variant=variant,
                        kind=kind,
                        final_text=text[:300] + " edited" if kind == "edit" else None,
                    )
                ),
            )
            made += 1
        i += 1
        ts += rng.randint(1, 40)


def make_events(n_events: int, users: int, seed: int = 1, text_chars: int = 500, t0: int = T0):
    """(source, raw bytes) in event-time order (see iter_events)."""
    return [(source, raw) for source, _, raw in iter_events(n_events, users, seed, text_chars, t0)]


def active_users(events: list[tuple[str, str, bytes]], hold_ms: int) -> int:
    """Users the outcomes agent still holds at the end: a trace within ``hold_ms`` of the newest event time.
    Event times are reconstructed from the generator's order (about MEAN_STEP_MS per trace)."""
    traces = [user for source, user, _ in events if source == TRACE]
    last: dict[str, int] = {}
    for index, user in enumerate(traces):
        last[user] = index
    cutoff = len(traces) - hold_ms / MEAN_STEP_MS
    return sum(1 for index in last.values() if index >= cutoff)


BARE_APP = """
import faust, sys, time
topic_name, total, broker, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
app = faust.App("bare-" + str(int(time.time())), broker="kafka://" + broker, store="memory://", web_enabled=False,
                datadir=__file__ + ".data",  # beside this script in the bench's temp folder, not in the cwd
                broker_session_timeout=6.0, broker_heartbeat_interval=1.0, broker_rebalance_timeout=10.0,
                consumer_auto_offset_reset="earliest")
topic = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
state = {"n": 0, "t0": None}
@app.agent(topic, concurrency=1)
async def bare(stream):
    async for event in stream.events():
        if state["t0"] is None: state["t0"] = time.perf_counter()
        state["n"] += 1
        if state["n"] >= total:
            open(out, "w").write(str(total / (time.perf_counter() - state["t0"])))
# Run as safeswap runs its workers (streams.worker.faust_worker): without Faust's terminal
# spinner, which sets the root logger to DEBUG, so the baseline pays for no debug records.
from faust.worker import Worker
worker = Worker(app, loglevel="warn", quiet=True)
worker.spinner = None
worker.execute_from_commandline()
"""


# -- small helpers --------------------------------------------------------------------------
def rss_mb(pid: int | None = None) -> float:
    """VmRSS of a process (default: this one) in MiB."""
    with open(f"/proc/{pid or 'self'}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Reporter:
    """Progress lines on stderr (rich when available); silent when ``quiet``."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = None
        if not quiet:
            with contextlib.suppress(ImportError):
                from rich.console import Console

                self.console = Console(stderr=True, soft_wrap=True)
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        line = f"[{time.monotonic() - self.started:6.1f}s] {message}"
        if self.console is not None:
            self.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def status(self, message: str):
        if self.console is None:
            self(message)
            yield
            return
        with self.console.status(message):
            yield


@dataclass
class BenchConfig:
    events: int = 400_000  # event time spans ~105 min: the measured window has sessions closing (30 min gap)
    users: int = 100_000
    text_chars: int = 500
    feedback_share: float = 0.3
    trials: int = 30
    background_eps: float = 5000.0
    min_users: int = 50  # N: users per arm at which the latency rollouts' guardrail gets a verdict
    rss_events: int = 0  # > 0: also run the long RSS curve over this many events (streamed, not held in memory)
    seed: int = 1
    phase_timeout_s: float = 600.0
    trial_timeout_s: float = 10.0
    latency_workers: int = 1  # workers serving the latency trials (1 or 2)  # a trial without a rollback by then counts as failed (latency > this)
    skip: tuple[str, ...] = ()  # "raw", "bare", "two", "latency"


# -- Kafka plumbing -------------------------------------------------------------------------
async def produce(bootstrap: str, settings, events, *, rate: float = 0.0) -> float:
    """Produce (source, user, raw) to <prefix>.traces/.feedback keyed by user_id; returns the seconds taken."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024, max_request_size=4 * 1024 * 1024
    )
    await producer.start()
    topics = {TRACE: settings.topic("traces"), FEEDBACK: settings.topic("feedback")}
    start = time.perf_counter()
    try:
        for index, (source, user, raw) in enumerate(events):
            await producer.send(topics[source], raw, key=user.encode())
            if rate and index % 100 == 99:
                ahead = (index + 1) / rate - (time.perf_counter() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await producer.flush()
    finally:
        await producer.stop()
    return time.perf_counter() - start


async def raw_aiokafka_eps(bootstrap: str, settings, total: int) -> float:
    """aiokafka getmany + msgspec decode of every value of both input topics, from the beginning."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from schemas import FeedbackEvent, TraceEvent, decode

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_bytes=16 * 1024 * 1024,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        await consumer.topics()
        traces = settings.topic("traces")
        tps = [
            TopicPartition(t, p)
            for t in (traces, settings.topic("feedback"))
            for p in sorted(consumer.partitions_for_topic(t))
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen, start = 0, None
        while seen < total:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if start is None and batches:
                start = time.perf_counter()
            for tp, records in batches.items():
                kind = TraceEvent if tp.topic == traces else FeedbackEvent
                for record in records:
                    decode(kind, record.value)
                seen += len(records)
        return seen / (time.perf_counter() - start)
    finally:
        await consumer.stop()


def bare_faust_eps(bootstrap: str, settings, total: int, tmp: Path, timeout_s: float) -> float:
    out, script = tmp / "bare.txt", tmp / "bare.py"
    script.write_text(
        BARE_APP.replace(
            "topic = app.topic(topic_name,", "topic = app.topic(topic_name, topic_name.replace('traces', 'feedback'),"
        )
    )
    bare = subprocess.Popen(
        [sys.executable, str(script), settings.topic("traces"), str(total), bootstrap, str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not out.exists() and time.monotonic() < deadline and bare.poll() is None:
            time.sleep(0.2)
        time.sleep(0.1)  # the file is written in one call; let it land
    finally:
        from streams.process import stop_process

        stop_process(bare, timeout_s=3)
    if not out.exists():
        raise RuntimeError("the bare Faust agent did not read every event in time")
    return float(out.read_text())


class StatsTail:
    """Tails <prefix>.stats: the newest outcome snapshot ``seq`` per (rollout, partition)."""

    def __init__(self, bootstrap: str, settings):
        self.bootstrap, self.settings = bootstrap, settings
        self.seqs: dict[tuple[str, int], int] = {}
        self.updated = 0.0
        self.produced_ms: dict[str, list[int]] = {}  # per watched rollout: when its snapshots were produced
        self.watched: set[str] = set()
        self.thresholds: list[int] = []  # done() marks to time: threshold -> (perf_counter, done) in reached
        self.reached: dict[int, tuple[float, int]] = {}
        self._task: asyncio.Task | None = None

    def done(self, rollout_id: str | None = None) -> int:
        per_partition: dict[int, int] = {}
        for (rollout, partition), seq in self.seqs.items():
            if rollout_id is None or rollout == rollout_id:
                per_partition[partition] = max(per_partition.get(partition, 0), seq)
        return sum(per_partition.values())

    async def start(self) -> StatsTail:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        topic = self.settings.topic("stats")
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=100
        )
        await self._consumer.start()
        await self._consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(self._consumer.partitions_for_topic(topic))]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        import msgspec

        class Seq(msgspec.Struct):
            rollout_id: str
            partition: int
            seq: int
            source: str = ""

        decoder = msgspec.json.Decoder(Seq)
        while True:
            for records in (await self._consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    with contextlib.suppress(Exception):
                        snap = decoder.decode(record.value)
                        if snap.source:
                            continue
                        key = (snap.rollout_id, snap.partition)
                        if snap.seq > self.seqs.get(key, -1):
                            self.seqs[key] = snap.seq
                            self.updated = time.perf_counter()
                            for mark in self.thresholds:
                                if mark not in self.reached and (done := self.done()) >= mark:
                                    self.reached[mark] = (self.updated, done)
                        if snap.rollout_id in self.watched:
                            self.produced_ms.setdefault(snap.rollout_id, []).append(record.timestamp)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


async def sink_offsets(bootstrap: str, settings) -> int:
    """Sum of the sink group's committed offsets on traces + feedback (rows safely in Parquet).
    Read with ``committed()`` of an unsubscribed consumer: it never joins (or disturbs) the group."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=f"{settings.app_id}.sink", enable_auto_commit=False
    )
    await consumer.start()
    try:
        total = 0
        for topic in (settings.topic("traces"), settings.topic("feedback")):
            for partition in range(settings.partitions):
                total += await consumer.committed(TopicPartition(topic, partition)) or 0
        return total
    finally:
        await consumer.stop()


async def end_offsets(bootstrap: str, settings) -> int:
    """Sum of the end offsets of traces + feedback: every event produced so far."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [
            TopicPartition(t, p)
            for t in (settings.topic("traces"), settings.topic("feedback"))
            for p in range(settings.partitions)
        ]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


_ASSIGNED = re.compile(r"outcomes: partition (\d+) resumes at")


def wait_joined(workers: list, partitions: int, timeout_s: float) -> float:
    """Until every worker logged an assigned partition and together they own all of them."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        owned = [set(map(int, _ASSIGNED.findall(w.log()))) for w in workers]
        if all(owned) and set().union(*owned) >= set(range(partitions)):
            return time.monotonic() - start
        for worker in workers:
            if not worker.alive():
                raise RuntimeError(f"worker exited during startup:\n{worker.log()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"workers did not get their partitions within {timeout_s:.0f} s")


# -- phases ---------------------------------------------------------------------------------
def pipeline_settings(base, bootstrap: str, tmp: Path, name: str):
    suffix = uuid.uuid4().hex[:6]
    return base.replace(
        broker=bootstrap,
        topic_prefix=f"bench-{name}-{suffix}",
        app_id=f"bench-{name}-{suffix}",
        state_dir=str(tmp / f"state-{name}"),
        data_dir=str(tmp / f"data-{name}"),
        log_level="warn",
    )


def bench_plan(rollout_id: str, min_users: int = 100):
    """A live canary the controller evaluates on every snapshot and never promotes or rolls back by itself."""
    from schemas import GuardrailSpec, RolloutPlan, StageSpec

    return RolloutPlan(
        rollout_id=rollout_id,
        stakes="low",
        min_users_per_arm=min_users,
        stages=[StageSpec(name="canary", percent=50, min_users_per_arm=10**9)],
        guardrails=[
            GuardrailSpec(metric="thumbs_down_rate", max_relative_increase=100.0),
            GuardrailSpec(metric="error_rate", max_absolute_increase=0.5),
        ],
    )


def crossing_plan(rollout_id: str, min_users: int):
    """Canary 50%; no verdict below ``min_users`` per arm; error_rate +0.05 absolute rolls back."""
    from schemas import GuardrailSpec, RolloutPlan, StageSpec

    return RolloutPlan(
        rollout_id=rollout_id,
        stakes="low",
        min_users_per_arm=min_users,
        stages=[StageSpec(name="canary", percent=50, min_users_per_arm=10**9)],
        guardrails=[GuardrailSpec(metric="error_rate", max_absolute_increase=0.05, action="rollback")],
    )


async def publish_plans(bootstrap: str, settings, plans) -> None:
    from aiokafka import AIOKafkaProducer

    from schemas import encode

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for plan in plans:
            await producer.send(settings.topic("plans"), encode(plan), key=plan.rollout_id.encode())
        await producer.flush()
    finally:
        await producer.stop()


MEASURE_FROM = 0.6  # the throughput window: from the statistics covering 60% of the events to 100%


async def _measure_pipeline(
    bootstrap: str, settings, events, workers: list, say: Callable[[str], None], timeout_s: float, sample_rss: bool
) -> dict[str, Any]:
    total = len(events)
    tail = await StatsTail(bootstrap, settings).start()
    # Every run is timed over the same events, the last 40%: the state and the work per
    # event grow with event time (sessions close, joins expire), so a run that got further
    # while the events were produced (two workers) must not be timed over heavier events only.
    window_from = int(total * MEASURE_FROM)
    tail.thresholds = [window_from]
    try:
        rss_empty = [rss_mb(w.pid) for w in workers]
        produce_s = await produce(bootstrap, settings, events)
        t_start, done_start = time.perf_counter(), tail.done()
        say(
            f"  produced {total:,} events in {produce_s:.1f} s ({total / produce_s:,.0f}/s); "
            f"{done_start:,} already processed; timing the events from {max(window_from, done_start):,} on"
        )
        curve = []
        deadline = time.monotonic() + timeout_s
        last_report = 0.0
        while tail.done() < total and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if sample_rss:
                curve.append((tail.done(), round(sum(rss_mb(w.pid) for w in workers), 1)))
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                say(f"  {tail.done():,}/{total:,} events in statistics")
            for worker in workers:
                if not worker.alive():
                    raise RuntimeError(f"worker died:\n{worker.log()[-3000:]}")
        done = tail.done()
        if done < total:
            raise RuntimeError(f"the pipeline covered {done:,} of {total:,} events within {timeout_s:.0f} s")
        t_end = tail.updated
        mark = tail.reached.get(window_from)
        # Else the window starts where producing ended: the run was past 60% by then, or
        # (a tiny run) the last 40% took under a second, too short a window to time.
        if done_start < window_from and mark is not None and mark[1] < total and t_end - mark[0] >= 1.0:
            t_start, done_start = mark
        eps = (total - done_start) / (t_end - t_start)
        # The sinks: when their committed offsets (rows renamed into the dataset) reach the end.
        sink_done_s = None
        sink_deadline = time.monotonic() + settings.sink_idle_s + 15
        while time.monotonic() < sink_deadline:
            with contextlib.suppress(Exception):
                if await sink_offsets(bootstrap, settings) >= total:
                    sink_done_s = time.perf_counter() - t_end
                    break
            await asyncio.sleep(0.25)
        await asyncio.sleep(1.0)
        rss_after = [rss_mb(w.pid) for w in workers]
    finally:
        await tail.stop()
    return {
        "eps": eps,
        "window_s": t_end - t_start,
        "events_in_window": total - done_start,
        "produce_s": produce_s,
        "sinks_after_s": sink_done_s,
        "rss_empty_mb": rss_empty,
        "rss_after_mb": rss_after,
        "curve": curve,
    }


def run_pipeline(
    base,
    bootstrap: str,
    tmp: Path,
    name: str,
    events,
    n_workers: int,
    say,
    timeout_s: float,
    sample_rss: bool = False,
    keep_worker: bool = False,
):
    """Workers join on empty topics, then the events are produced and the rate measured."""
    from streams.process import WorkerProcess
    from streams.topics import ensure_topics

    settings = pipeline_settings(base, bootstrap, tmp, name)
    asyncio.run(ensure_topics(settings))
    asyncio.run(publish_plans(bootstrap, settings, [bench_plan("bench")]))  # the decide agent evaluates it
    workers = [WorkerProcess(settings, tmp / f"worker-{name}-{i}.log").start() for i in range(n_workers)]
    try:
        joined_s = wait_joined(workers, settings.partitions, timeout_s=90)
        time.sleep(2.0)  # let a trailing rebalance (and the sinks' own group) settle
        say(f"  {n_workers} worker(s) joined in {joined_s:.1f} s (pid {', '.join(str(w.pid) for w in workers)})")
        result = asyncio.run(_measure_pipeline(bootstrap, settings, events, workers, say, timeout_s, sample_rss))
        result["joined_s"] = joined_s
        result["rebalances"] = sum(len(_ASSIGNED.findall(w.log())) for w in workers) - settings.partitions
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    if not keep_worker:
        for worker in workers:
            worker.stop()
        return result, settings, None
    return result, settings, workers


# -- decision latency -----------------------------------------------------------------------
def _trace(rollout_id: str, user: str, variant: str, error: bool, ts: int, event_id: str) -> bytes:
    from schemas import TraceEvent, encode

    return encode(
        TraceEvent(
            event_id=event_id,
            ts=ts,
            rollout_id=rollout_id,
            variant=variant,
            user_id=user,
            session_id=user,
            trace_id=event_id,
            prompt_version="p",
            model_version="m",
            latency_ms=250.0,
            input_tokens=100,
            output_tokens=120,
            cost_usd=0.001,
            cache_hit=False,
            error="timeout" if error else "none",
            prompt_text="question",
            response_text="answer",
        )
    )


def _pick_users(salt: str, prefix: str, n_control: int, n_candidate: int) -> tuple[list[str], list[str]]:
    from safeswap.core.assignment import in_candidate

    control, candidate, k = [], [], 0
    while len(control) < n_control or len(candidate) < n_candidate:
        user = f"{prefix}-{k}"
        k += 1
        if in_candidate(salt, user, 50):
            if len(candidate) < n_candidate:
                candidate.append(user)
        elif len(control) < n_control:
            control.append(user)
    return control, candidate


async def _background(
    bootstrap: str, settings, rate: float, users: int, text_chars: int, stop: asyncio.Event, counter: dict
) -> None:
    """Events at ``rate``/s on rollout bench-bg, in current event time, until ``stop``."""
    from aiokafka import AIOKafkaProducer

    from schemas import FeedbackEvent, TraceEvent, encode

    rng = random.Random(7)
    texts = _texts(rng, text_chars, 256)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024)
    await producer.start()
    traces, feedback = settings.topic("traces"), settings.topic("feedback")
    start, sent, i = time.perf_counter(), 0, 0
    try:
        while not stop.is_set():
            due = int((time.perf_counter() - start) * rate) - sent
            now = int(time.time() * 1000)
            while due > 0:
                user = f"bg-{rng.randrange(users)}"
                variant = "candidate" if zlib.crc32(user.encode()) & 1 else "control"
                text = texts[rng.randrange(len(texts))]
                trace = TraceEvent(
                    event_id=f"bg{i}",
                    ts=now,
                    rollout_id="bench-bg",
                    variant=variant,
                    user_id=user,
                    session_id=user,
                    trace_id=f"bg{i}",
                    prompt_version="p",
                    model_version="m",
                    latency_ms=300.0,
                    input_tokens=100,
                    output_tokens=200,
                    cost_usd=0.001,
                    cache_hit=False,
                    prompt_text="question",
                    response_text=text,
                )
                await producer.send(traces, encode(trace), key=user.encode())
                sent += 1
                due -= 1
                if due > 0 and rng.random() < 0.3:
                    await producer.send(
                        feedback,
                        encode(
                            FeedbackEvent(
                                event_id=f"bgf{i}",
                                ts=now + 1,
                                trace_id=f"bg{i}",
                                user_id=user,
                                session_id=user,
                                rollout_id="bench-bg",
                                variant=variant,
                                kind="thumbs_up",
                            )
                        ),
                        key=user.encode(),
                    )
                    sent += 1
                    due -= 1
                i += 1
            counter["sent"] = sent
            await asyncio.sleep(0.02)
    finally:
        counter["seconds"] = time.perf_counter() - start
        await producer.stop()


async def _latency(bootstrap: str, settings, cfg: BenchConfig, say) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    from safeswap.flags import FlagClient, rolled_back
    from safeswap.tools.simulate import status_view

    n = cfg.min_users
    run = uuid.uuid4().hex[:6]
    trials = [f"lat-{run}-{i}" for i in range(cfg.trials)]
    users = {rid: _pick_users(rid, f"{rid}-u", n, n) for rid in trials}
    flags = FlagClient(settings=settings.replace(broker=bootstrap))
    await flags.start()
    watcher = await status_view(settings.replace(broker=bootstrap)).start()
    tail = await StatsTail(bootstrap, settings).start()
    tail.watched = set(trials)
    rolled: dict[str, float] = {}
    to_snapshot: list[float] = []  # crossing event sent -> the outcome snapshot covering it produced

    def on_change(decision) -> None:
        if decision.rollout_id in users and rolled_back(decision) and decision.rollout_id not in rolled:
            rolled[decision.rollout_id] = time.perf_counter()

    flags.on_change(on_change)
    stop, counter = asyncio.Event(), {"sent": 0}
    background = None
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    latencies: list[float] = []
    failures: list[str] = []
    try:
        await publish_plans(bootstrap, settings, [bench_plan("bench-bg")] + [crossing_plan(r, n) for r in trials])
        deadline = time.monotonic() + 60
        while any(flags.decision(r) is None for r in trials) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if cfg.background_eps > 0:
            background = asyncio.create_task(
                _background(bootstrap, settings, cfg.background_eps, cfg.users, cfg.text_chars, stop, counter)
            )
        await asyncio.sleep(3.0)  # the background reaches its rate
        now = int(time.time() * 1000)
        for rid in trials:  # N control users (20% errors), N-1 candidate users (80% errors)
            control, candidate = users[rid]
            for k, user in enumerate(control):
                await producer.send(
                    settings.topic("traces"),
                    _trace(rid, user, "control", k % 5 == 0, now, f"{user}-t"),
                    key=user.encode(),
                )
            for k, user in enumerate(candidate[:-1]):
                await producer.send(
                    settings.topic("traces"),
                    _trace(rid, user, "candidate", k % 5 != 0, now, f"{user}-t"),
                    key=user.encode(),
                )
        await producer.flush()
        deadline = time.monotonic() + 60
        expected = {"control": n, "candidate": n - 1}
        while time.monotonic() < deadline:
            ready = sum(
                1
                for r in trials
                if (s := watcher.latest.get(r)) is not None and all(s.users.get(v, 0) >= c for v, c in expected.items())
            )
            if ready == len(trials):
                break
            await asyncio.sleep(0.2)
        say(
            f"  {len(trials)} rollouts registered and primed with {n} control / {n - 1} candidate users; "
            f"background {cfg.background_eps:,.0f} events/s"
        )
        rng = random.Random(3)
        lag_samples = []
        for index, rid in enumerate(trials):
            await asyncio.sleep(rng.uniform(0.2, 1.2))  # land anywhere in the snapshot interval
            if rid in rolled:
                failures.append(f"{rid}: rolled back before the crossing event")
                continue
            control, candidate = users[rid]
            user = candidate[-1]
            raw = _trace(rid, user, "candidate", True, int(time.time() * 1000), f"{user}-t")
            sent_at, sent_wall_ms = time.perf_counter(), time.time() * 1000
            await producer.send_and_wait(settings.topic("traces"), raw, key=user.encode())
            while rid not in rolled and time.perf_counter() - sent_at < cfg.trial_timeout_s:
                await asyncio.sleep(0.005)
            if rid not in rolled:
                failures.append(f"{rid}: no rollback within {cfg.trial_timeout_s:g} s")
                if len(failures) >= 3 and not latencies:
                    break  # the worker is not keeping up: say so instead of waiting out every trial
                continue
            if flags.variant(rid, candidate[0]) != "control":
                failures.append(f"{rid}: rolled back but variant() still serves the candidate")
                continue
            latencies.append(rolled[rid] - sent_at)
            after = [ts for ts in tail.produced_ms.get(rid, []) if ts >= sent_wall_ms]
            if after:  # where the time goes: before the snapshot, or from it to the flag client
                to_snapshot.append(min(after) / 1000 - sent_wall_ms / 1000)
            lag_samples.append(await end_offsets(bootstrap, settings) - tail.done())  # produced, not yet in statistics
            if (index + 1) % 10 == 0:
                say(f"  {index + 1}/{len(trials)} trials, p50 so far {statistics.median(latencies):.2f} s")
    finally:
        stop.set()
        if background is not None:
            with contextlib.suppress(Exception):
                await background
        await producer.stop()
        await tail.stop()
        await watcher.stop()
        await flags.stop()
    achieved = counter["sent"] / counter["seconds"] if counter.get("seconds") else 0.0
    return {
        "latencies": latencies,
        "failures": failures,
        "background_eps_achieved": achieved,
        "workers": cfg.latency_workers,
        "snapshot_interval_s": settings.snapshot_interval_s,
        "event_to_snapshot_p50_s": statistics.median(to_snapshot) if to_snapshot else None,
        "event_to_snapshot_max_s": max(to_snapshot) if to_snapshot else None,
        "snapshot_to_flag_p50_s": (
            statistics.median(latencies) - statistics.median(to_snapshot) if to_snapshot and latencies else None
        ),
        "background_lag_events_max": max(lag_samples) if lag_samples else None,
        "background_lag_events_median": statistics.median(lag_samples) if lag_samples else None,
    }


# -- long RSS curve -------------------------------------------------------------------------
async def _rss_curve(bootstrap: str, settings, worker, cfg: BenchConfig, say) -> dict[str, Any]:
    """Stream cfg.rss_events events (never all in memory) and sample the worker's RSS against progress."""
    tail = await StatsTail(bootstrap, settings).start()
    start_ts = int(time.time() * 1000) - int(cfg.rss_events * MEAN_STEP_MS / 1.3) - 3_600_000
    stop = asyncio.Event()
    curve: list[tuple[int, float]] = []

    async def sample() -> None:
        last = 0.0
        while not stop.is_set():
            curve.append((tail.done(), round(rss_mb(worker.pid), 1)))
            if time.monotonic() - last > 30:
                last = time.monotonic()
                say(f"  RSS curve: {curve[-1][0]:,} events, {curve[-1][1]:,.0f} MB")
            await asyncio.sleep(2.0)

    sampler = asyncio.create_task(sample())
    try:
        chunk = 200_000
        generator = iter_events(
            cfg.rss_events,
            cfg.users,
            seed=cfg.seed + 1,
            text_chars=cfg.text_chars,
            t0=start_ts,
            feedback_share=cfg.feedback_share,
        )
        produced = 0
        while produced < cfg.rss_events:
            batch = [e for _, e in zip(range(chunk), generator)]
            if not batch:
                break
            # keep at most ~2 chunks ahead of the worker: the broker keeps everything in memory
            while produced - tail.done() > 2 * chunk:
                await asyncio.sleep(1.0)
            await produce(bootstrap, settings, batch)
            produced += len(batch)
        while tail.done() < produced:
            await asyncio.sleep(1.0)
        await asyncio.sleep(3.0)
        curve.append((tail.done(), round(rss_mb(worker.pid), 1)))
    finally:
        stop.set()
        await sampler
        await tail.stop()
    return {"events": produced, "curve": curve}


# -- the whole run --------------------------------------------------------------------------
def run_bench(
    cfg: BenchConfig, broker: str | None = None, say: Callable[[str], None] | None = None, base_settings=None
) -> dict[str, Any]:
    from streams.broker import EmbeddedBroker
    from streams.settings import Settings
    from streams.topics import ensure_topics

    say = say or (lambda message: None)
    base = base_settings or Settings()
    started = time.monotonic()
    details: dict[str, Any] = {"config": asdict(cfg)}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="safeswap-bench-")))
        if broker:
            bootstrap, broker_name = broker, broker
        else:
            bootstrap, broker_name = stack.enter_context(EmbeddedBroker()).bootstrap, "embedded Tansu"
        details["broker"] = broker_name
        say(
            f"broker {broker_name} at {bootstrap}; generating {cfg.events:,} events, {cfg.users:,} users, "
            f"{cfg.text_chars}-char responses, {cfg.feedback_share:.0%} of traces with feedback"
        )
        now = int(time.time() * 1000)
        t0 = now - int(cfg.events / (1 + cfg.feedback_share) * MEAN_STEP_MS) - 120_000
        events = list(
            iter_events(
                cfg.events,
                cfg.users,
                seed=cfg.seed,
                text_chars=cfg.text_chars,
                t0=t0,
                feedback_share=cfg.feedback_share,
            )
        )
        details["event_bytes_mean"] = round(sum(len(raw) for _, _, raw in events) / len(events))

        # 1. baselines over the same events: raw aiokafka, then a bare Faust agent
        baseline = pipeline_settings(base, bootstrap, tmp, "baseline")
        asyncio.run(ensure_topics(baseline))
        asyncio.run(produce(bootstrap, baseline, events))
        raw = 0.0
        if "raw" not in cfg.skip:
            raw = asyncio.run(raw_aiokafka_eps(bootstrap, baseline, len(events)))
            say(f"raw aiokafka consume + decode: {raw:,.0f} events/s")
        bare = 0.0
        if "bare" not in cfg.skip:
            say("bare Faust agent: starting a worker process")
            bare = bare_faust_eps(bootstrap, baseline, len(events), tmp, cfg.phase_timeout_s)
            say(f"bare Faust agent: {bare:,.0f} events/s")

        hold_ms = max(int(base.session_gap_s * 1000), int(base.join_ttl_s * 1000) + 1)
        held = active_users(events, hold_ms)
        details["users_distinct"], details["users_active"] = len({user for _, user, _ in events}), held

        def latency_phase(settings) -> dict | None:
            if "latency" in cfg.skip or cfg.trials <= 0:
                return None
            say(
                f"decision latency: {cfg.trials} trials on {cfg.latency_workers} worker(s), "
                f"background {cfg.background_eps:,.0f} events/s"
            )
            return asyncio.run(_latency(bootstrap, settings, cfg, say))

        # 2. one worker: throughput, RSS before/after; kept for the latency trials (and the RSS curve)
        say("pipeline, 1 worker: starting")
        one, one_settings, workers = run_pipeline(
            base, bootstrap, tmp, "one", events, 1, say, cfg.phase_timeout_s, sample_rss=True, keep_worker=True
        )
        latency = curve = None
        try:
            say(f"pipeline, 1 worker: {one['eps']:,.0f} events/s")
            rss_delta = one["rss_after_mb"][0] - one["rss_empty_mb"][0]
            if cfg.latency_workers == 1:
                latency = latency_phase(one_settings)
        finally:
            workers[0].stop()
        if cfg.rss_events:  # a fresh worker and topics: the events' event time must start behind "now"
            from streams.process import WorkerProcess

            say(f"RSS curve over {cfg.rss_events:,} events (streamed), fresh worker")
            rss_settings = pipeline_settings(base, bootstrap, tmp, "rss")
            asyncio.run(ensure_topics(rss_settings))
            asyncio.run(publish_plans(bootstrap, rss_settings, [bench_plan("bench")]))
            with WorkerProcess(rss_settings, tmp / "worker-rss.log") as rss_worker:
                wait_joined([rss_worker], rss_settings.partitions, timeout_s=90)
                curve = asyncio.run(_rss_curve(bootstrap, rss_settings, rss_worker, cfg, say))

        # 3. two workers, one group, 4 partitions (kept for the latency trials with --latency-workers 2)
        two = None
        if "two" not in cfg.skip:
            say("pipeline, 2 workers: starting")
            keep = cfg.latency_workers == 2
            two, two_settings, kept = run_pipeline(
                base, bootstrap, tmp, "two", events, 2, say, cfg.phase_timeout_s, keep_worker=keep
            )
            say(f"pipeline, 2 workers: {two['eps']:,.0f} events/s")
            if keep:
                try:
                    del events
                    latency = latency_phase(two_settings)
                finally:
                    for worker in kept:
                        worker.stop()

    # A trial without a rollback within trial_timeout_s counts at that bound: percentiles are then lower bounds.
    lat = (latency["latencies"] + [cfg.trial_timeout_s] * len(latency["failures"])) if latency else []
    result = {
        "pipeline_eps": round(one["eps"]),
        "bare_faust_eps": round(bare),
        "raw_aiokafka_eps": round(raw),
        "pipeline_vs_bare_faust": round(one["eps"] / bare, 3) if bare else None,
        "two_workers_vs_one": round(two["eps"] / one["eps"], 3) if two else None,
        "decision_latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "decision_latency_p99_s": round(pct(lat, 0.99), 3) if lat else None,
        "rss_mb_per_100k_users": round(rss_delta / held * 100_000, 1) if held else None,
    }
    details.update(
        {
            "one_worker": {k: v for k, v in one.items() if k != "curve"},
            "rss_curve_one_worker": one["curve"][:: max(1, len(one["curve"]) // 20)],
            "two_workers": two,
            "latency": latency,
            "long_rss_curve": curve,
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    return {"result": result, "details": details}


# -- presentation ---------------------------------------------------------------------------
TARGETS = {
    "pipeline_vs_bare_faust": (">=", 0.8),
    "two_workers_vs_one": (">=", 1.6),
    "decision_latency_p99_s": ("<=", 2.0),
}


def table_lines(out: dict[str, Any]) -> list[str]:
    r, d = out["result"], out["details"]
    one, two, lat = d["one_worker"], d["two_workers"], d["latency"]

    def target(key: str) -> str:
        if key not in TARGETS or r.get(key) is None:
            return ""
        op, bound = TARGETS[key]
        met = r[key] >= bound if op == ">=" else r[key] <= bound
        return f"target {op} {bound:g}: {'met' if met else 'MISSED'}"

    lines = [
        f"safeswap bench on {d['broker']}: {d['config']['events']:,} events (~{d['event_bytes_mean']} bytes), "
        f"{d['users_distinct']:,} users, {d['seconds']:.0f} s",
        f"{'figure':<34} {'value':>12}  note",
        f"{'raw aiokafka consume+decode':<34} {r['raw_aiokafka_eps']:>12,} events/s, baseline",
        f"{'bare Faust agent':<34} {r['bare_faust_eps']:>12,} events/s, baseline",
        f"{'pipeline, 1 worker':<34} {r['pipeline_eps']:>12,} events/s over {one['events_in_window']:,} events; "
        f"sinks in Parquet {_fmt(one['sinks_after_s'])} s later",
        f"{'  vs bare Faust':<34} {_fmt(r['pipeline_vs_bare_faust']):>12}  {target('pipeline_vs_bare_faust')}",
        f"{'  vs raw aiokafka':<34} {_fmt(r['pipeline_eps'] / r['raw_aiokafka_eps'] if r['raw_aiokafka_eps'] else None):>12}",
    ]
    if two:
        lines += [
            f"{'pipeline, 2 workers':<34} {round(two['eps']):>12,} events/s",
            f"{'  2 workers vs 1':<34} {_fmt(r['two_workers_vs_one']):>12}  {target('two_workers_vs_one')}",
        ]
    if lat:
        lines += [
            f"{'decision latency p50':<34} {_fmt(r['decision_latency_p50_s']):>12} s  "
            f"{len(lat['latencies'])} trials ok, {len(lat['failures'])} over {d['config']['trial_timeout_s']:g} s, "
            f"{lat['workers']} worker(s), snapshots every {lat['snapshot_interval_s']:g} s, background "
            f"{lat['background_eps_achieved']:,.0f} events/s",
            f"{'decision latency p99':<34} {_fmt(r['decision_latency_p99_s']):>12} s  {target('decision_latency_p99_s')}; "
            f"background lag max {lat['background_lag_events_max']} events",
        ]
    lines.append(
        f"{'worker RSS per 100k active users':<34} {_fmt(r['rss_mb_per_100k_users']):>12} MB  "
        f"({one['rss_empty_mb'][0]:.0f} MB empty -> {one['rss_after_mb'][0]:.0f} MB, "
        f"{d['users_active']:,} users held)"
    )
    return lines


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
