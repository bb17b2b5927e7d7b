"""A trace <-> feedback join with a time-to-live in event time, either arrival order.

Rules (pure, so a test can reach every edge):

* a feedback event joins its trace (same ``trace_id``) when their event times are
  at most ``ttl_ms`` apart (``|feedback.ts - trace.ts| <= ttl_ms``);
* feedback that arrives before its trace waits in :class:`PendingJoin` until the
  watermark passes ``feedback.ts + ttl_ms``: from then on no trace that is not late
  can still join it, so it expires (and the caller sends it to the DLQ);
* a trace is kept for joining until the watermark passes ``trace.ts + ttl_ms``.

Because both expiries compare against a watermark that only non-late events can
follow, the join result does not depend on how the two topics were interleaved.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")


def joinable(trace_ts: int, feedback_ts: int, ttl_ms: int) -> bool:
    return abs(feedback_ts - trace_ts) <= ttl_ms


def expired(ts: int, watermark: int, ttl_ms: int) -> bool:
    """A trace or waiting feedback at ``ts`` can no longer join anything."""
    return ts + ttl_ms < watermark


class PendingJoin(Generic[Item]):
    """Feedback waiting for its trace: ``trace_id -> [(ts, item), ...]``."""

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting: dict[str, list[tuple[int, Item]]] = {}

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, trace_id: str, ts: int, item: Item) -> None:
        self.waiting.setdefault(trace_id, []).append((ts, item))

    def take(self, trace_id: str) -> list[tuple[int, Item]]:
        """Everything waiting for ``trace_id`` (removed), oldest first."""
        return sorted(self.waiting.pop(trace_id, ()), key=lambda pair: pair[0])

    def expire(self, watermark: int, ttl_ms: int) -> list[Item]:
        """Remove and return the items no trace can join any more."""
        gone: list[Item] = []
        for trace_id in list(self.waiting):
            items = self.waiting[trace_id]
            keep = [(ts, item) for ts, item in items if not expired(ts, watermark, ttl_ms)]
            gone.extend(item for ts, item in items if expired(ts, watermark, ttl_ms))
            if keep:
                self.waiting[trace_id] = keep
            else:
                del self.waiting[trace_id]
        return gone

    def oldest_ts(self) -> int | None:
        return min((ts for items in self.waiting.values() for ts, _ in items), default=None)

    def __iter__(self) -> Iterator[tuple[str, list[tuple[int, Any]]]]:
        return iter(self.waiting.items())
