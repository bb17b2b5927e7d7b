"""The README's advice for clients in other languages, true for the client it names.

confluent-kafka 2.16 (librdkafka 2.16) with exactly the settings the README lists
produces trace events to the embedded broker, and every event lands on the
partition safeswap's own clients would pick for its user_id (murmur2), so the
worker's per-user state is whole.
"""

from __future__ import annotations

import asyncio
import json

import confluent_kafka
import pytest

from safeswap.tools.replay import partition_for
from tests.faults.helpers import fresh_settings
from tests.support.kafka import read_topic

pytestmark = pytest.mark.integration


def test_librdkafka_with_the_readme_settings_produces_where_safeswap_partitions(broker, tmp_path):
    settings = fresh_settings(broker, tmp_path, "librdkafka")
    config = {  # the README, "Clients in other languages against the embedded broker"
        "bootstrap.servers": broker,
        "partitioner": "murmur2_random",
        "enable.idempotence": False,
        "acks": "all",
        "linger.ms": 5,
    }
    producer = confluent_kafka.Producer(config)
    users = [f"user-{i}" for i in range(200)]
    errors: list = []
    for i, user in enumerate(users):
        event = {
            "type": "trace",
            "event_id": f"ev-{i}",
            "ts": "2026-11-02T09:16:40Z",
            "rollout_id": "r1",
            "variant": "control",
            "user_id": user,
            "session_id": f"{user}/1",
            "trace_id": f"tr-{i}",
            "prompt_version": "p1",
            "model_version": "m1",
            "latency_ms": 800.0,
        }
        producer.produce(
            settings.topic("traces"),
            key=user.encode(),
            value=json.dumps(event).encode(),
            on_delivery=lambda err, msg: errors.append(err) if err else None,
        )
    assert producer.flush(30) == 0 and errors == []
    assert confluent_kafka.libversion()[1] >= 0x02100000  # librdkafka 2.16 or later, as the README says
    records = asyncio.run(read_topic(broker, settings.topic("traces"), until_count=len(users)))
    assert len(records) == len(users)
    for record in records:
        assert record.partition == partition_for(record.key.decode(), settings.partitions), record.key
