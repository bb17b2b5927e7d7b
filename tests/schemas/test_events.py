import json

import jsonschema
import pytest

from schemas import FeedbackEvent, InvalidEvent, RolloutPlan, TraceEvent, convert, decode, encode, json_schemas


def trace_fields(**overrides):
    fields = dict(
        event_id="e1",
        ts="2026-11-02T09:16:40Z",
        rollout_id="r1",
        variant="candidate",
        user_id="u1",
        session_id="s1",
        trace_id="t1",
        prompt_version="v41",
        model_version="claude-sonnet-4-6-20260301",
        latency_ms=812.5,
        input_tokens=300,
        output_tokens=120,
        cost_usd=0.0021,
        cache_hit=False,
    )
    fields.update(overrides)
    return fields


def test_trace_decodes_rfc3339_and_epoch_ms_to_the_same_event_time():
    a = convert(TraceEvent, trace_fields(ts="2026-11-02T09:16:40Z"))
    b = convert(TraceEvent, trace_fields(ts=1793611000000))
    c = convert(TraceEvent, trace_fields(ts="2026-11-02T10:16:40+01:00"))
    assert a.ts == b.ts == c.ts == 1793611000000


def test_encode_roundtrips_with_rfc3339_on_the_wire():
    event = convert(TraceEvent, trace_fields(error="timeout", response_text="hi"))
    wire = json.loads(encode(event))
    assert wire["ts"] == "2026-11-02T09:16:40.000Z"
    assert decode(TraceEvent, encode(event)) == event


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        ({"variant": "treatment"}, "variant", "Invalid enum value"),
        ({"latency_ms": -1}, "latency_ms", ">= 0"),
        ({"ts": "2026-11-02T09:16:40"}, "ts", ""),  # no offset: ambiguous, refused
        ({"input_tokens": "many"}, "input_tokens", "Expected"),
        ({"error": "boom"}, "error", "Invalid enum value"),
        ({"user_id": ""}, "user_id", "length"),
        ({"segment": {"locale": "ja,en"}}, "segment", "regex"),  # a segment is named key=value
        ({"segment": {"1locale": "ja"}}, "segment", "regex"),
        ({"segment": {f"k{i}": "v" for i in range(9)}}, "segment", "length"),
    ],
)
def test_validation_errors_name_the_field_and_reason(overrides, field, reason):
    with pytest.raises(InvalidEvent) as info:
        convert(TraceEvent, trace_fields(**overrides))
    assert f"`$.{field}" in str(info.value)
    assert reason in str(info.value)


def test_a_trace_carries_its_users_segment():
    event = convert(TraceEvent, trace_fields(segment={"locale": "ja", "tier": "enterprise"}))
    assert decode(TraceEvent, encode(event)).segment == {"locale": "ja", "tier": "enterprise"}
    assert convert(TraceEvent, trace_fields()).segment is None


def test_missing_field_is_named():
    fields = trace_fields()
    del fields["trace_id"]
    with pytest.raises(InvalidEvent, match="trace_id"):
        convert(TraceEvent, fields)


def test_undecodable_bytes_are_invalid_not_a_crash():
    with pytest.raises(InvalidEvent, match="undecodable"):
        decode(FeedbackEvent, b"\xff\xfenot json")


def test_unknown_fields_are_ignored_for_forward_compatibility():
    event = convert(TraceEvent, trace_fields(new_field_from_v2=1))
    assert event.trace_id == "t1"


def test_plan_refuses_unknown_fields():
    with pytest.raises(InvalidEvent, match="percnt"):
        convert(RolloutPlan, {"rollout_id": "r", "percnt": 5})


def test_json_schemas_cover_every_event_type_and_validate_an_event():
    schemas = json_schemas()
    assert {"trace", "feedback", "decision", "rollout_plan", "stats_snapshot"} <= set(schemas)
    wire = json.loads(encode(convert(TraceEvent, trace_fields())))
    jsonschema.validate(wire, schemas["trace"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**wire, "variant": "treatment"}, schemas["trace"])


TS_SAMPLES = [
    "2026-11-02T09:16:40Z",
    "2026-11-02T09:16:40.123Z",
    "2026-11-02T09:16:40+01:00",
    "2026-11-02t09:16:40z",
    "2026-11-02 09:16:40Z",
    "2026-11-02T09:16:40.123456789Z",
    "2026-11-02T09:16:40+0100",
    "2026-11-02T09:16:40-00:00",  # accepted by both
    "2026-11-02T09:16:40",
    "2026-11-02",
    "2026-11-02T09:16Z",
    "2026-13-02T09:16:40Z",
    "20261102T091640Z",
    "2026-11-02T24:00:00Z",
    "yesterday",
    "",  # refused by both
    1_796_000_000_000,
    0,
    -1,
    1.5,
]


@pytest.mark.parametrize("ts", TS_SAMPLES)
def test_the_exported_schema_and_the_decoder_agree_on_ts(ts):
    schemas = json_schemas()
    wire = {**json.loads(encode(convert(TraceEvent, trace_fields()))), "ts": ts}
    try:
        decode(TraceEvent, json.dumps(wire).encode())
        accepted = True
    except InvalidEvent:
        accepted = False
    assert jsonschema.Draft202012Validator(schemas["trace"]).is_valid(wire) is accepted, (ts, accepted)


def test_exported_schemas_name_their_draft_and_id():
    for name, schema in json_schemas().items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"] == f"urn:safeswap:schema:v1:{name}"
        jsonschema.Draft202012Validator.check_schema(schema)
