"""The worker: the Faust app with every agent registered, and how it runs.

``safeswap worker`` calls :func:`run_worker`; one process runs every agent, and more
workers (up to the partition count) share the partitions.
"""

from __future__ import annotations

import asyncio

import faust

from agents import decide, judge, otlp, outcomes, prometheus, sink
from streams.app import create_app
from streams.settings import Settings
from streams.worker import ensure_topics_with_retry, faust_worker


def worker_app(settings: Settings) -> faust.App:
    """The Faust app with the outcomes, decide, sink, metrics and judge agents."""
    app = create_app(settings)
    outcomes_service = outcomes.register(app, settings)
    decide.register(app, settings)
    sink_service = sink.register(app, settings)  # Parquet sinks (sinks/, docs/data.md)
    worker_metrics = prometheus.register(  # Prometheus /metrics (off unless metrics_port)
        app,
        settings,
        consumers=lambda: {
            "outcomes": outcomes_service.reader.consumer,
            "sink": sink_service.reader.consumer if sink_service else None,
        },
    )
    if worker_metrics is not None:
        outcomes_service.reader.on_batch.append(worker_metrics.reader("outcomes"))
        if sink_service is not None:
            sink_service.reader.on_batch.append(worker_metrics.reader("sink"))
    judge.register(app, settings)  # shadow statistics + LLM judge (docs/shadow.md)
    otlp_counts = otlp.register(app, settings)  # OpenTelemetry spans -> traces, feedback (off unless otlp_topic)
    if otlp_counts is not None and worker_metrics is not None:
        otlp_counts.on_count.append(worker_metrics.otlp_counted)
    return app


def run_worker(settings: Settings) -> None:
    """Blocks until the worker is stopped (SIGINT/SIGTERM)."""
    setup = asyncio.new_event_loop()
    try:
        setup.run_until_complete(ensure_topics_with_retry(settings))
    finally:
        setup.close()
    asyncio.set_event_loop(asyncio.new_event_loop())
    worker = faust_worker(worker_app(settings), settings)
    worker.execute_from_commandline()
