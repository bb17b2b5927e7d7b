"""Distinct users, abandonment that late feedback can change, retries
that stay inside their session, retried xor followed up, and replay's stderr/JSON contract."""

from __future__ import annotations

import json
import subprocess
import sys

import msgspec
import pytest

from safeswap.core.dedup import DistinctHashes, id_hash
from safeswap.core.metrics import model_drift
from safeswap.core.outcomes import OutcomeConfig, OutcomeProcessor, merged_snapshot_values
from safeswap.tools.replay import replay_lines, short_values
from schemas import DistinctSet
from streams.checkpoint import decode_state, encode_state
from tests.support.events import NOW, T0, assert_same_metrics, feedback, jsonl, simulated_events, trace

MIN = 60_000
HOUR = 60 * MIN


def run(events, config=None, collect=False):
    processor = OutcomeProcessor(0, config)
    processor.collect_outcomes = collect
    verdicts = [processor.apply(event, NOW) for event in events]
    assert verdicts == [None] * len(events), verdicts
    processor.finish()
    return processor


def values(processor, rollout="r1"):
    return merged_snapshot_values([processor.snapshot(rollout, 1)])


# -- users: distinct user_ids ---------------------------------------------------------------


def test_distinct_hashes_membership_survives_merges_and_the_checkpoint_state():
    hashes = DistinctHashes(min_merge=4)
    ids = [id_hash(f"user-{i}") for i in range(1000)]
    assert all(hashes.add(h) for h in ids)
    assert not any(hashes.add(h) for h in ids)  # every one already a member, merged or recent
    assert len(hashes) == 1000 and len(hashes.members) > 900  # most live in the compact array
    restored = DistinctHashes.from_state(
        msgspec.msgpack.decode(msgspec.msgpack.encode(hashes.to_state()), type=DistinctSet)
    )
    assert len(restored.recent) == len(hashes.recent) > 0  # both parts carried
    assert len(restored) == 1000 and all(h in restored for h in ids)
    assert id_hash("user-1000") not in restored
    assert id_hash("user-7") == id_hash("user-7") != id_hash("user-8")


def test_a_user_back_after_three_hours_is_one_user_and_the_same_unit():
    events = [
        trace(1, T0, user="u1"),
        trace(2, T0 + 3 * HOUR, user="u1", prompt="again"),
        trace(3, T0 + 3 * HOUR, user="u2", prompt="other"),
    ]
    processor = run(events)
    got = values(processor)["control"]
    assert got["users"] == 2 and got["n_units"] == 2  # u1's two visits add to u1's totals: one unit
    assert got["responses"] == 3
    ratio = processor.cells[("r1", "control", 0, "")].ratio(0)
    assert ratio.den_sq == 2**2 + 1  # per-user totals since first exposure: 2 responses and 1
    replayed = replay_lines(jsonl(events), OutcomeConfig(), partitions=3, now_ms=NOW)
    assert replayed["rollouts"]["r1"]["variants"]["control"]["users"] == 2
    assert replayed["rollouts"]["r1"]["variants"]["control"]["n_units"] == 2


def test_distinct_users_survive_a_checkpoint_round_trip_while_the_state_is_released():
    events = simulated_events(seed=11, users=80)
    variant_of = {e.user_id: e.variant for e in events}
    back = [f"user-{i}" for i in range(0, 80, 3)]
    returning = [
        trace(f"back-{i}", events[-1].ts + 6 * HOUR + i, user=user, variant=variant_of[user], prompt=f"back {i}")
        for i, user in enumerate(back)
    ]
    everything = events + returning
    uninterrupted = run(everything)
    processor = OutcomeProcessor(0)
    for event in events:
        processor.apply(event, NOW)
    assert any(("r1", user) not in processor.users for user in back)  # only the distinct sets remember them
    restored = OutcomeProcessor.from_state(decode_state(encode_state(processor.to_state())))  # a checkpoint's trip
    assert restored is not processor
    for event in returning:
        assert restored.apply(event, NOW) is None
    restored.finish()
    assert_same_metrics(values(restored), values(uninterrupted))
    users = {variant: got["users"] for variant, got in values(uninterrupted).items()}
    assert sum(users.values()) == 80  # each simulated user has one variant
    first = values(run(events))
    assert {v: got["users"] for v, got in first.items()} == users  # the returning users are no new users
    # a returning user adds to its own totals, not a new unit
    assert sum(got["n_units"] for got in values(uninterrupted).values()) == sum(
        got["n_units"] for got in first.values()
    )


# -- abandonment: late feedback moves the session -------------------------------------------


def _late_feedback_events(kinds_and_minutes):
    """u1's one-response session closes (u2's traffic moves both watermarks past its gap), then
    feedback on that response arrives within the join TTL."""
    events = [trace(1, T0, user="u1")]
    for i, minute in enumerate(range(1, 40)):
        events.append(trace(100 + i, T0 + minute * MIN, user="u2", prompt=f"q{i} " + "y" * i))
        events.append(feedback(100 + i, 100 + i, T0 + minute * MIN, "copy", user="u2"))
    for n, (kind, minute) in enumerate(kinds_and_minutes, start=1):
        events.append(feedback(n, 1, T0 + minute * MIN, kind, user="u1"))
    return events


@pytest.mark.parametrize(
    "kinds, abandoned",
    [
        ([("thumbs_down", 40)], True),
        ([("thumbs_down", 40), ("thumbs_up", 50)], False),  # abandoned, then moved back
        ([("abandon", 45)], True),
        ([("copy", 35), ("retry", 41)], True),
    ],
)
def test_feedback_after_the_session_closed_counts_for_abandonment_and_the_record_agrees(kinds, abandoned):
    events = _late_feedback_events(kinds)
    processor = OutcomeProcessor(0)
    processor.collect_outcomes = True
    for event in events[: -len(kinds)]:
        assert processor.apply(event, NOW) is None
    response = processor.users[("r1", "u1")].by_trace["t-1"]
    assert response.closed and response.last  # the session closed before its feedback came
    assert values(processor)["control"]["abandon_rate"] is not None
    for event in events[-len(kinds) :]:
        assert processor.apply(event, NOW) is None
    processor.finish()
    got = values(processor)["control"]
    u1_abandoned = 1.0 if abandoned else 0.0
    assert got["abandon_rate"] == pytest.approx((u1_abandoned + 0.0) / 2)  # u2's session ended on a copy
    record = {r.trace_id: r for r in processor.outcome_records}["t-1"]
    assert record.session_last and record.abandoned is abandoned
    # closed with all its feedback known (as replay closes at the end of its input): the same verdict
    alone = values(run([e for e in events if e.user_id == "u1"]))["control"]
    assert alone["abandon_rate"] == u1_abandoned


# -- retries stay in their session; retried xor followed up --------------------------------


def test_an_implicit_retry_never_crosses_a_session_boundary():
    config = OutcomeConfig(gap_ms=30_000, retry_window_ms=60_000)
    same = "how do I reset my password"
    apart = [trace(1, T0, prompt=same), trace(2, T0 + 45_000, prompt=same)]  # within the window, not the session
    got = values(run(apart, config))["control"]
    assert got["sessions"] == 2 and got["retry_rate"] == 0.0 and got["follow_up_rate"] == 0.0
    at_gap = [trace(1, T0, prompt=same), trace(2, T0 + 30_000, prompt=same)]  # exactly the gap: a new session
    assert values(run(at_gap, config))["control"]["retry_rate"] == 0.0
    inside = [trace(1, T0, prompt=same), trace(2, T0 + 29_999, prompt=same)]  # gap - 1: same session
    got = values(run(inside, config))["control"]
    assert got["sessions"] == 1 and got["retry_rate"] == 0.5


def test_a_retried_response_is_never_a_follow_up():
    events = [
        trace(1, T0, prompt="how do I reset my password"),
        feedback(1, 1, T0 + 1000, "retry"),
        trace(2, T0 + 5 * MIN, prompt="tell me a joke about databases"),  # next request, not similar
        feedback(2, 2, T0 + 5 * MIN + 1000, "follow_up"),
        feedback(3, 2, T0 + 5 * MIN + 2000, "retry"),
    ]
    processor = run(events, collect=True)
    got = values(processor)["control"]
    assert got["retry_rate"] == 1.0 and got["follow_up_rate"] == 0.0
    records = {r.trace_id: r for r in processor.outcome_records}
    assert all(r.retried and not r.follow_up for r in records.values())
    # without the explicit retries, #1 is followed up (a non-retry request) and #2 by its feedback
    plain = values(run([e for e in events if getattr(e, "kind", None) != "retry"]))["control"]
    assert plain["retry_rate"] == 0.0 and plain["follow_up_rate"] == 1.0


# -- replay: every rejected line on stderr, model drift with a plan -------------------------


def test_short_values_cuts_only_long_quoted_values():
    long = "x" * 5000
    cut = short_values(f"invalid: field `type` must be trace or feedback, got {long!r}")
    assert cut.startswith("invalid: field `type` must be trace or feedback, got 'xxx")
    assert "(5,000 chars)" in cut and len(cut) < 200
    plain = "future_timestamp: event time 2030-01-01T00:00:00Z is ahead of the worker's clock; it's " + "z" * 100
    assert short_values(plain) == plain


def test_model_drift_is_the_share_off_the_pinned_model():
    assert model_drift({"m1": 3, "m2": 1}, "m1") == 0.25
    assert model_drift({"m1": 3}, None) is None and model_drift({}, "m1") is None


def test_replay_reports_every_rejected_line_with_its_number(tmp_path):
    good = jsonl([trace(1, T0)])
    bad = [json.dumps({"type": "sideways" + "s" * 3000, "user_id": "u"}).encode() for _ in range(120)]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(good + bad) + b"\n")
    result = subprocess.run(
        [sys.executable, "-m", "safeswap", "replay", str(path), "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    skipped = [line for line in result.stderr.splitlines() if ": skipped: " in line]
    assert [int(line.split(":")[1]) for line in skipped] == list(range(2, 122))
    assert all(len(line) < 300 and "must be trace, feedback or decision" in line for line in skipped)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["events"] == {"read": 121, "invalid": 120, "duplicates": 0, "late": 0}
    assert out["rollouts"]["r1"]["variants"]["control"]["users"] == 1
    assert "model_drift" not in out["rollouts"]["r1"]["variants"]["control"]  # no plan: no pinned model


def test_replay_with_pins_reports_model_drift_per_variant():
    events = [
        trace(1, T0, model_version="m1"),
        trace(2, T0 + 1, user="u2", model_version="m2", prompt="b"),
        trace(3, T0 + 2, user="u3", variant="candidate", model_version="c1", prompt="c"),
    ]
    out = replay_lines(
        jsonl(events), OutcomeConfig(), partitions=2, now_ms=NOW, pinned=("r1", {"control": "m1", "candidate": "c1"})
    )
    variants = out["rollouts"]["r1"]["variants"]
    assert variants["control"]["model_drift"] == 0.5 and variants["candidate"]["model_drift"] == 0.0
