"""Sink benchmarks, each with its baseline measured in the same run (these machines are noisy).

1. Throughput: the sink (decode + validate + buffer + Parquet files + commit) over a
   topic of trace events, against a bare Faust agent iterating the same topic, and
   raw aiokafka ``getmany`` for context. Target: sink >= 0.8x bare Faust.
2. Reading: the per-variant summary (``sinks.variant_summary``: exact distinct users and
   sessions, p95 latency, thumbs rates from the feedback joined on trace_id) over 10M
   trace rows and 500k feedback rows with polars, against the same aggregates with
   pyarrow.dataset (exact ``count_distinct``, exact per-group quantile, a hash join),
   checked to give the same figures. Timed cold (the first query of a fresh process, as
   ``safeswap query summary`` runs it, imports excluded) and warm (median of 3 in one
   process). Target: < 2 s.

    python benchmarks/bench_sinks.py [--events 200000] [--rows 10000000] [--skip-throughput]

Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sinks.queries import SUMMARY_KEYS  # noqa: E402 - after the path insert; the summary's group keys, for the pyarrow baseline


# --- children: one Faust worker each, reporting its own timing --------------------------------
def _child(role: str, bootstrap: str, prefix: str, events: int, data_dir: str) -> None:
    import faust

    from streams.app import faust_broker_url, raw_topic
    from streams.settings import Settings

    settings = Settings(
        broker=bootstrap,
        topic_prefix=prefix,
        app_id=f"bench-{role}-{uuid.uuid4().hex[:6]}",
        data_dir=data_dir,
        sink_datasets="traces",
        state_dir=tempfile.mkdtemp(),
        sink_max_rows=20_000,
        sink_idle_s=0.25,
    )  # files of 20k rows; the tail flushed 0.25 s after the last
    app = faust.App(
        settings.app_id,
        broker=faust_broker_url(bootstrap),
        store="memory://",
        web_enabled=False,
        datadir=settings.state_dir,
        topic_partitions=settings.partitions,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        consumer_auto_offset_reset="earliest",
    )
    marks: dict[str, float] = {}

    def done() -> None:
        result = {"role": role, "events": events, "seconds": marks["end"] - marks["start"]}
        os.write(1, (json.dumps(result) + "\n").encode())  # fd 1: the Faust worker redirects sys.stdout
        os._exit(0)

    if role == "bare":
        topic = raw_topic(app, settings, "traces")
        count = 0

        @app.agent(topic, name="bare", concurrency=1)
        async def bare(stream):
            nonlocal count
            async for _event in stream.events():
                if count == 0:
                    marks["start"] = time.perf_counter()
                count += 1
                if count >= events:
                    marks["end"] = time.perf_counter()
                    done()
    else:
        from agents import sink

        service = sink.register(app, settings)

        @app.task
        async def monitor():
            while True:
                await asyncio.sleep(0.01)
                writers = [w for s in service.sinks.values() for w in s.writers.values()]
                if "start" not in marks and any(w.first is not None or w.rows_written for w in writers):
                    marks["start"] = time.perf_counter()
                if sum(w.rows_written for w in writers) >= events:
                    marks["end"] = time.perf_counter()
                    done()

    from streams.worker import faust_worker

    faust_worker(app, settings).execute_from_commandline()


def run_child(role: str, bootstrap: str, prefix: str, events: int, data_dir: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", role, bootstrap, prefix, str(events), data_dir],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    for line in reversed(out.stdout.splitlines()):
        if '"role"' in line:  # after the terminal escape codes the worker prints
            return json.loads(line[line.index("{") :])["seconds"]
    raise RuntimeError(f"{role} child failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


async def produce_traces(bootstrap: str, topic: str, events: int) -> None:
    from aiokafka import AIOKafkaProducer

    from schemas import encode
    from tests.support.sinks import trace

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    try:
        for i in range(events):
            user = f"u{i % 5000}"
            await producer.send(topic, encode(trace(i, user=user)), key=user.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def raw_getmany(bootstrap: str, topic: str, events: int) -> float:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        count, start = 0, None
        while count < events:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            if batch and start is None:
                start = time.perf_counter()
            for records in batch.values():
                for record in records:
                    json.loads(record.value)
                count += sum(len(r) for r in batch.values())
        return time.perf_counter() - start
    finally:
        await consumer.stop()


def throughput(events: int) -> dict:
    from streams.broker import EmbeddedBroker
    from streams.settings import Settings
    from streams.topics import ensure_topics

    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        settings = Settings(broker=broker.bootstrap, topic_prefix=prefix)
        asyncio.run(ensure_topics(settings))
        asyncio.run(produce_traces(broker.bootstrap, settings.topic("traces"), events))
        raw_s = asyncio.run(raw_getmany(broker.bootstrap, settings.topic("traces"), events))
        bare_s = run_child("bare", broker.bootstrap, prefix, events, tmp)
        sink_s = run_child("sink", broker.bootstrap, prefix, events, os.path.join(tmp, "data"))
        import sinks

        rows = sinks.count_rows(os.path.join(tmp, "data"), ["traces"])["traces"]
    return {
        "events": events,
        "raw_aiokafka_getmany_json_eps": round(events / raw_s),
        "bare_faust_agent_eps": round(events / bare_s),
        "sink_eps": round(events / sink_s),
        "sink_vs_bare_faust": round(bare_s / sink_s, 2),
        "sink_rows_on_disk": rows,
    }


# --- reading ------------------------------------------------------------------------------------------
def write_synthetic_traces(data_dir: Path, rows: int, files: int = 20) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sinks import DATASETS
    from sinks.writer import file_name

    schema = DATASETS["traces"].arrow_schema
    rng = np.random.default_rng(0)
    users = pa.array([f"user-{i}" for i in range(200_000)])
    sessions = pa.array([f"session-{i}" for i in range(1_000_000)])
    per_file = rows // files
    for n in range(files):
        first = n * per_file
        ids = pa.array(np.arange(first, first + per_file))
        variant_idx = rng.random(per_file) < 0.2
        columns = {
            "event_id": pc.binary_join_element_wise("t-", pc.cast(ids, pa.string()), ""),
            "ts": pa.array(1_767_225_600_000 + np.arange(first, first + per_file) * 10, pa.timestamp("ms", tz="UTC")),
            "variant": pa.array(np.where(variant_idx, "candidate", "control")),
            "user_id": users.take(pa.array(rng.integers(0, len(users), per_file))),
            "session_id": sessions.take(pa.array(rng.integers(0, len(sessions), per_file))),
            "trace_id": pc.cast(ids, pa.string()),
            "prompt_version": pa.array(np.where(variant_idx, "v42", "v41")),
            "model_version": pa.array(np.where(rng.random(per_file) < 0.5, "claude-a", "claude-b")),
            "latency_ms": pa.array(rng.lognormal(6.8, 0.5, per_file)),
            "ttft_ms": pa.nulls(per_file, pa.float64()),
            "input_tokens": pa.array(rng.integers(100, 800, per_file)),
            "output_tokens": pa.array(rng.integers(50, 400, per_file)),
            "cost_usd": pa.array(rng.random(per_file) * 0.01),
            "cache_hit": pa.array(rng.random(per_file) < 0.3),
            "error": pa.array(np.where(rng.random(per_file) < 0.01, "timeout", "none")),
            "prompt_text": pa.nulls(per_file, pa.string()),
            "response_text": pa.nulls(per_file, pa.string()),
            "kafka_partition": pa.array(np.full(per_file, n % 4, dtype=np.int32)),
            "kafka_offset": ids,
        }
        table = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
        folder = data_dir / "traces" / "rollout_id=bench" / "date=2026-01-01"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / file_name(n % 4, first, first + per_file - 1), compression="zstd")


def write_synthetic_feedback(data_dir: Path, share: float = 0.05) -> int:
    """One reaction for ``share`` of the traces (thumbs, edits, copies, ...), 30 s after it."""
    import numpy as np
    import polars as pl
    import pyarrow.parquet as pq

    from sinks import DATASETS, scan
    from sinks.writer import file_name

    kinds = ["thumbs_up", "thumbs_down", "edit", "retry", "abandon", "follow_up", "copy"]
    reacted = (
        scan("traces", data_dir)
        .select("trace_id", "user_id", "session_id", "variant", "ts")
        .collect()
        .sample(fraction=share, seed=1)
    )
    n = reacted.height
    rng = np.random.default_rng(1)
    feedback = reacted.with_columns(
        event_id=pl.format("f-{}", pl.int_range(n)),
        ts=pl.col("ts") + pl.duration(seconds=30),
        kind=pl.Series(np.array(kinds)[rng.integers(0, len(kinds), n)]),
        final_text=pl.lit(None, pl.String),
        kafka_partition=pl.lit(0, pl.Int32),
        kafka_offset=pl.int_range(n, dtype=pl.Int64),
    )
    schema = DATASETS["feedback"].arrow_schema
    folder = data_dir / "feedback" / "rollout_id=bench" / "date=2026-01-01"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        feedback.to_arrow().select(schema.names).cast(schema), folder / file_name(0, 0, n - 1), compression="zstd"
    )
    return n


def pyarrow_summary(data_dir: Path):
    """The summary's aggregates with pyarrow: exact distinct counts, p95 as polars computes
    it (nearest rank, per group), thumbs per response through a hash join on trace_id.
    pyarrow has no exact per-group quantile, so each group's latencies are collected as a
    list and ``pc.quantile`` runs on it."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    dataset = pads.dataset(data_dir / "traces", format="parquet", partitioning="hive")
    table = dataset.to_table(
        columns=[
            *SUMMARY_KEYS,
            "trace_id",
            "user_id",
            "session_id",
            "latency_ms",
            "cost_usd",
            "error",
            "cache_hit",
            "output_tokens",
        ]
    )
    table = table.append_column("is_error", pc.not_equal(table["error"], "none"))
    grouped = table.group_by(SUMMARY_KEYS).aggregate(
        [
            ([], "count_all"),
            ("user_id", "count_distinct"),
            ("session_id", "count_distinct"),
            ("latency_ms", "mean"),
            ("latency_ms", "list"),
            ("cost_usd", "sum"),
            ("is_error", "mean"),
            ("cache_hit", "mean"),
            ("output_tokens", "mean"),
        ]
    )
    p95 = [
        pc.quantile(values, q=0.95, interpolation="nearest")[0].as_py()
        for values in grouped.column("latency_ms_list").to_pylist()
    ]
    grouped = grouped.drop_columns(["latency_ms_list"]).append_column("latency_ms_p95", pa.array(p95))
    grouped = grouped.append_column(
        "cost_per_session", pc.divide(grouped["cost_usd_sum"], grouped["session_id_count_distinct"])
    )
    feedback = pads.dataset(data_dir / "feedback", format="parquet", partitioning="hive").to_table(
        columns=["trace_id", "kind"]
    )
    feedback = feedback.append_column("down", pc.equal(feedback["kind"], "thumbs_down")).append_column(
        "up", pc.equal(feedback["kind"], "thumbs_up")
    )
    reacted = feedback.group_by("trace_id").aggregate([("down", "max"), ("up", "max")])
    matched = table.select([*SUMMARY_KEYS, "trace_id"]).join(reacted, "trace_id", join_type="inner")
    thumbs = matched.group_by(SUMMARY_KEYS).aggregate([(c, "sum") for c in ("down_max", "up_max")])
    grouped = grouped.join(thumbs, SUMMARY_KEYS, join_type="left outer")
    for kind, column in (("down", "down_max_sum"), ("up", "up_max_sum")):
        rate = pc.divide(
            pc.cast(pc.fill_null(grouped[column], 0), pa.float64()), pc.cast(grouped["count_all"], pa.float64())
        )
        grouped = grouped.append_column(f"thumbs_{kind}_rate", rate)
    return grouped


FIGURES = ["responses", "users", "sessions", "latency_ms_p95", "thumbs_down_rate", "thumbs_up_rate"]


def same_figures(polars_summary, arrow_summary) -> bool:
    """Do both give the same responses, users, sessions, p95 and thumbs rates per group?"""
    import polars as pl

    mine = polars_summary.select(*SUMMARY_KEYS, *FIGURES).sort(SUMMARY_KEYS)
    theirs = (
        pl.from_arrow(arrow_summary)
        .select(
            *SUMMARY_KEYS,
            pl.col("count_all").alias("responses"),
            pl.col("user_id_count_distinct").alias("users"),
            pl.col("session_id_count_distinct").alias("sessions"),
            "latency_ms_p95",
            "thumbs_down_rate",
            "thumbs_up_rate",
        )
        .sort(SUMMARY_KEYS)
    )
    return mine.equals(theirs.cast(mine.schema))


COLD = """
import resource, sys, time
import sinks
started = time.perf_counter()
sinks.variant_summary(sys.argv[1]).collect(engine="streaming")  # as `safeswap query summary` collects it
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def cold_summary(data: Path) -> tuple[float, int]:
    """The first summary of a fresh process: what one `safeswap query summary` pays (every
    page its memory touches is new), imports excluded; and the process's peak RSS in MB."""
    out = subprocess.run(
        [sys.executable, "-c", COLD, str(data)], capture_output=True, text=True, check=True, cwd=ROOT, timeout=600
    )
    seconds, peak_mb = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(peak_mb)


def reading(rows: int, repeats: int = 3) -> dict:
    import sinks

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        started = time.perf_counter()
        write_synthetic_traces(data, rows)
        feedback_rows = write_synthetic_feedback(data)
        generated = time.perf_counter() - started
        cold = [cold_summary(data) for _ in range(repeats)]
        cold_s = [seconds for seconds, _ in cold]
        polars_s, arrow_s, approx_s = [], [], []
        # Each tool's repeats run together: pyarrow's memory pool keeps gigabytes after its
        # summary, and polars run right after it paid for that (+20-30% here).
        for _ in range(repeats):
            t0 = time.perf_counter()
            summary = sinks.variant_summary(data).collect(engine="streaming")
            polars_s.append(time.perf_counter() - t0)
        for _ in range(repeats):
            t0 = time.perf_counter()
            sinks.variant_summary(data, exact=False).collect(engine="streaming")
            approx_s.append(time.perf_counter() - t0)
        for _ in range(repeats):
            t0 = time.perf_counter()
            baseline = pyarrow_summary(data)
            arrow_s.append(time.perf_counter() - t0)
        assert summary["responses"].sum() == rows == sum(baseline.column("count_all").to_pylist())
        same = same_figures(summary, baseline)
    return {
        "rows": rows,
        "feedback_rows": feedback_rows,
        "generate_s": round(generated, 1),
        "polars_summary_s_cold_median": round(statistics.median(cold_s), 2),  # fresh process, first query
        "polars_summary_s_cold_max": round(max(cold_s), 2),
        "polars_summary_peak_rss_mb": max(peak for _, peak in cold),
        "polars_summary_s_median": round(statistics.median(polars_s), 2),  # warm: repeats in one process
        "polars_summary_s_best": round(min(polars_s), 2),
        "pyarrow_summary_s_median": round(statistics.median(arrow_s), 2),
        "pyarrow_summary_s_best": round(min(arrow_s), 2),
        "same_figures": same,  # responses, exact users and sessions, p95, thumbs rates per group
        "polars_approx_summary_s_median": round(statistics.median(approx_s), 2),
        "groups": summary.height,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-reading", action="store_true")
    args = parser.parse_args()
    result: dict = {}
    if not args.skip_throughput:
        result["throughput"] = throughput(args.events)
        print(result["throughput"], file=sys.stderr)
    if not args.skip_reading:
        result["reading"] = reading(args.rows)
        print(result["reading"], file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
