"""Reading the datasets: scan options, schema evolution, named queries, SQL, compaction."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from pathlib import Path

import msgspec
import polars as pl
import pyarrow.parquet as pq

import sinks
from schemas import Decision, GuardrailEvidence
from sinks import DATASETS, Layout, compact, count_rows, list_files, scan
from sinks.writer import write_rows
from tests.support.sinks import BASE_TS, feedback, raw, trace

TRACES = DATASETS["traces"]


def write_traces(data: Path, events, partition: int = 0, first_offset: int = 0):
    return write_rows(Layout(data), TRACES, partition, [TRACES.row(raw(e)) for e in events], first_offset)


def test_files_from_before_and_after_a_new_optional_column_read_as_one_table(tmp_path: Path):
    # An older version of the dataset: the same columns without the last one.
    old = dataclasses.replace(TRACES, columns=TRACES.columns[:-1], version=0)
    rows = [TRACES.row(raw(trace(i))) for i in range(5)]
    write_rows(Layout(tmp_path), old, 0, [r[: len(old.value_columns)] + r[-2:] for r in rows])
    newer = [trace(i) for i in range(5, 10)]
    for event in newer:
        event.segment = {"locale": f"l{event.event_id}"}
    write_traces(tmp_path, newer, first_offset=5)
    files = list_files(tmp_path / "traces")
    assert len(files) == 2 and "segment_json" not in pq.ParquetFile(files[0]).schema_arrow.names
    frame = scan("traces", tmp_path).sort("kafka_offset").collect()
    assert frame.height == 10
    assert frame["segment_json"].to_list() == [None] * 5 + [f'{{"locale":"lt-{i}"}}' for i in range(5, 10)]


def test_scan_ignores_staging_hidden_and_foreign_files_and_types_hive_columns(tmp_path: Path):
    write_traces(tmp_path, [trace(i, rollout_id="a=b/c d") for i in range(3)])
    folder = Path(list_files(tmp_path / "traces")[0]).parent
    (folder / ".part-0-9-9.parquet").write_bytes(b"half a file")
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / "notes.txt").write_text("x")
    (tmp_path / "_staging" / "traces" / ".p0-5-9-0.parquet.tmp").write_bytes(b"PAR1 partial")
    frame = scan("traces", tmp_path).collect()
    assert frame.height == 3
    assert frame.schema["rollout_id"] == pl.String and frame["rollout_id"].unique().to_list() == ["a=b/c d"]
    assert frame.schema["date"] == pl.Date and frame.schema["ts"] == pl.Datetime("ms", "UTC")
    # The documented raw recipe reads the same thing.
    recipe = pl.scan_parquet(
        str(tmp_path / "traces") + "/**/*.parquet",
        hive_partitioning=True,
        hidden_file_prefix=[".", "_"],
        missing_columns="insert",
        extra_columns="ignore",
    )
    assert recipe.select(pl.len()).collect().item() == 3


def test_an_empty_dataset_scans_as_an_empty_typed_frame(tmp_path: Path):
    frame = scan("judgments", tmp_path).collect()
    assert frame.height == 0 and {"verdict", "rollout_id", "date", "kafka_offset"} <= set(frame.columns)
    assert count_rows(tmp_path) == {name: 0 for name in DATASETS}


def test_named_queries_answer_the_three_questions(tmp_path: Path):
    events = [
        trace(i, user=f"u{i % 4}", variant="control" if i < 8 else "candidate", model_version="m1" if i < 8 else "m2")
        for i in range(12)
    ]
    write_traces(tmp_path, events)
    fb = DATASETS["feedback"]
    write_rows(Layout(tmp_path), fb, 0, [fb.row(raw(feedback(i))) for i in (8, 9, 9)])  # 9 twice: one response
    summary = sinks.variant_summary(tmp_path).collect()
    by_variant = {row["variant"]: row for row in summary.to_dicts()}
    assert by_variant["control"]["responses"] == 8 and by_variant["control"]["model_version"] == "m1"
    assert by_variant["candidate"]["thumbs_down_rate"] == 2 / 4 and by_variant["control"]["thumbs_down_rate"] == 0
    assert by_variant["candidate"]["users"] == 4 and by_variant["candidate"]["cost_per_response"] == 0.01
    both = sinks.users_in_both_arms(tmp_path).collect()
    assert sorted(both["user_id"]) == ["u0", "u1", "u2", "u3"]
    assert both.filter(pl.col("user_id") == "u0")["control_responses"].item() == 2

    dd = DATASETS["decisions"]
    evidence = [
        GuardrailEvidence(
            metric="thumbs_down_rate",
            status="breach",
            estimate=1.0,
            ci_low=0.5,
            ci_high=2.0,
            p_value=0.01,
            threshold=0.2,
            users_control=8,
            users_candidate=4,
        )
    ]
    decisions = [
        Decision(
            rollout_id="r1",
            seq=1,
            ts=BASE_TS,
            action="start",
            stage="canary",
            percent=5,
            salt="r1",
            reason="plan registered",
        ),
        Decision(
            rollout_id="r1",
            seq=2,
            ts=BASE_TS + 60_000,
            action="rollback",
            stage="rolled_back",
            percent=0,
            salt="r1",
            reason="thumbs down",
            evidence=evidence,
        ),
    ]
    write_rows(Layout(tmp_path), dd, 0, [dd.row(raw(d)) for d in decisions])
    timeline = sinks.decision_timeline(tmp_path, rollout_id="r1").collect()
    assert timeline["action"].to_list() == ["start", "rollback"]
    assert timeline["breached"].to_list() == ["", "thumbs_down_rate"]
    # docs/data.md, recipe 2: every decision, one row per evidence item (none: one row of nulls).
    recipe = (
        sinks.scan("decisions", data_dir=tmp_path)
        .filter(pl.col("rollout_id") == "r1")
        .sort("seq")
        .with_columns(pl.when(pl.col("evidence").list.len() > 0).then(pl.col("evidence")))
        .explode("evidence")
        .unnest("evidence")
        .select(
            "seq",
            "ts",
            "action",
            "stage",
            "percent",
            "metric",
            "status",
            "estimate",
            "ci_low",
            "ci_high",
            "threshold",
            "users_control",
            "users_candidate",
            "reason",
        )
        .collect()
    )
    assert recipe["seq"].to_list() == [1, 2] and recipe["metric"].to_list() == [None, "thumbs_down_rate"]

    counted = sinks.sql(
        tmp_path, "SELECT variant, COUNT(*) AS n FROM traces GROUP BY variant ORDER BY variant"
    ).collect()
    assert counted.to_dicts() == [{"variant": "candidate", "n": 4}, {"variant": "control", "n": 8}]
    assert count_rows(tmp_path, ["traces", "feedback"], rollout_id="r1") == {"traces": 12, "feedback": 3}
    assert count_rows(tmp_path, ["traces"], rollout_id="other") == {"traces": 0}


def test_compaction_merges_closed_dates_and_a_concurrent_reader_never_sees_duplicates_or_gaps(tmp_path: Path):
    for batch in range(4):  # four small files per partition in a closed date
        for partition in (0, 1):
            write_traces(
                tmp_path,
                [trace(batch * 10 + i + partition * 1000) for i in range(10)],
                partition,
                first_offset=batch * 10,
            )
    today = dt.datetime.now(dt.UTC)
    open_events = [trace(5000 + i, ts=int(today.timestamp() * 1000)) for i in range(3)]
    write_traces(tmp_path, open_events, 0, first_offset=40)
    before = scan("traces", tmp_path).collect()
    assert before.height == 83

    seen_during_grace: list[pl.DataFrame] = []

    def reader_during_grace(_seconds: float) -> None:
        # The merged files are in place, their inputs not yet removed: both are listed.
        files = sorted(p for p in (tmp_path / "traces").rglob("part-*.parquet"))
        assert len(files) == 4 * 2 + 2 + 1
        seen_during_grace.append(scan("traces", tmp_path).collect())

    report = compact(tmp_path, ["traces"], grace_s=5, sleep=reader_during_grace)
    assert report.merged_files == 8 and report.written_files == 2 and report.removed_files == 8 and not report.errors
    after = scan("traces", tmp_path).collect()
    for frame in (seen_during_grace[0], after):
        assert frame.height == 83 and frame["event_id"].n_unique() == 83
        assert frame.sort("event_id").equals(before.sort("event_id"))
    names = sorted(os.path.basename(p) for p in list_files(tmp_path / "traces"))
    assert names == ["part-0-0-39.parquet", "part-0-40-42.parquet", "part-1-0-39.parquet"]  # today's file untouched
    again = compact(tmp_path, ["traces"], grace_s=0)
    assert again.merged_files == 0 and again.removed_files == 0


def test_summary_groups_keep_apart_key_tuples_that_share_values(tmp_path: Path):
    # The group is one hash of the four keys: swapped or shifted values must not merge.
    versions = [("a", "b"), ("b", "a"), ("a", "a"), ("b", "b"), ("ab", "c"), ("a", "bc")]
    write_traces(
        tmp_path,
        [trace(i, variant="control", prompt_version=p, model_version=m) for i, (p, m) in enumerate(versions * 2)],
    )
    summary = sinks.variant_summary(tmp_path).collect()
    assert sorted(zip(summary["prompt_version"], summary["model_version"])) == sorted(versions)
    assert summary["responses"].to_list() == [2] * len(versions)


def test_the_summary_counts_users_and_sessions_exactly_and_gives_p95_at_any_size(tmp_path: Path):
    import random

    rng = random.Random(3)
    events = [
        trace(i, user=f"u{rng.randrange(3000)}", variant=rng.choice(["control", "candidate"])) for i in range(6000)
    ]
    for n, i in enumerate(range(0, 6000, 1500)):  # several files, as a running worker leaves them
        write_traces(tmp_path, events[i : i + 1500], n % 2, first_offset=i)
    # Reactions to 900 of the traces, 60 of them twice (a thumbs-down on top): one response each.
    reacted = rng.sample(range(6000), 900)
    reactions = [feedback(i, rng.choice(["thumbs_down", "thumbs_up", "edit"])) for i in reacted]
    reactions += [msgspec.structs.replace(feedback(i), event_id=f"again-{i}") for i in reacted[:60]]
    fb = DATASETS["feedback"]
    write_rows(Layout(tmp_path), fb, 0, [fb.row(raw(event)) for event in reactions])
    keys = ["rollout_id", "variant", "prompt_version", "model_version"]
    # The same figures the plain way: strings, no hashing, one pass.
    traces, kinds = scan("traces", tmp_path), scan("feedback", tmp_path).select("trace_id", "kind")
    thumbs = (
        traces.join(kinds, on="trace_id")
        .group_by(keys)
        .agg(
            down=pl.col("trace_id").filter(pl.col("kind") == "thumbs_down").n_unique(),
            up=pl.col("trace_id").filter(pl.col("kind") == "thumbs_up").n_unique(),
        )
    )
    expected = (
        traces.group_by(keys)
        .agg(
            responses=pl.len(),
            users=pl.col("user_id").n_unique(),
            sessions=pl.col("session_id").n_unique(),
            latency_ms_p95=pl.col("latency_ms").quantile(0.95),
        )
        .join(thumbs, on=keys, how="left")
        .select(
            *keys,
            "users",
            "sessions",
            "latency_ms_p95",
            thumbs_down_rate=pl.col("down").fill_null(0) / pl.col("responses"),
            thumbs_up_rate=pl.col("up").fill_null(0) / pl.col("responses"),
        )
        .sort(keys)
        .collect()
    )
    figures = ["users", "sessions", "latency_ms_p95", "thumbs_down_rate", "thumbs_up_rate"]
    for engine in ("streaming", "in-memory"):
        summary = sinks.variant_summary(tmp_path).collect(engine=engine).sort(keys)
        assert summary.select(*keys, *figures).equals(expected), engine
    assert summary.columns == sinks.queries.SUMMARY_COLUMNS  # the order the CLI prints
    assert expected["users"].sum() > 2000 and expected["thumbs_down_rate"].min() > 0  # enough for a miscount to show
    approx = sinks.variant_summary(tmp_path, exact=False).collect().sort(keys)
    assert "latency_ms_p95" not in approx.columns and approx["responses"].sum() == 6000
    assert approx.select(*keys, "thumbs_down_rate", "thumbs_up_rate").equals(
        expected.select(*keys, "thumbs_down_rate", "thumbs_up_rate")
    )


def test_decisions_keep_the_segment_guardrails_evidence(tmp_path: Path):
    from schemas import Decision, GuardrailEvidence, encode
    from sinks.datasets import DATASETS

    decisions = DATASETS["decisions"]
    evidence = GuardrailEvidence(
        metric="thumbs_down_rate",
        status="breach",
        estimate=0.5,
        ci_low=0.2,
        ci_high=0.8,
        p_value=0.001,
        threshold=0.2,
        users_control=900,
        users_candidate=300,
        reason="thumbs_down_rate +50.0% vs control in locale=ja exceeds the +20.0% limit",
        segment="locale=ja",
    )
    decision = Decision(
        rollout_id="r1", seq=3, ts=1_700_000_000_000, action="rollback", stage="rolled_back", percent=0.0,
        salt="s", reason=evidence.reason, segment_evidence=[evidence],
    )  # fmt: skip
    write_rows(Layout(tmp_path), decisions, 0, [decisions.row(encode(decision))])
    (row,) = scan("decisions", tmp_path).collect()["segment_evidence"].to_list()
    assert [(e["segment"], e["status"], e["users_candidate"], e["reason"]) for e in row] == [
        ("locale=ja", "breach", 300, evidence.reason)
    ]


def test_live_scores_land_in_their_dataset_with_pinned_types_and_answer_sql(tmp_path: Path):
    from schemas.events import LiveScore

    scores = DATASETS["live_scores"]
    records = [
        LiveScore(
            event_id=f"t-{i}:score",
            ts=BASE_TS + i * 1000,
            rollout_id="r1",
            variant="candidate" if i % 2 else "control",
            trace_id=f"tr{i}",
            user_id=f"u{i % 3}",
            trace_event_id=f"t-{i}",
            stage="canary",
            judge_model="claude-haiku-4-5-20251001",
            rubric_hash="abc",
            score=3 + i,
            reason="scripted",
            cost_usd=0.001,
        )
        for i in range(6)
    ]
    write_rows(Layout(tmp_path), scores, 0, [scores.row(raw(r)) for r in records])
    frame = scan("live_scores", tmp_path).collect()
    assert frame.height == 6 and frame.schema["score"] == pl.Int64 and frame.schema["ts"] == pl.Datetime("ms", "UTC")
    assert frame["event_id"].to_list() == [f"t-{i}:score" for i in range(6)] and set(frame["rollout_id"]) == {"r1"}
    by_variant = sinks.sql(
        tmp_path, "SELECT variant, AVG(score) AS mean, COUNT(*) AS n FROM live_scores GROUP BY variant ORDER BY variant"
    ).collect()
    assert by_variant.to_dicts() == [
        {"variant": "candidate", "mean": 6.0, "n": 3},  # scores 4, 6, 8
        {"variant": "control", "mean": 5.0, "n": 3},  # scores 3, 5, 7
    ]
    assert count_rows(tmp_path)["live_scores"] == 6
