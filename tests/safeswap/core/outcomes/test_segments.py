"""Segments in the outcome state: a user's segment is fixed at its first trace, and a snapshot
carries the whole population (all segments added) and each ``key=value`` apart."""

from __future__ import annotations

from safeswap.core.controller import parse_snapshot
from safeswap.core.outcomes import MAX_SEGMENT_VALUES, OutcomeProcessor
from schemas import Decision
from tests.support.events import NOW, T0, feedback, trace

MINUTE = 60_000


def start(segments=("locale",), metrics=("thumbs_down_rate",), rollout="r1") -> Decision:
    return Decision(
        rollout_id=rollout,
        seq=1,
        ts=T0,
        action="start",
        stage="canary",
        percent=50,
        salt=rollout,
        reason="test",
        segments=list(segments),
        segment_metrics=list(metrics),
    )


def feed(processor: OutcomeProcessor, users: list[tuple[str, str, str | None, bool]]) -> None:
    """(user, variant, locale, thumbs-down) -> one trace each (and its thumbs-down)."""
    for n, (user, variant, locale, down) in enumerate(users, start=1):
        ts = T0 + n * MINUTE
        segment = {"locale": locale, "tier": "free"} if locale else None
        assert processor.apply(trace(n, ts, user=user, variant=variant, segment=segment), NOW) is None
        if down:
            assert processor.apply(feedback(n, n, ts + 1000, "thumbs_down", user=user, variant=variant), NOW) is None


def test_snapshot_has_the_population_and_each_segment_value():
    processor = OutcomeProcessor(0)
    processor.on_decision(start())
    users = [(f"u{i}", "candidate" if i % 2 else "control", "ja" if i % 4 < 2 else "en", i % 3 == 0) for i in range(40)]
    feed(processor, users)
    snapshot = processor.snapshot("r1", seq=1)
    assert set(snapshot.segments) == {"locale=ja", "locale=en"}
    population = parse_snapshot(snapshot)["0"]
    for variant in ("control", "candidate"):
        ja = snapshot.segments["locale=ja"]["0"][variant]
        en = snapshot.segments["locale=en"]["0"][variant]
        assert set(ja) == {"thumbs_down_rate"}  # only what the segment guardrails read
        total = population[variant]["thumbs_down_rate"]
        # users in disjoint segments: the population's sums are the segments' sums
        assert ja["thumbs_down_rate"]["num"] + en["thumbs_down_rate"]["num"] == total.num
        assert ja["thumbs_down_rate"]["n_units"] + en["thumbs_down_rate"]["n_units"] == total.n_units
        expected_down = sum(1 for _, v, _, d in users if v == variant and d)
        assert total.num == expected_down
    assert snapshot.cohort_exposures == {"0": {"control": 20, "candidate": 20}}


def test_a_user_keeps_the_segment_of_its_first_trace_also_after_its_state_is_released():
    processor = OutcomeProcessor(0)
    processor.on_decision(start())
    feed(processor, [("u1", "control", "ja", False)])
    processor.finish()  # the session closes, the user's state is released
    assert not processor.users
    later = T0 + 3 * 24 * 3600_000
    processor.apply(trace(9, later, user="u1", segment={"locale": "en"}), later + MINUTE)
    processor.apply(feedback(9, 9, later + 1000, "thumbs_down", user="u1"), later + MINUTE)
    snapshot = processor.snapshot("r1", seq=2)
    assert set(snapshot.segments) == {"locale=ja"}
    assert snapshot.segments["locale=ja"]["0"]["control"]["thumbs_down_rate"]["num"] == 1.0


def test_segment_values_beyond_the_cap_count_as_other_and_are_not_published():
    processor = OutcomeProcessor(0)
    processor.on_decision(start())
    feed(processor, [(f"u{i}", "control", f"l{i}", False) for i in range(MAX_SEGMENT_VALUES + 3)])
    snapshot = processor.snapshot("r1", seq=1)
    assert len(snapshot.segments) == MAX_SEGMENT_VALUES
    assert snapshot.cohort_exposures["0"]["control"] == MAX_SEGMENT_VALUES + 3  # all still in the population
    assert any(key[3] == "locale=other" for key in processor.cells)


def test_without_segment_keys_nothing_is_kept_per_segment():
    processor = OutcomeProcessor(0)
    feed(processor, [("u1", "control", "ja", True), ("u2", "candidate", "en", False)])
    snapshot = processor.snapshot("r1", seq=1)
    assert snapshot.segments == {}
    assert {key[3] for key in processor.cells} == {""}


def test_users_without_the_key_are_in_the_population_only():
    processor = OutcomeProcessor(0)
    processor.on_decision(start())
    feed(processor, [("u1", "control", None, True), ("u2", "control", "ja", False)])
    snapshot = processor.snapshot("r1", seq=1)
    assert set(snapshot.segments) == {"locale=ja"}
    assert parse_snapshot(snapshot)["0"]["control"]["thumbs_down_rate"].num == 1.0
