import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams.topics import TOPICS, ensure_topics

pytestmark = pytest.mark.integration


def test_topics_are_created_once_with_partitions_and_compaction(settings):
    async def scenario():
        again = await ensure_topics(settings)  # the fixture created them already
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.broker)
        await admin.start()
        try:
            described = await admin.describe_topics([settings.topic(spec.name) for spec in TOPICS])
            configs = await admin.describe_configs(
                [
                    ConfigResource(ConfigResourceType.TOPIC, settings.topic(name))
                    for name in ("decisions", "plans", "traces")
                ]
            )
        finally:
            await admin.close()
        return again, described, configs

    again, described, configs = asyncio.run(scenario())
    assert again == []
    assert {t["topic"]: len(t["partitions"]) for t in described} == {
        settings.topic(spec.name): settings.partitions for spec in TOPICS
    }
    policies = {}
    for response in configs:
        for resource in response.resources:
            name, entries = resource[3], resource[4]
            policies[name] = {entry[0]: entry[1] for entry in entries}.get("cleanup.policy")
    assert policies[settings.topic("decisions")] == "compact"
    assert policies[settings.topic("plans")] == "compact"
    assert policies[settings.topic("traces")] != "compact"


def test_creation_errors_name_topic_and_kafka_error_but_not_already_exists():
    from aiokafka.protocol.admin import CreateTopicsResponse_v0, CreateTopicsResponse_v2

    from streams.topics import creation_errors

    response = CreateTopicsResponse_v2(
        throttle_time_ms=0,
        topic_errors=[
            ("p.traces", 0, None),
            ("p.plans", 36, "Topic 'p.plans' already exists."),  # another process won the race
            ("p.decisions", 38, "Replication factor: 3 larger than available brokers: 1."),
            ("p.status", 29, None),
        ],
    )
    assert creation_errors(response.topic_errors) == [
        "p.decisions: InvalidReplicationFactorError (Replication factor: 3 larger than available brokers: 1.)",
        "p.status: TopicAuthorizationFailedError",
    ]
    # A controller moving is not a refusal: it is retried (ensure_topics_with_retry).
    moving = CreateTopicsResponse_v0(topic_errors=[("p.dlq", 41), ("p.stats", 37)]).topic_errors
    assert creation_errors(moving) == ["p.stats: InvalidPartitionsError"]
    assert creation_errors(moving, retriable=True) == ["p.dlq: NotControllerError"]


def test_drift_warnings_for_partitions_and_compaction():
    from streams.settings import Settings
    from streams.topics import drift_warnings

    settings = Settings(topic_prefix="p", partitions=4)
    warnings = drift_warnings(
        settings,
        partitions={"p.traces": 4, "p.decisions": 2, "p.stats": 4},
        policies={"p.decisions": "compact", "p.plans": None, "p.status": "delete", "p.checkpoints": "compact,delete"},
    )
    assert len(warnings) == 3  # in registry order: plans, decisions, status
    assert "p.plans is not compacted (cleanup.policy=delete)" in warnings[0]
    assert "p.decisions has 2 partitions" in warnings[1] and "SAFESWAP_PARTITIONS is 4" in warnings[1]
    assert "p.status is not compacted (cleanup.policy=delete)" in warnings[2]
    assert drift_warnings(settings, {}, {}) == []  # nothing described: nothing checked


def test_existing_topics_that_differ_are_warned_about_once_each(broker, caplog):
    import logging
    import uuid

    from aiokafka.admin import NewTopic

    from streams.settings import Settings

    settings = Settings(broker=broker, topic_prefix=f"drift{uuid.uuid4().hex[:8]}", partitions=4)

    async def scenario():
        # Someone created two of the topics by hand: too few partitions, and not compacted.
        admin = AIOKafkaAdminClient(bootstrap_servers=broker)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(settings.topic("decisions"), 2, 1), NewTopic(settings.topic("traces"), 4, 1)]
            )
        finally:
            await admin.close()
        with caplog.at_level(logging.WARNING, logger="streams.topics"):
            created = await ensure_topics(settings)
        return created

    created = asyncio.run(scenario())
    assert settings.topic("decisions") not in created and settings.topic("plans") in created
    messages = [r.getMessage() for r in caplog.records if r.name == "streams.topics"]
    assert len(messages) == 2, messages
    assert any(f"{settings.topic('decisions')} has 2 partitions" in m for m in messages)
    assert any(f"{settings.topic('decisions')} is not compacted" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streams.topics"):
        asyncio.run(ensure_topics(settings.replace(topic_prefix=f"ok{uuid.uuid4().hex[:8]}")))
    assert [r for r in caplog.records if r.name == "streams.topics"] == []  # made by safeswap: nothing to say
