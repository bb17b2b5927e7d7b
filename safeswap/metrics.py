"""Per-partition guardrail statistics, with users as the unit.

Request-level rates (thumbs-down per response, errors per response) are ratios
of per-user sums: a user who sends 20 requests is one unit, not 20, so the
delta-method variance in :mod:`safeswap.stats` sees the clustering. Each
accumulator keeps every user's running (numerator, denominator) and updates the
sums of squares and cross-products incrementally, O(1) per event.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from schemas import FeedbackEvent, StatsSnapshot, TraceEvent, decode
from safeswap.stats import Ratio

# The metrics the first guardrail path computes; the outcomes issue adds more.
GUARDRAIL_METRICS: tuple[str, ...] = ("thumbs_down_rate", "error_rate")


class RatioSums:
    """Mutable sums behind a :class:`~safeswap.stats.Ratio`, fed user by user."""

    __slots__ = ("per_user", "num", "num_sq", "den", "den_sq", "num_den")

    def __init__(self) -> None:
        self.per_user: dict[str, tuple[float, float]] = {}
        self.num = self.num_sq = self.den = self.den_sq = self.num_den = 0.0

    def add(self, user_id: str, d_num: float, d_den: float) -> None:
        a, b = self.per_user.get(user_id, (0.0, 0.0))
        a2, b2 = a + d_num, b + d_den
        self.per_user[user_id] = (a2, b2)
        self.num += d_num
        self.den += d_den
        self.num_sq += a2 * a2 - a * a
        self.den_sq += b2 * b2 - b * b
        self.num_den += a2 * b2 - a * b

    def to_ratio(self) -> Ratio:
        return Ratio(
            n_units=len(self.per_user),
            num=self.num,
            num_sq=self.num_sq,
            den=self.den,
            den_sq=self.den_sq,
            num_den=self.num_den,
        )


class PartitionStats:
    """Everything one source partition knows about each rollout's guardrails.

    Pure: ``apply_*`` folds one decoded event in and returns False for a repeated
    event_id (at-least-once delivery must not count twice).
    """

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.seen_events: set[str] = set()
        self.thumbs_down_traces: set[str] = set()
        self.sums: dict[tuple[str, str, str], RatioSums] = defaultdict(RatioSums)
        self.latest_ts: dict[str, int] = {}
        self.seq: dict[str, int] = defaultdict(int)
        self.dirty: set[str] = set()
        self.events_since_snapshot = 0

    def _first_time(self, event_id: str, rollout_id: str, ts: int) -> bool:
        if event_id in self.seen_events:
            return False
        self.seen_events.add(event_id)
        self.latest_ts[rollout_id] = max(ts, self.latest_ts.get(rollout_id, 0))
        self.dirty.add(rollout_id)
        self.events_since_snapshot += 1
        return True

    def apply_trace(self, trace: TraceEvent) -> bool:
        if not self._first_time(trace.event_id, trace.rollout_id, trace.ts):
            return False
        key = (trace.rollout_id, trace.variant)
        self.sums[(*key, "thumbs_down_rate")].add(trace.user_id, 0.0, 1.0)
        self.sums[(*key, "error_rate")].add(trace.user_id, float(trace.error != "none"), 1.0)
        return True

    def apply_feedback(self, feedback: FeedbackEvent) -> bool:
        if not self._first_time(feedback.event_id, feedback.rollout_id, feedback.ts):
            return False
        # A response counts once however many thumbs-down it collects.
        if feedback.kind == "thumbs_down" and feedback.trace_id not in self.thumbs_down_traces:
            self.thumbs_down_traces.add(feedback.trace_id)
            self.sums[(feedback.rollout_id, feedback.variant, "thumbs_down_rate")].add(feedback.user_id, 1.0, 0.0)
        return True

    def snapshot(self, rollout_id: str) -> StatsSnapshot:
        self.seq[rollout_id] += 1
        users: dict[str, int] = {}
        metrics: dict[str, dict[str, dict]] = {}
        for (rollout, variant, metric), sums in self.sums.items():
            if rollout != rollout_id:
                continue
            metrics.setdefault(variant, {})[metric] = sums.to_ratio().to_dict()
            users[variant] = max(users.get(variant, 0), len(sums.per_user))
        return StatsSnapshot(
            rollout_id=rollout_id,
            partition=self.partition,
            seq=self.seq[rollout_id],
            ts=self.latest_ts.get(rollout_id, 0),
            users=users,
            metrics=metrics,
        )

    def take_dirty_snapshots(self) -> Iterable[StatsSnapshot]:
        """Snapshots of every rollout that changed since the last call."""
        dirty, self.dirty = self.dirty, set()
        self.events_since_snapshot = 0
        return [self.snapshot(rollout_id) for rollout_id in sorted(dirty)]


def fold_raw(state: PartitionStats, is_trace: bool, raw: bytes) -> bool:
    """Decode one message from the traces or feedback topic and fold it in.

    Raises InvalidEvent (naming the field) for bad input; returns False for a
    repeated event_id.
    """
    if is_trace:
        return state.apply_trace(decode(TraceEvent, raw))
    return state.apply_feedback(decode(FeedbackEvent, raw))
