"""OutcomeProcessor: the metric contract of docs/metrics.md as pure step functions."""

import random

import pytest
from rapidfuzz.distance import Levenshtein

from safeswap.core.outcomes import OutcomeConfig, OutcomeProcessor, merged_snapshot_values
from schemas import encode
from tests.support.events import NOW, T0, assert_same_metrics, feedback, simulated_events, trace

MIN = 60_000


def run(events, config=None, finish=True):
    processor = OutcomeProcessor(0, config)
    verdicts = [processor.apply(event, NOW) for event in events]
    if finish:
        processor.finish()
    return processor, verdicts


def values(processor, rollout="r1"):
    return merged_snapshot_values([processor.snapshot(rollout, 1)])


def test_response_rates_count_a_response_once_however_many_feedbacks():
    events = [
        trace(1, T0),
        trace(2, T0 + 40 * MIN, prompt="something else"),
        feedback(1, 1, T0 + 1000, "thumbs_down"),
        feedback(2, 1, T0 + 2000, "thumbs_down"),
        feedback(3, 2, T0 + 41 * MIN, "thumbs_up"),
    ]
    got = values(run(events)[0])["control"]
    assert got["responses"] == 2 and got["users"] == 1
    assert got["thumbs_down_rate"] == 0.5
    assert got["thumbs_up_rate"] == 0.5
    assert got["sessions"] == 2 and got["session_turns_mean"] == 1.0


def test_feedback_before_its_trace_waits_and_joins():
    events = [feedback(1, 1, T0 + 5000, "thumbs_down"), trace(1, T0)]
    processor, verdicts = run(events)
    assert verdicts == [None, None]
    assert values(processor)["control"]["thumbs_down_rate"] == 1.0
    assert processor.counts["late"] == 0


def test_feedback_without_trace_within_the_ttl_is_rejected_with_a_reason_not_dropped():
    config = OutcomeConfig(join_ttl_ms=10 * MIN)
    events = [
        trace(1, T0),
        feedback(1, 1, T0 + 10 * MIN, "thumbs_down"),  # at the TTL: joins
        trace(2, T0 + 20 * MIN),
        feedback(2, 2, T0 + 30 * MIN + 1, "thumbs_down"),  # TTL + 1: rejected
        feedback(3, 99, T0 + 31 * MIN, "thumbs_up"),
    ]  # its trace never comes
    processor, verdicts = run(events, config)
    assert verdicts[1] is None
    assert verdicts[3].startswith("feedback_unjoined")
    assert processor.reasons["feedback_unjoined"] == 2 and processor.counts["late"] == 2
    assert [reason.split(":")[0] for _, reason in processor.rejected] == ["feedback_unjoined"]
    assert values(processor)["control"]["thumbs_down_rate"] == 0.5


def test_edit_distance_uses_the_latest_edit_and_is_normalised():
    response = "The quick brown fox jumps over the lazy dog"
    first, last = "The quick brown fox", "A quick red fox jumps over the dog"
    events = [
        trace(1, T0, response_text=response),
        feedback(2, 1, T0 + 3000, "edit", final_text=last),
        feedback(1, 1, T0 + 2000, "edit", final_text=first),
    ]  # older edit arrives later
    got = values(run(events)[0])["control"]
    assert got["edit_rate"] == 1.0
    assert got["edit_distance_mean"] == pytest.approx(Levenshtein.normalized_distance(response, last))
    assert got["edit_distance_words_mean"] == pytest.approx(
        Levenshtein.normalized_distance(response.split(), last.split())
    )


def test_implicit_retry_window_and_similarity_edges():
    same = "how do I reset my password"
    events = [
        trace(1, T0, prompt=same),
        trace(2, T0 + MIN, prompt=same + "?"),  # 60 s, similar: retry
        trace(3, T0 + 2 * MIN + 1, prompt=same),  # 60 s + 1 after #2: not a retry of #2
        trace(4, T0 + 2 * MIN + 2, prompt="tell me a joke about databases"),
    ]  # dissimilar
    got = values(run(events)[0])["control"]
    assert got["retry_rate"] == 0.25  # only #1
    # follow-ups: #2 (next #3 not a retry), #3 (next #4 dissimilar); #1 was retried, #4 is last
    assert got["follow_up_rate"] == 0.5
    assert got["sessions"] == 1 and got["session_turns_mean"] == 4


def test_explicit_retry_and_abandon_rules():
    gap = 30 * MIN
    events = [
        trace(1, T0, prompt="a"),
        feedback(1, 1, T0 + 1000, "retry"),  # session 1: last got a retry -> abandoned
        trace(2, T0 + gap + 1, prompt="b"),
        feedback(2, 2, T0 + gap + 2, "thumbs_down"),
        feedback(3, 2, T0 + gap + 3, "copy"),  # positive after the thumbs-down: not abandoned
        trace(3, T0 + 3 * gap, prompt="c", error="timeout"),  # ended in an error: abandoned
        trace(4, T0 + 5 * gap, prompt="d"),
        feedback(4, 4, T0 + 5 * gap + 1, "abandon"),  # explicit
        trace(5, T0 + 7 * gap, prompt="e"),  # nothing happened after it: not abandoned
    ]
    got = values(run(events)[0])["control"]
    assert got["sessions"] == 5
    assert got["abandon_rate"] == pytest.approx(3 / 5)
    assert got["retry_rate"] == pytest.approx(1 / 5)
    assert got["error_rate"] == pytest.approx(1 / 5) and got["error_rate_timeout"] == pytest.approx(1 / 5)
    assert got["error_rate_refusal"] == 0.0


def test_a_user_counts_in_the_arm_that_first_served_it():
    """Intention to treat: a control user moved to the candidate (a ramp step) keeps counting in
    control, its session too; which variant served each response is still counted."""
    events = [trace(1, T0, variant="control", prompt="x"), trace(2, T0 + MIN, variant="candidate", prompt="y")]
    got = values(run(events)[0])
    assert got["control"]["sessions"] == 1 and got["control"]["session_turns_mean"] == 2.0
    assert got["candidate"]["sessions"] == 0 and got["candidate"]["session_turns_mean"] is None
    assert got["control"]["users"] == got["candidate"]["users"] == 1  # served each once
    assert got["control"]["responses"] == got["candidate"]["responses"] == 1


def test_latency_and_cost_are_stratified_by_cache_and_models_are_counted():
    events = [
        trace(1, T0, latency_ms=100.0, cache_hit=True, model_version="m2"),
        trace(2, T0 + 1, latency_ms=300.0, cache_hit=False, prompt="other", cost_usd=0.03),
        trace(3, T0 + 2, latency_ms=500.0, cache_hit=False, prompt="third", cost_usd=0.05),
    ]
    got = values(run(events)[0])["control"]
    assert got["latency_ms_mean"] == pytest.approx(300.0)
    assert got["latency_ms_mean_cache_hit"] == pytest.approx(100.0)
    assert got["latency_ms_mean_cache_miss"] == pytest.approx(400.0)
    assert got["cache_hit_rate"] == pytest.approx(1 / 3)
    assert got["cost_usd_mean"] == pytest.approx(0.03)
    assert got["cost_per_session_mean"] == pytest.approx(0.09)
    assert 300 < got["latency_ms_p95"] <= 520 and got["latency_ms_p95_cache_hit"] < 110
    assert got["models"] == {"m1": 2, "m2": 1}


def test_users_are_the_unit_of_the_ratio_statistics():
    events = [trace(i, T0 + i, user="heavy", prompt=f"q{i}") for i in range(10)] + [trace(99, T0, user="light")]
    processor, _ = run(events)
    ratio = processor.cells[("r1", "control", 0, "")].ratio(0)  # thumbs_down_rate
    assert ratio.n_units == 2 and ratio.users == ratio.n == 2  # two users, in two hash buckets
    assert ratio.den == 11 and ratio.den_sq == 10**2 + 1


def test_repeated_event_ids_and_trace_ids_never_count_twice():
    events = simulated_events(seed=3, users=60)
    once, _ = run(events)
    twice, _ = run([e for event in events for e in (event, event)])
    assert twice.counts["duplicates"] == len(events)
    assert_same_metrics(values(twice), values(once))


def test_metrics_do_not_depend_on_how_the_two_topics_interleave():
    events = simulated_events(seed=5, users=150)
    traces = [e for e in events if e.__class__.__name__ == "TraceEvent"]
    feedbacks = [e for e in events if e.__class__.__name__ == "FeedbackEvent"]
    baseline = values(run(events)[0])
    rng = random.Random(1)
    for _ in range(3):  # random merges that keep each topic's own order
        merged, i, j = [], 0, 0
        while i < len(traces) or j < len(feedbacks):
            take_trace = j >= len(feedbacks) or (i < len(traces) and rng.random() < 0.5)
            merged.append(traces[i] if take_trace else feedbacks[j])
            i, j = (i + 1, j) if take_trace else (i, j + 1)
        assert_same_metrics(values(run(merged)[0]), baseline)


def test_out_of_order_trace_relinks_retry_and_follow_up():
    same = "how do I reset my password"
    in_order = [trace(1, T0, prompt=same), trace(2, T0 + 20_000, prompt=same), trace(3, T0 + 200_000, prompt="x")]
    shuffled = [in_order[0], in_order[2], in_order[1]]  # #2 arrives after #3 (within the lateness)
    assert values(run(shuffled)[0]) == values(run(in_order)[0])


def test_late_events_go_to_the_dlq_with_a_reason_and_are_counted():
    config = OutcomeConfig(lateness_ms=5 * MIN)
    events = [trace(1, T0 + 60 * MIN), trace(2, T0 + 55 * MIN, user="u2"), trace(3, T0 + 55 * MIN - 1, user="u3")]
    processor, verdicts = run(events, config)
    assert verdicts[1] is None
    assert verdicts[2].startswith("late_event") and "allowed lateness is 300 s" in verdicts[2]
    assert processor.counts["late"] == 1 and values(processor)["control"]["responses"] == 2


def test_bad_input_is_rejected_with_a_reason_and_processing_continues():
    processor = OutcomeProcessor(0, OutcomeConfig(max_event_bytes=50_000, max_edit_chars=1000))
    good = encode(trace(1, T0))
    assert processor.fold_raw("trace", b"{not json", NOW).startswith("undecodable TraceEvent: JSON is malformed")
    assert "latency_ms" in processor.fold_raw(
        "trace", encode(trace(2, T0)).replace(b'"latency_ms":100.0', b'"latency_ms":-1'), NOW
    )
    assert "variant" in processor.fold_raw("trace", good.replace(b'"control"', b'"sideways"'), NOW)
    assert processor.fold_raw("trace", encode(trace(3, NOW + 2 * 3600_000)), NOW).startswith("future_timestamp")
    assert processor.fold_raw("trace", encode(trace(4, T0, response_text="x" * 60_000)), NOW).startswith("too_large")
    # big but allowed texts are truncated for edit distance: quick, and still counted
    assert processor.fold_raw("trace", encode(trace(5, T0, prompt="p5", response_text="ab " * 15_000)), NOW) is None
    assert (
        processor.fold_raw("feedback", encode(feedback(5, 5, T0 + 1, "edit", final_text="ba " * 15_000)), NOW) is None
    )
    assert processor.fold_raw("trace", good, NOW) is None
    processor.finish()
    assert processor.counts == {"read": 8, "invalid": 5, "duplicates": 0, "late": 0}
    assert processor.reasons == {"invalid": 3, "future_timestamp": 1, "too_large": 1}
    got = values(processor)["control"]
    assert got["responses"] == 2 and got["edit_rate"] == 0.5 and 0 < got["edit_distance_mean"] < 1


def test_state_is_released_after_the_gap_and_the_ttl():
    config = OutcomeConfig(gap_ms=30 * MIN, join_ttl_ms=60 * MIN, lateness_ms=MIN, max_skew_ms=10 * 60 * MIN)
    processor = OutcomeProcessor(0, config)
    processor.apply(trace(1, T0, user="gone"), NOW)
    processor.apply(feedback(1, 1, T0 + 1000, "thumbs_up", user="gone"), NOW)
    clock = T0 + 60 * MIN + MIN  # TTL reached but the watermark is ttl + lateness behind: still held
    processor.apply(trace(2, clock, user="other"), NOW)
    processor.apply(feedback(2, 2, clock, "copy", user="other"), NOW)
    assert ("r1", "gone") in processor.users
    clock += MIN + 2
    processor.apply(trace(3, clock, user="other", prompt="next"), NOW)
    processor.apply(feedback(3, 3, clock, "copy", user="other"), NOW)
    assert ("r1", "gone") not in processor.users
    assert values(processor)["control"]["thumbs_up_rate"] == pytest.approx(1 / 3)


def test_exposures_count_users_by_their_first_variant_and_crossovers_count_leaks():
    # u1: control then candidate (a ramp moved it): one control exposure, no leak.
    # u2: candidate then control within a visit: a crossover (assignment leak).
    # u3: control, then back after the session gap + TTL: still one user, one exposure.
    # u4: candidate, then control on a later visit (its state released meanwhile): a crossover,
    #     counted once however often it is served control again.
    events = [
        trace(1, T0, user="u1"),
        trace(2, T0 + 1 * MIN, user="u1", variant="candidate", prompt="x"),
        trace(3, T0, user="u2", variant="candidate"),
        trace(4, T0 + 1 * MIN, user="u2", prompt="y"),
        trace(5, T0, user="u3"),
        trace(6, T0 + 5 * 60 * MIN, user="u3", prompt="z"),
        trace(7, T0, user="u4", variant="candidate"),
        trace(8, T0 + 5 * 60 * MIN, user="u4", prompt="w"),
        trace(9, T0 + 10 * 60 * MIN, user="u4", prompt="v"),
    ]
    processor, verdicts = run(sorted(events, key=lambda e: e.ts))
    assert verdicts == [None] * 9
    snapshot = processor.snapshot("r1", 1)
    assert snapshot.first_exposures == {"control": 2, "candidate": 2}
    assert snapshot.crossover_users == 2
    assert snapshot.users == {"control": 4, "candidate": 3}


def test_a_final_response_yields_one_outcome_record_with_what_happened():
    events = [
        trace(1, T0),
        trace(2, T0 + 20_000, prompt="how do I reset my password?"),  # implicit retry of 1
        feedback(1, 2, T0 + 30_000, "edit", final_text="Open settings, then reset."),
        feedback(2, 2, T0 + 40_000, "thumbs_up"),
        trace(3, T0 + 5 * 60 * MIN, user="u2", error="timeout"),
    ]  # alone in its session, ended in an error
    processor = OutcomeProcessor(0)
    processor.collect_outcomes = True
    for event in events:
        assert processor.apply(event, NOW) is None
    processor.finish()
    records = {r.trace_id: r for r in processor.outcome_records}
    assert set(records) == {"t-1", "t-2", "t-3"}
    assert records["t-1"].retried and not records["t-1"].session_last and not records["t-1"].abandoned
    second = records["t-2"]
    assert second.edited and second.thumbs_up and second.session_last and not second.abandoned
    assert second.edit_distance == pytest.approx(
        Levenshtein.normalized_distance("Open settings and click reset.", "Open settings, then reset.")
    )
    assert records["t-3"].abandoned and records["t-3"].error == "timeout"
    assert records["t-2"].event_id == "outcome-t-2" and records["t-2"].model_version == "m1"
    off = OutcomeProcessor(0)
    for event in events:
        off.apply(event, NOW)
    off.finish()
    assert off.outcome_records == []  # replay leaves collection off: nothing accumulates


def test_a_session_longer_than_the_join_ttl_is_not_revisited_on_every_watermark_step():
    """A user active for hours (turns 20 min apart: one session, longer than the 60 min
    join TTL) must be woken when something can change, not at every second of event
    time while other users' events move the watermark (that once cost 90% of the worker)."""
    processor = OutcomeProcessor(0)
    calls = {"u-long": 0}
    advance_user = processor._advance_user

    def counting(user, watermark):
        if user.user_id == "u-long":
            calls["u-long"] += 1
        return advance_user(user, watermark)

    processor._advance_user = counting
    hours = 4
    events = [
        trace(n, T0 + n * 20 * MIN, user="u-long", prompt=f"question {n} " + "x" * (n % 7)) for n in range(hours * 3)
    ]
    events += [
        trace(1000 + s, T0 + s * 1000, user=f"u-bg-{s % 500}", prompt=f"background {s}") for s in range(hours * 3600)
    ]  # the watermark moves one second of event time per event
    events += [
        feedback(s, 1000 + s, T0 + s * 1000 + 500, "thumbs_up", user=f"u-bg-{s % 500}")
        for s in range(0, hours * 3600, 10)
    ]  # both sources move: the watermark is their minimum
    events.sort(key=lambda e: e.ts)
    for event in events:
        processor.apply(event, NOW)
    # one wake-up per turn (the session's end moves) or per response reaching its TTL, not 14,400
    assert calls["u-long"] <= 4 * hours * 3, calls
    processor.finish()
    long_user = values(processor)["control"]
    assert long_user["responses"] == hours * 3 + hours * 3600
