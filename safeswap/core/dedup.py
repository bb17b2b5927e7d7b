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
* :class:`DistinctHashes` counts distinct ids exactly *after* their state is
  released: 64-bit hashes (:func:`id_hash`) in a sorted array, 8 bytes an id.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterator
from hashlib import blake2b

import numpy as np

from schemas.state import DistinctSet, DueState

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

    def to_state(self) -> dict[str, int]:
        return dict(self.newest)

    @classmethod
    def from_state(cls, newest: dict[str, int], lateness_ms: int, max_skew_ms: int) -> Watermarks:
        marks = cls(tuple(newest), lateness_ms, max_skew_ms)
        marks.newest.update(newest)
        return marks

    def combined(self) -> int:
        """No event that is not late can be older than this, on any source.

        = max(min over sources of ``of``, max of ``of`` - max_skew), NEVER before any
        event; written out because it runs once per event."""
        newest = self.newest.values()
        fastest = max(newest)
        if fastest == NEVER:
            return NEVER
        slowest = min(newest)
        lateness = self.lateness_ms
        return max(NEVER if slowest == NEVER else slowest - lateness, fastest - lateness - self.max_skew_ms)


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

    def to_state(self) -> DueState:
        """Keys are tuples: written as lists of their components."""
        return DueState(
            bucket_ms=self.bucket_ms,
            heap=list(self.heap),
            buckets={bucket: [list(key) for key in keys] for bucket, keys in self.buckets.items()},
        )

    @classmethod
    def from_state(cls, state: DueState) -> DueQueue:
        queue = cls(state.bucket_ms)
        queue.heap = list(state.heap)
        queue.buckets = {bucket: [tuple(key) for key in keys] for bucket, keys in state.buckets.items()}
        return queue

    def pop_due(self, watermark: int) -> Iterator[Hashable]:
        """Keys whose bucket the watermark has reached (a key may come more than once)."""
        heap = self.heap
        while heap and heap[0] * self.bucket_ms <= watermark:
            yield from self.buckets.pop(heapq.heappop(heap))


def id_hash(value: str) -> int:
    """A 64-bit hash of an id (stable across processes, unlike ``hash``): among 1M ids a
    collision, which would undercount one, has a probability of ~3e-8."""
    return int.from_bytes(blake2b(value.encode(), digest_size=8).digest(), "little")


class DistinctHashes:
    """An exact set of 64-bit hashes at ~8 bytes per member.

    A Python set of ints costs ~70 bytes per member; here members live in a sorted
    ``uint64`` array and only recent additions in a set, merged into the array once
    they reach 1/64 of it (two sorted runs: the stable sort merges them in linear
    time), so the amortised cost stays O(1) per new member and memory ~8 bytes.
    The checkpoint carries the array as bytes (``to_state``)."""

    __slots__ = ("members", "recent", "min_merge")

    def __init__(self, min_merge: int = 4096) -> None:
        self.members = np.empty(0, dtype=np.uint64)
        self.recent: set[int] = set()
        self.min_merge = min_merge

    def __len__(self) -> int:
        return len(self.members) + len(self.recent)

    def to_state(self) -> DistinctSet:
        return DistinctSet(
            members=self.members.astype("<u8", copy=False).tobytes(),
            recent=sorted(self.recent),
            min_merge=self.min_merge,
        )

    @classmethod
    def from_state(cls, state: DistinctSet) -> DistinctHashes:
        hashes = cls(state.min_merge)
        # a copy: a view of the payload's bytes would be read-only
        hashes.members = np.frombuffer(state.members, dtype="<u8").astype(np.uint64)
        hashes.recent = set(state.recent)
        return hashes

    def __contains__(self, h: int) -> bool:
        if h in self.recent:
            return True
        members = self.members
        if not len(members):
            return False
        i = int(members.searchsorted(np.uint64(h)))
        return i < len(members) and int(members[i]) == h

    def add(self, h: int) -> bool:
        """Add ``h``; True when it was not a member yet."""
        if h in self:
            return False
        self.add_new(h)
        return True

    def add_new(self, h: int) -> None:
        """Add ``h``, which the caller knows is not a member (saves the lookup)."""
        recent = self.recent
        recent.add(h)
        if len(recent) >= max(self.min_merge, len(self.members) >> 6):
            merged = np.concatenate((self.members, np.sort(np.fromiter(recent, np.uint64, len(recent)))))
            merged.sort(kind="stable")
            self.members = merged
            self.recent = set()
