"""Running a Faust worker: its topics first (``ensure_topics_with_retry``), without Faust's spinner."""

from __future__ import annotations

import asyncio
import logging

from streams.settings import Settings
from streams.topics import TopicCreationError, ensure_topics

log = logging.getLogger(__name__)


async def ensure_topics_with_retry(settings: Settings, timeout_s: float | None = None) -> None:
    """Create the topics, retrying while the broker comes up (compose starts them together)
    for ``timeout_s`` (default: SAFESWAP_BROKER_WAIT_S). A refused creation is not retried."""
    deadline = asyncio.get_running_loop().time() + (settings.broker_wait_s if timeout_s is None else timeout_s)
    while True:
        try:
            await ensure_topics(settings)
            return
        except TopicCreationError:
            raise
        except Exception as exc:  # noqa: BLE001 - the broker may fail in any way while it starts: retried until the deadline
            if asyncio.get_running_loop().time() > deadline:
                raise ConnectionError(
                    f"cannot reach the Kafka broker at {settings.broker}: "
                    f"{exc or type(exc).__name__}; check --broker / SAFESWAP_BROKER"
                ) from None
            await asyncio.sleep(0.5)


def faust_worker(app, settings: Settings):
    """Faust's Worker without its terminal spinner. The spinner spins on every log record, so
    Faust sets the root logger to DEBUG for it whatever the log level: every debug call in
    aiokafka and Faust then builds a LogRecord (~15% of a loaded worker's event loop)."""
    from faust.worker import Worker

    worker = Worker(app, loglevel=settings.log_level, quiet=True)
    worker.spinner = None
    return worker
