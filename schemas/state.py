"""The checkpoint payload: one source partition's outcome state as plain data.

The outcomes agent checkpoints each partition's :class:`safeswap.core.outcomes.OutcomeProcessor`
as a :class:`PartitionState` (``OutcomeProcessor.to_state``/``from_state``), msgpack-encoded
and zlib'd by ``streams.checkpoint``. Nothing in it names a Python class or module, so
code may move or be renamed without making checkpoints unreadable; a change of shape bumps
:data:`STATE_VERSION`, and a payload of another version is not loaded (the partition is
rebuilt from its topics' start).

Shared references of the live state are written as keys and rebuilt on decode:

* a response's cell (the ``VariantSums`` it counts in) is the cell's key, and the running
  totals it adds to are the user's bucket index in that cell;
* a user's open responses and those kept for the join are indices into its ``responses``.

Tuple keys (a cell's ``(rollout_id, arm, cohort, segment)``, a ``(rollout_id, variant)``, a due
user's ``(rollout_id, user_id)``) are lists of their components, so a component can be
added without a new encoding. Numeric arrays are little-endian bytes.
"""

from __future__ import annotations

import msgspec

from schemas.events import FeedbackEvent, OutcomeRecord, TraceEvent

# The shape of the checkpointed state; a checkpoint of another version is not loaded.
# 2: distinct-user hash sets and n_units. 3: cells per (arm, cohort) summed in user buckets.
# 4: latency histograms per user bucket (VariantSums.latency) instead of per cell.
# 5: explicit msgpack structs (this module) instead of a pickle of the live objects.
# 6: segments: cells and first exposures per (rollout, arm, cohort, segment), the users'
#    segment, the rollouts' segment keys and the segment values kept apart.
STATE_VERSION = 6

Key = list[str | int]
# Where a dead letter's input came from: the agent's (topic, partition, offset, key, value),
# replay's line number, or nothing.
Origin = tuple[str, int, int, bytes | None, bytes | None] | int | None


class StateVersion(msgspec.Struct):
    """The version alone: read before the rest, which may have another shape."""

    version: int


class DistinctSet(msgspec.Struct, kw_only=True):
    """``safeswap.core.dedup.DistinctHashes``: sorted members and recent additions."""

    members: bytes  # sorted uint64 hashes
    recent: list[int]  # sorted
    min_merge: int


class DueState(msgspec.Struct, kw_only=True):
    """``safeswap.core.dedup.DueQueue``: the heap of due buckets and each bucket's keys."""

    bucket_ms: int
    heap: list[int]  # in heap order
    buckets: dict[int, list[Key]]


class CellSums(msgspec.Struct, kw_only=True):
    """``safeswap.core.metrics.VariantSums`` of one cell."""

    sums: list[float]  # 6 per ratio metric
    buckets: dict[int, bytes]  # bucket -> float64 running totals, (num, den) per ratio metric
    latency: dict[int, bytes]  # latency bucket -> uint32 bin counts, cache hits then misses
    users: int
    responses: int
    sessions: int


class PendingFeedback(msgspec.Struct, kw_only=True):
    """Feedback waiting for its trace (``safeswap.core.join.PendingJoin``)."""

    ts: int
    feedback: FeedbackEvent
    origin: Origin = None


class HeldResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A response held for its session or its join (``safeswap.core.outcomes.Response``)."""

    trace: TraceEvent  # without its texts
    cell: Key  # the cell it counts in
    bucket: int  # its user's bucket in that cell: the running totals it adds to
    prompt: str | None = None  # the texts, cut to max_edit_chars
    text: str | None = None
    closed: bool = False
    last: bool = False
    down: bool = False
    up: bool = False
    edited: bool = False
    edit_key: tuple[int, str] | None = None
    dist: float | None = None
    dist_words: float | None = None
    explicit_retry: bool = False
    implicit_retry: bool = False
    explicit_follow: bool = False
    has_next: bool = False
    counted_retry: bool = False
    counted_follow: bool = False
    counted_abandon: bool = False
    last_negative: int | None = None
    last_positive: int | None = None
    abandon_feedback: bool = False


class HeldUser(msgspec.Struct, kw_only=True):
    """One (rollout, user) held in memory (``safeswap.core.outcomes.UserState``)."""

    rollout_id: str
    user_id: str
    uid: int  # safeswap.core.dedup.id_hash(user_id)
    variants: list[str] | None
    arm: str
    cohort: int
    segment: str  # its segment label ("locale=ja"; "" without segment keys)
    crossed: bool
    responses: list[HeldResponse]
    open: list[int]  # indices into responses, in session order
    by_trace: list[int]  # indices into responses, in join order (keyed by their trace_id)
    pending: dict[str, list[PendingFeedback]]  # trace_id -> feedback waiting for it
    ids: dict[str, int]  # event id -> event time, for dedup
    due: int
    release_at: int


class PartitionState(msgspec.Struct, kw_only=True):
    """The whole outcome state of one source partition, with the source offsets it covers."""

    version: int
    partition: int
    watermarks: dict[str, int]  # newest event time per source
    users: list[HeldUser]
    first_seen: list[tuple[Key, DistinctSet]]  # per (rollout, arm, cohort, segment)
    also_served: list[tuple[Key, DistinctSet]]  # per (rollout, variant)
    crossed_users: dict[str, DistinctSet]  # per rollout
    due: DueState
    cells: list[tuple[Key, CellSums]]  # per (rollout, arm, cohort, segment)
    served: list[tuple[Key, dict[str, int]]]  # per (rollout, variant): responses per model
    cohort_starts: dict[str, list[int]]
    # Per rollout: its plan's segment keys and the metrics its segment guardrails read;
    # per (rollout, key): the values kept apart (the others count as "other").
    segment_keys: dict[str, list[str]]
    segment_metrics: dict[str, list[str]]
    segment_values: list[tuple[Key, list[str]]]
    counts: dict[str, int]
    reasons: dict[str, int]
    latest_ts: dict[str, int]
    dirty: list[str]
    offsets: dict[str, int]
    log_marks: dict[str, list[int]]
    rejected: list[tuple[Origin, str]]
    events_since_snapshot: int
    events_since_checkpoint: int
    outcome_records: list[OutcomeRecord]
