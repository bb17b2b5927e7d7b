"""Shared fixtures: a real Kafka-protocol broker (embedded Tansu) on a free loopback port,
or the external Kafka named by SAFESWAP_BROKER."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.broker import EmbeddedBroker
from streams.process import WorkerProcess
from streams.settings import ENV_PREFIX, Settings
from streams.topics import ensure_topics


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap address of a running broker for the whole test session."""
    external = os.environ.get(ENV_PREFIX + "BROKER")
    if external:
        yield external
        return
    with EmbeddedBroker() as embedded:
        yield embedded.bootstrap


@pytest.fixture
def settings(broker: str, tmp_path: Path) -> Settings:
    """Settings with a topic prefix and consumer group of this test's own, topics created."""
    unique = uuid.uuid4().hex[:8]
    settings = Settings(
        broker=broker,
        topic_prefix=f"t{unique}",
        app_id=f"safeswap-test-{unique}",
        state_dir=str(tmp_path / "state"),
        data_dir=str(tmp_path / "data"),
    )
    asyncio.run(ensure_topics(settings))
    return settings


@pytest.fixture
def worker_factory(settings: Settings, tmp_path: Path):
    """Start worker processes for this test's settings; all are stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(**overrides) -> WorkerProcess:
        worker = WorkerProcess(settings.replace(**overrides), tmp_path / f"worker-{len(started)}.log").start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
