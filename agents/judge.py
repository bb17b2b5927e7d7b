"""Judge agent: shadow pairs -> judgments (Anthropic) and per-partition shadow statistics.

For every shadow pair (``safeswap.shadow``, keyed by user_id):

1. fold it into the (rollout, partition) :class:`ShadowAccumulator` (tails, cost,
   latency: no API call needed, so this runs with or without a judge);
2. if the judge runs (ANTHROPIC_API_KEY set; otherwise one log line at start),
   judge it in the background: both orders, verdict by forced tool call
   (safeswap.judge). The loop waits while ``judge_concurrency`` pairs are being
   judged (backpressure), and the judge's own semaphore keeps at most
   ``judge_concurrency`` API calls in flight. A judged pair goes to
   ``safeswap.judgments`` (key rollout_id); a reply without a valid verdict goes
   to the DLQ with the reason (counted, never guessed);
3. every ``snapshot_interval_s`` each changed accumulator is published to
   ``safeswap.stats`` as a ``StatsSnapshot`` with ``source="shadow:<incarnation>"``
   and the counts in ``shadow``; the controller adds them up per (source,
   partition), so a restarted worker (a new incarnation) adds to what the old one
   published instead of replacing it.

Delivery: the offset of a pair is committed once the loop moves past it, so a
crash loses the verdicts of at most ``judge_concurrency`` pairs being judged
(they stay counted as pairs, not as judged), and may count the pairs between
the last commit and the crash twice.

Budget: each (rollout, partition) has ``judge_budget_usd / partitions``, so the
cap holds however the partitions are spread over workers. The spend is durable:
the loop reserves a pair's worst case before any call (``Judge.admit``) and
writes spent + reserved to the ``judge_spend`` table (changelog-backed, the
shadow topic's partitions) in the same step; a worker that restarts or takes
the partition over seeds its budget from it. A reservation settled below its
worst case lowers the stored figure at the key's next write (a timer or a
background task cannot write a Faust table), so the stored figure is never
below what was spent.

Live scores (the ``live_judge`` agent, registered only when the judge runs and
``judge_live_sample_rate`` > 0): the traces topic (keyed by user_id, partitioned
like the shadow topic), read after the app emitted it, so the app waits for
nothing. For every trace of a rollout whose latest decision (a FlagClient on the
decisions topic) is in canary or ramp:

1. count it in the (rollout, partition) :class:`LiveScoreAccumulator`;
2. ``Judge.admit_trace``: sampled by trace_id, scoreable (prompt and response
   texts), and its worst case reserved in the same ``judge_spend`` key as the
   shadow pairs of that partition (one budget per rollout, durable the same way);
3. score it in the background (one forced ``record_score`` call, sharing the
   judge's concurrency limit and retries): the score goes to
   ``safeswap.live_scores`` (key rollout_id), a reply without a valid score to
   the DLQ with the reason;
4. every ``snapshot_interval_s`` changed accumulators go to ``safeswap.stats`` with
   ``source="live_judge:<incarnation>"`` and the counts in ``live_judge``; the
   controller keeps them for the status and never decides on them.

Invalid traces are skipped: the outcomes agent, which reads the same topic, sends
them to the DLQ once. Delivery is the shadow pairs': a crash loses the scores in
flight and may count the traces since the last commit twice.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from functools import partial

import faust

from safeswap.core.live_scores import SCORED_STAGES, SOURCE_PREFIX, LiveScoreAccumulator
from safeswap.core.shadow_analysis import ShadowAccumulator
from safeswap.flags import FlagClient
from safeswap.judge import Budget, Judge, JudgeResult, ScoreAdmission
from schemas import InvalidEvent, StatsSnapshot, TraceEvent, decode, encode
from schemas.events import ShadowPair
from streams.app import raw_topic
from streams.deadletter import DeadLetters
from streams.settings import Settings

log = logging.getLogger(__name__)


def register(app: faust.App, settings: Settings) -> None:
    shadow_topic = raw_topic(app, settings, "shadow")
    judgments_topic = raw_topic(app, settings, "judgments")
    stats_topic = raw_topic(app, settings, "stats")
    dead_letters = DeadLetters(app, settings, agent="judge")
    incarnation = uuid.uuid4().hex[:12]
    source = f"shadow:{incarnation}"
    share = settings.judge_budget_usd / max(1, settings.partitions)
    judge = Judge.from_settings(settings, budget=Budget(share))
    spend = app.Table(
        "judge_spend",  # "rollout|partition" -> USD spent + reserved, as text
        partitions=settings.partitions,
        key_type=str,
        value_type=bytes,
        schema=faust.Schema(key_type=str, value_type=bytes, key_serializer="raw", value_serializer="raw"),
    )
    seeded: set[str] = set()  # budget keys whose stored spend this worker has taken over
    if judge is not None:
        log.warning(
            "judge: %s, %d calls in flight at most, %.0f%% of pairs, %.2f USD per rollout",
            judge.model,
            settings.judge_concurrency,
            100 * judge.sample_rate,
            settings.judge_budget_usd,
        )
    accumulators: dict[tuple[str, int], ShadowAccumulator] = {}
    seqs: dict[tuple[str, int], int] = {}
    dirty: set[tuple[str, int]] = set()
    pending: set[asyncio.Task] = set()
    slots = asyncio.Semaphore(max(1, settings.judge_concurrency))

    @app.on_partitions_revoked.connect
    async def forget_spend(app: faust.App, revoked, **kwargs) -> None:
        # A revoked shadow (or traces: partitioned alike) partition that comes back may have been
        # judged elsewhere meanwhile: seed its keys ("rollout|partition") again. Kept partitions
        # keep their seeding.
        judged = (settings.topic("shadow"), settings.topic("traces"))
        gone = {tp.partition for tp in revoked if tp.topic in judged}
        seeded.difference_update({key for key in seeded if int(key.rsplit("|", 1)[1]) in gone})

    def reserve(budget_key: str, admit):
        """Seed the key's budget from the table once, admit (``admit()``: sampling, the check
        and the reservation), and store spent + reserved before any call. Called in an agent's
        stream iteration: the table's changelog partition is the event's."""
        if budget_key not in seeded:
            if (stored := spend.get(budget_key)) is not None:
                judge.budget.seed(budget_key, float(stored))
            seeded.add(budget_key)
        admission = admit()
        if not isinstance(admission, JudgeResult):
            spend[budget_key] = repr(judge.budget.committed(budget_key)).encode()
        return admission

    async def judge_one(admission, message, key: tuple[str, int]) -> None:
        pair = admission.pair
        try:
            result = await judge.judge_admitted(admission)
            winner = result.judgment.winner if result.judgment is not None else None
            accumulators[key].add_judge_result(result.status, winner, result.cost_usd)
            dirty.add(key)
            if result.judgment is not None:
                await judgments_topic.send(key=pair.rollout_id.encode(), value=encode(result.judgment))
            elif result.status == "malformed":
                await dead_letters.send(message, result.reason)
            elif result.status == "error":
                log.warning("judge: pair %s not judged: %s", pair.event_id, result.reason)
        except Exception as exc:  # never let a background task die silently
            log.exception("judge: failed on pair %s", pair.event_id)
            await dead_letters.send(message, f"internal error: {exc!r}")
        finally:
            slots.release()

    @app.agent(shadow_topic, name="judge", concurrency=1)
    async def judge_agent(stream: faust.StreamT) -> None:
        async for event in stream.events():
            message = event.message
            try:
                pair = decode(ShadowPair, event.value)
            except InvalidEvent as exc:
                await dead_letters.send(message, str(exc))
                continue
            try:
                key = (pair.rollout_id, message.partition)
                accumulator = accumulators.setdefault(key, ShadowAccumulator())
                accumulator.add_pair(pair)
                dirty.add(key)
                if judge is None:
                    accumulator.add_judge_result("disabled")
                    continue
                budget_key = f"{pair.rollout_id}|{message.partition}"
                admission = reserve(budget_key, partial(judge.admit, pair, budget_key))
                if isinstance(admission, JudgeResult):  # not sampled, no answer to judge, or over budget
                    accumulator.add_judge_result(admission.status)
                    continue
                await slots.acquire()  # backpressure: at most judge_concurrency pairs being judged
                task = asyncio.create_task(judge_one(admission, message, key), name=f"judge-{pair.event_id}")
                pending.add(task)
                task.add_done_callback(pending.discard)
            except Exception as exc:  # never leave the loop
                log.exception("judge: failed on %s[%s]@%s", message.topic, message.partition, message.offset)
                await dead_letters.send(message, f"internal error: {exc!r}")

    @app.timer(settings.snapshot_interval_s)
    async def publish_shadow_stats() -> None:
        for snapshot in dirty_snapshots(dirty, accumulators, seqs, source, "shadow"):
            await stats_topic.send(key=snapshot.rollout_id.encode(), value=encode(snapshot))

    if judge is not None and judge.live_sample_rate > 0:
        register_live(app, settings, judge, reserve, slots, incarnation)


def dirty_snapshots(
    dirty: set[tuple[str, int]], accumulators: dict, seqs: dict[tuple[str, int], int], source: str, field: str
) -> list[StatsSnapshot]:
    """A snapshot of each (rollout, partition) accumulator changed since the last ones, each with
    the next ``seq``; its statistics in the StatsSnapshot field ``field`` (``shadow``, ``live_judge``)."""
    snapshots = []
    while dirty:
        key = dirty.pop()
        accumulator = accumulators[key]
        seqs[key] = seqs.get(key, 0) + 1
        rollout_id, partition = key
        snapshots.append(
            StatsSnapshot(
                rollout_id=rollout_id,
                partition=partition,
                seq=seqs[key],
                ts=accumulator.ts,
                users={},
                metrics={},
                source=source,
                **{field: accumulator.to_dict()},
            )
        )
    return snapshots


def register_live(app: faust.App, settings: Settings, judge: Judge, reserve, slots, incarnation: str) -> None:
    """The live judge: canary and ramp responses of both variants -> scores (see the module doc).
    ``reserve`` and ``slots`` are the shadow judge's: one budget table, one limit on work in flight."""
    traces_topic = raw_topic(app, settings, "traces")
    scores_topic = raw_topic(app, settings, "live_scores")
    stats_topic = raw_topic(app, settings, "stats")
    dead_letters = DeadLetters(app, settings, agent="live_judge")
    source = f"{SOURCE_PREFIX}{incarnation}"
    accumulators: dict[tuple[str, int], LiveScoreAccumulator] = {}
    seqs: dict[tuple[str, int], int] = {}
    dirty: set[tuple[str, int]] = set()
    pending: set[asyncio.Task] = set()
    spent: set[str] = set()  # budget keys whose refusal was logged
    log.warning(
        "live judge: scoring %.1f%% of canary and ramp responses (monitored, never a decision input)",
        100 * judge.live_sample_rate,
    )

    async def score_one(admission: ScoreAdmission, message, key: tuple[str, int]) -> None:
        trace = admission.trace
        try:
            result = await judge.score_admitted(admission)
            score = result.score.score if result.score is not None else None
            accumulators[key].add_result(trace.variant, result.status, trace.user_id, score, result.cost_usd)
            dirty.add(key)
            if result.score is not None:
                await scores_topic.send(key=trace.rollout_id.encode(), value=encode(result.score))
            elif result.status == "malformed":
                await dead_letters.send(message, result.reason)
            else:
                log.warning("live judge: trace %s not scored: %s", trace.trace_id, result.reason)
        except Exception as exc:  # never let a background task die silently
            log.exception("live judge: failed on trace %s", trace.trace_id)
            await dead_letters.send(message, f"internal error: {exc!r}")
        finally:
            slots.release()

    @app.agent(traces_topic, name="live_judge", concurrency=1)
    async def live_judge_agent(stream: faust.StreamT) -> None:
        flags = FlagClient(settings=settings)  # each rollout's stage, as the apps learn it
        await flags.start()
        try:
            async for event in stream.events():
                message = event.message
                raw = message.value or b""
                if len(raw) > settings.max_event_bytes:
                    continue  # the outcomes agent dead-letters it
                try:
                    trace = decode(TraceEvent, raw)
                except (InvalidEvent, RecursionError):
                    continue  # the outcomes agent dead-letters it (once, with the reason)
                try:
                    decision = flags.decision(trace.rollout_id)
                    if decision is None or decision.stage not in SCORED_STAGES:
                        continue
                    key = (trace.rollout_id, message.partition)
                    accumulator = accumulators.setdefault(key, LiveScoreAccumulator())
                    accumulator.add_trace(trace.variant, trace.ts)
                    dirty.add(key)
                    budget_key = f"{trace.rollout_id}|{message.partition}"
                    admission = reserve(budget_key, partial(judge.admit_trace, trace, budget_key, decision.stage))
                    if isinstance(admission, JudgeResult):  # not sampled, no texts, or over budget
                        accumulator.add_result(trace.variant, admission.status)
                        if admission.status == "budget" and budget_key not in spent:
                            spent.add(budget_key)
                            log.warning("live judge: scoring stops for %s: %s", budget_key, admission.reason)
                        continue
                    await slots.acquire()  # backpressure, shared with the shadow pairs
                    task = asyncio.create_task(score_one(admission, message, key), name=f"live-judge-{trace.trace_id}")
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                except Exception as exc:  # never leave the loop
                    log.exception("live judge: failed on %s[%s]@%s", message.topic, message.partition, message.offset)
                    await dead_letters.send(message, f"internal error: {exc!r}")
        finally:
            await flags.stop()

    @app.timer(settings.snapshot_interval_s)
    async def publish_live_scores() -> None:
        for snapshot in dirty_snapshots(dirty, accumulators, seqs, source, "live_judge"):
            await stats_topic.send(key=snapshot.rollout_id.encode(), value=encode(snapshot))
