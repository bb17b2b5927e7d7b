"""Outcomes agent: traces + feedback -> per-partition guardrail statistics snapshots.

Both input topics are keyed by user_id with the same partition count, so the
partition that owns a user's traces owns their feedback too; state is kept per
source partition and published as cumulative snapshots keyed by rollout_id.
"""

from __future__ import annotations

import logging

import faust

from agents.dlq import DeadLetters
from safeswap.metrics import PartitionStats, fold_raw
from schemas import InvalidEvent, encode
from streams.app import raw_topic
from streams.settings import Settings

log = logging.getLogger(__name__)


def register(app: faust.App, settings: Settings) -> None:
    inputs = raw_topic(app, settings, "traces", "feedback")
    stats_topic = raw_topic(app, settings, "stats")
    dead_letters = DeadLetters(app, settings, agent="outcomes")
    traces_name = settings.topic("traces")
    partitions: dict[int, PartitionStats] = {}

    async def publish(state: PartitionStats) -> None:
        for snapshot in state.take_dirty_snapshots():
            await stats_topic.send(key=snapshot.rollout_id.encode(), value=encode(snapshot))

    @app.agent(inputs, name="outcomes", concurrency=1)
    async def outcomes(stream: faust.StreamT) -> None:
        async for event in stream.events():
            message = event.message
            state = partitions.get(message.partition)
            if state is None:
                state = partitions[message.partition] = PartitionStats(message.partition)
            try:
                fold_raw(state, message.topic == traces_name, event.value)
            except InvalidEvent as exc:
                await dead_letters.send(message, str(exc))
            except Exception as exc:  # never leave the loop: Faust would skip and restart
                log.exception("outcomes: failed on %s[%s]@%s", message.topic, message.partition, message.offset)
                await dead_letters.send(message, f"internal error: {exc!r}")
            if state.events_since_snapshot >= settings.snapshot_every_events:
                await publish(state)

    @app.timer(settings.snapshot_interval_s)
    async def publish_snapshots() -> None:
        for state in list(partitions.values()):
            await publish(state)
