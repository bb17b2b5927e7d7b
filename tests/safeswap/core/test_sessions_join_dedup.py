"""Stream primitives at their boundaries: session gap, join TTL, lateness, expiry queue."""

import pytest

from safeswap.core.dedup import NEVER, DueQueue, Watermarks
from safeswap.core.join import PendingJoin, expired, joinable
from safeswap.core.sessions import closable_sessions, first_session_end, same_session

GAP = 30 * 60_000


def test_session_gap_boundaries():
    assert same_session(0, GAP - 1, GAP)
    assert not same_session(0, GAP, GAP)  # exactly the gap without events: a new session
    assert not same_session(0, GAP + 1, GAP)


def test_sessions_split_and_close_only_when_the_watermark_reaches_last_plus_gap():
    times = [0, 10, 10 + GAP, 10 + GAP + GAP]  # exactly gap apart: three sessions [0, 10], [.], [.]
    assert first_session_end(times, GAP) == 1
    assert first_session_end([0, 10, 9 + GAP], GAP) == 2  # gap - 1: still one session
    assert closable_sessions(times, watermark=10 + GAP - 1, gap_ms=GAP) == []
    assert closable_sessions(times, watermark=10 + GAP, gap_ms=GAP) == [(0, 1)]
    assert closable_sessions(times, watermark=10 + 2 * GAP, gap_ms=GAP) == [(0, 1), (2, 2)]


def test_out_of_order_request_merges_two_open_sessions():
    times = [0, GAP + 100]
    assert closable_sessions(times, watermark=10**12, gap_ms=GAP) == [(0, 0), (1, 1)]
    merged = sorted(times + [GAP // 2])  # arrives late, within the allowed lateness
    assert closable_sessions(merged, watermark=10**12, gap_ms=GAP) == [(0, 2)]


def test_join_ttl_edges():
    ttl = 3_600_000
    assert joinable(1000, 1000 + ttl, ttl)
    assert not joinable(1000, 1000 + ttl + 1, ttl)
    assert joinable(1000 + ttl, 1000, ttl)  # feedback stamped before its trace: either order
    assert not expired(1000, 1000 + ttl, ttl)
    assert expired(1000, 1000 + ttl + 1, ttl)


def test_pending_join_waits_and_expires_at_the_ttl():
    pending = PendingJoin()
    pending.add("t1", 100, "early")
    pending.add("t1", 50, "earlier")
    pending.add("t2", 500, "other")
    assert pending.expire(watermark=100 + 10, ttl_ms=10) == ["earlier"]  # 50 + 10 < 110; 100 + 10 is not
    assert pending.expire(watermark=100 + 11, ttl_ms=10) == ["early"]
    assert pending.oldest_ts() == 500
    assert pending.take("t2") == [(500, "other")]
    assert len(pending) == 0


def test_lateness_is_judged_per_source_and_the_combined_watermark_waits_for_the_slower_one():
    marks = Watermarks(("trace", "feedback"), lateness_ms=100, max_skew_ms=10_000)
    assert marks.combined() == NEVER
    marks.observe("trace", 5_000)
    assert not marks.is_late("trace", 4_900)
    assert marks.is_late("trace", 4_899)
    assert not marks.is_late("feedback", 0)  # feedback has its own clock
    assert marks.combined() == 5_000 - 100 - 10_000  # feedback silent: held back by the skew bound
    marks.observe("feedback", 3_000)
    assert marks.combined() == 3_000 - 100
    marks.observe("trace", 50_000)
    assert marks.combined() == 50_000 - 100 - 10_000  # the lagging source holds it at most max_skew


def test_due_queue_wakes_keys_when_the_watermark_reaches_their_bucket():
    queue = DueQueue(bucket_ms=1000)
    queue.schedule("a", 1500)
    queue.schedule("b", 1000)
    queue.schedule("c", 7000)
    assert list(queue.pop_due(999)) == []
    assert list(queue.pop_due(1000)) == ["b"]
    assert list(queue.pop_due(1999)) == []  # 1500 is rounded up: never woken early
    assert list(queue.pop_due(2000)) == ["a"]
    assert list(queue.pop_due(10_000)) == ["c"] and list(queue.pop_due(10**9)) == []


def test_add_response_equals_one_add_per_metric():
    """The hot path's fused update gives the sums and per-user totals of ``add(totals, m, x, 1.0)``."""
    import random

    from safeswap.core.metrics import N_RATIO, VariantSums

    rng = random.Random(5)
    fused, single = VariantSums(), VariantSums()
    users = [(fused.bucket(u), single.bucket(u)) for u in range(20)]
    for _ in range(2000):
        totals_fused, totals_single = rng.choice(users)
        rows = [(m, rng.choice([0.0, 0.0, 1.0, rng.uniform(0, 900)])) for m in rng.sample(range(N_RATIO), 6)]
        fused.add_response(totals_fused, rows)
        for m, x in rows:
            single.add(totals_single, m, x, 1.0)
    assert fused.sums == pytest.approx(single.sums, rel=1e-12)
    assert [list(t) for t, _ in users] == [pytest.approx(list(t), rel=1e-12) for _, t in users]
