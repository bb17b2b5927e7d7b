"""Event factories for the sink tests."""

from __future__ import annotations

from schemas import FeedbackEvent, TraceEvent, encode

BASE_TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def trace(
    i: int,
    *,
    rollout_id: str = "r1",
    variant: str | None = None,
    ts: int | None = None,
    user: str | None = None,
    prompt_version: str = "v1",
    model_version: str = "m1",
) -> TraceEvent:
    return TraceEvent(
        event_id=f"t-{i}",
        ts=BASE_TS + i * 1000 if ts is None else ts,
        rollout_id=rollout_id,
        variant=variant or ("control" if i % 2 else "candidate"),
        user_id=user or f"u{i % 7}",
        session_id=f"s{i % 11}",
        trace_id=f"tr{i}",
        prompt_version=prompt_version,
        model_version=model_version,
        latency_ms=100.0 + i,
        input_tokens=10,
        output_tokens=20,
        cost_usd=0.01,
        cache_hit=i % 3 == 0,
    )


def feedback(i: int, kind: str = "thumbs_down", *, rollout_id: str = "r1", variant: str = "candidate") -> FeedbackEvent:
    return FeedbackEvent(
        event_id=f"f-{i}",
        ts=BASE_TS + i * 1000 + 500,
        trace_id=f"tr{i}",
        user_id=f"u{i % 7}",
        session_id=f"s{i % 11}",
        rollout_id=rollout_id,
        variant=variant,
        kind=kind,
    )


def raw(event) -> bytes:
    return encode(event)
