"""Outcomes as a pure step function: traces + feedback of one partition -> per-variant statistics.

:class:`OutcomeProcessor` is the whole state of one source partition (both input
topics are keyed by user_id, so partition *p* of traces and of feedback hold the
same users). The outcomes agent (agents/outcomes.py) and ``safeswap replay``
(safeswap/tools/replay.py) drive the *same* object; nothing in here knows about Kafka,
wall clocks (``now_ms`` is passed in) or Faust.

Per (rollout, user) the state holds (:class:`UserState`):

* ``open``: the requests of the sessions not closed yet, sorted by event time
  (safeswap.core.sessions derives the sessions from them);
* ``by_trace``: responses kept for the trace/feedback join until the watermark
  passes ``ts + join_ttl`` (safeswap.core.join);
* ``pending``: feedback that arrived before its trace;
* ``ids``: event ids seen, for dedup (forgotten once a repeat would be late);
* ``arm``, ``cohort`` and ``segment``: the variant and the split period of the user's
  first exposure to the rollout, and the segment values its first trace carried.

The statistics are kept per *cell* = (rollout, arm, cohort, segment) (:class:`VariantSums`),
and within a cell per hash bucket of the user id (``safeswap.core.metrics.UNIT_BUCKETS``):
every response and its feedback add to the running totals of the user's bucket, from
which the sums of squares are kept exact. A user never changes bucket, arm or cohort,
so a user who comes back after days adds to the same totals: the user is the unit
for the whole rollout, in constant memory (docs/statistics.md "The unit").

* **Arm (intention to treat).** A user counts in the arm first served. A control
  user moved to the candidate by a ramp step keeps counting in control (so does a
  candidate user later served control, a leak that the crossover check reports);
  which variant served each response is still counted (``users``, ``models``).
* **Cohort.** The split period (``Decision.cohort_starts``, passed in through
  :meth:`OutcomeProcessor.on_decision`) in which the user was first exposed. Within a
  cohort the split was fixed when its users arrived, so the arms are comparable; the
  controller combines cohorts with Cochran-Mantel-Haenszel weights, which removes the
  time bias of pooling a ramp whose split changed while the baseline moved.
* **Segment.** For a plan with segment guardrails (``Decision.segments``: keys such as
  ``locale``), the values of those keys on the user's first trace, as a label
  (``locale=ja,tier=free``; ``""`` without segment keys). A snapshot adds the cells of
  all labels for the whole population, and those of each ``key=value`` for the segment
  guardrails; each (label, bucket) is then its own unit, which keeps units independent.
  At most ``MAX_SEGMENT_VALUES`` values of a key are kept per partition, later ones
  count as ``other``.

A user's state is released when the watermark has passed the session gap and the
join TTL of everything it holds. What must outlive it is kept compactly: per
(rollout, arm, cohort, segment) the 64-bit hashes of the users first exposed there
(``first_seen``), and per (rollout, variant) those served it outside their arm
(``also_served``), so ``users`` is the exact number of distinct users and a
returning user finds its arm and cohort again. The metric contract is
docs/metrics.md.

Determinism: every decision is a function of event times and the watermarks of
safeswap.core.dedup, so two runs over the same per-topic logs give the same metrics
however the two topics interleave (up to float summation order). That is what
makes the crash recovery (replay from a checkpoint) and ``safeswap replay``
agree with the streaming path. A checkpoint carries the state as plain data:
:meth:`OutcomeProcessor.to_state` and :meth:`OutcomeProcessor.from_state`
(schemas/state.py).
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, get_args

import msgspec
from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein

from safeswap.core.dedup import DistinctHashes, DueQueue, Watermarks, id_hash
from safeswap.core.join import PendingJoin, expired, joinable
from safeswap.core.metrics import M, VariantSums
from safeswap.core.sessions import closable_sessions, first_session_end, same_session
from schemas import (
    STATE_VERSION,
    Decision,
    FeedbackEvent,
    HeldResponse,
    HeldUser,
    InvalidEvent,
    OutcomeRecord,
    PartitionState,
    PendingFeedback,
    StatsSnapshot,
    TraceEvent,
    decode,
)
from schemas.events import Variant, rfc3339

TRACE, FEEDBACK = "trace", "feedback"
FAR_FUTURE = 1 << 62
LATE_REASONS = ("late_event", "feedback_unjoined")
INVALID_REASONS = ("invalid", "too_large", "future_timestamp")
# Values of one segment key kept apart per (rollout, partition); later ones are "other".
MAX_SEGMENT_VALUES = 16
SEGMENT_MISSING, SEGMENT_OTHER = "(missing)", "other"

_THUMBS_DOWN, _THUMBS_UP, _EDIT = M["thumbs_down_rate"], M["thumbs_up_rate"], M["edit_rate"]
_EDIT_DIST, _EDIT_WORDS = M["edit_distance_mean"], M["edit_distance_words_mean"]
_RETRY, _FOLLOW = M["retry_rate"], M["follow_up_rate"]
_TURNS, _ABANDON, _COST_SESSION = M["session_turns_mean"], M["abandon_rate"], M["cost_per_session_mean"]
_ERROR, _LATENCY, _COST, _CACHE = M["error_rate"], M["latency_ms_mean"], M["cost_usd_mean"], M["cache_hit_rate"]
_LATENCY_HIT, _LATENCY_MISS = M["latency_ms_mean_cache_hit"], M["latency_ms_mean_cache_miss"]
_RESPONSES_PER_USER = M["responses_per_user"]
_ERROR_KINDS = {
    kind: M[f"error_rate_{kind}"]
    for kind in ("rate_limit", "tool_failure", "parse_error", "timeout", "refusal", "other")
}
_ERROR_KIND_LIST = tuple(_ERROR_KINDS.values())
_VARIANTS = get_args(Variant)  # control, candidate
# A new response's increments that depend only on its error value: 0 for thumbs, edit,
# retry and follow-up (feedback fills them in later), 0/1 for the error rate and each kind.
_PER_RESPONSE_ZERO = tuple((m, 0.0) for m in (_THUMBS_DOWN, _THUMBS_UP, _EDIT, _RETRY, _FOLLOW))
_ERROR_ROWS = {
    error: (
        *_PER_RESPONSE_ZERO,
        (_ERROR, 0.0 if error == "none" else 1.0),
        *((m, 1.0 if m == _ERROR_KINDS.get(error) else 0.0) for m in _ERROR_KIND_LIST),
    )
    for error in ("none", "other", *_ERROR_KINDS)
}


@dataclass(frozen=True)
class OutcomeConfig:
    gap_ms: int = 30 * 60_000
    retry_window_ms: int = 60_000
    retry_similarity: float = 80.0
    join_ttl_ms: int = 60 * 60_000
    lateness_ms: int = 5 * 60_000
    max_skew_ms: int = 24 * 60 * 60_000
    max_future_ms: int = 60 * 60_000
    max_edit_chars: int = 10_000
    max_event_bytes: int = 1_000_000

    @classmethod
    def from_settings(cls, settings: Any) -> OutcomeConfig:
        ms = lambda seconds: int(round(seconds * 1000))  # noqa: E731
        return cls(
            gap_ms=ms(settings.session_gap_s),
            retry_window_ms=ms(settings.retry_window_s),
            retry_similarity=float(settings.retry_similarity),
            join_ttl_ms=ms(settings.join_ttl_s),
            lateness_ms=ms(settings.allowed_lateness_s),
            max_skew_ms=ms(settings.max_topic_skew_s),
            max_future_ms=ms(settings.max_future_s),
            max_edit_chars=int(settings.max_edit_chars),
            max_event_bytes=int(settings.max_event_bytes),
        )


class Response:
    """One served response and what is known about it so far."""

    __slots__ = (
        "trace",
        "trace_id",
        "ts",
        "variant",
        "cell",
        "totals",
        "prompt",
        "text",
        "error",
        "cost",
        "closed",
        "last",
        "down",
        "up",
        "edited",
        "edit_key",
        "dist",
        "dist_words",
        "explicit_retry",
        "implicit_retry",
        "explicit_follow",
        "has_next",
        "counted_retry",
        "counted_follow",
        "counted_abandon",
        "last_negative",
        "last_positive",
        "abandon_feedback",
    )

    def __init__(self, trace: TraceEvent, max_chars: int, cell: VariantSums, totals: list[float]) -> None:
        # for its outcome record; without the texts, which may be large
        self.trace = msgspec.structs.replace(trace, prompt_text=None, response_text=None)
        self.last = False  # closed as the last response of its session
        self.trace_id = trace.trace_id
        self.ts = trace.ts
        self.variant = trace.variant
        self.cell = cell  # the (rollout, arm, cohort) statistics it counts in
        self.totals = totals  # the running totals of its user's bucket in that cell
        self.prompt = trace.prompt_text[:max_chars] if trace.prompt_text is not None else None
        self.text = trace.response_text[:max_chars] if trace.response_text is not None else None
        self.error = trace.error
        self.cost = trace.cost_usd
        self.closed = False
        self.down = self.up = self.edited = False
        self.edit_key: tuple[int, str] | None = None
        self.dist: float | None = None
        self.dist_words: float | None = None
        self.explicit_retry = self.implicit_retry = self.explicit_follow = self.has_next = False
        self.counted_retry = self.counted_follow = self.counted_abandon = False
        self.last_negative: int | None = None
        self.last_positive: int | None = None
        self.abandon_feedback = False

    def to_state(self, cell: list, bucket: int) -> HeldResponse:
        """``cell``, ``bucket``: the keys of ``self.cell`` and ``self.totals`` (shared references)."""
        return HeldResponse(
            trace=self.trace,
            cell=cell,
            bucket=bucket,
            prompt=self.prompt,
            text=self.text,
            closed=self.closed,
            last=self.last,
            down=self.down,
            up=self.up,
            edited=self.edited,
            edit_key=self.edit_key,
            dist=self.dist,
            dist_words=self.dist_words,
            explicit_retry=self.explicit_retry,
            implicit_retry=self.implicit_retry,
            explicit_follow=self.explicit_follow,
            has_next=self.has_next,
            counted_retry=self.counted_retry,
            counted_follow=self.counted_follow,
            counted_abandon=self.counted_abandon,
            last_negative=self.last_negative,
            last_positive=self.last_positive,
            abandon_feedback=self.abandon_feedback,
        )

    @classmethod
    def from_state(cls, saved: HeldResponse, cell: VariantSums, totals: list[float]) -> Response:
        response = cls.__new__(cls)  # the trace is stored without its texts already
        trace = response.trace = saved.trace
        response.trace_id, response.ts, response.variant = trace.trace_id, trace.ts, trace.variant
        response.error, response.cost = trace.error, trace.cost_usd
        response.cell, response.totals = cell, totals
        response.prompt, response.text = saved.prompt, saved.text
        response.closed, response.last = saved.closed, saved.last
        response.down, response.up, response.edited = saved.down, saved.up, saved.edited
        response.edit_key, response.dist, response.dist_words = saved.edit_key, saved.dist, saved.dist_words
        response.explicit_retry, response.implicit_retry = saved.explicit_retry, saved.implicit_retry
        response.explicit_follow, response.has_next = saved.explicit_follow, saved.has_next
        response.counted_retry, response.counted_follow = saved.counted_retry, saved.counted_follow
        response.counted_abandon, response.abandon_feedback = saved.counted_abandon, saved.abandon_feedback
        response.last_negative, response.last_positive = saved.last_negative, saved.last_positive
        return response

    def abandoned(self) -> bool:
        """As the last response of a session: explicit abandon, an error, or a thumbs-down
        or retry with no thumbs-up, copy or edit at or after it."""
        if self.abandon_feedback or self.error != "none":
            return True
        negative, positive = self.last_negative, self.last_positive
        return negative is not None and (positive is None or positive < negative)


def outcome_record(response: Response) -> OutcomeRecord:
    trace = response.trace
    return OutcomeRecord(
        event_id=f"outcome-{trace.trace_id}",
        ts=trace.ts,
        rollout_id=trace.rollout_id,
        trace_id=trace.trace_id,
        variant=trace.variant,
        user_id=trace.user_id,
        session_id=trace.session_id,
        prompt_version=trace.prompt_version,
        model_version=trace.model_version,
        latency_ms=trace.latency_ms,
        cost_usd=trace.cost_usd,
        cache_hit=trace.cache_hit,
        error=trace.error,
        thumbs_up=response.up,
        thumbs_down=response.down,
        edited=response.edited,
        edit_distance=response.dist,
        edit_distance_words=response.dist_words,
        retried=response.counted_retry,
        follow_up=response.counted_follow,
        session_last=response.last,
        abandoned=response.last and response.abandoned(),
    )


def _sort_key(response: Response) -> tuple[int, str]:
    return response.ts, response.trace_id


class UserState:
    __slots__ = (
        "rollout_id",
        "user_id",
        "uid",
        "variants",
        "crossed",
        "open",
        "by_trace",
        "pending",
        "ids",
        "arm",
        "cohort",
        "segment",
        "due",
        "release_at",
    )

    def __init__(self, rollout_id: str, user_id: str) -> None:
        self.rollout_id = rollout_id
        self.user_id = user_id
        self.uid = id_hash(user_id)
        # The variants this user was ever served, its arm first (from the processor's
        # distinct sets, read at this state's first trace), so later traces cost no set
        # lookup; and whether the user is counted as a crossover already.
        self.variants: tuple[str, ...] | None = None  # a tuple: ~150 bytes less than a set per held user
        self.arm = ""
        self.cohort = 0
        self.segment = ""
        self.crossed = False
        self.open: list[Response] = []
        self.by_trace: dict[str, Response] = {}
        self.pending: PendingJoin = PendingJoin()
        self.ids: dict[str, int] = {}
        self.due = FAR_FUTURE
        # Every event holds the user's state until ts + max(gap, ttl + 1) (the
        # watermark must pass it before release).
        self.release_at = -FAR_FUTURE

    def hold(self, ts: int, hold_ms: int) -> None:
        if ts + hold_ms > self.release_at:
            self.release_at = ts + hold_ms

    def to_state(self, cell_keys: dict[int, list], bucket_of: dict[int, int]) -> HeldUser:
        """``cell_keys``/``bucket_of``: a cell's key and a bucket's index by the ``id`` of the
        VariantSums and of the running totals its responses share."""
        responses = list(self.by_trace.values())  # open responses are held for the join too
        index = {id(response): i for i, response in enumerate(responses)}
        for response in self.open:
            if id(response) not in index:
                index[id(response)] = len(responses)
                responses.append(response)
        return HeldUser(
            rollout_id=self.rollout_id,
            user_id=self.user_id,
            uid=self.uid,
            variants=None if self.variants is None else list(self.variants),
            arm=self.arm,
            cohort=self.cohort,
            segment=self.segment,
            crossed=self.crossed,
            responses=[r.to_state(cell_keys[id(r.cell)], bucket_of[id(r.totals)]) for r in responses],
            open=[index[id(response)] for response in self.open],
            by_trace=list(range(len(self.by_trace))),
            pending={
                trace_id: [PendingFeedback(ts=ts, feedback=feedback, origin=origin) for ts, (feedback, origin) in items]
                for trace_id, items in self.pending
            },
            ids=dict(self.ids),
            due=self.due,
            release_at=self.release_at,
        )

    @classmethod
    def from_state(cls, saved: HeldUser, cells: dict[tuple, VariantSums]) -> UserState:
        user = cls.__new__(cls)  # uid comes with the state: no hashing
        user.rollout_id, user.user_id, user.uid = saved.rollout_id, saved.user_id, saved.uid
        user.variants = None if saved.variants is None else tuple(saved.variants)
        user.arm, user.cohort, user.segment, user.crossed = saved.arm, saved.cohort, saved.segment, saved.crossed
        responses = []
        for response in saved.responses:
            cell = cells[tuple(response.cell)]
            responses.append(Response.from_state(response, cell, cell.buckets[response.bucket]))
        user.open = [responses[i] for i in saved.open]
        user.by_trace = {responses[i].trace_id: responses[i] for i in saved.by_trace}
        user.pending = PendingJoin()
        user.pending.waiting = {
            trace_id: [(item.ts, (item.feedback, item.origin)) for item in items]
            for trace_id, items in saved.pending.items()
        }
        user.ids = dict(saved.ids)
        user.due, user.release_at = saved.due, saved.release_at
        return user


class OutcomeProcessor:
    """The outcome state of one source partition; see the module docstring.

    ``apply``/``fold_raw`` return ``None`` when the event was used (or was a
    repeat, counted in ``counts["duplicates"]``) and a reason string when it must
    go to the DLQ. Feedback that waited for a trace in vain is rejected later, when
    the watermark passes its TTL: those land in ``self.rejected`` as
    ``(origin, reason)`` for the caller to dead-letter.
    """

    # The version of ``to_state``'s shape (schemas/state.py says what each version was): a
    # checkpoint of another version is not loaded (the partition is rebuilt from its topics' start).
    STATE_VERSION = STATE_VERSION

    def __init__(self, partition: int = 0, config: OutcomeConfig | None = None) -> None:
        self.partition = partition
        self.config = config or OutcomeConfig()
        self.marks = Watermarks((TRACE, FEEDBACK), self.config.lateness_ms, self.config.max_skew_ms)
        self.users: dict[tuple[str, str], UserState] = {}
        # Distinct users: first exposed per (rollout, arm, cohort); served a variant outside
        # their arm per (rollout, variant); per rollout those counted as crossovers. Hashes
        # that outlive the released per-user state (checkpointed with the rest).
        self.first_seen: dict[tuple[str, str, int, str], DistinctHashes] = {}
        self.also_served: dict[tuple[str, str], DistinctHashes] = {}
        self.crossed_users: dict[str, DistinctHashes] = {}
        self.due = DueQueue()
        self.cells: dict[tuple[str, str, int, str], VariantSums] = {}  # (rollout, arm, cohort, segment)
        # Per (rollout, served variant): responses and the models that served them.
        self.served: dict[tuple[str, str], dict[str, int]] = {}
        # Per rollout: event times at which the split changed (Decision.cohort_starts).
        self.cohort_starts: dict[str, list[int]] = {}
        # Per rollout: the plan's segment keys and the metrics its segment guardrails read
        # (Decision.segments, .segment_metrics); per (rollout, key) the values kept apart.
        self.segment_keys: dict[str, tuple[str, ...]] = {}
        self.segment_metrics: dict[str, tuple[str, ...]] = {}
        self.segment_values: dict[tuple[str, str], set[str]] = {}
        self.counts = {"read": 0, "invalid": 0, "duplicates": 0, "late": 0}
        self.reasons: dict[str, int] = {}
        self.latest_ts: dict[str, int] = {}
        self.dirty: set[str] = set()
        self.offsets: dict[str, int] = {}  # the agent's next offset per source topic (checkpointed with the state)
        # per source topic, streams.resume.record_mark of the record before ``offsets``: a restart
        # checks the log still holds it (a recreated topic starts its offsets again)
        self.log_marks: dict[str, list[int]] = {}
        self.rejected: list[tuple[Any, str]] = []
        # Per (rollout, cohort, arm) of a rollout with segments: the combined latency histograms
        # and the (responses, users) of the cells they were built from (a cache, not state).
        self.view_histograms: dict[tuple[str, int, str], tuple[tuple, dict[str, Any]]] = {}
        self.events_since_snapshot = 0
        self.events_since_checkpoint = 0
        # The agent sets this and drains the records (replay leaves it off).
        self.collect_outcomes = False
        self.outcome_records: list[OutcomeRecord] = []

    # -- checkpoints ----------------------------------------------------------------------
    def to_state(self) -> PartitionState:
        """The whole state as plain data (schemas/state.py), for a checkpoint; the config is
        not part of it (``from_state`` takes the running one)."""
        cell_keys = {id(sums): list(key) for key, sums in self.cells.items()}
        bucket_of = {id(totals): b for sums in self.cells.values() for b, totals in sums.buckets.items()}
        return PartitionState(
            version=self.STATE_VERSION,
            partition=self.partition,
            watermarks=self.marks.to_state(),
            users=[user.to_state(cell_keys, bucket_of) for user in self.users.values()],
            first_seen=[(list(key), seen.to_state()) for key, seen in self.first_seen.items()],
            also_served=[(list(key), seen.to_state()) for key, seen in self.also_served.items()],
            crossed_users={rollout: seen.to_state() for rollout, seen in self.crossed_users.items()},
            due=self.due.to_state(),
            cells=[(list(key), sums.to_state()) for key, sums in self.cells.items()],
            served=[(list(key), dict(models)) for key, models in self.served.items()],
            cohort_starts={rollout: list(starts) for rollout, starts in self.cohort_starts.items()},
            segment_keys={rollout: list(keys) for rollout, keys in self.segment_keys.items()},
            segment_metrics={rollout: list(metrics) for rollout, metrics in self.segment_metrics.items()},
            segment_values=[(list(key), sorted(values)) for key, values in self.segment_values.items()],
            counts=dict(self.counts),
            reasons=dict(self.reasons),
            latest_ts=dict(self.latest_ts),
            dirty=sorted(self.dirty),
            offsets=dict(self.offsets),
            log_marks={topic: list(mark) for topic, mark in self.log_marks.items()},
            rejected=list(self.rejected),
            events_since_snapshot=self.events_since_snapshot,
            events_since_checkpoint=self.events_since_checkpoint,
            outcome_records=list(self.outcome_records),
        )

    @classmethod
    def from_state(cls, state: PartitionState, config: OutcomeConfig | None = None) -> OutcomeProcessor:
        """The processor ``state`` describes, with ``config`` (the running one). Raises ValueError
        or KeyError for a state of another version or whose references do not resolve."""
        if state.version != cls.STATE_VERSION:
            raise ValueError(f"state version {state.version}, this safeswap reads version {cls.STATE_VERSION}")
        processor = cls(state.partition, config)
        config = processor.config
        processor.marks = Watermarks.from_state(state.watermarks, config.lateness_ms, config.max_skew_ms)
        cells = processor.cells = {tuple(key): VariantSums.from_state(sums) for key, sums in state.cells}
        processor.users = {(user.rollout_id, user.user_id): UserState.from_state(user, cells) for user in state.users}
        processor.first_seen = {tuple(key): DistinctHashes.from_state(seen) for key, seen in state.first_seen}
        processor.also_served = {tuple(key): DistinctHashes.from_state(seen) for key, seen in state.also_served}
        processor.crossed_users = {r: DistinctHashes.from_state(seen) for r, seen in state.crossed_users.items()}
        processor.due = DueQueue.from_state(state.due)
        processor.served = {tuple(key): dict(models) for key, models in state.served}
        processor.cohort_starts = {rollout: list(starts) for rollout, starts in state.cohort_starts.items()}
        processor.segment_keys = {rollout: tuple(keys) for rollout, keys in state.segment_keys.items()}
        processor.segment_metrics = {rollout: tuple(metrics) for rollout, metrics in state.segment_metrics.items()}
        processor.segment_values = {tuple(key): set(values) for key, values in state.segment_values}
        processor.counts = dict(state.counts)
        processor.reasons = dict(state.reasons)
        processor.latest_ts = dict(state.latest_ts)
        processor.dirty = set(state.dirty)
        processor.offsets = dict(state.offsets)
        processor.log_marks = {topic: list(mark) for topic, mark in state.log_marks.items()}
        processor.rejected = list(state.rejected)
        processor.events_since_snapshot = state.events_since_snapshot
        processor.events_since_checkpoint = state.events_since_checkpoint
        processor.outcome_records = list(state.outcome_records)
        return processor

    @property
    def _hold_ms(self) -> int:
        return max(self.config.gap_ms, self.config.join_ttl_ms + 1)

    # -- entry points ---------------------------------------------------------------------
    def fold_raw(self, source: str, raw: bytes, now_ms: int, origin: Any = None) -> str | None:
        """Decode one message of the traces (``source="trace"``) or feedback topic and apply it."""
        self.counts["read"] += 1
        self.events_since_snapshot += 1
        self.events_since_checkpoint += 1
        if len(raw) > self.config.max_event_bytes:
            return self._reject(
                "invalid",
                "too_large",
                f"event of {len(raw):,} bytes exceeds max_event_bytes={self.config.max_event_bytes:,}",
            )
        try:
            event = decode(TraceEvent if source == TRACE else FeedbackEvent, raw)
        except InvalidEvent as exc:
            self._reject("invalid", "invalid", "")
            return str(exc)  # the decoder's sentence ("invalid TraceEvent: ..."), as every agent words it
        if source == TRACE:
            return self._on_trace(event, now_ms)
        return self._on_feedback(event, now_ms, origin)

    def apply(self, event: TraceEvent | FeedbackEvent, now_ms: int, origin: Any = None) -> str | None:
        """Apply one decoded event (what replay and tests call)."""
        self.counts["read"] += 1
        self.events_since_snapshot += 1
        self.events_since_checkpoint += 1
        if isinstance(event, TraceEvent):
            return self._on_trace(event, now_ms)
        return self._on_feedback(event, now_ms, origin)

    def finish(self) -> None:
        """End of input (replay): close every session, expire every join."""
        for key in list(self.users):
            user = self.users.get(key)
            if user is not None:
                self._advance_user(user, FAR_FUTURE)

    def reject_invalid(self, reason: str) -> str:
        """Count an input rejected before it reached ``fold_raw`` (the agent's own checks)."""
        self.counts["read"] += 1
        return self._reject("invalid", "invalid", reason)

    # -- traces and feedback --------------------------------------------------------------
    def _on_trace(self, trace: TraceEvent, now_ms: int) -> str | None:
        config = self.config
        if trace.ts > now_ms + config.max_future_ms:
            return self._reject("invalid", "future_timestamp", self._future_reason(trace.ts, now_ms))
        key = (trace.rollout_id, trace.user_id)
        user = self.users.get(key)
        if user is not None and (trace.event_id in user.ids or trace.trace_id in user.by_trace):
            self.counts["duplicates"] += 1
            return None
        marks = self.marks
        if marks.is_late(TRACE, trace.ts):
            return self._reject("late", "late_event", self._late_reason(TRACE, trace.ts))
        marks.observe(TRACE, trace.ts)
        if user is None:
            user = self.users[key] = UserState(trace.rollout_id, trace.user_id)
        user.hold(trace.ts, self._hold_ms)
        user.ids[trace.event_id] = trace.ts

        variant = trace.variant
        served = user.variants
        if served is None or variant not in served:
            served = self._served(user, variant, trace.ts, trace.segment)
        if variant == "control" and "candidate" in served and not user.crossed:
            self._crossover(user)
        sums = self.cells[(trace.rollout_id, user.arm, user.cohort, user.segment)]
        totals = sums.bucket(user.uid)
        sums.add(totals, _RESPONSES_PER_USER, 1.0, 0.0)
        sums.responses += 1
        models = self.served.get((trace.rollout_id, variant))
        if models is None:
            models = self.served[(trace.rollout_id, variant)] = {}
        models[trace.model_version] = models.get(trace.model_version, 0) + 1
        latency = trace.latency_ms
        hit = trace.cache_hit
        sums.add_response(totals, _ERROR_ROWS[trace.error])
        sums.add_response(
            totals,
            (
                (_LATENCY, latency),
                (_LATENCY_HIT if hit else _LATENCY_MISS, latency),
                (_COST, trace.cost_usd),
                (_CACHE, 1.0 if hit else 0.0),
            ),
        )
        sums.add_latency(latency, hit, user.uid)

        response = Response(trace, config.max_edit_chars, sums, totals)
        user.by_trace[trace.trace_id] = response
        self._insert(user, sums, response)
        if user.pending.waiting:
            for fb_ts, (feedback, origin) in user.pending.take(trace.trace_id):
                if joinable(trace.ts, fb_ts, config.join_ttl_ms):
                    self._join(user, response, feedback)
                else:
                    self.rejected.append(
                        (origin, self._reject("late", "feedback_unjoined", self._unjoined_reason(feedback, trace.ts)))
                    )
        self._schedule(user, min(trace.ts + config.gap_ms, trace.ts + config.join_ttl_ms + 1))
        self._touch(trace.rollout_id, trace.ts)
        self._advance()
        return None

    def _served(self, user: UserState, variant: str, ts: int, segment: dict[str, str] | None) -> tuple[str, ...]:
        """Record that ``user`` was served ``variant``: first exposure (arm, cohort, segment), distinct users."""
        rollout, uid = user.rollout_id, user.uid
        served = user.variants
        if served is None:  # this state's first trace: what the distinct sets already know
            served = ()
            for (r, arm, cohort, label), seen in self.first_seen.items():
                if r == rollout and uid in seen:
                    user.arm, user.cohort, user.segment = arm, cohort, label
                    served = (arm,)
                    break
            if served:
                served += tuple(
                    v
                    for v in _VARIANTS
                    if v != served[0] and (also := self.also_served.get((rollout, v))) is not None and uid in also
                )
            user.variants = served
        if variant not in served:
            if not served:  # the user's first trace in this rollout: its arm and cohort
                user.arm, user.cohort = variant, bisect_right(self.cohort_starts.get(rollout, ()), ts)
                user.segment = self._segment_label(rollout, segment)
                cell_key = (rollout, variant, user.cohort, user.segment)
                sums = self.cells.get(cell_key)
                if sums is None:
                    sums = self.cells[cell_key] = VariantSums()
                sums.users += 1
                sums.add(sums.bucket(uid), _RESPONSES_PER_USER, 0.0, 1.0)  # one more user in its denominator
                seen = self.first_seen.get(cell_key)
                if seen is None:
                    seen = self.first_seen[cell_key] = DistinctHashes()
            else:
                seen = self.also_served.get((rollout, variant))
                if seen is None:
                    seen = self.also_served[(rollout, variant)] = DistinctHashes()
            seen.add_new(uid)  # not a member: ``served`` was read from the sets, and only this state adds
            served = user.variants = served + (variant,)
        return served

    def _segment_label(self, rollout: str, segment: dict[str, str] | None) -> str:
        """The user's cell label for the rollout's segment keys: ``locale=ja,tier=free``."""
        keys = self.segment_keys.get(rollout)
        if not keys:
            return ""
        parts = []
        for key in keys:
            value = segment.get(key) if segment else None
            if value is None:
                value = SEGMENT_MISSING
            else:
                kept = self.segment_values.setdefault((rollout, key), set())
                if value not in kept:
                    if len(kept) >= MAX_SEGMENT_VALUES:
                        value = SEGMENT_OTHER
                    else:
                        kept.add(value)
            parts.append(f"{key}={value}")
        return ",".join(parts)

    def _crossover(self, user: UserState) -> None:
        """Served the candidate, then control: a ramp only moves users the other way (a leak)."""
        user.crossed = True
        crossed = self.crossed_users.get(user.rollout_id)
        if crossed is None:
            crossed = self.crossed_users[user.rollout_id] = DistinctHashes()
        crossed.add(user.uid)

    def on_decision(self, decision: Decision) -> None:
        """Learn where the rollout's split periods begin (event time): a user first exposed
        at or after ``cohort_starts[i]`` belongs to cohort ``i + 1``. Users are assigned when
        their first trace is folded, so the few first exposed between a promotion and the
        moment its decision arrives here stay in the earlier cohort, as they do at the apps'
        flag clients, which serve the old split until the decision reaches them."""
        starts = list(decision.cohort_starts)
        if len(starts) > len(self.cohort_starts.get(decision.rollout_id, ())):
            self.cohort_starts[decision.rollout_id] = starts
        # A plan's segment keys never change; users first seen before they are known have none.
        if decision.segments and decision.rollout_id not in self.segment_keys:
            self.segment_keys[decision.rollout_id] = tuple(decision.segments)
            self.segment_metrics[decision.rollout_id] = tuple(decision.segment_metrics)

    def _on_feedback(self, feedback: FeedbackEvent, now_ms: int, origin: Any) -> str | None:
        config = self.config
        if feedback.ts > now_ms + config.max_future_ms:
            return self._reject("invalid", "future_timestamp", self._future_reason(feedback.ts, now_ms))
        key = (feedback.rollout_id, feedback.user_id)
        user = self.users.get(key)
        if user is not None and feedback.event_id in user.ids:
            self.counts["duplicates"] += 1
            return None
        if self.marks.is_late(FEEDBACK, feedback.ts):
            return self._reject("late", "late_event", self._late_reason(FEEDBACK, feedback.ts))
        self.marks.observe(FEEDBACK, feedback.ts)
        if user is None:
            user = self.users[key] = UserState(feedback.rollout_id, feedback.user_id)
        user.hold(feedback.ts, self._hold_ms)
        user.ids[feedback.event_id] = feedback.ts
        response = user.by_trace.get(feedback.trace_id)
        reason = None
        if response is None:
            user.pending.add(feedback.trace_id, feedback.ts, (feedback, origin))
            self._schedule(user, feedback.ts + config.join_ttl_ms + 1)
        elif joinable(response.ts, feedback.ts, config.join_ttl_ms):
            self._join(user, response, feedback)
        else:
            reason = self._reject("late", "feedback_unjoined", self._unjoined_reason(feedback, response.ts))
        self._touch(feedback.rollout_id, feedback.ts)
        self._advance()
        return reason

    def _join(self, user: UserState, response: Response, feedback: FeedbackEvent) -> None:
        sums = response.cell
        totals = response.totals
        kind = feedback.kind
        ts = feedback.ts
        if kind == "thumbs_down":
            if not response.down:
                response.down = True
                sums.add(totals, _THUMBS_DOWN, 1.0, 0.0)
            self._negative(response, ts)
        elif kind == "thumbs_up":
            if not response.up:
                response.up = True
                sums.add(totals, _THUMBS_UP, 1.0, 0.0)
            self._positive(response, ts)
        elif kind == "copy":
            self._positive(response, ts)
        elif kind == "edit":
            if not response.edited:
                response.edited = True
                sums.add(totals, _EDIT, 1.0, 0.0)
            self._positive(response, ts)
            self._edit_distance(sums, totals, response, feedback)
        elif kind == "retry":
            response.explicit_retry = True
            self._negative(response, ts)
            self._recount(sums, totals, response)
        elif kind == "follow_up":
            response.explicit_follow = True
            self._recount(sums, totals, response)
        elif kind == "abandon":
            response.abandon_feedback = True
        if response.last:  # feedback after its session closed (within the TTL) can change the verdict
            self._count_abandon(sums, response)
        self.dirty.add(user.rollout_id)

    @staticmethod
    def _negative(response: Response, ts: int) -> None:
        if response.last_negative is None or ts > response.last_negative:
            response.last_negative = ts

    @staticmethod
    def _positive(response: Response, ts: int) -> None:
        if response.last_positive is None or ts > response.last_positive:
            response.last_positive = ts

    def _edit_distance(
        self, sums: VariantSums, totals: list[float], response: Response, feedback: FeedbackEvent
    ) -> None:
        """Distance of the latest edit (by event time, then event id) of a response."""
        if feedback.final_text is None or response.text is None:
            return
        key = (feedback.ts, feedback.event_id)
        if response.edit_key is not None and key <= response.edit_key:
            return
        response.edit_key = key
        final = feedback.final_text[: self.config.max_edit_chars]
        distance = Levenshtein.normalized_distance(response.text, final)
        words = Levenshtein.normalized_distance(response.text.split(), final.split())
        if response.dist is None:
            sums.add(totals, _EDIT_DIST, distance, 1.0)
            sums.add(totals, _EDIT_WORDS, words, 1.0)
        else:
            sums.add(totals, _EDIT_DIST, distance - response.dist, 0.0)
            sums.add(totals, _EDIT_WORDS, words - response.dist_words, 0.0)
        response.dist, response.dist_words = distance, words

    # -- sessions: retry, follow-up -------------------------------------------------------
    def _insert(self, user: UserState, sums: VariantSums, response: Response) -> None:
        opened = user.open
        if not opened or _sort_key(opened[-1]) <= _sort_key(response):
            opened.append(response)
            index = len(opened) - 1
        else:  # out of order (within the allowed lateness)
            insort(opened, response, key=_sort_key)
            index = opened.index(response)
        self._link(response, opened[index + 1] if index + 1 < len(opened) else None)
        self._recount(sums, response.totals, response)
        if index > 0:
            previous = opened[index - 1]
            self._link(previous, response)
            self._recount(previous.cell, previous.totals, previous)

    def _link(self, response: Response, following: Response | None) -> None:
        """Derive what the next request of the same user says about ``response``."""
        config = self.config
        if following is None:
            response.has_next = response.implicit_retry = False
            return
        response.has_next = same_session(response.ts, following.ts, config.gap_ms)
        response.implicit_retry = (
            response.has_next  # a retry window longer than the gap must not reach into the next session
            and following.ts - response.ts <= config.retry_window_ms
            and response.prompt is not None
            and following.prompt is not None
            and fuzz.ratio(response.prompt, following.prompt) >= config.retry_similarity
        )

    @staticmethod
    def _recount(sums: VariantSums, totals: list[float], response: Response) -> None:
        retried = response.explicit_retry or response.implicit_retry
        # "followed by a non-retry request": a retried response is never a follow-up
        followed = not retried and (response.explicit_follow or response.has_next)
        if retried != response.counted_retry:
            sums.add(totals, _RETRY, 1.0 if retried else -1.0, 0.0)
            response.counted_retry = retried
        if followed != response.counted_follow:
            sums.add(totals, _FOLLOW, 1.0 if followed else -1.0, 0.0)
            response.counted_follow = followed

    # -- time: closing sessions, expiring joins, releasing users --------------------------
    def _schedule(self, user: UserState, due: int) -> None:
        if due < user.due:
            user.due = due
            self.due.schedule((user.rollout_id, user.user_id), due)

    def _advance(self) -> None:
        due = self.due
        if not due.heap:
            return
        watermark = self.marks.combined()
        if due.heap[0] * due.bucket_ms > watermark:
            return
        users = self.users
        for key in list(due.pop_due(watermark)):
            user = users.get(key)
            if user is not None and user.due <= watermark:
                self._advance_user(user, watermark)

    def _advance_user(self, user: UserState, watermark: int) -> None:
        config = self.config
        opened = user.open
        if opened:
            closed = closable_sessions([r.ts for r in opened], watermark, config.gap_ms)
            for first, last in closed:
                self._close_session(user, opened[first : last + 1])
            if closed:
                del opened[: closed[-1][1] + 1]
        ttl = config.join_ttl_ms
        by_trace = user.by_trace
        for trace_id in [t for t, r in by_trace.items() if r.closed and expired(r.ts, watermark, ttl)]:
            final = by_trace.pop(trace_id)
            if self.collect_outcomes:  # nothing can change it any more: its outcome record
                self.outcome_records.append(outcome_record(final))
        if user.pending.waiting:
            for feedback, origin in user.pending.expire(watermark, ttl):
                self.rejected.append(
                    (
                        origin,
                        self._reject(
                            "late",
                            "feedback_unjoined",
                            f"feedback {feedback.event_id} for trace {feedback.trace_id}: no trace within the join TTL "
                            f"({ttl // 1000} s)",
                        ),
                    )
                )
        user.ids = {event_id: ts for event_id, ts in user.ids.items() if ts >= watermark}
        key = (user.rollout_id, user.user_id)
        if not opened and not by_trace and not user.pending.waiting:
            if watermark >= user.release_at:
                del self.users[key]  # released: the session gap and the join TTL are over
                return
        candidates = [user.release_at]
        if opened:
            candidates.append(opened[first_session_end([r.ts for r in opened], config.gap_ms)].ts + config.gap_ms)
        # A response is final once its session has closed *and* its join TTL has passed. An
        # open session's responses wait for its end (the candidate above): counting their
        # TTL alone would wake a user whose session outlasts the TTL at every watermark step.
        final_ts = [r.ts for r in by_trace.values() if r.closed] or (
            [] if opened else [r.ts for r in by_trace.values()]
        )
        if final_ts:
            candidates.append(min(final_ts) + ttl + 1)
        oldest = user.pending.oldest_ts()
        if oldest is not None:
            candidates.append(oldest + ttl + 1)
        user.due = FAR_FUTURE
        self._schedule(user, max(min(candidates), watermark + 1))

    def _close_session(self, user: UserState, responses: list[Response]) -> None:
        last = responses[-1]
        sums = last.cell
        totals = last.totals
        sums.add(totals, _TURNS, float(len(responses)), 1.0)
        sums.add(totals, _COST_SESSION, sum(r.cost for r in responses), 1.0)
        sums.add(totals, _ABANDON, 0.0, 1.0)
        sums.sessions += 1
        for response in responses:
            response.closed = True
        last.last = True
        self._count_abandon(sums, last)
        self.dirty.add(user.rollout_id)

    @staticmethod
    def _count_abandon(sums: VariantSums, last: Response) -> None:
        """Keep ``abandon_rate`` equal to the last response's verdict as feedback joins it, also
        after its session closed: its outcome record (taken when its TTL has passed) says the same."""
        abandoned = last.abandoned()
        if abandoned != last.counted_abandon:
            sums.add(last.totals, _ABANDON, 1.0 if abandoned else -1.0, 0.0)
            last.counted_abandon = abandoned

    # -- bookkeeping ----------------------------------------------------------------------
    def _touch(self, rollout_id: str, ts: int) -> None:
        if ts > self.latest_ts.get(rollout_id, -1):
            self.latest_ts[rollout_id] = ts
        self.dirty.add(rollout_id)

    def _reject(self, counter: str, reason_key: str, reason: str) -> str:
        self.counts[counter] += 1
        self.reasons[reason_key] = self.reasons.get(reason_key, 0) + 1
        return f"{reason_key}: {reason}"

    def _late_reason(self, source: str, ts: int) -> str:
        newest = self.marks.newest[source]
        return (
            f"event time {rfc3339(ts)} is {(newest - ts) / 1000:.0f} s behind the newest {source} event "
            f"({rfc3339(newest)}); allowed lateness is {self.config.lateness_ms / 1000:.0f} s"
        )

    def _future_reason(self, ts: int, now_ms: int) -> str:
        return (
            f"event time {rfc3339(ts)} is more than {self.config.max_future_ms / 1000:.0f} s ahead of the "
            f"worker's clock ({rfc3339(now_ms)})"
        )

    def _unjoined_reason(self, feedback: FeedbackEvent, trace_ts: int) -> str:
        return (
            f"feedback {feedback.event_id} is {abs(feedback.ts - trace_ts) / 1000:.0f} s from its trace "
            f"{feedback.trace_id}; the join TTL is {self.config.join_ttl_ms / 1000:.0f} s"
        )

    # -- output ---------------------------------------------------------------------------
    def rollouts(self) -> list[str]:
        return sorted({rollout for rollout, _ in self.served} | {key[0] for key in self.cells})

    def snapshot(self, rollout_id: str, seq: int) -> StatsSnapshot:
        users: dict[str, int] = {}
        metrics: dict[str, dict[str, dict]] = {}
        counts: dict[str, dict[str, int]] = {}
        exposures: dict[str, int] = {}
        cohorts: dict[str, dict[str, dict[str, dict]]] = {}
        cohort_exposures: dict[str, dict[str, int]] = {}
        pooled: dict[str, VariantSums] = {}
        cells: dict[tuple[int, str], list[VariantSums]] = {}  # (cohort, arm) -> its segments' cells
        by_segment: dict[tuple[str, int, str], list[VariantSums]] = {}  # ("locale=ja", cohort, arm) -> cells
        for (rollout, arm, cohort, label), sums in sorted(self.cells.items()):
            if rollout != rollout_id:
                continue
            cells.setdefault((cohort, arm), []).append(sums)
            for part in label.split(",") if label else ():
                if not part.endswith((f"={SEGMENT_MISSING}", f"={SEGMENT_OTHER}")):
                    by_segment.setdefault((part, cohort, arm), []).append(sums)
        for (cohort, arm), parts in cells.items():
            sums = VariantSums.combined(parts)
            if len(parts) > 1:  # the histograms of a view whose cells have no new request: as last time
                key = (rollout_id, cohort, arm)
                seen = tuple((part.responses, part.users) for part in parts)
                cached = self.view_histograms.get(key)
                if cached is not None and cached[0] == seen:
                    sums.cached_histograms = ((sums.responses, sums.users), cached[1])
                else:
                    self.view_histograms[key] = (seen, sums.histograms())
            cohorts.setdefault(str(cohort), {})[arm] = sums.stats()
            cohort_exposures.setdefault(str(cohort), {})[arm] = sums.users
            exposures[arm] = exposures.get(arm, 0) + sums.users
            into = pooled.get(arm)
            if into is None:
                into = pooled[arm] = VariantSums()
            into.absorb(sums)
        segments: dict[str, dict[str, dict[str, dict[str, dict]]]] = {}
        wanted = self.segment_metrics.get(rollout_id, ())
        for (segment, cohort, arm), parts in by_segment.items():
            stats = VariantSums.combined(parts).stats(wanted)
            if stats:
                segments.setdefault(segment, {}).setdefault(str(cohort), {})[arm] = stats
        for arm, sums in pooled.items():
            metrics[arm] = sums.stats()
            counts[arm] = {"sessions": sums.sessions, "n_units": int(round(sums.sums[6 * _THUMBS_DOWN]))}
        models: dict[str, dict[str, int]] = {}
        for (rollout, variant), seen in self.served.items():
            if rollout == rollout_id:
                models[variant] = dict(seen)
                counts.setdefault(variant, {"sessions": 0, "n_units": 0})["responses"] = sum(seen.values())
                # distinct users served the variant: its own arm's plus those served it outside their arm
                also = self.also_served.get((rollout, variant))
                users[variant] = exposures.get(variant, 0) + (len(also) if also is not None else 0)
        crossed = self.crossed_users.get(rollout_id)
        return StatsSnapshot(
            rollout_id=rollout_id,
            partition=self.partition,
            seq=seq,
            ts=self.latest_ts.get(rollout_id, 0),
            users=users,
            metrics=metrics,
            models=models,
            counts=counts,
            first_exposures=exposures,
            crossover_users=len(crossed) if crossed is not None else 0,
            cohorts=cohorts,
            cohort_exposures=cohort_exposures,
            cohort_starts=list(self.cohort_starts.get(rollout_id, ())),
            segments=segments,
        )

    def take_dirty_snapshots(self, seq: int) -> list[StatsSnapshot]:
        dirty, self.dirty = self.dirty, set()
        self.events_since_snapshot = 0
        rollouts = set(self.rollouts())
        return [self.snapshot(rollout_id, seq) for rollout_id in sorted(dirty) if rollout_id in rollouts]

    def state_size(self) -> dict[str, int]:
        """How much is held (for tests and the memory benchmark)."""
        return {
            "users": len(self.users),
            "open_responses": sum(len(u.open) for u in self.users.values()),
            "join_responses": sum(len(u.by_trace) for u in self.users.values()),
            "pending_feedback": sum(len(items) for u in self.users.values() for _, items in u.pending),
            "due_entries": len(self.due),
        }


def merged_snapshot_values(snapshots: Iterable[StatsSnapshot]) -> dict[str, dict[str, Any]]:
    """Per-variant metric values (docs/metrics.md) of a rollout from the latest snapshot of
    each partition, merged the way the decide agent merges them. Used by replay and tests."""
    from safeswap.core.metrics import merge_variant_stats, metric_values

    snapshots = list(snapshots)
    merged = merge_variant_stats(snapshots)
    out: dict[str, dict[str, Any]] = {}
    for variant in sorted({v for s in snapshots for v in s.users}):
        counts = {"responses": 0, "sessions": 0, "users": 0}
        models: dict[str, int] = {}
        for snapshot in snapshots:
            counts["users"] += snapshot.users.get(variant, 0)
            for name, value in snapshot.counts.get(variant, {}).items():
                counts[name] = counts.get(name, 0) + value
            for model, n in snapshot.models.get(variant, {}).items():
                models[model] = models.get(model, 0) + n
        out[variant] = {**counts, **metric_values(merged.get(variant, {})), "models": models}
    return out
