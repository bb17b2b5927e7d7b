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
                [ConfigResource(ConfigResourceType.TOPIC, settings.topic(name)) for name in ("decisions", "plans", "traces")]
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
