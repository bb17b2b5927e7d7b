"""Compaction: merge the small files of closed date partitions, one file per Kafka partition.

A date partition is closed when its date is before ``before`` (default: today,
UTC). In each of its folders, the files of one Kafka partition and generation are
merged into ``part-<p>-<lowest first>-<highest last>[-g<n>].parquet`` (rows in offset
order, the dataset's newest schema: older files get nulls for columns they lack).
Generations (a recreated topic's offsets from 0 again, sinks/writer.py) are never
merged together: their offset ranges overlap without being the same records.

1. the merged file is written to the staging folder and renamed into the folder;
   from that instant ``sinks.scan``/``list_files`` read the merged file *instead
   of* its inputs (a file whose offset range another covers is superseded), so a
   reader sees every row once, before and after;
2. the inputs are removed only ``grace_s`` later, so a reader that listed the
   folder just before the rename can still open them (no gaps).

It is safe beside a running worker: the worker writes only offsets above its
checkpoint, so a new file is never inside a merged range. Running it twice is
harmless (the second run finds one file per partition and does nothing).
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sinks.datasets import DATASETS, Dataset
from sinks.read import data_folders, select_files
from sinks.writer import STAGING, file_name, fsync_dir, parse_file_name, write_parquet


@dataclass
class CompactionReport:
    folders: int = 0
    merged_files: int = 0  # inputs merged in this run
    written_files: int = 0  # merged files written
    rows: int = 0
    removed_files: int = 0  # superseded inputs removed
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def conform(table: pa.Table, ds: Dataset) -> pa.Table:
    """A file's table in the dataset's newest schema (missing nullable columns as nulls)."""
    schema = ds.arrow_schema
    columns = []
    for field_ in schema:
        if field_.name in table.column_names:
            columns.append(table.column(field_.name).cast(field_.type))
        else:
            columns.append(pa.nulls(table.num_rows, type=field_.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _folder_date(folder: str) -> dt.date | None:
    name = os.path.basename(folder)
    if not name.startswith("date="):
        return None
    try:
        return dt.date.fromisoformat(name[len("date=") :])
    except ValueError:
        return None


def compact(
    data_dir: str | os.PathLike,
    datasets: list[str] | None = None,
    *,
    before: dt.date | None = None,
    grace_s: float = 10.0,
    min_files: int = 2,
    sleep=time.sleep,
) -> CompactionReport:
    """Merge the small files of closed date partitions; remove superseded inputs after ``grace_s``."""
    data_dir = Path(data_dir)
    before = before or dt.datetime.now(dt.UTC).date()
    report = CompactionReport()
    to_remove: list[str] = []
    for name in datasets or list(DATASETS):
        ds = DATASETS[name]
        staging = data_dir / STAGING / ds.name
        for folder, names in list(data_folders(data_dir / ds.name)):
            date = _folder_date(folder)
            if date is None or date >= before:
                continue
            kept, superseded = select_files(names)
            to_remove.extend(os.path.join(folder, n) for n in superseded)  # left over by an earlier run
            by_partition: dict[tuple[int, int], list[str]] = {}
            for n in kept:
                parsed = parse_file_name(n)
                by_partition.setdefault((parsed.partition, parsed.generation), []).append(n)
            report.folders += 1
            for (partition, generation), inputs in sorted(by_partition.items()):
                if len(inputs) < min_files:
                    continue
                try:
                    report.rows += _merge(ds, Path(folder), partition, generation, inputs, staging)
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the rest
                    where = f"partition {partition}" + (f" generation {generation}" if generation else "")
                    report.errors.append(f"{folder}: {where}: {exc}")
                    continue
                report.merged_files += len(inputs)
                report.written_files += 1
                to_remove.extend(os.path.join(folder, n) for n in inputs)
    if to_remove:
        if grace_s > 0:
            sleep(grace_s)
        for path in to_remove:
            try:
                os.unlink(path)
                report.removed_files += 1
            except FileNotFoundError:
                pass
    return report


def _merge(ds: Dataset, folder: Path, partition: int, generation: int, inputs: list[str], staging: Path) -> int:
    parsed = [parse_file_name(n) for n in inputs]
    first = min(p.first for p in parsed)
    last = max(p.last for p in parsed)
    tables = [conform(pq.read_table(folder / n), ds) for n in inputs]
    merged = pa.concat_tables(tables).sort_by("kafka_offset")
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f".compact-{uuid.uuid4().hex}.parquet.tmp"
    write_parquet(merged, tmp, fsync=True)
    os.replace(tmp, folder / file_name(partition, first, last, generation))
    fsync_dir(folder)
    return merged.num_rows
