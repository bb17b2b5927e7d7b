"""The Parquet writer's commit protocol, without Kafka: layout, schema, crashes at every step."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import msgspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sinks import DATASETS, Layout, PartitionWriter, Rotation, scan
from sinks.writer import parse_file_name
from tests.support.sinks import BASE_TS, raw, trace

TRACES = DATASETS["traces"]
NEVER = Rotation(max_rows=10**9, max_bytes=2**60, max_age_s=1e9, idle_s=1e9)
DAY = 86_400_000


class Crash(Exception):
    pass


def records(n: int, start: int = 0):
    """(offset, row): two rollouts and two dates interleaved, so one flush writes several files."""
    for i in range(start, start + n):
        yield i, TRACES.row(raw(trace(i, rollout_id="r/a b" if i % 2 else "r2", ts=BASE_TS + (i % 3 == 0) * DAY)))


def feed(writer: PartitionWriter, items) -> None:
    for offset, row in items:
        if not writer.seen(offset):  # what the sink does with a redelivered record
            writer.append(row, offset, 100)


def dataset_files(data: Path) -> list[Path]:
    return sorted(p for p in (data / "traces").rglob("*") if p.is_file())


def test_files_land_in_hive_folders_named_by_offsets_with_the_pinned_schema(tmp_path: Path):
    writer = PartitionWriter(Layout(tmp_path), TRACES, 3, NEVER)
    feed(writer, records(40, start=100))
    assert writer.flush() == 40
    files = dataset_files(tmp_path)
    assert [f.relative_to(tmp_path / "traces").as_posix() for f in files] == [
        "rollout_id=r%2Fa%20b/date=2026-01-01/part-3-100-139.parquet",
        "rollout_id=r%2Fa%20b/date=2026-01-02/part-3-100-139.parquet",
        "rollout_id=r2/date=2026-01-01/part-3-100-139.parquet",
        "rollout_id=r2/date=2026-01-02/part-3-100-139.parquet",
    ]
    meta = pq.ParquetFile(files[0])
    schema = meta.schema_arrow
    assert schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert schema.metadata[b"safeswap.schema_version"] == b"2" and schema.metadata[b"safeswap.dataset"] == b"traces"
    assert meta.metadata.row_group(0).column(0).compression == "ZSTD"
    assert not any((tmp_path / "_staging" / "traces").iterdir())  # nothing left in staging
    frame = scan("traces", tmp_path).collect()
    assert frame.height == 40 and set(frame["rollout_id"]) == {"r/a b", "r2"}
    assert frame["date"].dtype == pl.Date and frame["kafka_partition"].unique().to_list() == [3]
    assert sorted(frame["kafka_offset"]) == list(range(100, 140))
    state = json.loads((tmp_path / "_sink" / "traces" / "partition-3.json").read_text())
    assert state["last_offset"] == 139 and state["pending"] is None


@pytest.mark.parametrize("step", ["staged", "intent", "moved-0", "moved-2", "committed"])
def test_a_crash_at_any_step_then_a_replay_leaves_every_record_exactly_once(tmp_path: Path, step: str):
    armed = [False]

    def fault(at: str) -> None:
        if armed[0] and at == step:
            raise Crash(at)

    writer = PartitionWriter(Layout(tmp_path), TRACES, 0, NEVER, fault=fault)
    feed(writer, records(60))
    writer.flush()  # a first batch commits
    armed[0] = True
    feed(writer, records(60, start=60))
    with pytest.raises(Crash):
        writer.flush()  # the process dies here
    # Whatever is visible is complete and readable: no partial file inside the dataset.
    for path in dataset_files(tmp_path):
        assert parse_file_name(path.name) is not None
        pq.ParquetFile(path).metadata  # noqa: B018 (a footer that reads)
    assert scan("traces", tmp_path).collect().height in range(60, 121)
    # Restart: the new writer recovers; Kafka redelivers everything after the last commit
    # (here, to be harsh, from offset 0), plus records that came in since.
    restarted = PartitionWriter(Layout(tmp_path), TRACES, 0, NEVER)
    feed(restarted, records(150))
    restarted.flush()
    frame = scan("traces", tmp_path).collect()
    assert frame.height == 150
    assert frame["event_id"].n_unique() == 150 and sorted(frame["kafka_offset"]) == list(range(150))
    assert not [p for p in (tmp_path / "_staging" / "traces").iterdir()]


def test_a_committed_batch_is_never_written_twice_and_without_a_checkpoint_file_names_decide(tmp_path: Path):
    writer = PartitionWriter(Layout(tmp_path), TRACES, 1, NEVER)
    feed(writer, records(30))
    writer.flush()
    again = PartitionWriter(Layout(tmp_path), TRACES, 1, NEVER)
    assert all(again.seen(offset) for offset in range(30)) and not again.seen(30)
    (tmp_path / "_sink" / "traces" / "partition-1.json").unlink()  # lost by hand
    recovered = PartitionWriter(Layout(tmp_path), TRACES, 1, NEVER)
    assert recovered.last_offset == 29
    other = PartitionWriter(Layout(tmp_path), TRACES, 2, NEVER)
    assert other.last_offset == -1  # another partition's files do not count


def test_rejected_records_extend_the_batch_range_without_rows(tmp_path: Path):
    writer = PartitionWriter(Layout(tmp_path), TRACES, 0, NEVER)
    writer.pass_over(0)
    writer.pass_over(1)
    assert writer.flush() == 0 and not dataset_files(tmp_path)
    assert PartitionWriter(Layout(tmp_path), TRACES, 0, NEVER).last_offset == 1  # not re-read


def test_rotation_by_rows_bytes_age_and_idle():
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731

    def writer(**limits) -> PartitionWriter:
        w = PartitionWriter.__new__(PartitionWriter)  # rotation logic only: no folders
        w.rotation, w.clock = Rotation(**{**NEVER.__dict__, **limits}), clock
        w._reset_buffer()
        return w

    row = TRACES.row(raw(trace(1)))
    by_rows = writer(max_rows=2)
    by_rows.append(row, 0, 10)
    assert not by_rows.due()
    by_rows.append(row, 1, 10)
    assert by_rows.full() and by_rows.due()
    by_bytes = writer(max_bytes=25)
    by_bytes.append(row, 0, 20)
    assert not by_bytes.due()
    by_bytes.append(row, 1, 20)
    assert by_bytes.due()
    by_age = writer(max_age_s=10, idle_s=3)
    by_age.append(row, 0, 1)
    for t in (2.0, 4.0, 6.0, 8.0):
        now[0] = t
        by_age.append(row, int(t), 1)
        assert not by_age.due()
    now[0] = 10.0
    assert by_age.due()  # 10 s since the first record, though never idle
    idle = writer(idle_s=3)
    now[0] = 0.0
    idle.append(row, 0, 1)
    now[0] = 2.9
    assert not idle.due()
    now[0] = 3.0
    assert idle.due()
    assert not writer().due()  # empty buffer: nothing to do


def test_a_record_that_does_not_validate_raises_naming_the_field():
    with pytest.raises(msgspec.ValidationError, match="latency_ms"):
        TRACES.row(raw(trace(1)).replace(b'"latency_ms":101.0', b'"latency_ms":-1'))
    with pytest.raises(msgspec.DecodeError):
        TRACES.row(b"\x00 not json")


def test_every_dataset_column_comes_from_its_struct():
    """Registry drift check: a column the wire struct does not have is written as nulls."""
    missing = {
        name: [c.attr for c in ds.value_columns if c.attr != "*" and c.attr not in ds.struct.__struct_fields__]
        for name, ds in DATASETS.items()
    }
    assert not any(missing.values()), missing
    for ds in DATASETS.values():
        ts = ds.arrow_schema.field("ts")
        assert ts.type == pa.timestamp("ms", tz="UTC"), ds.name
        assert ds.arrow_schema.names[-2:] == ["kafka_partition", "kafka_offset"]
        assert not set(ds.partition_by) & set(ds.arrow_schema.names)  # hive keys live in the path only


def test_staging_leftovers_of_a_flush_that_never_reached_its_intent_are_removed(tmp_path: Path):
    def fault(at: str) -> None:
        if at == "staged":
            raise Crash(at)

    writer = PartitionWriter(Layout(tmp_path), TRACES, 0, NEVER, fault=fault)
    feed(writer, records(10))
    with pytest.raises(Crash):
        writer.flush()
    assert os.listdir(tmp_path / "_staging" / "traces")
    PartitionWriter(Layout(tmp_path), TRACES, 0, NEVER)
    assert not os.listdir(tmp_path / "_staging" / "traces")
    assert not dataset_files(tmp_path)


def test_a_recreated_topic_starts_a_generation_whose_files_nothing_overwrites_hides_or_merges(tmp_path: Path):
    """Offsets restart at 0 when a topic is recreated (a fresh embedded broker): the new
    generation's batches must neither take an old file's name (overwrite) nor sit inside an
    old file's offset range (hidden by scan, then deleted by compact)."""
    from sinks import compact

    def batch(writer: PartitionWriter, offsets: range, first_event: int) -> None:
        for offset in offsets:
            writer.append(TRACES.row(raw(trace(first_event + offset))), offset, 100)
        writer.flush()

    writer = PartitionWriter(Layout(tmp_path), TRACES, 0, NEVER)
    batch(writer, range(0, 30), 0)
    batch(writer, range(30, 60), 0)
    writer.reset()  # what the sink does when it finds the topic recreated (agents/sink.py)
    assert writer.last_offset == -1
    batch(writer, range(0, 30), 1000)  # the same offsets as the first file of generation 0
    batch(writer, range(30, 45), 1000)  # inside the second file's range
    produced = {f"t-{i}" for i in range(60)} | {f"t-{1000 + i}" for i in range(45)}

    def check() -> None:
        frame = scan("traces", tmp_path).collect()
        assert frame.height == 105 and set(frame["event_id"]) == produced

    check()
    names = sorted(p.name for p in dataset_files(tmp_path))
    assert names == ["part-0-0-29-g1.parquet", "part-0-0-29.parquet", "part-0-30-44-g1.parquet", "part-0-30-59.parquet"]
    assert [parse_file_name(n).generation for n in names] == [1, 0, 1, 0]

    restarted = PartitionWriter(Layout(tmp_path), TRACES, 0, NEVER)
    assert (restarted.generation, restarted.last_offset) == (1, 44)
    (tmp_path / "_sink" / "traces" / "partition-0.json").unlink()  # lost by hand: the file names decide
    recovered = PartitionWriter(Layout(tmp_path), TRACES, 0, NEVER)
    assert (recovered.generation, recovered.last_offset) == (1, 44)
    assert all(recovered.seen(offset) for offset in range(45)) and not recovered.seen(45)

    report = compact(tmp_path, ["traces"], before=dt.date(2100, 1, 1), grace_s=0)
    assert report.written_files == 2 and report.removed_files == 4 and not report.errors
    assert sorted(p.name for p in dataset_files(tmp_path)) == ["part-0-0-44-g1.parquet", "part-0-0-59.parquet"]
    check()
