"""OTLP agent: the OpenTelemetry Collector's Kafka messages -> the traces and feedback topics.

On when ``SAFESWAP_OTLP_TOPIC`` names the topic the Collector's Kafka exporter writes
(``otlp_spans`` by default there), in ``SAFESWAP_OTLP_ENCODING`` (``otlp_proto`` or
``otlp_json``). Each message goes through the pure mapping of ``safeswap.core.otlp``; its events
are produced keyed by user_id, exactly as the Emitter sends them, so the outcomes agent,
sessions, joins and the controller see no difference. A message that is not OTLP, and a
model call of a rollout without a variant or user, are dead-lettered once each with the
reason; spans that are not model calls of a rollout are only counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import faust

from safeswap.core.otlp import decode_spans, map_spans
from schemas import InvalidEvent, encode
from streams.app import raw_topic
from streams.deadletter import DeadLetters
from streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class OtlpCounts:
    """Spans read, by outcome: what /metrics exports as ``safeswap_otlp_spans_total``."""

    mapped: int = 0
    skipped: int = 0
    rejected: int = 0
    on_count: list[Callable[[str, int], None]] = field(default_factory=list)

    def add(self, outcome: str, n: int) -> None:
        if n:
            setattr(self, outcome, getattr(self, outcome) + n)
            for hook in self.on_count:
                hook(outcome, n)


def register(app: faust.App, settings: Settings) -> OtlpCounts | None:
    if not settings.otlp_topic:
        return None
    source = raw_topic(app, settings, settings.otlp_topic, prefixed=False)
    traces, feedback = raw_topic(app, settings, "traces"), raw_topic(app, settings, "feedback")
    dead_letters = DeadLetters(app, settings, agent="otlp")
    counts = OtlpCounts()

    @app.agent(source, name="otlp", concurrency=1)
    async def otlp(stream: faust.StreamT) -> None:
        async for event in stream.events():
            message = event.message
            try:
                spans = decode_spans(event.value or b"", settings.otlp_encoding)
            except InvalidEvent as exc:
                await dead_letters.send(message, str(exc))
                continue
            mapped = map_spans(spans)
            for trace in mapped.traces:
                await traces.send(key=trace.user_id.encode(), value=encode(trace))
            for item in mapped.feedback:
                await feedback.send(key=item.user_id.encode(), value=encode(item))
            for reason in mapped.rejected:
                await dead_letters.send(message, reason)
            counts.add("mapped", len(mapped.traces) + len(mapped.feedback))
            counts.add("skipped", mapped.skipped)
            counts.add("rejected", len(mapped.rejected))

    return counts
