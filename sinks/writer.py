"""Writing one Kafka partition of one dataset to Parquet, crash-safe and idempotent.

Layout (``data_dir`` from settings)::

    <data_dir>/<dataset>/rollout_id=<id>/date=<YYYY-MM-DD>/part-<partition>-<first>-<last>.parquet
    <data_dir>/<dataset>/.../part-<partition>-<first>-<last>-g<generation>.parquet   after a topic recreation
    <data_dir>/_staging/<dataset>/.p<partition>-<first>-<last>-<n>.parquet.tmp   files being written
    <data_dir>/_sink/<dataset>/partition-<p>.json                               the writer's checkpoint

``<first>``/``<last>`` are the Kafka offsets of the *batch* (every file one flush
writes has the same name, in the folder of its rollout and date).

Generations: offsets identify a record only while the topic lives. When it is
deleted and created again (a fresh embedded broker, a reset cluster) offsets
start at 0 again, so the writer starts a new *generation* (:meth:`PartitionWriter.reset`):
its number is kept in the checkpoint, and files of generation ``g > 0`` carry a
``-g<g>`` suffix. Generation 0 keeps the plain name. Within one (partition,
generation) a file name still identifies a batch, so a replay overwrites instead
of duplicating; files of another generation are never overwritten, superseded
or merged with it (``sinks.read.select_files``, ``sinks.compact``).

The commit protocol of one flush (:meth:`PartitionWriter.flush`):

1. build one Arrow table per (rollout, date), write each to the staging folder
   (outside the dataset: a reader never sees a half-written file), fsync;
2. write the checkpoint with ``pending`` = the list of (staging, final) moves;
3. ``os.replace`` each staging file into place (atomic per file);
4. write the checkpoint with ``last_offset`` = the batch's last offset, no pending;
5. only then acknowledge the batch's records to Kafka (the caller's ``on_commit``).

Recovery (a new writer for the partition, after a crash or a rebalance) rolls a
pending flush forward (moves what is still in staging), deletes orphan staging
files, and from then on skips every record at or below ``last_offset``: records
Kafka redelivers because their offsets were never committed are already in the
dataset exactly once. Without a checkpoint (deleted by hand) the newest
generation among the partition's file names, and its highest ``<last>``, are used
instead.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from sinks.datasets import DAY_MS, Dataset
from streams.resume import record_mark

log = logging.getLogger(__name__)

FILE_RE = re.compile(r"^part-(\d+)-(\d+)-(\d+)(?:-g([1-9]\d*))?\.parquet$")
STAGING = "_staging"
STATE = "_sink"
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
_json = msgspec.json.Encoder()


@dataclass(frozen=True)
class Rotation:
    """When a partition's buffer becomes a file: whichever comes first."""

    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024  # raw record bytes buffered
    max_age_s: float = 30.0  # since the first buffered record
    idle_s: float = 2.0  # no new record for this long (end of a burst): flush now

    @classmethod
    def from_settings(cls, settings: Any) -> Rotation:
        return cls(
            max_rows=settings.sink_max_rows,
            max_bytes=settings.sink_max_bytes,
            max_age_s=settings.sink_max_age_s,
            idle_s=settings.sink_idle_s,
        )


class FileName(NamedTuple):
    partition: int
    first: int
    last: int
    generation: int = 0


def file_name(partition: int, first: int, last: int, generation: int = 0) -> str:
    suffix = f"-g{generation}" if generation else ""
    return f"part-{partition}-{first}-{last}{suffix}.parquet"


def parse_file_name(name: str) -> FileName | None:
    """``part-3-100-199.parquet`` -> (3, 100, 199, 0), ``part-3-0-9-g2.parquet`` -> (3, 0, 9, 2);
    None for anything else."""
    match = FILE_RE.match(name)
    if not match:
        return None
    return FileName(int(match[1]), int(match[2]), int(match[3]), int(match[4] or 0))


def hive_value(value: str) -> str:
    """A partition value as a path segment (percent-encoded; polars decodes it)."""
    return urllib.parse.quote(value, safe="")


def day_string(day: int) -> str:
    return dt.date.fromordinal(_EPOCH_ORDINAL + day).isoformat()


class Layout:
    """Where a dataset's files, staging files and checkpoints live."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.data_dir = Path(data_dir)

    def root(self, dataset: Dataset | str) -> Path:
        return self.data_dir / (dataset if isinstance(dataset, str) else dataset.name)

    def staging(self, dataset: Dataset) -> Path:
        return self.data_dir / STAGING / dataset.name

    def state(self, dataset: Dataset, partition: int) -> Path:
        return self.data_dir / STATE / dataset.name / f"partition-{partition}.json"

    def folder(self, dataset: Dataset, rollout_id: str | None, day: int) -> Path:
        path = self.root(dataset)
        if dataset.has_rollout:
            path = path / f"rollout_id={hive_value(rollout_id or '')}"
        return path / f"date={day_string(day)}"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: dict, fsync: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(json.dumps(payload).encode())
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_parquet(table: pa.Table, path: Path, fsync: bool) -> None:
    with open(path, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def _group_order(item: tuple) -> str:
    """Files of one flush in a fixed order: by (rollout_id, day) only. Sorting the items
    themselves by str() printed every buffered row (~8% of a loaded worker's GIL time)."""
    return str(item[0])


def build_table(dataset: Dataset, rows: list[tuple], offsets: list[int], partition: int) -> pa.Table:
    """The pinned-schema Arrow table for buffered rows (columns built once, at flush)."""
    columns = list(zip(*rows)) if rows else [()] * (dataset.ts_index + 1)
    arrays = []
    for col in dataset.columns:
        slot = dataset.ts_index if col.kind == "time" else dataset.slot(col.name)
        if slot is None:
            arrays.append(pa.nulls(len(rows), type=col.type))
            continue
        values: Any = columns[slot]
        if col.kind == "json":
            values = [None if v is None else _json.encode(v).decode() for v in values]
        elif col.kind == "builtins":
            values = msgspec.to_builtins(list(values))
        arrays.append(pa.array(values, type=col.type))
    arrays.append(pa.array([partition] * len(rows), type=pa.int32()))
    arrays.append(pa.array(offsets, type=pa.int64()))
    return pa.Table.from_arrays(arrays, schema=dataset.arrow_schema)


def highest_offset_in_files(root: Path, partition: int) -> tuple[int, int]:
    """(generation, highest ``<last>``) of the partition's newest generation among the file
    names under ``root``; (0, -1): no file."""
    highest = (0, -1)
    for _folder, _dirs, files in os.walk(root):
        for name in files:
            parsed = parse_file_name(name)
            if parsed and parsed.partition == partition and (parsed.generation, parsed.last) > highest:
                highest = (parsed.generation, parsed.last)
    return highest


class PartitionWriter:
    """Buffers one (dataset, Kafka partition) in row tuples and flushes them as files.

    Faust-free: the caller hands in decoded rows with their offsets and an opaque
    ack token per record; ``on_commit(tokens)`` is called once the records are
    durably in the dataset. ``fault(step)`` is a test hook called between steps.
    """

    def __init__(
        self,
        layout: Layout,
        dataset: Dataset,
        partition: int,
        rotation: Rotation = Rotation(),
        *,
        on_commit: Callable[[list], None] | None = None,
        fsync: bool = True,
        clock: Callable[[], float] = time.monotonic,
        fault: Callable[[str], None] | None = None,
    ) -> None:
        self.layout = layout
        self.dataset = dataset
        self.partition = partition
        self.rotation = rotation
        self.on_commit = on_commit
        self.fsync = fsync
        self.clock = clock
        self.fault = fault or (lambda step: None)
        self.files_written = 0
        self.rows_written = 0
        self._rollout_index = dataset.rollout_index
        self._ts_index = dataset.ts_index
        # (timestamp, value) of the newest record handed in, set by the caller; the
        # checkpoint keeps its fingerprint so a restart can tell a recreated topic
        # (offsets from 0 again) from a redelivery.
        self.tail: tuple[int, bytes | None] | None = None
        self.fingerprint: list | None = None
        self.generation = 0  # bumped each time the topic is found recreated (offsets from 0 again)
        self._reset_buffer()
        self.last_offset = self._recover()

    # -- buffer -------------------------------------------------------------------
    def _reset_buffer(self) -> None:
        self.rows: list[tuple] = []
        self.offsets: list[int] = []
        self.tokens: list = []
        self.first: int | None = None
        self.last: int | None = None
        self.nbytes = 0
        self.opened_at = 0.0
        self.touched_at = 0.0

    def _extend_range(self, offset: int) -> None:
        now = self.clock()
        if self.first is None:
            self.first = offset
            self.opened_at = now
        self.last = offset
        self.touched_at = now

    def seen(self, offset: int) -> bool:
        """True if this record is already in the dataset (or in the buffer): skip it."""
        return offset <= self.last_offset or (self.last is not None and offset <= self.last)

    def append(self, row: tuple, offset: int, nbytes: int, token: Any = None) -> None:
        self._extend_range(offset)
        self.rows.append(row)
        self.offsets.append(offset)
        self.tokens.append(token)
        self.nbytes += nbytes

    def pass_over(self, offset: int, token: Any = None) -> None:
        """A record that is not a row (sent to the DLQ): part of the batch's range, no row."""
        self._extend_range(offset)
        self.tokens.append(token)

    def full(self) -> bool:
        return len(self.rows) >= self.rotation.max_rows or self.nbytes >= self.rotation.max_bytes

    def due(self, now: float | None = None) -> bool:
        if self.first is None:
            return False
        now = self.clock() if now is None else now
        return (
            self.full()
            or now - self.opened_at >= self.rotation.max_age_s
            or now - self.touched_at >= self.rotation.idle_s
        )

    # -- flush ----------------------------------------------------------------------
    def _groups(self) -> dict[tuple[str | None, int], tuple[list[tuple], list[int]]]:
        ri, ti = self._rollout_index, self._ts_index
        groups: dict[tuple[str | None, int], tuple[list[tuple], list[int]]] = {}
        rows, offsets = self.rows, self.offsets
        first_key = (rows[0][ri] if ri is not None else None, rows[0][ti] // DAY_MS)
        if all((row[ri] if ri is not None else None, row[ti] // DAY_MS) == first_key for row in rows):
            return {first_key: (rows, offsets)}
        for row, offset in zip(rows, offsets):
            key = (row[ri] if ri is not None else None, row[ti] // DAY_MS)
            bucket = groups.get(key)
            if bucket is None:
                bucket = groups[key] = ([], [])
            bucket[0].append(row)
            bucket[1].append(offset)
        return groups

    def flush(self) -> int:
        """Write the buffer as files and commit it; returns the rows written."""
        if self.first is None:
            return 0
        first, last = self.first, self.last
        assert last is not None
        name = file_name(self.partition, first, last, self.generation)
        moves: list[tuple[str, str]] = []
        if self.rows:
            staging = self.layout.staging(self.dataset)
            staging.mkdir(parents=True, exist_ok=True)
            for n, ((rollout_id, day), (rows, offsets)) in enumerate(sorted(self._groups().items(), key=_group_order)):
                table = build_table(self.dataset, rows, offsets, self.partition)
                tmp = staging / f".p{self.partition}-{first}-{last}-{n}.parquet.tmp"
                write_parquet(table, tmp, self.fsync)
                moves.append((str(tmp), str(self.layout.folder(self.dataset, rollout_id, day) / name)))
            self.fault("staged")
            self._save_state(self.last_offset, {"first": first, "last": last, "moves": moves})
            self.fault("intent")
            for index, (tmp, final) in enumerate(moves):
                _move(tmp, final, self.fsync)
                self.fault(f"moved-{index}")
        if self.tail is not None:
            self.fingerprint = record_mark(*self.tail)
        self._save_state(last, None)
        self.fault("committed")
        rows_written = len(self.rows)
        tokens = self.tokens
        self.last_offset = last
        self.files_written += len(moves)
        self.rows_written += rows_written
        self._reset_buffer()
        if self.on_commit is not None:
            self.on_commit(tokens)
        return rows_written

    def discard(self) -> None:
        """Drop the buffer without acknowledging it (Kafka redelivers it to the next owner)."""
        self._reset_buffer()

    # -- checkpoint ---------------------------------------------------------------
    def _save_state(self, last_offset: int, pending: dict | None) -> None:
        write_json_atomic(
            self.layout.state(self.dataset, self.partition),
            {
                "dataset": self.dataset.name,
                "partition": self.partition,
                "last_offset": last_offset,
                "pending": pending,
                "fingerprint": self.fingerprint,
                "generation": self.generation,
                "updated_ms": int(time.time() * 1000),
            },
            self.fsync,
        )

    def _recover(self) -> int:
        path = self.layout.state(self.dataset, self.partition)
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            state = None
        except (OSError, ValueError) as exc:
            log.error(
                "sink %s[%d]: unreadable checkpoint %s (%s): using file names",
                self.dataset.name,
                self.partition,
                path,
                exc,
            )
            state = None
        keep: set[str] = set()
        if state is None:
            self.generation, last_offset = highest_offset_in_files(self.layout.root(self.dataset), self.partition)
        else:
            last_offset = int(state["last_offset"])
            self.fingerprint = state.get("fingerprint")
            self.generation = int(state.get("generation") or 0)  # checkpoints from before generations: 0
            pending = state.get("pending")
            if pending:
                for tmp, final in pending["moves"]:
                    if os.path.exists(tmp):
                        _move(tmp, final, self.fsync)
                    elif not os.path.exists(final):
                        log.error(
                            "sink %s[%d]: file of a pending flush is missing: %s",
                            self.dataset.name,
                            self.partition,
                            final,
                        )
                last_offset = int(pending["last"])
                log.warning(
                    "sink %s[%d]: rolled forward a flush interrupted at offsets %s-%s",
                    self.dataset.name,
                    self.partition,
                    pending["first"],
                    pending["last"],
                )
                self._save_state(last_offset, None)
        staging = self.layout.staging(self.dataset)
        prefix = f".p{self.partition}-"
        if staging.is_dir():
            for entry in staging.iterdir():
                if entry.name.startswith(prefix) and str(entry) not in keep:
                    entry.unlink(missing_ok=True)  # a flush that never reached its intent
        return last_offset

    def reset(self) -> int:
        """The topic was recreated (offsets start again): start a new generation from offset 0.
        The files already written stay where they are and keep their rows; the new
        generation's files carry its number, so none of them can take an old file's name.
        Returns the new generation."""
        self._reset_buffer()
        self.last_offset = -1
        self.fingerprint = None
        self.generation += 1
        self._save_state(-1, None)
        return self.generation


def _move(tmp: str, final: str, fsync: bool) -> None:
    folder = os.path.dirname(final)
    os.makedirs(folder, exist_ok=True)
    os.replace(tmp, final)
    if fsync:
        fsync_dir(Path(folder))


def write_rows(
    layout: Layout, dataset: Dataset, partition: int, rows: Iterable[tuple], first_offset: int = 0, fsync: bool = False
) -> PartitionWriter:
    """Write rows (as :meth:`Dataset.row` returns them) through the real protocol; for tools and tests."""
    writer = PartitionWriter(
        layout, dataset, partition, Rotation(max_rows=10**12, max_bytes=2**62, max_age_s=1e12, idle_s=1e12), fsync=fsync
    )
    offset = max(first_offset, writer.last_offset + 1)
    for row in rows:
        writer.append(row, offset, 0)
        offset += 1
    writer.flush()
    return writer
