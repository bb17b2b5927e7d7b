"""Spans made by the real OpenTelemetry SDK, with flag evaluations recorded by OpenFeature's
real OpenTelemetry hook, encoded as the Collector's Kafka exporter writes them."""

from __future__ import annotations

import random
import time
from typing import Any

from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider, Metadata
from opentelemetry.trace import Status, StatusCode

from safeswap.core.assignment import assign
from safeswap.tools.demo import OtelApp


class BucketingProvider(AbstractProvider):
    """Serves a rollout's variant by safeswap's bucketing at a fixed split (what the
    SafeswapProvider answers once the controller's decision is read)."""

    def __init__(self, percent: float) -> None:
        self.percent = percent

    def get_metadata(self) -> Metadata:
        return Metadata(name="safeswap-test")

    def resolve_string_details(self, flag_key: str, default_value: str, evaluation_context=None):
        variant = assign(flag_key, evaluation_context.targeting_key, self.percent)
        return FlagResolutionDetails(value=variant, variant=variant, reason=Reason.TARGETING_MATCH)

    def resolve_boolean_details(self, flag_key, default_value, evaluation_context=None):
        raise NotImplementedError

    def resolve_integer_details(self, flag_key, default_value, evaluation_context=None):
        raise NotImplementedError

    def resolve_float_details(self, flag_key, default_value, evaluation_context=None):
        raise NotImplementedError

    def resolve_object_details(self, flag_key, default_value, evaluation_context=None):
        raise NotImplementedError


class App(OtelApp):
    """An app instrumented only with OpenTelemetry and OpenFeature."""

    def __init__(self, percent: float = 50.0, provider: Any = None) -> None:
        super().__init__(provider or BucketingProvider(percent), "support-bot")

    def request(
        self,
        rollout_id: str,
        user_id: str,
        *,
        rng: random.Random,
        error: str | None = None,
        errors: dict[str, float] | None = None,
        feedback: str | None = None,
        tokens: tuple[int, int] = (300, 120),
    ) -> str:
        """One user request: the flag evaluated on the request's span, then the model call as a
        child span; optionally the user's feedback later, on a span of its own."""
        with self.tracer.start_as_current_span("POST /chat", end_on_exit=False) as request:
            request.set_attribute("user.id", user_id)
            variant = self.flags.get_string_value(rollout_id, "control", EvaluationContext(targeting_key=user_id))
            start = time.time_ns()  # the model is called once the flag is evaluated
            with self.tracer.start_as_current_span("chat claude", start_time=start, end_on_exit=False) as call:
                call.set_attribute("gen_ai.operation.name", "chat")
                call.set_attribute(
                    "gen_ai.request.model", "claude-sonnet-4-5" if variant == "control" else "claude-sonnet-4-6"
                )
                call.set_attribute(
                    "gen_ai.response.model",
                    "claude-sonnet-4-5-20250929" if variant == "control" else "claude-sonnet-4-6-20260301",
                )
                call.set_attribute("gen_ai.usage.input_tokens", tokens[0])
                call.set_attribute("gen_ai.usage.output_tokens", tokens[1])
                call.set_attribute("session.id", f"s-{user_id}")
                if errors and rng.random() < errors.get(variant, 0.0):
                    error = "TimeoutError"
                if error:
                    call.set_attribute("error.type", error)
                    call.set_status(Status(StatusCode.ERROR))
                response_id = f"{call.get_span_context().trace_id:032x}:{call.get_span_context().span_id:016x}"
                end = start + int(rng.uniform(300, 900) * 1e6)
                call.end(end_time=end)
            request.end(end_time=end + 1_000_000)
        if feedback:
            with self.tracer.start_as_current_span("POST /feedback", end_on_exit=False) as span:
                span.set_attribute("user.id", user_id)
                self.flags.get_string_value(rollout_id, "control", EvaluationContext(targeting_key=user_id))
                at = end + 5_000_000_000
                span.add_event(
                    "safeswap.feedback",
                    {"safeswap.feedback.kind": feedback, "safeswap.trace_id": response_id},
                    timestamp=at,
                )
                span.end(end_time=at)
        return response_id
