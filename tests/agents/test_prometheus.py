"""The worker's /metrics, fed directly (the sensor's update methods) and parsed with
prometheus-client's own parser: dead letters by reason kind, events per reading agent,
and the unit-correct families next to the kept ones. Lag needs real consumers: test_live."""

from __future__ import annotations

import msgspec
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agents.prometheus import WorkerMetrics
from safeswap.core.outcomes import OutcomeConfig, OutcomeProcessor
from schemas import encode
from streams.deadletter import DLQ_REASON_KINDS, dead_letter, reason_kind
from streams.settings import Settings
from tests.safeswap.dashboard.test_model import EVIL, snapshot
from tests.support.events import NOW, T0, trace

MIN = 60_000


def scrape(metrics: WorkerMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_outcome_reasons_become_their_kind_and_anything_else_a_bounded_label():
    processor = OutcomeProcessor(0, OutcomeConfig(max_event_bytes=5_000, lateness_ms=5 * MIN))
    sent = [
        processor.fold_raw("trace", b"{not json", NOW),
        processor.fold_raw("trace", encode(trace(1, NOW + 2 * 3600_000)), NOW),
        processor.fold_raw("trace", encode(trace(2, T0, response_text="x" * 6_000)), NOW),
        processor.fold_raw("trace", encode(trace(3, T0 + 60 * MIN)), NOW),  # accepted: None
        processor.fold_raw("trace", encode(trace(4, T0, user="u4")), NOW),
    ]  # an hour behind it: late
    assert sent[3] is None
    kinds: dict[str, int] = {}
    for reason in sent[:3] + sent[4:]:
        kinds[reason_kind(reason)] = kinds.get(reason_kind(reason), 0) + 1
    # The label is the key the processor counts the reason under (processor.reasons).
    assert {k: v for k, v in kinds.items() if k != "other"} == processor.reasons and "other" not in kinds
    assert set(processor.reasons) <= DLQ_REASON_KINDS
    assert reason_kind("invalid RolloutPlan: Expected `str`") == "invalid"
    assert reason_kind("internal error: KeyError('x')") == "internal_error"
    assert reason_kind("the judge said: <script>") == "other" and reason_kind("") == "other"


def test_dead_letters_by_reason_events_per_agent_and_unit_families():
    settings = Settings(topic_prefix="m")
    metrics = WorkerMetrics(settings)
    for reason, agent in (
        ("late_event: 400 s behind", "outcomes"),
        ("late_event: 500 s behind", "outcomes"),
        ("feedback_unjoined: no trace", "outcomes"),
        ("invalid Decision: x", "sink:decisions"),
    ):
        metrics.observe_sent(
            settings.topic("dlq"),
            dead_letter(topic="t", partition=0, offset=1, key=None, value=b"x", reason=reason, agent=agent),
        )
    traces = settings.topic("traces")
    metrics.reader("outcomes")(traces, 7)
    metrics.reader("sink")(traces, 5)
    metrics.observe_sent(
        settings.topic("status"), msgspec.json.encode({"rollout_id": "r", "percent": 25.0, "users": {"control": 3}})
    )
    metrics.observe_snapshot(msgspec.json.encode(snapshot(0, 1, 1_000, 40, {"control": 0.1, "candidate": 0.2})))

    samples = scrape(metrics)

    dlq = {
        dict(k)["reason"]: v
        for (name, k), v in samples.items()
        if name == "safeswap_dead_letters_total" and dict(k)["agent"] == "outcomes"
    }
    assert dlq == {"late_event": 2, "feedback_unjoined": 1}
    assert samples[("safeswap_dead_letters_total", (("agent", "sink:decisions"), ("reason", "invalid")))] == 1
    processed = {dict(k)["agent"]: v for (name, k), v in samples.items() if name == "safeswap_events_processed_total"}
    assert processed == {"outcomes": 7, "sink": 5}  # one message read by both: once per reader
    assert samples[("safeswap_rollout_percent", (("rollout_id", "r"),))] == 25
    assert samples[("safeswap_rollout_candidate_ratio", (("rollout_id", "r"),))] == 0.25

    def variant(name: str, **labels) -> float:
        return samples[(name, tuple(sorted({"rollout_id": EVIL, "variant": "control", **labels}.items())))]

    p95_ms = variant("safeswap_variant_metric", metric="latency_ms_p95")
    assert 100 < p95_ms < 150  # the histogram holds 100..149 ms
    assert variant("safeswap_variant_latency_seconds", quantile="0.95") == p95_ms / 1000
    assert (
        variant("safeswap_variant_latency_seconds", quantile="0.5")
        == variant("safeswap_variant_metric", metric="latency_ms_p50") / 1000
    )
    down = variant("safeswap_variant_metric", metric="thumbs_down_rate")
    assert 0 < down < 1 and variant("safeswap_variant_rate_ratio", metric="thumbs_down_rate") == down
    assert not [k for k in samples if k[0] == "safeswap_variant_rate_ratio" and "latency" in dict(k[1])["metric"]]


def test_live_judge_scores_from_the_status_become_gauges():
    from safeswap.core.live_scores import LiveScoreAccumulator, merge, summarize
    from tests.safeswap.dashboard.test_model import PLAN

    accumulator = LiveScoreAccumulator()
    for user in range(12):
        for variant, score in (("control", 8 + user % 2), ("candidate", 3 + user % 3)):
            accumulator.add_trace(variant, 1_000)
            accumulator.add_result(variant, "scored", f"{variant}{user}", score)
    live = summarize(merge([accumulator.to_dict()]), PLAN)
    settings = Settings(topic_prefix="m")
    metrics = WorkerMetrics(settings)
    metrics.observe_sent(settings.topic("status"), msgspec.json.encode({"rollout_id": "r", "live_judge": live}))
    samples = scrape(metrics)

    def gauge(name: str, **labels) -> float:
        return samples[(name, tuple(sorted({"rollout_id": "r", **labels}.items())))]

    assert gauge("safeswap_live_judge_score", variant="control") == 8.5
    assert gauge("safeswap_live_judge_score", variant="candidate") == 4.0
    assert (
        gauge("safeswap_live_judge_scored", variant="candidate")
        == 12
        == gauge("safeswap_live_judge_users", variant="control")
    )
    assert gauge("safeswap_live_judge_difference_estimate") == -4.5
    low, high = gauge("safeswap_live_judge_difference_ci_low"), gauge("safeswap_live_judge_difference_ci_high")
    assert (low, high) == (live["difference"]["ci_low"], live["difference"]["ci_high"]) and low < -4.5 < high
    # A status before any score exports none of them.
    quiet = WorkerMetrics(settings)
    quiet.observe_sent(settings.topic("status"), msgspec.json.encode({"rollout_id": "q", "live_judge": {}}))
    assert not [key for key in scrape(quiet) if key[0].startswith("safeswap_live_judge")]
