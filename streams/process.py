"""A `safeswap worker` as a child process: what the demo, simulate and tests start.

Always stopped in order (SIGINT, SIGKILL after a timeout: a worker whose broker
vanished may ignore signals) and always reaped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from streams.settings import Settings, env_name


class WorkerExited(RuntimeError):
    """A worker process stopped while it was needed."""


def stop_process(process: subprocess.Popen, timeout_s: float = 8.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class WorkerProcess:
    def __init__(self, settings: Settings, log_path: str | Path | None = None):
        self.settings = settings
        if log_path:
            self.log_path = Path(log_path)
        else:
            fd, path = tempfile.mkstemp(prefix="safeswap-worker-", suffix=".log")
            os.close(fd)  # start() opens it by name, once per start
            self.log_path = Path(path)
        self.process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        env = dict(os.environ)
        for field in fields(Settings):  # the child sees exactly the parent's settings
            value = getattr(self.settings, field.name)
            if value is not None:
                env[env_name(field.name)] = str(value)
        repo_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "safeswap", "worker"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the parent, which stops us in order
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.alive():
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise WorkerExited if the worker was started and has exited on its own."""
        if self.process is not None and self.process.poll() is not None:
            raise WorkerExited(f"the worker exited with code {self.process.returncode}; its log: {self.log_path}")

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
