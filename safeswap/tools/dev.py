"""`safeswap dev`: a local stack without Docker, the embedded broker, its topics and a worker.

The broker (Tansu) keeps its log in memory: stopping the stack forgets the topics
(the Parquet datasets in the data folder stay). Stopped with Ctrl-C: the worker
first (SIGINT, so its sinks flush what they hold), then the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from rich.console import Console

from streams.broker import EmbeddedBroker, wait_for_port
from streams.process import WorkerProcess
from streams.settings import Settings
from streams.worker import ensure_topics_with_retry

DEFAULT_PORT = 9092


class PortInUse(Exception):
    pass


def run_dev(settings: Settings, port: int, console: Console, *, until: float | None = None) -> int:
    """Run the stack until Ctrl-C (or ``until``, a ``time.monotonic()``, for tests); returns the
    worker's exit code if it stopped on its own, else 0."""
    if wait_for_port("127.0.0.1", port, 0.2):
        raise PortInUse(
            f"port {port} on 127.0.0.1 is in use (another broker, or `safeswap dev` already running?): "
            f"pass --port with a free one"
        )
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker(port=port))
        settings = settings.replace(broker=broker.bootstrap)
        asyncio.run(ensure_topics_with_retry(settings))
        worker = stack.enter_context(WorkerProcess(settings))
        console.print(f"embedded broker (Tansu) on {broker.bootstrap}, topics created (prefix {settings.topic_prefix})")
        console.print(f"worker running (pid {worker.pid}), log: {worker.log_path}")
        console.print(f"Parquet datasets in {settings.data_dir}")
        console.print(
            "\nIn another shell:\n"
            f"  export SAFESWAP_BROKER={broker.bootstrap}\n"
            "  safeswap rollout start plan.yaml    # then emit events from your app\n"
            "  safeswap dashboard                  # http://127.0.0.1:8050\n"
            "\nCtrl-C stops the worker and the broker (the broker's topics are in memory).",
            highlight=False,
        )
        try:
            while until is None or time.monotonic() < until:
                if not worker.alive():
                    console.print(f"[bold red]the worker exited[/]; the last lines of {worker.log_path}:")
                    console.print(worker.log_tail(20), markup=False, highlight=False, soft_wrap=True)
                    return worker.process.returncode or 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            console.print("stopping the worker (its sinks flush), then the broker")
    return 0
