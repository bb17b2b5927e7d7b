"""Outcomes benchmarks; every figure printed next to its baseline from the same run.

python benchmarks/bench_outcomes.py step    [--events 200000]   pure OutcomeProcessor, 500-char responses,
                                                                30% of traces with feedback (decode excluded
                                                                and included); baseline: msgspec decode alone
python benchmarks/bench_outcomes.py memory  [--users 1000000]   RSS while USERS distinct users pass in event time;
                                                                baseline: RSS before the first user
python benchmarks/bench_outcomes.py agent   [--events 60000]    the outcomes agent vs a bare Faust agent over the
                                                                same topic on the embedded broker
python benchmarks/bench_outcomes.py checkpoint [--events 200000 --users 50000]
                                                                one partition's checkpoint: encode (forked child),
                                                                restore and payload size; baseline: a zlib'd pickle
                                                                of the same state (the format before state version 5)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pickle
import random
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pipeline import BARE_APP, T0, make_events
from safeswap.core.outcomes import TRACE, OutcomeProcessor
from schemas import FeedbackEvent, TraceEvent, decode

# One way to make events and run the bare-Faust baseline: shared with `safeswap bench` (benchmarks/pipeline.py).


def bench_step(n_events: int) -> dict:
    events = make_events(n_events, users=max(1000, n_events // 10))
    now = T0 + 10**9
    start = time.perf_counter()
    decoded = [(s, decode(TraceEvent if s == TRACE else FeedbackEvent, raw)) for s, raw in events]
    decode_s = time.perf_counter() - start
    processor = OutcomeProcessor(0)
    start = time.perf_counter()
    for _, event in decoded:
        processor.apply(event, now)
    step_s = time.perf_counter() - start
    processor = OutcomeProcessor(0)
    start = time.perf_counter()
    for source, raw in events:
        processor.fold_raw(source, raw, now)
    full_s = time.perf_counter() - start
    return {
        "events": len(events),
        "baseline_msgspec_decode_per_s": round(len(events) / decode_s),
        "step_per_s": round(len(events) / step_s),
        "decode_plus_step_per_s": round(len(events) / full_s),
        "target_step_per_s": 50_000,
    }


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


REFERENCE_USERS = 100_000


def bench_memory(users: int) -> dict:
    """USERS distinct users, each one short session, in event-time order (1 new user per 50 ms)."""
    processor = OutcomeProcessor(0)
    now = T0 + 10**10
    rng = random.Random(2)
    samples = []
    baseline = rss_mb()  # interpreter, imports and an empty processor
    start = time.perf_counter()
    for u in range(users):
        ts = T0 + u * 50
        user = f"user-{u}"
        trace = TraceEvent(
            event_id=f"e{u}",
            ts=ts,
            rollout_id="bench",
            variant="control" if u & 1 else "candidate",
            user_id=user,
            session_id="s",
            trace_id=f"t{u}",
            prompt_version="p",
            model_version="m",
            latency_ms=200.0,
            input_tokens=1,
            output_tokens=1,
            cost_usd=0.001,
            cache_hit=False,
            prompt_text="question",
            response_text="x" * 500,
        )
        processor.apply(trace, now)
        if rng.random() < 0.3:
            processor.apply(
                FeedbackEvent(
                    event_id=f"f{u}",
                    ts=ts + 1000,
                    trace_id=f"t{u}",
                    user_id=user,
                    session_id="s",
                    rollout_id="bench",
                    variant=trace.variant,
                    kind="thumbs_up",
                ),
                now,
            )
        if u % (users // 10) == 0 or u == REFERENCE_USERS:
            samples.append({"users_seen": u, "rss_mb": round(rss_mb(), 1), "users_held": len(processor.users)})
    samples.append({"users_seen": users, "rss_mb": round(rss_mb(), 1), "users_held": len(processor.users)})
    kept = [*processor.first_seen.values(), *processor.also_served.values()]
    distinct = sum(len(seen) for seen in kept)
    reference = next((s["rss_mb"] for s in samples if s["users_seen"] == REFERENCE_USERS), None)
    return {
        "users": users,
        "seconds": round(time.perf_counter() - start, 1),
        "baseline_rss_mb": round(baseline, 1),
        "samples": samples,
        "growth_mb": round(samples[-1]["rss_mb"] - baseline, 1),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "distinct_users_kept": distinct,
        "distinct_users_mb": round(sum(seen.members.nbytes + 80 * len(seen.recent) for seen in kept) / 2**20, 1),
        # the target: RSS at USERS distinct users <= 1.5x the RSS at 100k, in the same run
        "rss_at_100k_mb": reference,
        "rss_ratio_to_100k": round(samples[-1]["rss_mb"] / reference, 3) if reference else None,
        "note": "state held = users active within gap + join TTL + lateness of event time (~1.1 h = ~78k users "
        "here); the distinct-user hashes (8 bytes a user) are all that grows",
    }


def bench_agent(n_events: int) -> dict:
    """Both run as worker processes on the same embedded broker and the same events."""
    from aiokafka import AIOKafkaProducer

    from streams.broker import EmbeddedBroker
    from streams.process import WorkerProcess
    from streams.settings import Settings
    from streams.topics import ensure_topics
    from tests.support.kafka import read_topic

    events = make_events(n_events, users=max(1000, n_events // 10))
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            broker=broker.bootstrap,
            topic_prefix="bench",
            app_id="bench-outcomes",
            state_dir=tmp + "/state",
            data_dir=tmp + "/data",
            snapshot_interval_s=0.5,
            sink_datasets=os.environ.get("SAFESWAP_SINK_DATASETS", "all"),
        )
        asyncio.run(ensure_topics(settings))

        async def produce():
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
            await producer.start()
            for source, raw in events:
                user = json.loads(raw)["user_id"].encode()
                await producer.send(settings.topic("traces" if source == TRACE else "feedback"), raw, key=user)
            await producer.flush()
            await producer.stop()

        asyncio.run(produce())
        # bare Faust over the same two topics' messages (the traces+feedback stream)
        out = Path(tmp) / "bare.txt"
        script = Path(tmp) / "bare.py"
        script.write_text(
            BARE_APP.replace(
                "topic = app.topic(topic_name,",
                "topic = app.topic(topic_name, topic_name.replace('traces', 'feedback'),",
            )
        )
        bare = subprocess.Popen(
            [sys.executable, str(script), settings.topic("traces"), str(len(events)), broker.bootstrap, str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        bare.kill()
        bare.wait()
        bare_rate = float(out.read_text()) if out.exists() else None
        # the outcomes worker: throughput from the first to the last snapshot covering everything
        worker = WorkerProcess(settings.replace(log_level="warn"), Path(tmp) / "worker.log").start()
        try:
            first_seen = None
            rate = None
            while time.monotonic() < deadline:
                records = asyncio.run(read_topic(broker.bootstrap, settings.topic("stats"), timeout_s=2))
                seqs = {}
                for record in records:
                    snap = json.loads(record.value)
                    seqs[snap["partition"]] = max(seqs.get(snap["partition"], 0), snap["seq"])
                done = sum(seqs.values())
                if first_seen is None and done:
                    first_seen = (time.perf_counter(), done)
                if done >= len(events):
                    rate = (done - first_seen[1]) / (time.perf_counter() - first_seen[0])
                    break
                time.sleep(0.2)
        finally:
            worker.stop()
    return {
        "events": len(events),
        "baseline_bare_faust_per_s": round(bare_rate or 0),
        "outcomes_agent_per_s": round(rate or 0),
        "ratio": round((rate or 0) / bare_rate, 2) if bare_rate and rate else None,
        "target_ratio": 0.7,
        "note": "agent rate measured between its first and last stats snapshot (polling every ~0.5 s)",
    }


def _best_of(runs: int, work) -> tuple[float, float, object]:
    """The fastest of ``runs`` timings of ``work()`` (wall clock, and this process's CPU time, which
    other processes on the shared machine disturb less), and its result."""
    best, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = work()
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu, result


def _without_gc(work):
    """``work`` as the forked encoder runs it: no cyclic collection (see ForkedEncoding)."""

    def run():
        gc.disable()
        try:
            return work()
        finally:
            gc.enable()

    return run


def bench_checkpoint(n_events: int, users: int, runs: int = 3) -> dict:
    """Both formats encode and restore the same processor, ``runs`` times each; best times."""
    from agents.outcomes import restore_processor
    from safeswap.core.outcomes import OutcomeConfig
    from streams.checkpoint import ForkedEncoding, encode_state

    processor = OutcomeProcessor(0)
    now = T0 + 10**9
    for source, raw in make_events(n_events, users=users):
        processor.fold_raw(source, raw, now)
    gc.collect()
    gc.freeze()  # as the worker does every 10 s (streams/app.py): the state is old objects

    pickle_encode_s, pickle_encode_cpu, pickled = _best_of(
        runs, _without_gc(lambda: zlib.compress(pickle.dumps(processor, protocol=pickle.HIGHEST_PROTOCOL), 1))
    )
    # the old restore ran with the collector on; with it off too, for a like-for-like figure
    pickle_decode_s, pickle_decode_cpu, _ = _best_of(runs, lambda: pickle.loads(zlib.decompress(pickled)))
    pickle_decode_nogc_s, pickle_decode_nogc_cpu, _ = _best_of(
        runs, _without_gc(lambda: pickle.loads(zlib.decompress(pickled)))
    )

    build_s, _, _ = _best_of(runs, _without_gc(processor.to_state))
    struct_encode_s, struct_encode_cpu, payload = _best_of(
        runs, _without_gc(lambda: encode_state(processor.to_state()))
    )

    async def forked() -> ForkedEncoding:
        encoding = ForkedEncoding.start(processor.to_state)
        assert await encoding.payload() == payload
        return encoding

    encodings = [asyncio.run(forked()) for _ in range(runs)]
    config = OutcomeConfig()
    restore_s, restore_cpu, restored = _best_of(runs, lambda: restore_processor(payload, config))
    assert restored is not None and restored.to_state() == processor.to_state()
    return {
        "events": n_events,
        "users_held": len(processor.users),
        "responses_held": sum(len(u.by_trace) for u in processor.users.values()),
        "baseline_pickle_encode_s": round(pickle_encode_s, 2),
        "baseline_pickle_decode_s": round(pickle_decode_s, 2),
        "baseline_pickle_decode_without_gc_s": round(pickle_decode_nogc_s, 2),
        "baseline_pickle_bytes": len(pickled),
        "struct_build_s": round(build_s, 2),
        "struct_encode_s": round(struct_encode_s, 2),
        "struct_forked_encode_s": round(min(e.encode_s for e in encodings), 2),
        "struct_forked_loop_held_s": round(max(e.blocked_s for e in encodings), 3),
        "struct_restore_s": round(restore_s, 2),
        "struct_bytes": len(payload),
        "encode_ratio_to_pickle": round(struct_encode_s / pickle_encode_s, 2),
        "restore_ratio_to_pickle": round(restore_s / pickle_decode_s, 2),
        "cpu_s": {
            "baseline_pickle_encode": round(pickle_encode_cpu, 2),
            "baseline_pickle_decode": round(pickle_decode_cpu, 2),
            "baseline_pickle_decode_without_gc": round(pickle_decode_nogc_cpu, 2),
            "struct_encode": round(struct_encode_cpu, 2),
            "struct_restore": round(restore_cpu, 2),
        },
        "note": f"best of {runs} runs, wall clock (cpu_s: this process's CPU time); encode = build + msgpack + zlib; restore = restore_processor "
        "(decode + from_state), the pickle's decode = zlib + pickle.loads",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["step", "memory", "agent", "checkpoint"])
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--users", type=int, default=None)
    args = parser.parse_args()
    if args.what == "step":
        result = bench_step(args.events or 200_000)
    elif args.what == "memory":
        result = bench_memory(args.users or 1_000_000)
    elif args.what == "checkpoint":
        result = bench_checkpoint(args.events or 200_000, args.users or 50_000)
    else:
        result = bench_agent(args.events or 60_000)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
