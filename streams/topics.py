"""The topic registry: every topic safeswap reads or writes, with its shape.

Source topics are created with the admin client before a worker starts; Faust
creates only its own internal topics (changelogs, repartition, assignor).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.kafka import client_options
from streams.settings import Settings

COMPACT = {"cleanup.policy": "compact"}


@dataclass(frozen=True)
class TopicSpec:
    name: str  # short name; the full name is settings.topic(name)
    key: str  # what the key is, for people reading this registry
    config: dict[str, str] = field(default_factory=dict)


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("traces", key="user_id"),
    TopicSpec("feedback", key="user_id"),
    TopicSpec("shadow", key="user_id"),
    TopicSpec("outcomes", key="user_id"),
    TopicSpec("stats", key="rollout_id"),
    TopicSpec("plans", key="rollout_id", config=COMPACT),
    TopicSpec("decisions", key="rollout_id", config=COMPACT),
    TopicSpec("commands", key="rollout_id"),
    TopicSpec("status", key="rollout_id", config=COMPACT),
    TopicSpec("judgments", key="rollout_id"),
    TopicSpec("dlq", key="source key"),
    # The outcomes agent's whole-partition state checkpoints (streams/checkpoint.py).
    TopicSpec("checkpoints", key="source partition", config=COMPACT),
)


async def ensure_topics(settings: Settings, timeout_s: float = 20.0) -> list[str]:
    """Create every missing topic; returns the names created. Idempotent."""
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=int(timeout_s * 1000))
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=settings.topic(spec.name),
                num_partitions=settings.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=dict(spec.config),
            )
            for spec in TOPICS
            if settings.topic(spec.name) not in existing
        ]
        if missing:
            await admin.create_topics(missing)
        return [topic.name for topic in missing]
    finally:
        await admin.close()
