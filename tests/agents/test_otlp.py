"""An app instrumented with OpenTelemetry and OpenFeature only, its spans in the Collector's
Kafka format on the embedded broker, a real worker with OTLP ingest on: the candidate's
errors reach a rollback decision, and what is not OTLP is dead-lettered once with the reason."""

from __future__ import annotations

import asyncio
import random
import time

import msgspec
import pytest
from openfeature import api

from safeswap.openfeature import SafeswapProvider
from schemas import DeadLetter, GuardrailSpec, RolloutPlan, StageSpec, VariantSpec, encode
from streams.topics import ensure_topics
from tests.support.kafka import produce, read_topic
from tests.support.otlp import App

pytestmark = pytest.mark.integration

ROLLOUT = "otel-bot"
PLAN = RolloutPlan(
    rollout_id=ROLLOUT,
    stakes="low",
    control=VariantSpec(model="claude-sonnet-4-5-20250929", prompt_version="v41"),
    candidate=VariantSpec(model="claude-sonnet-4-6-20260301", prompt_version="v41"),
    skip_shadow="test: the candidate exists only to be rolled back",
    stages=[
        StageSpec(name="canary", percent=50, min_duration="24h", min_users_per_arm=50),
        StageSpec(name="ramp", percent=100),
    ],
    min_users_per_arm=50,
    guardrails=[GuardrailSpec(metric="error_rate", max_absolute_increase=0.05, action="rollback")],
)


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
def test_spans_in_the_collectors_format_reach_a_rollback(settings, worker_factory, encoding):
    settings = settings.replace(otlp_topic=f"{settings.topic_prefix}.otlp_spans", otlp_encoding=encoding)
    asyncio.run(ensure_topics(settings))  # the Collector's topic too
    worker = worker_factory(otlp_topic=settings.otlp_topic, otlp_encoding=encoding)
    provider = SafeswapProvider(settings=settings)
    app, rng = App(provider=provider), random.Random(5)

    async def publish(value: bytes) -> None:
        await produce(settings.broker, settings.otlp_topic, [(None, value)])

    try:
        asyncio.run(produce(settings.broker, settings.topic("plans"), [(ROLLOUT.encode(), encode(PLAN))]))
        started = provider.flags.wait_for_sync(lambda d: d.rollout_id == ROLLOUT, 60)
        assert started is not None and started.action == "start", worker.log()[-3000:]
        served, deadline, index = {"control": 0, "candidate": 0}, time.monotonic() + 120, 0
        while provider.flags.decision(ROLLOUT).action != "rollback" and time.monotonic() < deadline:
            for _ in range(40):
                app.request(ROLLOUT, f"u{index}", rng=rng, errors={"control": 0.02, "candidate": 0.4})
                served[provider.flags.variant(ROLLOUT, f"u{index}")] += 1
                index += 1
            asyncio.run(publish(app.export(encoding)))
            time.sleep(0.2)
        decision = provider.flags.decision(ROLLOUT)
        assert decision.action == "rollback", worker.log()[-3000:]
        assert "error_rate" in decision.reason and served["candidate"] >= 50
        # After the rollback every user is served control, through OpenFeature.
        assert all(app.flags.get_string_value(ROLLOUT, "control", _ctx(f"u{i}")) == "control" for i in range(50))

        # Not OTLP: one dead letter naming the encoding. A model call of the rollout without
        # a user: one dead letter naming the attribute. Other spans: counted, not dead-lettered.
        asyncio.run(publish(b"\x00 not an export request"))
        with app.tracer.start_as_current_span("chat, no user") as span:
            span.set_attributes(
                {"gen_ai.operation.name": "chat", "safeswap.rollout_id": ROLLOUT, "safeswap.variant": "control"}
            )
        with app.tracer.start_as_current_span("GET /health"):
            pass
        asyncio.run(publish(app.export(encoding)))
        otlp: list[DeadLetter] = []
        for _ in range(30):  # the DLQ is keyed like its input (none here): any partition, any order
            records = asyncio.run(read_topic(settings.broker, settings.topic("dlq"), timeout_s=1.0))
            otlp = [r for r in (msgspec.json.decode(m.value, type=DeadLetter) for m in records) if r.agent == "otlp"]
            if len(otlp) >= 2:
                break
            time.sleep(0.5)
        assert len(otlp) == 2, otlp
        refused = next(r for r in otlp if r.reason.startswith(f"invalid OTLP ({encoding})"))
        assert refused.topic == settings.otlp_topic
        assert any("no user: set user.id" in r.reason and "'chat, no user'" in r.reason for r in otlp)
    finally:
        api.shutdown()


def _ctx(user_id: str):
    from openfeature.evaluation_context import EvaluationContext

    return EvaluationContext(targeting_key=user_id)
