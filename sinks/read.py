"""Reading the datasets with polars: ``scan(dataset, data_dir=...)`` -> LazyFrame.

What ``scan`` takes care of:

* only committed files: ``part-*.parquet`` inside the dataset folder; staging
  files live outside it and hidden/underscore files are skipped;
* typed hive partitions: ``rollout_id`` (String, percent-decoded) and ``date`` (Date);
* schema evolution: the dataset's newest pinned schema is passed, so older files
  without a newer (nullable) column read as nulls, and unknown columns are ignored;
* compaction in flight: a merged file ``part-<p>-<a>-<b>`` supersedes the files of
  the same partition and folder whose offset ranges it covers, so a reader that
  lists the folder between the merge's rename and the removal of its inputs sees
  every row once (``sinks.compact`` removes inputs only after a grace period).
  Only files of the same *generation* can supersede each other: offsets restart
  at 0 when a topic is recreated, so an older generation's range says nothing
  about a newer generation's files (``-g<n>`` names, sinks/writer.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from sinks.datasets import DATASETS, Dataset
from sinks.datasets import dataset as dataset_named
from sinks.writer import parse_file_name

HIDDEN = (".", "_")


def _polars_schema(ds: Dataset) -> pl.Schema:
    empty = pl.from_arrow(ds.arrow_schema.empty_table())
    assert isinstance(empty, pl.DataFrame)
    return empty.schema


def hive_schema(ds: Dataset) -> dict[str, pl.DataType]:
    return {key: (pl.Date if key == "date" else pl.String) for key in ds.partition_by}


def select_files(names: list[str]) -> tuple[list[str], list[str]]:
    """Split one folder's file names into (kept, superseded).

    Data files only (``part-<p>-<first>-<last>[-g<n>].parquet``). A file whose offset
    range lies inside another file's range, same folder, partition and generation, is
    superseded: a compaction merged it and has not removed it yet."""
    ranges: dict[tuple[int, int], list[tuple[int, int, str]]] = {}
    for name in names:
        parsed = parse_file_name(name)
        if parsed is not None:
            ranges.setdefault((parsed.partition, parsed.generation), []).append((parsed.first, parsed.last, name))
    kept: list[str] = []
    superseded: list[str] = []
    for items in ranges.values():
        # Sorted by first offset (widest first on ties), every kept range starts at or
        # before this one: it is covered iff some kept range ends at or after it.
        items.sort(key=lambda item: (item[0], -item[1]))
        reach = -1
        for _first, last, name in items:
            if last <= reach:
                superseded.append(name)
            else:
                reach = last
                kept.append(name)
    return kept, superseded


def data_folders(root: str | os.PathLike):
    """(folder, file names) for every non-hidden folder under a dataset root."""
    root = Path(root)
    if not root.is_dir():
        return
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(HIDDEN))
        yield folder, [name for name in files if not name.startswith(HIDDEN)]


def list_files(root: str | os.PathLike) -> list[str]:
    """The committed data files under a dataset root, superseded (compacted) files left out."""
    found: list[str] = []
    for folder, names in data_folders(root):
        found.extend(os.path.join(folder, name) for name in select_files(names)[0])
    return sorted(found)


def scan(dataset: str, data_dir: str | os.PathLike = "./safeswap-data") -> pl.LazyFrame:
    """One dataset as a polars LazyFrame (hive columns ``rollout_id`` and ``date`` included)."""
    ds = dataset_named(dataset)
    schema = _polars_schema(ds)
    files = list_files(Path(data_dir) / ds.name)
    if not files:
        empty = pl.DataFrame(schema=schema).lazy()
        return empty.with_columns([pl.lit(None, dtype=dtype).alias(key) for key, dtype in hive_schema(ds).items()])
    return pl.scan_parquet(
        files,
        hive_partitioning=True,
        hive_schema=hive_schema(ds),
        schema=schema,
        hidden_file_prefix=list(HIDDEN),
        missing_columns="insert",
        extra_columns="ignore",
    )


class UnreadableFile(ValueError):
    """A file named like a data file that is not readable Parquet (copied in by hand,
    truncated by a full disk): polars' own error does not say which file it was."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"{path}: not a readable Parquet file ({reason}) (fix: remove it, or move it out of the dataset folder)"
        )
        self.path = path


def footer_rows(path: str) -> int:
    """The rows of one data file, from its footer; FileNotFoundError if it is gone
    (a compaction removed it), :class:`UnreadableFile` if it is not Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:
        text = str(exc).strip().splitlines()
        raise UnreadableFile(path, text[0] if text else type(exc).__name__) from None


def _rollout_root(data_dir: str | os.PathLike, name: str, rollout_id: str | None) -> Path:
    from sinks.writer import hive_value

    root = Path(data_dir) / name
    if rollout_id is not None and DATASETS[name].has_rollout:
        root = root / f"rollout_id={hive_value(rollout_id)}"
    return root


def count_rows(
    data_dir: str | os.PathLike, datasets: list[str] | None = None, *, rollout_id: str | None = None
) -> dict[str, int]:
    """Rows per dataset (every registered dataset, 0 where nothing was written).

    ``rollout_id``: only that rollout's rows (datasets not partitioned by rollout,
    like ``dlq``, count in full). Reads only Parquet footers, not the data.
    Raises :class:`UnreadableFile` naming a file that is not Parquet."""
    counts: dict[str, int] = {}
    for name in datasets or list(DATASETS):
        total = 0
        for path in list_files(_rollout_root(data_dir, name, rollout_id)):
            try:
                total += footer_rows(path)
            except FileNotFoundError:  # removed by a compaction since the listing
                continue
        counts[name] = total
    return counts


def find_unreadable(data_dir: str | os.PathLike, datasets: list[str] | None = None) -> UnreadableFile | None:
    """The first data file of these datasets that is not readable Parquet (None: all read).
    For turning a failed query's anonymous read error into one that names the file."""
    try:
        count_rows(data_dir, datasets)
    except UnreadableFile as exc:
        return exc
    return None


def wait_for_rows(
    data_dir: str | os.PathLike,
    at_least: dict[tuple[str, ...], int],
    *,
    rollout_id: str | None = None,
    timeout_s: float = 20.0,
    poll_s: float = 0.25,
) -> dict[str, int]:
    """Wait until each group of datasets together holds its number of rows, e.g.
    ``{("traces", "feedback"): events_sent, ("decisions",): 3}`` (the worker is a separate
    process: its sinks flush on rotation). Returns the rows found per dataset; no error on
    timeout."""
    import time

    datasets = sorted({name for group in at_least for name in group})
    deadline = time.monotonic() + timeout_s
    while True:
        found = count_rows(data_dir, datasets, rollout_id=rollout_id)
        reached = all(sum(found.get(name, 0) for name in group) >= n for group, n in at_least.items())
        if reached or time.monotonic() >= deadline:
            return found
        time.sleep(poll_s)
