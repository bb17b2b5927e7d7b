"""The Faust app factory: the runtime every agent is registered on.

Kafka plus Faust consumer groups are the distributed engine: start more workers
(up to the partition count) and the partitions spread over them.
"""

from __future__ import annotations

import gc

import faust

from streams.kafka import credentials
from streams.settings import Settings


def faust_broker_url(bootstrap: str) -> str:
    """ "h1:9092,h2:9092" -> "kafka://h1:9092;h2:9092" (Faust's form)."""
    hosts = [h.strip() for h in bootstrap.replace(";", ",").split(",") if h.strip()]
    return "kafka://" + ";".join(hosts)


def raw_topic(app: faust.App, settings: Settings, *names: str, prefixed: bool = True) -> faust.TopicT:
    """A topic (or several, consumed as one stream) of raw bytes: we decode ourselves,
    so a bad message reaches our code (and the DLQ) instead of Faust's error path.
    ``prefixed=False``: the names are full topic names (another system's topic)."""
    return app.topic(
        *(settings.topic(name) if prefixed else name for name in names),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )


def _patch_fetch_max_wait() -> None:
    """Faust builds its consumer with ``fetch_max_wait_ms=1500`` and no setting to change
    it: set the app's ``safeswap_fetch_max_wait_ms`` on the consumer it builds, before
    the consumer starts. Patched once per process."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    build = AIOKafkaConsumerThread._create_worker_consumer
    if getattr(build, "safeswap", False):
        return

    def create_worker_consumer(self, transport):  # type: ignore[no-untyped-def]
        consumer = build(self, transport)
        wait_ms = getattr(self.app, "safeswap_fetch_max_wait_ms", None)
        if wait_ms is not None:
            consumer._fetch_max_wait_ms = wait_ms
        return consumer

    create_worker_consumer.safeswap = True  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer


HEAP_FREEZE_S = 10.0


def _freeze_heap_regularly(app: faust.App) -> None:
    """Move every object alive now out of the collector's reach (``gc.freeze``), every 10 s.

    The outcomes state is millions of long-lived objects. CPython's full collection
    runs whenever the objects promoted since the last one reach 25% of those that
    survived it, and scans them all: with ~80k users held that was a 0.6-1.5 s stop
    every 10-20 s, 15% of the worker's CPU and most of the decision-latency tail.
    Frozen objects are still freed by reference counting (the state has no cycles);
    only cyclic garbage among them would stay, which is why the RSS bench runs over
    millions of events. ``fork()`` for checkpoints also copies fewer pages."""

    @app.timer(HEAP_FREEZE_S)
    async def freeze_heap() -> None:
        gc.freeze()


def create_app(settings: Settings) -> faust.App:
    """The configured Faust app, without agents (``agents.worker.worker_app`` adds them)."""
    app = faust.App(
        settings.app_id,
        broker=faust_broker_url(settings.broker),
        broker_credentials=credentials(settings),
        store="memory://",
        datadir=settings.state_dir,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        # Tansu has no idempotent producer; exactly-once effects come from
        # idempotent processing (dedup, snapshots) instead.
        processing_guarantee="at_least_once",
        producer_linger=settings.producer_linger_ms / 1000,
        producer_max_batch_size=settings.producer_max_batch_bytes,
    )
    _patch_fetch_max_wait()
    _freeze_heap_regularly(app)
    app.safeswap_fetch_max_wait_ms = settings.consumer_fetch_max_wait_ms
    return app
