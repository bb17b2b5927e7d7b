"""The worker's log level is what its settings say, for aiokafka and Faust too."""

import asyncio
import logging

import pytest

from streams.app import create_app
from streams.settings import Settings
from streams.worker import faust_worker


@pytest.fixture
def root_logger():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    root.setLevel(level)
    root.handlers[:] = handlers


def test_a_warn_worker_builds_no_debug_records(root_logger):
    # Faust's terminal spinner sets the root logger to DEBUG so that it spins on every
    # record; with it, each debug call in aiokafka's producer and fetcher built a record.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        settings = Settings(log_level="warn")
        worker = faust_worker(create_app(settings), settings)
        worker.redirect_stdouts = False  # not what this test is about, and it would outlive it
        worker._setup_logging()  # what execute_from_commandline does first
        for name in ("aiokafka.producer.producer", "aiokafka.consumer.fetcher", "faust.topics", "agents.outcomes"):
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
        assert logging.getLogger("agents.outcomes").isEnabledFor(logging.WARNING)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
