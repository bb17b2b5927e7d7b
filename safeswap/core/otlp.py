"""OpenTelemetry GenAI spans -> safeswap events, as pure functions.

Apps that trace their model calls with OpenTelemetry (the GenAI semantic conventions)
and ship the spans to Kafka through the Collector's Kafka exporter need no safeswap
code: the OTLP agent (``agents/otlp.py``) reads those messages, and this module turns
each message into the ``TraceEvent`` and ``FeedbackEvent`` records the Emitter would
have sent. One Kafka message is one ``ExportTraceServiceRequest``, in the Collector's
``otlp_proto`` (protobuf bytes) or ``otlp_json`` (OTLP/JSON: hex ids, 64-bit integers
as strings) encoding.

The mapping (README "OpenTelemetry ingest" has the table):

* a span is a **model call** when it has ``gen_ai.operation.name`` or
  ``gen_ai.request.model``; other spans are skipped (counted, never dead-lettered);
* it is **of a rollout** when it has ``safeswap.rollout_id``, or a flag evaluation names
  one: an OpenFeature ``feature_flag.evaluation`` event (``feature_flag.key``,
  ``feature_flag.result.variant``, ``feature_flag.context.id``; older hooks:
  ``feature_flag`` events with ``feature_flag.variant``) on the span, else the latest
  one before its end on another span of its trace in the same message;
  model calls of no rollout are skipped too;
* a model call of a rollout without a variant or a user is dead-lettered once, with
  the attribute to set.

A span's ``safeswap.segment.<key>`` attributes are the user's segment (``TraceEvent.segment``).

Feedback is a span event ``safeswap.feedback`` with ``safeswap.feedback.kind`` (a
``FeedbackEvent`` kind) and ``safeswap.trace_id`` (the response it is about), on a span
that names the rollout, variant and user the same way.
"""

from __future__ import annotations

import base64
import json
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from schemas import FeedbackEvent, InvalidEvent, TraceEvent, convert
from schemas.events import ERROR_KINDS

Encoding = Literal["otlp_proto", "otlp_json"]
ENCODINGS: tuple[str, ...] = ("otlp_proto", "otlp_json")
FLAG_EVENTS = ("feature_flag.evaluation", "feature_flag")  # the OpenFeature hook's event, then older hooks'
FEEDBACK_EVENT = "safeswap.feedback"
# error.type values (exception class names, HTTP codes) -> safeswap's error kinds
ERROR_ALIASES = {
    "timeout": "timeout",
    "timeouterror": "timeout",
    "apitimeouterror": "timeout",
    "readtimeout": "timeout",
    "deadline_exceeded": "timeout",
    "429": "rate_limit",
    "ratelimiterror": "rate_limit",
    "rate_limit_error": "rate_limit",
    "overloaded_error": "rate_limit",
    "refusal": "refusal",
    "jsondecodeerror": "parse_error",
    "validationerror": "parse_error",
}


@dataclass
class Span:
    """One span, whichever encoding it came in (ids as lowercase hex)."""

    trace_id: str
    span_id: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    error: bool = False  # status code ERROR


@dataclass
class Mapped:
    """What one OTLP message became."""

    traces: list[TraceEvent] = field(default_factory=list)
    feedback: list[FeedbackEvent] = field(default_factory=list)
    skipped: int = 0  # spans that are not model calls of a rollout
    rejected: list[str] = field(default_factory=list)  # one reason per model call that cannot be used


# -- decoding ---------------------------------------------------------------------------
def decode_spans(payload: bytes, encoding: str) -> list[Span]:
    """Every span of one Kafka message; raises InvalidEvent naming the encoding when the
    message is not an OTLP trace export."""
    if encoding not in ENCODINGS:
        raise ValueError(f"OTLP encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
    try:
        return _from_proto(payload) if encoding == "otlp_proto" else _from_json(payload)
    except InvalidEvent:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the bytes are, the reason names the encoding
        raise InvalidEvent(f"invalid OTLP ({encoding}): not an ExportTraceServiceRequest: {exc}") from None


def _from_proto(payload: bytes) -> list[Span]:
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    try:
        request = ExportTraceServiceRequest.FromString(payload)
    except DecodeError as exc:
        raise InvalidEvent(f"invalid OTLP (otlp_proto): not an ExportTraceServiceRequest: {exc}") from None
    spans = []
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    Span(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        name=span.name,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_proto_attributes(span.attributes),
                        events=[(e.name, e.time_unix_nano, _proto_attributes(e.attributes)) for e in span.events],
                        error=span.status.code == 2,
                    )
                )
    if not spans and payload and not request.resource_spans:
        raise InvalidEvent("invalid OTLP (otlp_proto): the message holds no resourceSpans")
    return spans


def _proto_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_proto_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _proto_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _proto_attributes(attributes: Any) -> dict[str, Any]:
    return {kv.key: _proto_value(kv.value) for kv in attributes}


class _JsonSpan(msgspec.Struct, rename="camel"):
    trace_id: str = ""
    span_id: str = ""
    name: str = ""
    start_time_unix_nano: int | str = 0
    end_time_unix_nano: int | str = 0
    attributes: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    status: dict[str, Any] = {}


class _JsonScope(msgspec.Struct, rename="camel"):
    spans: list[_JsonSpan] = []


class _JsonResource(msgspec.Struct, rename="camel"):
    scope_spans: list[_JsonScope] = []


class _JsonRequest(msgspec.Struct, rename="camel"):
    resource_spans: list[_JsonResource]


_json_request = msgspec.json.Decoder(_JsonRequest)


def _from_json(payload: bytes) -> list[Span]:
    try:
        request = _json_request.decode(payload)
    except msgspec.DecodeError as exc:
        raise InvalidEvent(f"invalid OTLP (otlp_json): not an ExportTraceServiceRequest: {exc}") from None
    spans = []
    for resource in request.resource_spans:
        for scope in resource.scope_spans:
            for span in scope.spans:
                code = span.status.get("code", 0)
                spans.append(
                    Span(
                        trace_id=_json_id(span.trace_id),
                        span_id=_json_id(span.span_id),
                        name=span.name,
                        start_ns=int(span.start_time_unix_nano),
                        end_ns=int(span.end_time_unix_nano),
                        attributes=_json_attributes(span.attributes),
                        events=[
                            (
                                e.get("name", ""),
                                int(e.get("timeUnixNano", 0)),
                                _json_attributes(e.get("attributes", [])),
                            )
                            for e in span.events
                        ],
                        error=code in (2, "STATUS_CODE_ERROR"),
                    )
                )
    return spans


def _json_id(text: str) -> str:
    """OTLP/JSON ids are hex; protobuf's generic JSON mapping writes base64: accept both."""
    try:
        bytes.fromhex(text)
        return text.lower()
    except ValueError:
        return base64.b64decode(text).hex()


def _json_value(value: dict[str, Any]) -> Any:
    for kind, found in value.items():
        if kind == "intValue":
            return int(found)
        if kind == "doubleValue":
            return float(found)
        if kind == "arrayValue":
            return [_json_value(v) for v in found.get("values", [])]
        if kind == "kvlistValue":
            return {kv["key"]: _json_value(kv.get("value", {})) for kv in found.get("values", [])}
        return found
    return None


def _json_attributes(attributes: list[dict[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: _json_value(kv.get("value", {})) for kv in attributes if "key" in kv}


# -- mapping ----------------------------------------------------------------------------
def is_model_call(span: Span) -> bool:
    return "gen_ai.operation.name" in span.attributes or "gen_ai.request.model" in span.attributes


def trace_evaluations(spans: list[Span]) -> dict[str, tuple[list[int], list[dict[str, Any]]]]:
    """Per trace id, the flag evaluations recorded on its spans in this message, by time:
    (times, attributes), sorted together (built once per message)."""
    found: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for span in spans:
        for name, time, attrs in span.events:
            if name in FLAG_EVENTS:
                found.setdefault(span.trace_id, []).append((time, attrs))
    out = {}
    for trace_id, evaluations in found.items():
        evaluations.sort(key=lambda item: item[0])
        out[trace_id] = ([time for time, _ in evaluations], [attrs for _, attrs in evaluations])
    return out


def flag_evaluation(span: Span, evaluations: dict[str, tuple[list[int], list[dict[str, Any]]]]) -> dict[str, Any]:
    """The flag evaluation that served this span: on the span itself, else the latest one before
    its end on another span of its trace (``trace_evaluations``; attributes, possibly empty)."""
    own = [attrs for name, _, attrs in span.events if name in FLAG_EVENTS]
    if own:
        return own[-1]
    times, attributes = evaluations.get(span.trace_id, ((), ()))
    index = bisect_right(times, span.end_ns)
    return attributes[index - 1] if index else {}


def _first(attributes: dict[str, Any], *names: str) -> Any:
    for name in names:
        value = attributes.get(name)
        if value not in (None, ""):
            return value
    return None


def who(attributes: dict[str, Any], flag: dict[str, Any]) -> dict[str, Any]:
    """Rollout, variant, user and session of a span (its attributes first, then its flag evaluation)."""
    user = _first(attributes, "user.id", "enduser.id") or _first(flag, "feature_flag.context.id")
    return {
        "rollout_id": _first(attributes, "safeswap.rollout_id") or _first(flag, "feature_flag.key"),
        "variant": _first(attributes, "safeswap.variant")
        or _first(flag, "feature_flag.result.variant", "feature_flag.variant"),
        "user_id": user,
        "session_id": _first(attributes, "session.id", "gen_ai.conversation.id") or user,
    }


def error_kind(span: Span) -> str:
    """``error.type`` as safeswap's error kind: the kind itself, a known alias, else ``other``;
    a span with status ERROR and no type is ``other``; a refusal finish reason is ``refusal``."""
    finish = span.attributes.get("gen_ai.response.finish_reasons") or []
    if "refusal" in (finish if isinstance(finish, list) else [finish]):
        return "refusal"
    kind = span.attributes.get("error.type")
    if kind is None:
        return "other" if span.error else "none"
    kind = str(kind).strip().lower()
    if kind in ERROR_KINDS:
        return kind
    return ERROR_ALIASES.get(kind.rsplit(".", 1)[-1], "other")


def _missing(found: dict[str, Any]) -> str | None:
    if not found["variant"]:
        return "no variant: set safeswap.variant, or evaluate the flag with OpenFeature's OpenTelemetry hook"
    if not found["user_id"]:
        return "no user: set user.id (or enduser.id), or evaluate the flag with the user as targeting key"
    return None


def map_spans(spans: list[Span]) -> Mapped:
    """The events one message's spans stand for (see the module docstring)."""
    out = Mapped()
    evaluations = trace_evaluations(spans)
    for span in spans:
        feedback_events = [(time, attrs) for name, time, attrs in span.events if name == FEEDBACK_EVENT]
        model_call = is_model_call(span)
        if not model_call and not feedback_events:  # most spans: nothing to look up
            out.skipped += 1
            continue
        flag = flag_evaluation(span, evaluations)
        for time, attrs in feedback_events:
            _map_feedback(span, flag, time, attrs, out)
        if not model_call:
            continue
        found = who(span.attributes, flag)
        if not found["rollout_id"]:
            out.skipped += 1
            continue
        where = f"span {span.name!r} (trace {span.trace_id}, span {span.span_id})"
        if (missing := _missing(found)) is not None:
            out.rejected.append(
                f"invalid OTLP span: {where}, a model call of rollout {found['rollout_id']!r}, has {missing}"
            )
            continue
        attrs = span.attributes
        fields = {
            **found,
            "event_id": f"otlp:{span.trace_id}:{span.span_id}",
            "ts": span.end_ns // 1_000_000,
            "trace_id": _first(attrs, "safeswap.trace_id") or f"{span.trace_id}:{span.span_id}",
            "prompt_version": str(_first(attrs, "safeswap.prompt_version", "gen_ai.prompt.version") or "unknown"),
            "model_version": str(_first(attrs, "gen_ai.response.model", "gen_ai.request.model") or "unknown"),
            "latency_ms": max(0.0, (span.end_ns - span.start_ns) / 1e6),
            "input_tokens": int(_first(attrs, "gen_ai.usage.input_tokens") or 0),
            "output_tokens": int(_first(attrs, "gen_ai.usage.output_tokens") or 0),
            "cost_usd": float(_first(attrs, "safeswap.cost_usd", "gen_ai.usage.cost") or 0.0),
            "cache_hit": bool(
                _first(attrs, "safeswap.cache_hit")
                or (_first(attrs, "gen_ai.usage.cache_read_input_tokens", "gen_ai.usage.cache_read.input_tokens") or 0)
                > 0
            ),
            "error": error_kind(span),
            "segment": segment_of(attrs),
        }
        try:
            out.traces.append(convert(TraceEvent, fields))
        except InvalidEvent as exc:
            out.rejected.append(f"invalid OTLP span: {where}: {exc}")
    return out


SEGMENT_PREFIX = "safeswap.segment."


def segment_of(attributes: dict[str, Any]) -> dict[str, str] | None:
    """The user's segment from ``safeswap.segment.<key>`` attributes (``safeswap.segment.locale``)."""
    found = {k[len(SEGMENT_PREFIX) :]: str(v) for k, v in attributes.items() if k.startswith(SEGMENT_PREFIX)}
    return found or None


def _map_feedback(span: Span, flag: dict[str, Any], time_ns: int, attrs: dict[str, Any], out: Mapped) -> None:
    found = who({**span.attributes, **attrs}, flag)
    where = f"{FEEDBACK_EVENT} event on span {span.name!r} (trace {span.trace_id}, span {span.span_id})"
    if not found["rollout_id"]:
        out.skipped += 1
        return
    trace_id = _first(attrs, "safeswap.trace_id")
    missing = _missing(found) or (None if trace_id else "no safeswap.trace_id (the response the feedback is about)")
    if missing is not None:
        out.rejected.append(f"invalid OTLP span: {where}, of rollout {found['rollout_id']!r}, has {missing}")
        return
    fields = {
        **found,
        "event_id": f"otlp:{span.trace_id}:{span.span_id}:{time_ns}",
        "ts": time_ns // 1_000_000,
        "trace_id": trace_id,
        "kind": _first(attrs, "safeswap.feedback.kind"),
        "final_text": _first(attrs, "safeswap.feedback.final_text"),
    }
    try:
        out.feedback.append(convert(FeedbackEvent, fields))
    except InvalidEvent as exc:
        out.rejected.append(f"invalid OTLP span: {where}: {exc}")


def to_json(request: Any) -> bytes:
    """An ExportTraceServiceRequest in OTLP/JSON, as the Collector's ``otlp_json`` writes it
    (camelCase, hex trace and span ids): protobuf's JSON mapping with the ids re-encoded."""
    from google.protobuf.json_format import MessageToDict

    document = MessageToDict(request)
    for resource in document.get("resourceSpans", []):
        for scope in resource.get("scopeSpans", []):
            for span in scope.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return json.dumps(document).encode()
