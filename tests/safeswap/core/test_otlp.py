"""OTel GenAI spans from the real SDK, flag evaluations from OpenFeature's real hook, in both
of the Collector's encodings -> the TraceEvents and FeedbackEvents the Emitter would send."""

from __future__ import annotations

import random

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from safeswap.core.assignment import assign
from safeswap.core.otlp import decode_spans, map_spans
from schemas import InvalidEvent
from tests.support.otlp import App

ROLLOUT = "support-bot-sonnet"


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
def test_model_calls_become_trace_events_and_feedback_events(encoding):
    app, rng = App(percent=50), random.Random(1)
    ids = {
        f"u{i}": app.request(ROLLOUT, f"u{i}", rng=rng, feedback="thumbs_down" if i % 3 == 0 else None)
        for i in range(30)
    }
    app.request(ROLLOUT, "u-err", rng=rng, error="RateLimitError")
    mapped = map_spans(decode_spans(app.export(encoding), encoding))
    assert not mapped.rejected
    traces = {t.user_id: t for t in mapped.traces}
    assert len(traces) == 31 and mapped.skipped == 31  # the request spans (a feedback span is used)
    for user, response_id in ids.items():
        trace = traces[user]
        assert trace.rollout_id == ROLLOUT and trace.variant == assign(ROLLOUT, user, 50)
        assert trace.trace_id == response_id and trace.session_id == f"s-{user}"
        assert (trace.input_tokens, trace.output_tokens) == (300, 120) and 300 <= trace.latency_ms <= 900
        assert trace.model_version.startswith(
            "claude-sonnet-4-5-" if trace.variant == "control" else "claude-sonnet-4-6-"
        )
        assert trace.error == "none" and trace.prompt_version == "unknown" and trace.cost_usd == 0.0
    assert traces["u-err"].error == "rate_limit"
    assert {t.variant for t in mapped.traces} == {"control", "candidate"}
    feedback = {f.user_id: f for f in mapped.feedback}
    assert set(feedback) == {f"u{i}" for i in range(0, 30, 3)}
    for user, event in feedback.items():
        assert event.kind == "thumbs_down" and event.trace_id == ids[user] and event.variant == traces[user].variant


def test_the_rollout_and_variant_may_be_span_attributes_instead_of_a_flag_evaluation():
    app = App()
    with app.tracer.start_as_current_span("generate") as span:
        span.set_attributes(
            {
                "gen_ai.request.model": "m",
                "safeswap.rollout_id": "r2",
                "safeswap.variant": "candidate",
                "enduser.id": "ann",
                "gen_ai.conversation.id": "c1",
                "safeswap.cost_usd": 0.002,
                "gen_ai.usage.cache_read_input_tokens": 120,
                "safeswap.prompt_version": "v42",
                "safeswap.segment.locale": "ja",
                "safeswap.segment.tier": "enterprise",
            }
        )
    (trace,) = map_spans(decode_spans(app.export(), "otlp_proto")).traces
    assert (trace.rollout_id, trace.variant, trace.user_id, trace.session_id) == ("r2", "candidate", "ann", "c1")
    assert trace.cost_usd == 0.002 and trace.cache_hit and trace.prompt_version == "v42" and trace.model_version == "m"
    assert trace.segment == {"locale": "ja", "tier": "enterprise"}


def test_spans_that_are_not_model_calls_of_a_rollout_are_skipped_and_broken_ones_name_the_field():
    app = App()
    with app.tracer.start_as_current_span("GET /health"):
        pass
    with app.tracer.start_as_current_span("chat without a rollout") as span:
        span.set_attribute("gen_ai.operation.name", "chat")
    with app.tracer.start_as_current_span("chat of a rollout, no user") as span:
        span.set_attributes(
            {"gen_ai.operation.name": "chat", "safeswap.rollout_id": "r3", "safeswap.variant": "control"}
        )
    with app.tracer.start_as_current_span("chat of a rollout, no variant") as span:
        span.set_attributes({"gen_ai.operation.name": "chat", "safeswap.rollout_id": "r3", "user.id": "u"})
    mapped = map_spans(decode_spans(app.export("otlp_json"), "otlp_json"))
    assert mapped.traces == [] and mapped.skipped == 2
    assert len(mapped.rejected) == 2
    assert "no user: set user.id" in mapped.rejected[0] and "'chat of a rollout, no user'" in mapped.rejected[0]
    assert "no variant: set safeswap.variant" in mapped.rejected[1]


@pytest.mark.parametrize(
    ("payload", "encoding"),
    [
        (b"\xff\x00garbage", "otlp_proto"),
        (b"{not json", "otlp_json"),
        (b'{"resourceSpans": 3}', "otlp_json"),
        (b'{"type": "trace", "user_id": "u"}', "otlp_json"),
    ],
)
def test_a_message_that_is_not_otlp_is_refused_with_the_encoding_named(payload, encoding):
    with pytest.raises(InvalidEvent, match=f"invalid OTLP \\({encoding}\\)"):
        decode_spans(payload, encoding)


def test_the_json_encoding_is_the_otlp_json_form_with_hex_ids():
    app = App()
    app.request(ROLLOUT, "u1", rng=random.Random(2))
    proto = app.exporter.get_finished_spans()
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from safeswap.core.otlp import to_json

    request = encode_spans(proto)
    document = to_json(request).decode()
    assert f'"traceId": "{proto[0].context.trace_id:032x}"' in document and '"startTimeUnixNano": "' in document
    assert ExportTraceServiceRequest.FromString(request.SerializeToString()) == request
