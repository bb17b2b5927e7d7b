"""``safeswap demo``: the whole product in one command.

Starts the embedded broker (unless a broker is given) and a worker process,
registers a plan, and simulates users: a FlagClient assigns each user, an Emitter
sends their traces and feedback, and the candidate has a clearly higher
thumbs-down rate. It ends when the worker's rollback decision reaches the
FlagClient and the candidate's users are served control again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tempfile
import time
import uuid
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

import sinks
from safeswap.emitter import Emitter
from safeswap.flags import FlagClient
from safeswap.tools.views import evidence_table
from schemas import (
    Decision,
    FeedbackEvent,
    GuardrailSpec,
    RolloutPlan,
    StageSpec,
    TraceEvent,
    VariantSpec,
    encode,
)
from streams.broker import EmbeddedBroker
from streams.kafka import client_options
from streams.process import WorkerExited, WorkerProcess
from streams.settings import Settings
from streams.worker import ensure_topics_with_retry

THUMBS_DOWN = {"control": 0.05, "candidate": 0.15}
ERROR_RATE = {"control": 0.01, "candidate": 0.01}
MODELS = {"control": "claude-sonnet-4-5-20250929", "candidate": "claude-sonnet-4-6-20260301"}


def demo_plan(rollout_id: str) -> RolloutPlan:
    """A canary guarded by thumbs-down and error rate; a day's watch before any promotion."""
    return RolloutPlan(
        rollout_id=rollout_id,
        stakes="low",
        control=VariantSpec(model=MODELS["control"], prompt_version="v41"),
        candidate=VariantSpec(model=MODELS["candidate"], prompt_version="v41"),
        skip_shadow="demo: the simulated candidate exists only to be rolled back",
        stages=[
            StageSpec(name="canary", percent=10, min_duration="24h", min_users_per_arm=200),
            StageSpec(name="ramp", percent=100),
        ],
        alpha=0.05,
        min_users_per_arm=200,
        guardrails=[
            GuardrailSpec(metric="thumbs_down_rate", max_relative_increase=0.20, action="rollback"),
            GuardrailSpec(metric="error_rate", max_relative_increase=0.10, action="rollback"),
        ],
    )


def simulated_events(flags: FlagClient, rollout_id: str, user_index: int, ts_ms: int, rng: random.Random):
    """One simulated user's request and reaction, assigned by the real FlagClient."""
    user_id = f"user-{user_index}"
    variant = flags.variant(rollout_id, user_id)
    trace_id = uuid.UUID(int=rng.getrandbits(128)).hex
    common = dict(rollout_id=rollout_id, variant=variant, user_id=user_id, session_id=f"s-{user_index}")
    trace = TraceEvent(
        event_id=f"t-{trace_id}",
        ts=ts_ms,
        trace_id=trace_id,
        prompt_version="v41",
        model_version=MODELS[variant],
        latency_ms=rng.lognormvariate(6.8, 0.5),
        input_tokens=rng.randint(200, 800),
        output_tokens=rng.randint(50, 400),
        cost_usd=0.002,
        cache_hit=rng.random() < 0.3,
        error="timeout" if rng.random() < ERROR_RATE[variant] else "none",
        **common,
    )
    events: list[Any] = [trace]
    if rng.random() < THUMBS_DOWN[variant]:
        events.append(
            FeedbackEvent(event_id=f"f-{trace_id}", ts=ts_ms + 5_000, trace_id=trace_id, kind="thumbs_down", **common)
        )
    return variant, events


class OtelApp:
    """An app instrumented only with OpenTelemetry and OpenFeature: a tracer whose spans are kept
    in memory, and an OpenFeature client whose evaluations the OpenTelemetry hook records on the
    active span. ``export`` hands the spans over as one message of the Collector's Kafka
    exporter. The demo's, the tests' and the OTLP benchmark's apps are this one."""

    def __init__(self, provider: Any, name: str = "safeswap-demo") -> None:
        from openfeature import api
        from openfeature.contrib.hook.opentelemetry import TracingHook
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter = InMemorySpanExporter()
        tracing = TracerProvider()
        tracing.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = tracing.get_tracer(name)
        api.clear_hooks()
        api.add_hooks([TracingHook()])
        api.set_provider_and_wait(provider)
        self.flags = api.get_client()

    def export(self, encoding: str = "otlp_proto") -> bytes:
        """Every span so far as one message, in ``otlp_proto`` or ``otlp_json``."""
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        from safeswap.core.otlp import to_json

        request = encode_spans(self.exporter.get_finished_spans())
        self.exporter.clear()
        return request.SerializeToString() if encoding == "otlp_proto" else to_json(request)

    def close(self) -> None:
        from openfeature import api

        api.shutdown()
        api.clear_hooks()


class OtlpApp(OtelApp):
    """The demo's app when it speaks only OpenTelemetry and OpenFeature (``demo --otlp``): the
    flag is evaluated through OpenFeature (the SafeswapProvider over the demo's FlagClient) with
    the OpenTelemetry hook recording it on the model call's span; spans leave as the
    Collector's Kafka exporter writes them (one ``otlp_proto`` ExportTraceServiceRequest a
    message). Same users, rates and models as ``simulated_events``."""

    def __init__(self, flags: FlagClient) -> None:
        from safeswap.openfeature import SafeswapProvider

        super().__init__(SafeswapProvider(flags))

    def serve(self, rollout_id: str, user_index: int, ts_ms: int, rng: random.Random) -> tuple[str, int]:
        """One user's request (a ``chat`` span) and maybe a thumbs-down (a ``safeswap.feedback``
        event); returns the variant and the events the spans stand for."""
        from openfeature.evaluation_context import EvaluationContext
        from opentelemetry.trace import Status, StatusCode

        context = EvaluationContext(targeting_key=f"user-{user_index}")
        start = ts_ms * 1_000_000
        with self.tracer.start_as_current_span("chat", start_time=start, end_on_exit=False) as call:
            variant = self.flags.get_string_value(rollout_id, "control", context)
            call.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": MODELS[variant],
                    "gen_ai.response.model": MODELS[variant],
                    "gen_ai.usage.input_tokens": rng.randint(200, 800),
                    "gen_ai.usage.output_tokens": rng.randint(50, 400),
                    "session.id": f"s-{user_index}",
                    "safeswap.prompt_version": "v41",
                    "safeswap.cost_usd": 0.002,
                    "safeswap.cache_hit": rng.random() < 0.3,
                }
            )
            if rng.random() < ERROR_RATE[variant]:
                call.set_attribute("error.type", "timeout")
                call.set_status(Status(StatusCode.ERROR))
            ids = call.get_span_context()
            call.end(end_time=start + int(rng.lognormvariate(6.8, 0.5) * 1e6))
        if rng.random() >= THUMBS_DOWN[variant]:
            return variant, 1
        at = start + 5_000_000_000
        with self.tracer.start_as_current_span("POST /feedback", start_time=at, end_on_exit=False) as span:
            self.flags.get_string_value(rollout_id, "control", context)
            span.add_event(
                "safeswap.feedback",
                {
                    "safeswap.feedback.kind": "thumbs_down",
                    "safeswap.trace_id": f"{ids.trace_id:032x}:{ids.span_id:016x}",
                },
                timestamp=at,
            )
            span.end(end_time=at)
        return variant, 2


def _status_table(sent: int, users: dict[str, int], decision: Decision | None, elapsed: float) -> Table:
    table = Table(title="safeswap demo: candidate has 3x the thumbs-down rate", show_header=False)
    table.add_row("elapsed", f"{elapsed:5.1f} s")
    table.add_row("events sent", f"{sent:,}")
    table.add_row("users control / candidate", f"{users['control']:,} / {users['candidate']:,}")
    if decision is None:
        table.add_row("controller", "waiting for the worker to register the plan...")
    else:
        table.add_row("last decision", f"#{decision.seq} {decision.action} ({decision.stage}, {decision.percent:g}%)")
        table.add_row("reason", decision.reason)
    return table


async def _simulate(
    settings: Settings,
    rollout_id: str,
    max_users: int,
    deadline: float,
    console: Console,
    started: float,
    worker: WorkerProcess,
    otlp: bool = False,
) -> dict:
    plan = demo_plan(rollout_id)
    rng = random.Random(7)
    users = {"control": 0, "candidate": 0}
    sent = 0
    async with Emitter(settings=settings) as emitter, FlagClient(settings=settings) as flags:
        # Register the plan (what `safeswap rollout start` does).
        from aiokafka import AIOKafkaProducer

        event_time = int(time.time() * 1000) - max_users * 1_000  # in the past: future events are refused
        producer = AIOKafkaProducer(**client_options(settings))
        await producer.start()
        try:
            # Stamped at the traffic's first event time: the start decision is in event time too.
            await producer.send_and_wait(
                settings.topic("plans"), encode(plan), key=rollout_id.encode(), timestamp_ms=event_time
            )
        finally:
            await producer.stop()
        with Live(_status_table(0, users, None, 0), console=console, refresh_per_second=8, transient=False) as live:
            await _wait(lambda: flags.decision(rollout_id) is not None, deadline, worker)
            index = 0
            app = OtlpApp(flags) if otlp else None
            while time.monotonic() < deadline:
                worker.check_alive()
                decision = flags.decision(rollout_id)
                if decision is not None and decision.action == "rollback":
                    break
                if index < max_users:
                    for _ in range(100):  # a batch of users, then a beat for the worker
                        if app is not None:
                            variant, count = app.serve(rollout_id, index, event_time, rng)
                            sent += count
                        else:
                            variant, events = simulated_events(flags, rollout_id, index, event_time, rng)
                            for event in events:
                                sent += (emitter.trace if isinstance(event, TraceEvent) else emitter.feedback)(event)
                        users[variant] += 1
                        index += 1
                        event_time += 1_000
                    if app is not None:  # the batch as one message of the Collector's Kafka exporter
                        await producer_send(settings, settings.otlp_topic, app.export())
                live.update(_status_table(sent, users, decision, time.monotonic() - started))
                await asyncio.sleep(0.05)
            if app is not None:
                app.close()
            decision = flags.decision(rollout_id)
            live.update(_status_table(sent, users, decision, time.monotonic() - started))
        candidates_served = sum(flags.variant(rollout_id, f"user-{i}") == "candidate" for i in range(index))
    return {"decision": decision, "events_sent": sent, "users": users, "candidate_users_now": candidates_served}


async def producer_send(settings: Settings, topic: str, value: bytes) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**client_options(settings))
    await producer.start()
    try:
        await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


async def _wait(condition, deadline: float, worker: WorkerProcess) -> None:
    while not condition() and time.monotonic() < deadline:
        worker.check_alive()  # a dead worker never decides: say so now, not at the deadline
        await asyncio.sleep(0.05)


def run_demo(
    settings: Settings,
    *,
    max_users: int,
    timeout_s: float,
    json_out: bool,
    data_dir: str | None = None,
    otlp: bool = False,
) -> dict:
    console = Console(stderr=json_out)
    started = time.monotonic()
    deadline = started + timeout_s
    rollout_id = f"demo-{uuid.uuid4().hex[:6]}"
    with contextlib.ExitStack() as stack:
        if not settings.broker:
            broker = stack.enter_context(EmbeddedBroker())
            settings = settings.replace(broker=broker.bootstrap)
            console.print(f"embedded Kafka-protocol broker (Tansu) on {broker.bootstrap}")
        state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="safeswap-demo-"))
        settings = settings.replace(state_dir=state_dir, data_dir=data_dir or settings.data_dir)
        if otlp:  # the worker's OTLP agent reads what the app's spans become
            settings = settings.replace(otlp_topic=settings.otlp_topic or settings.topic("otlp_spans"))
        asyncio.run(ensure_topics_with_retry(settings))
        worker = stack.enter_context(WorkerProcess(settings))
        keep_log = False  # the log of a worker that died is what the user needs next
        stack.callback(lambda: keep_log or not os.path.exists(worker.log_path) or os.unlink(worker.log_path))
        console.print(f"worker started (pid {worker.pid}); registering plan {rollout_id}")
        try:
            outcome = asyncio.run(
                _simulate(settings, rollout_id, max_users, deadline, console, started, worker, otlp=otlp)
            )
        except WorkerExited:
            keep_log = True
            console.print(f"[bold red]the worker exited[/]; the last lines of {worker.log_path}:", highlight=False)
            console.print(worker.log_tail(20), markup=False, highlight=False, soft_wrap=True)
            raise
        # The worker's sinks flush on rotation (idle/age), and the rest when it stops (SIGINT).
        # Wait for the events, and the decisions up to the last one, just published.
        last_seq = outcome["decision"].seq if outcome["decision"] is not None else 0
        sinks.wait_for_rows(
            settings.data_dir,
            {("traces", "feedback"): outcome["events_sent"], ("decisions",): last_seq},
            rollout_id=rollout_id,
        )
    rows = sinks.count_rows(settings.data_dir, rollout_id=rollout_id)
    decision: Decision | None = outcome["decision"]
    seconds = round(time.monotonic() - started, 2)
    if decision is not None and decision.evidence:
        console.print(
            evidence_table(decision.evidence, f"decision #{decision.seq}: {decision.action} {decision.rollout_id}")
        )
    if decision is not None and decision.action == "rollback":
        console.print(
            f"[bold green]rolled back[/] after {outcome['events_sent']:,} events in {seconds} s: {decision.reason}\n"
            f"candidate users served the candidate now: {outcome['candidate_users_now']}"
        )
    else:
        console.print(f"[bold red]no rollback within {timeout_s:g} s[/]")
    return {
        "rollout_id": rollout_id,
        "action": decision.action if decision else None,
        "stage": decision.stage if decision else None,
        "percent": decision.percent if decision else None,
        "reason": decision.reason if decision else "no decision",
        "seq": decision.seq if decision else None,
        "evidence": [
            {k: getattr(item, k) for k in item.__struct_fields__} for item in (decision.evidence if decision else [])
        ],
        "events_sent": outcome["events_sent"],
        "users": outcome["users"],
        "candidate_users_after": outcome["candidate_users_now"],
        "seconds": seconds,
        "data_dir": os.path.abspath(settings.data_dir),
        "rows": rows,
    }
