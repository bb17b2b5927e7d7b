"""Watermarks, lateness and an expiry queue: what makes replays idempotent and state bounded.

* :class:`Watermarks` keeps, per source (the traces and the feedback topic of one
  partition), the newest event time seen. An event older than its own source's
  newest minus ``lateness_ms`` is *late*. Judging lateness per source keeps the
  verdict independent of how Faust interleaves the two topics (within one
  topic-partition the order is fixed by the log). The *combined* watermark that
  closes sessions and expires joins is the slower source's watermark (it may lag
  the faster one by at most ``max_skew_ms``, so an idle topic cannot hold state
  forever).
* Dedup by event id needs no separate horizon: an id whose event time is behind
  the combined watermark can be forgotten, because a repeat of it is late anyway
  (late events are rejected, never counted).
* :class:`DueQueue` wakes keys up when the watermark passes their due time, in
  buckets, so expiry costs O(1) per event instead of a scan over every user.
"""

from __future__ import annotations

import heapq
from typing import Hashable, Iterator

NEVER = -(1 << 62)  # a watermark before any event


class Watermarks:
    __slots__ = ("lateness_ms", "max_skew_ms", "newest")

    def __init__(self, sources: tuple[str, ...], lateness_ms: int, max_skew_ms: int) -> None:
        self.lateness_ms = lateness_ms
        self.max_skew_ms = max_skew_ms
        self.newest: dict[str, int] = {source: NEVER for source in sources}

    def is_late(self, source: str, ts: int) -> bool:
        newest = self.newest[source]
        return newest != NEVER and ts < newest - self.lateness_ms

    def observe(self, source: str, ts: int) -> None:
        if ts > self.newest[source]:
            self.newest[source] = ts

    def of(self, source: str) -> int:
        newest = self.newest[source]
        return NEVER if newest == NEVER else newest - self.lateness_ms

    def combined(self) -> int:
        """No event that is not late can be older than this, on any source."""
        marks = [self.of(source) for source in self.newest]
        fastest = max(marks)
        if fastest == NEVER:
            return NEVER
        return max(min(marks), fastest - self.max_skew_ms)


class DueQueue:
    """Keys to wake up once the watermark reaches their due time (bucketed)."""

    __slots__ = ("bucket_ms", "buckets", "heap")

    def __init__(self, bucket_ms: int = 1000) -> None:
        self.bucket_ms = bucket_ms
        self.buckets: dict[int, list[Hashable]] = {}
        self.heap: list[int] = []

    def __len__(self) -> int:
        return sum(len(keys) for keys in self.buckets.values())

    def schedule(self, key: Hashable, due: int) -> None:
        bucket = -(-due // self.bucket_ms)  # ceil: never wake a key before its due time
        keys = self.buckets.get(bucket)
        if keys is None:
            self.buckets[bucket] = [key]
            heapq.heappush(self.heap, bucket)
        else:
            keys.append(key)

    def next_due(self) -> int | None:
        return self.heap[0] * self.bucket_ms if self.heap else None

    def pop_due(self, watermark: int) -> Iterator[Hashable]:
        """Keys whose bucket the watermark has reached (a key may come more than once)."""
        heap = self.heap
        while heap and heap[0] * self.bucket_ms <= watermark:
            yield from self.buckets.pop(heapq.heappop(heap))
