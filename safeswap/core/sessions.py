"""Session windows in event time, as pure functions over a sorted list of request times.

A session here is inferred from the gap between a user's requests; the app's own
``session_id`` label plays no part in it (docs/architecture.md, "Words that mean one
thing"). Faust has no session windows, so the outcomes agent keeps each
user's open requests in a list sorted by event time and asks these functions:

* two consecutive requests are in the same session when the later one starts
  less than ``gap_ms`` after the earlier one (a request exactly ``gap_ms`` later
  opens a new session: "30 minutes without events" have passed);
* a session is *closable* once the watermark has reached ``last + gap_ms``: no
  event that is not late can join it any more, so closing it is final and
  independent of the order in which the inputs were interleaved.

A late-arriving request in between two open sessions simply merges them, because
sessions are derived from the sorted times, never stored as boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence


def same_session(earlier_ts: int, later_ts: int, gap_ms: int) -> bool:
    """True when ``later_ts`` continues the session whose latest request is ``earlier_ts``."""
    return later_ts - earlier_ts < gap_ms


def first_session_end(times: Sequence[int], gap_ms: int) -> int:
    """Index of the last element of the first session in sorted ``times`` (requires len >= 1)."""
    last = len(times) - 1
    i = 0
    while i < last and times[i + 1] - times[i] < gap_ms:
        i += 1
    return i


def closable_sessions(times: Sequence[int], watermark: int, gap_ms: int) -> list[tuple[int, int]]:
    """The leading sessions of sorted ``times`` that the watermark has closed, as
    ``(first_index, last_index)`` pairs, oldest first. Later sessions stay open."""
    closed: list[tuple[int, int]] = []
    start = 0
    n = len(times)
    while start < n:
        end = start
        while end + 1 < n and times[end + 1] - times[end] < gap_ms:
            end += 1
        if times[end] + gap_ms > watermark:
            break
        closed.append((start, end))
        start = end + 1
    return closed
