"""Feeding the dashboard model: recorded (the Parquet datasets) or live (Kafka topics).

Both feed :class:`~safeswap.dashboard.model.DashboardModel` the same records in
the same order (plans first, then statistics in their topic's order, decisions,
judgments), so the page is the same either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
from datetime import datetime
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from safeswap.dashboard.model import EVENT_TOPICS, DashboardModel, coalesce, topic_kind
from schemas import (
    DeadLetter,
    Decision,
    GuardrailEvidence,
    InvalidEvent,
    RolloutPlan,
    RolloutStatus,
    StatsSnapshot,
    decode,
)
from streams.kafka import client_options
from streams.resume import log_ends
from streams.settings import Settings

log = logging.getLogger(__name__)
MAX_LOOKS = 150  # per rollout, recorded mode
LOOKS_PER_FETCH = 25  # live mode, per fetch of at most 500 records
EVENT_COUNT_INTERVAL_S = 15.0  # live mode: how often the events topics' ends are read (the DLQ rate)


# -- recorded -------------------------------------------------------------------------
def _ms(value: Any) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return int(value or 0)


def _json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def load_recorded(
    data_dir: str | os.PathLike, model: DashboardModel | None = None, max_looks: int = MAX_LOOKS
) -> DashboardModel:
    """A model filled from a dataset folder (``safeswap simulate --data DIR``, the worker's sinks).

    A rollout with more than ``max_looks`` snapshots is looked at ``max_looks``
    times or so (``coalesce``: as if its statistics had been published less often)."""
    import polars as pl

    import sinks

    model = model or DashboardModel()
    model.source = f"recorded: {os.fspath(data_dir)}"
    plans = sinks.scan("plans", data_dir=data_dir).sort("kafka_partition", "kafka_offset").collect()
    for row in plans.iter_rows(named=True):
        try:
            plan = msgspec.convert(_json(row.get("plan_json"), {}), RolloutPlan)
        except msgspec.ValidationError:
            continue
        model.add_plan(plan, _ms(row.get("ts")))
    stats = sinks.scan("stats", data_dir=data_dir).sort("rollout_id", "kafka_partition", "kafka_offset").collect()
    by_rollout: dict[str, list[StatsSnapshot]] = {}
    for row in stats.iter_rows(named=True):
        fields = {
            "rollout_id": row["rollout_id"],
            "partition": row.get("source_partition") or 0,
            "seq": row["seq"],
            "ts": _ms(row["ts"]),
            "users": _json(row.get("users_json"), {}),
            "metrics": _json(row.get("metrics_json"), {}),
            "models": _json(row.get("models_json"), {}),
            "counts": _json(row.get("counts_json"), {}),
            "first_exposures": _json(row.get("first_exposures_json"), {}),
            "crossover_users": row.get("crossover_users") or 0,
            "cohorts": _json(row.get("cohorts_json"), {}),  # null in files written before v3
            "cohort_exposures": _json(row.get("cohort_exposures_json"), {}),
            "cohort_starts": _json(row.get("cohort_starts_json"), []),
        }
        if row.get("source"):
            fields["source"] = row["source"]
            fields["shadow"] = _json(row.get("shadow_json"), {})  # the replayed shadow stage promotes on these
            fields["live_judge"] = _json(row.get("live_judge_json"), {})  # null in files written before v4
        try:
            by_rollout.setdefault(row["rollout_id"], []).append(msgspec.convert(fields, StatsSnapshot))
        except msgspec.ValidationError:
            continue
    for snapshots in by_rollout.values():
        for snapshot in coalesce(snapshots, math.ceil(len(snapshots) / max_looks)):
            model.add_snapshot(snapshot)
    decisions = sinks.scan("decisions", data_dir=data_dir).sort("rollout_id", "seq").collect()
    for row in decisions.iter_rows(named=True):
        evidence = [msgspec.convert(e, GuardrailEvidence) for e in (row.get("evidence") or [])]
        model.add_decision(
            Decision(
                rollout_id=row["rollout_id"],
                seq=row["seq"],
                ts=_ms(row["ts"]),
                action=row["action"],
                stage=row["stage"],
                percent=row["percent"] or 0.0,
                salt=row.get("salt") or "",
                reason=row["reason"] or "",
                plan_hash=row.get("plan_hash") or "",
                evidence=evidence,
                shadow_percent=row.get("shadow_percent") or 0.0,
                control=_json(row.get("control_json"), {}),
                candidate=_json(row.get("candidate_json"), {}),
                health=_json(row.get("health_json"), {}),
            )
        )
    judgments = sinks.scan("judgments", data_dir=data_dir)
    if "verdict" in judgments.collect_schema().names():
        counted = judgments.group_by("rollout_id", "verdict").agg(pl.len().alias("n")).collect()
        for row in counted.iter_rows(named=True):
            for _ in range(int(row["n"])):
                model.add_judgment(row["rollout_id"], row["verdict"])
    _load_dead_letters(model, data_dir)
    return model


def _load_dead_letters(model: DashboardModel, data_dir: str | os.PathLike) -> None:
    """The DLQ dataset into the model, and the records the events topics held: per partition,
    the highest offset any dataset row or dead letter came from, plus one."""
    import polars as pl

    import sinks

    letters = (
        sinks.scan("dlq", data_dir=data_dir).select("ts", "topic", "partition", "offset", "agent", "reason").collect()
    )
    for row in letters.iter_rows(named=True):
        model.add_dead_letter(
            DeadLetter(
                topic=row["topic"] or "",
                partition=row["partition"] or 0,
                offset=row["offset"] or 0,
                reason=row["reason"] or "",
                agent=row["agent"] or "",
                value_b64="",
                ts=_ms(row["ts"]),
            )
        )
    ends: dict[tuple[str, int], int] = {}
    bad = letters.with_columns(pl.col("topic").map_elements(topic_kind, return_dtype=pl.String).alias("kind"))
    frames = [bad.filter(pl.col("kind").is_in(EVENT_TOPICS)).select("kind", "partition", "offset")]
    for topic in EVENT_TOPICS:
        rows = (
            sinks.scan(topic, data_dir=data_dir)
            .select(
                pl.lit(topic).alias("kind"),
                pl.col("kafka_partition").alias("partition"),
                pl.col("kafka_offset").alias("offset"),
            )
            .collect()
        )
        frames.append(rows.cast({"partition": pl.Int32, "offset": pl.Int64}))
    frames[0] = frames[0].cast({"partition": pl.Int32, "offset": pl.Int64})
    for row in pl.concat(frames).group_by("kind", "partition").agg(pl.col("offset").max()).iter_rows(named=True):
        ends[(row["kind"], row["partition"])] = row["offset"] + 1
    model.set_event_count(sum(ends.values()))


# -- live -------------------------------------------------------------------------------
class _Judgment(msgspec.Struct):
    rollout_id: str
    winner: str


class LiveSource:
    """Tails plans, stats, decisions, status and judgments from the beginning into a model.

    One consumer without a group (it commits nothing, so it never disturbs the
    worker). Plans that arrive after their snapshots are handled by the model."""

    TOPICS = ("plans", "stats", "decisions", "status", "judgments", "dlq")

    def __init__(self, settings: Settings, model: DashboardModel | None = None) -> None:
        self.settings = settings
        self.model = model or DashboardModel()
        self.model.source = f"live: {settings.broker}"
        self.undecodable = 0
        self.restarts = 0  # times the read loop failed and reconnected
        self.connected = False
        self.error: str | None = None
        self._task: asyncio.Task | None = None
        self._counter: asyncio.Task | None = None
        self._event_partitions: list[TopicPartition] = []  # the events topics' partitions, counted for the DLQ rate
        self._consumer: AIOKafkaConsumer | None = None
        names = {settings.topic(t): t for t in self.TOPICS}
        self._kind = names
        # Next offset per partition: a reconnect resumes here, so nothing is folded in twice
        # (judgment counts are not idempotent).
        self._positions: dict[TopicPartition, int] = {}
        self._logged: set[str] = set()  # record kinds whose bad record was logged (once each)

    async def start(self) -> LiveSource:
        self._task = asyncio.create_task(self._run())
        self._counter = asyncio.create_task(self._count_events())
        return self

    async def _count_events(self) -> None:
        """The records on the events topics, now and then: the dead-letter rate's denominator."""
        while True:
            partitions = self._event_partitions
            if partitions:
                try:
                    ends = await log_ends(client_options(self.settings), partitions)
                    self.model.set_event_count(sum(ends.values()))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.debug("dashboard: could not count the events topics", exc_info=True)
            await asyncio.sleep(EVENT_COUNT_INTERVAL_S if partitions else 1.0)

    async def _connect(self) -> None:
        consumer = AIOKafkaConsumer(
            **client_options(self.settings),
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=200,
            request_timeout_ms=10_000,
        )
        await consumer.start()
        try:
            await consumer.topics()
            partitions = [
                TopicPartition(name, p)
                for name in self._kind
                for p in sorted(consumer.partitions_for_topic(name) or [])
            ]
            if not partitions:
                raise ConnectionError(
                    f"no safeswap topics with prefix {self.settings.topic_prefix!r} on "
                    f"{self.settings.broker}: run `safeswap topics create` or start a worker"
                )
            consumer.assign(partitions)
            self._event_partitions = [
                TopicPartition(self.settings.topic(t), p)
                for t in EVENT_TOPICS
                for p in sorted(consumer.partitions_for_topic(self.settings.topic(t)) or [])
            ]
            fresh = [tp for tp in partitions if tp not in self._positions]
            if fresh:
                await consumer.seek_to_beginning(*fresh)
            for tp in partitions:
                if tp in self._positions:
                    consumer.seek(tp, self._positions[tp])
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    async def _run(self) -> None:
        while True:
            while self._consumer is None:
                try:
                    await self._connect()
                    self.connected, self.error = True, None
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - keep trying; the page says why
                    self.error = f"cannot read {self.settings.broker}: {exc}"
                    await asyncio.sleep(2.0)
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.restarts += 1
                self.connected = False
                self.error = f"reading {self.settings.broker} failed ({exc!r}); reconnecting"
                log.warning("dashboard: live read loop failed, reconnecting", exc_info=True)
                consumer, self._consumer = self._consumer, None
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        await consumer.stop()
                await asyncio.sleep(2.0)

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=300, max_records=500)
            # Plans first within a batch: a rollout's snapshots need its plan.
            ordered = sorted(batches.items(), key=lambda item: self._kind.get(item[0].topic) != "plans")
            for tp, records in ordered:
                kind = self._kind.get(tp.topic, "")
                if kind == "stats":
                    self.ingest_snapshots([record.value for record in records])
                else:
                    for record in records:
                        self.ingest(kind, record.value, int(record.timestamp))
                if records:
                    self._positions[tp] = records[-1].offset + 1

    def _bad_record(self, kind: str, exc: BaseException) -> None:
        self.undecodable += 1  # the worker's DLQ has it; the dashboard only shows
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning(
                "dashboard: a %s record could not be shown (%s); later ones of this kind are only counted", kind, exc
            )

    def ingest_snapshots(self, values: list[bytes | None]) -> None:
        """One fetch of statistics. Snapshots are cumulative, so a long fetch (catching up
        on history at start) is looked at about LOOKS_PER_FETCH times, not once per
        snapshot; a fetch of a running worker's few new snapshots is looked at whole."""
        snapshots = []
        for value in values:
            try:
                snapshots.append(decode(StatsSnapshot, value or b""))
            except InvalidEvent as exc:
                self._bad_record("stats", exc)
        for snapshot in coalesce(snapshots, math.ceil(len(snapshots) / LOOKS_PER_FETCH)):
            try:
                self.model.add_snapshot(snapshot)
            except Exception as exc:  # noqa: BLE001 - decodes but cannot be folded in (bad histogram, say)
                self._bad_record("stats", exc)

    def ingest(self, kind: str, value: bytes | None, timestamp_ms: int) -> None:
        if not value:
            return
        try:
            if kind == "plans":
                self.model.add_plan(decode(RolloutPlan, value), timestamp_ms)
            elif kind == "stats":
                self.model.add_snapshot(decode(StatsSnapshot, value))
            elif kind == "decisions":
                self.model.add_decision(decode(Decision, value))
            elif kind == "status":
                self.model.add_status(decode(RolloutStatus, value))
            elif kind == "judgments":
                judgment = msgspec.json.decode(value, type=_Judgment)
                self.model.add_judgment(judgment.rollout_id, judgment.winner)
            elif kind == "dlq":
                self.model.add_dead_letter(decode(DeadLetter, value))
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the feed
            self._bad_record(kind, exc)

    async def stop(self) -> None:
        for task in (self._task, self._counter):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._consumer is not None:
            await self._consumer.stop()
