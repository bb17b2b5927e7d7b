"""Child processes are always stopped and reaped, even when they ignore SIGINT."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from streams.broker import free_port
from streams.process import WorkerExited, WorkerProcess, stop_process
from streams.settings import Settings

# Ignores SIGINT (as a worker whose broker vanished may), then says it is ready.
STUBBORN = "import signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"


def test_a_child_that_ignores_sigint_is_killed_and_reaped():
    child = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"  # the handler is installed
        stop_process(child, timeout_s=0.5)
        assert child.returncode == -9  # SIGKILL, after SIGINT was ignored
        with pytest.raises(ChildProcessError):
            os.waitpid(child.pid, os.WNOHANG)  # reaped: no zombie left to wait for
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def test_a_child_that_honours_sigint_is_not_killed():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        stop_process(child, timeout_s=30)
        assert child.returncode != -9  # stopped by SIGINT (KeyboardInterrupt), no escalation
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_worker_process_leaves_no_descriptor_open_for_its_temporary_log():
    before = open_fds()
    workers = [WorkerProcess(Settings()) for _ in range(5)]
    try:
        assert open_fds() <= before
        assert all(worker.log_path.exists() for worker in workers)
    finally:
        for worker in workers:
            worker.log_path.unlink(missing_ok=True)


def test_check_alive_reports_a_worker_that_exited_with_its_log(tmp_path):
    # Nothing listens on the broker: the worker gives up after SAFESWAP_BROKER_WAIT_S and exits.
    settings = Settings(broker=f"127.0.0.1:{free_port()}", broker_wait_s=0.5, state_dir=str(tmp_path / "state"))
    with WorkerProcess(settings, tmp_path / "worker.log") as worker:
        worker.check_alive()  # just started: nothing to report
        deadline = time.monotonic() + 60
        while worker.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(WorkerExited, match="exited with code 2") as raised:
            worker.check_alive()
    assert str(tmp_path / "worker.log") in str(raised.value)
    assert "cannot reach the Kafka broker" in worker.log_tail(20)
