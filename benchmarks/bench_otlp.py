"""OTLP ingest vs the native TraceEvent path, per worker, on the same model calls.

One worker (OTLP ingest on), an embedded broker. Phase 1 (the baseline, in the same run):
N trace events as the Emitter sends them (JSON, keyed by user) to the traces topic. Phase 2:
the same N model calls as OpenTelemetry spans, made by the real SDK with the flag evaluation
recorded by OpenFeature's hook, in the Collector's Kafka format (``otlp_proto``, 200 spans a
message) on the OTLP topic. Each phase is timed from its first produced message until the
outcomes agent's statistics cover every event (snapshot ``seq`` = the source offsets read),
so the OTLP figure includes the extra hop: the OTLP agent decodes, maps and produces the
trace events, which the outcomes agent then reads like any other. Target: OTLP >= 0.5x native.

Run:  python benchmarks/bench_otlp.py [--events 20000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaProducer

from safeswap.tools.demo import MODELS, OtelApp
from schemas import TraceEvent, encode
from streams.broker import EmbeddedBroker
from streams.compacted import CompactedView
from streams.process import WorkerProcess
from streams.settings import Settings
from streams.topics import ensure_topics

SPANS_PER_MESSAGE = 200


class _Seq(msgspec.Struct):
    rollout_id: str
    partition: int
    seq: int
    source: str = ""


def native_events(n: int, rollout_id: str, start_ms: int, rng: random.Random) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        variant = "candidate" if i % 2 else "control"
        event = TraceEvent(
            event_id=f"n-{i}",
            ts=start_ms + i,
            rollout_id=rollout_id,
            variant=variant,
            user_id=f"u{i}",
            session_id=f"s{i}",
            trace_id=f"t{i}",
            prompt_version="v41",
            model_version=MODELS[variant],
            latency_ms=rng.lognormvariate(6.8, 0.5),
            input_tokens=300,
            output_tokens=120,
            cost_usd=0.002,
            cache_hit=rng.random() < 0.3,
        )
        out.append((event.user_id.encode(), encode(event)))
    return out


def otlp_messages(n: int, rollout_id: str, start_ms: int, rng: random.Random) -> list[bytes]:
    """The same model calls as spans of the real SDK, evaluated through OpenFeature's hook."""
    from openfeature.evaluation_context import EvaluationContext
    from openfeature.flag_evaluation import FlagResolutionDetails
    from openfeature.provider import AbstractProvider, Metadata

    class Alternating(AbstractProvider):  # the same arms as the native events: odd users see the candidate
        def get_metadata(self):
            return Metadata(name="bench")

        def resolve_string_details(self, flag_key, default_value, evaluation_context=None):
            variant = "candidate" if int(evaluation_context.targeting_key[1:]) % 2 else "control"
            return FlagResolutionDetails(value=variant, variant=variant)

        resolve_boolean_details = resolve_integer_details = resolve_float_details = resolve_string_details
        resolve_object_details = resolve_string_details

    app = OtelApp(Alternating(), "bench")
    tracer, flags = app.tracer, app.flags
    messages = []
    for i in range(n):
        start = (start_ms + i) * 1_000_000
        with tracer.start_as_current_span("chat", start_time=start, end_on_exit=False) as call:
            variant = flags.get_string_value(rollout_id, "control", EvaluationContext(targeting_key=f"u{i}"))
            call.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": MODELS[variant],
                    "gen_ai.usage.input_tokens": 300,
                    "gen_ai.usage.output_tokens": 120,
                    "session.id": f"s{i}",
                    "safeswap.prompt_version": "v41",
                    "safeswap.cost_usd": 0.002,
                }
            )
            call.end(end_time=start + int(rng.lognormvariate(6.8, 0.5) * 1e6))
        if (i + 1) % SPANS_PER_MESSAGE == 0 or i == n - 1:
            messages.append(app.export())
    app.close()
    return messages


async def timed_phase(
    settings: Settings, topic: str, messages: list[tuple[bytes | None, bytes]], target: int, timeout_s: float
) -> float:
    """Seconds from the first message produced until the statistics cover ``target`` source offsets."""
    view = CompactedView(
        settings,
        "stats",
        lambda raw: msgspec.json.decode(raw, type=_Seq),
        key=lambda s: f"{s.rollout_id}|{s.partition}|{s.source}",
        fetch_max_wait_ms=50,
    )
    await view.start()
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, linger_ms=5, max_batch_size=1_000_000)
    await producer.start()
    try:
        started = time.perf_counter()
        for key, value in messages:
            await producer.send(topic, value=value, key=key)
        await producer.flush()
        deadline = started + timeout_s
        while time.perf_counter() < deadline:
            covered: dict[int, int] = {}
            for snap in view.latest.values():
                if not snap.source:
                    covered[snap.partition] = max(covered.get(snap.partition, 0), snap.seq)
            if sum(covered.values()) >= target:
                return time.perf_counter() - started
            await asyncio.sleep(0.02)
        raise TimeoutError(f"the statistics did not cover {target} offsets within {timeout_s:g} s")
    finally:
        await producer.stop()
        await view.stop()


def run(events: int, timeout_s: float) -> dict:
    rng = random.Random(3)
    start_ms = int(time.time() * 1000) - 2 * events
    native = native_events(events, "bench-native", start_ms, rng)
    prepared = time.perf_counter()
    spans = otlp_messages(events, "bench-otlp", start_ms + events, rng)
    span_seconds = time.perf_counter() - prepared
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as state:
        settings = Settings(
            broker=broker.bootstrap,
            state_dir=state,
            data_dir=str(Path(state) / "data"),
            otlp_topic="safeswap.otlp_spans",
            sink_datasets="",
            snapshot_interval_s=0.2,
            log_level="warn",
        )
        asyncio.run(ensure_topics(settings))
        with WorkerProcess(settings):
            time.sleep(3)  # the worker joins its groups before the clock starts
            native_s = asyncio.run(timed_phase(settings, settings.topic("traces"), native, events, timeout_s))
            otlp_s = asyncio.run(
                timed_phase(settings, settings.otlp_topic, [(None, m) for m in spans], 2 * events, timeout_s)
            )
    return {
        "events": events,
        "spans_per_message": SPANS_PER_MESSAGE,
        "native_eps": round(events / native_s, 1),
        "otlp_eps": round(events / otlp_s, 1),
        "otlp_vs_native": round(native_s / otlp_s, 3),
        "target": 0.5,
        "app_side_span_us": round(span_seconds / events * 1e6, 1),  # the SDK + OpenFeature hook, not the worker
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.events, args.timeout)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
