"""Hypothesis strategies for malformed messages on every input topic.

Each strategy starts from a valid record of the topic's type and breaks it in
one of the ways producers really do: not JSON, cut short, not UTF-8, not an
object, a required field missing, a field of the wrong type or out of range, an
unknown enum value, a naive timestamp. ``check_rejected`` is the property every
generated message must have (the topic's decoder refuses it), so a strategy that
accidentally makes a valid message fails loudly instead of skewing the counts.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

from schemas import Command, FeedbackEvent, InvalidEvent, RolloutPlan, StatsSnapshot, TraceEvent, decode
from schemas.events import ShadowPair

TS = "2026-01-01T00:00:00Z"
SIDE = {"latency_ms": 10.0, "model_version": "m", "prompt_version": "p"}

VALID: dict[str, dict] = {
    "traces": {
        "event_id": "e",
        "ts": TS,
        "rollout_id": "r",
        "variant": "control",
        "user_id": "u",
        "session_id": "s",
        "trace_id": "t",
        "prompt_version": "p",
        "model_version": "m",
        "latency_ms": 1.0,
        "input_tokens": 1,
        "output_tokens": 1,
        "cost_usd": 0.0,
        "cache_hit": False,
    },
    "feedback": {
        "event_id": "e",
        "ts": TS,
        "trace_id": "t",
        "user_id": "u",
        "session_id": "s",
        "rollout_id": "r",
        "variant": "control",
        "kind": "copy",
    },
    "shadow": {
        "event_id": "e",
        "ts": TS,
        "rollout_id": "r",
        "user_id": "u",
        "request_id": "q",
        "prompt_text": "hi",
        "control": SIDE,
        "candidate": SIDE,
    },
    "plans": {"rollout_id": "r"},
    "stats": {"rollout_id": "r", "partition": 0, "seq": 1, "ts": 1, "users": {}, "metrics": {}},
    "commands": {"rollout_id": "r", "command": "pause"},
}
STRUCT = {
    "traces": TraceEvent,
    "feedback": FeedbackEvent,
    "shadow": ShadowPair,
    "plans": RolloutPlan,
    "stats": StatsSnapshot,
    "commands": Command,
}
TOPICS = tuple(VALID)

# Values that are wrong for a field of each kind (never valid for it).
NOT_A_STRING = st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), max_size=3), st.just({}))
NOT_A_NUMBER = st.one_of(st.text(max_size=10), st.lists(st.integers(), max_size=2), st.just({}), st.booleans())
NEGATIVE = st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)
BAD_TS = st.one_of(
    st.just("2026-01-01T00:00:00"),
    st.just("yesterday"),
    st.integers(max_value=-1),
    st.floats(min_value=0.5, max_value=1e12).filter(lambda x: x != int(x)),
    NOT_A_STRING.filter(lambda v: not isinstance(v, int) or isinstance(v, bool)),
)
BAD_ENUM = st.text(min_size=1, max_size=12).filter(
    lambda s: (
        s
        not in {
            "control",
            "candidate",
            "thumbs_up",
            "thumbs_down",
            "edit",
            "retry",
            "abandon",
            "follow_up",
            "copy",
            "pause",
            "resume",
            "abort",
            "none",
            "rate_limit",
            "tool_failure",
            "parse_error",
            "timeout",
            "refusal",
            "other",
            "high",
            "low",
        }
    )
)


def _wrong_values(topic: str) -> dict[str, st.SearchStrategy]:
    """Per field of the topic's valid record: values that break it."""
    if topic == "traces":
        return {
            "event_id": NOT_A_STRING | st.just(""),
            "ts": BAD_TS,
            "rollout_id": NOT_A_STRING,
            "variant": BAD_ENUM,
            "user_id": NOT_A_STRING,
            "latency_ms": NOT_A_NUMBER | NEGATIVE,
            "input_tokens": NOT_A_NUMBER | st.integers(max_value=-1),
            "cost_usd": NEGATIVE,
            "cache_hit": st.one_of(st.text(max_size=5), st.integers(min_value=2)),
            "error": BAD_ENUM,
        }
    if topic == "feedback":
        return {
            "event_id": NOT_A_STRING,
            "ts": BAD_TS,
            "kind": BAD_ENUM,
            "variant": BAD_ENUM,
            "trace_id": NOT_A_STRING | st.just(""),
            "user_id": NOT_A_STRING,
        }
    if topic == "shadow":
        return {
            "ts": BAD_TS,
            "control": NOT_A_STRING | st.just({"latency_ms": -1}),
            "prompt_text": NOT_A_STRING,
            "candidate": st.just({}),
            "request_id": st.just(""),
        }
    if topic == "plans":
        return {
            "rollout_id": NOT_A_STRING | st.just(""),
            "stakes": BAD_ENUM,
            "alpha": st.floats(min_value=1.0),
            "stages": NOT_A_STRING.filter(lambda v: not isinstance(v, list) or v) | st.just([{"name": "x"}]),
            "surprise_field": st.integers(),
        }  # plans forbid unknown fields
    if topic == "stats":
        return {
            "partition": NOT_A_NUMBER,
            "seq": NOT_A_NUMBER,
            "users": NOT_A_STRING.filter(lambda v: v != {}),
            "metrics": st.lists(st.integers(), max_size=2),
            "rollout_id": NOT_A_STRING,
        }
    return {"command": BAD_ENUM, "rollout_id": NOT_A_STRING | st.just(""), "ts": NOT_A_NUMBER}


REQUIRED = {topic: [f for f in STRUCT[topic].__struct_fields__ if f in VALID[topic]] for topic in TOPICS}


@st.composite
def malformed(draw, topic: str) -> bytes:
    valid = dict(VALID[topic])
    how = draw(st.sampled_from(["garbage", "truncated", "not_utf8", "not_object", "missing", "wrong", "empty"]))
    if how == "garbage":
        return b"\x00" + draw(st.binary(max_size=64))  # a NUL first: never JSON
    if how == "truncated":
        raw = json.dumps(valid).encode()
        return raw[: draw(st.integers(1, len(raw) - 1))]
    if how == "not_utf8":
        raw = json.dumps(valid).encode()
        cut = draw(st.integers(1, len(raw) - 1))
        return raw[:cut] + b"\xff\xfe" + raw[cut:]
    if how == "not_object":
        return json.dumps(
            draw(
                st.one_of(
                    st.integers(), st.text(max_size=20), st.lists(st.integers(), max_size=3), st.none(), st.booleans()
                )
            )
        ).encode()
    if how == "missing":
        del valid[draw(st.sampled_from(REQUIRED[topic]))]
        return json.dumps(valid).encode()
    if how == "wrong":
        wrong = _wrong_values(topic)
        field = draw(st.sampled_from(sorted(wrong)))
        valid[field] = draw(wrong[field])
        return json.dumps(valid).encode()
    return b""


def check_rejected(topic: str, raw: bytes) -> None:
    """The property: the topic's decoder refuses the message."""
    try:
        decode(STRUCT[topic], raw)
    except InvalidEvent:
        return
    raise AssertionError(f"{topic}: generated message is valid: {raw!r}")
