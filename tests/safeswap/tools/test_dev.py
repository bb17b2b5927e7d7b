"""`safeswap dev`: the local stack a new user runs without Docker, stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streams.broker import free_port, wait_for_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]


def _safeswap(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "safeswap", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_dev_runs_broker_topics_and_worker_prints_the_address_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFESWAP_")}
    env.update(SAFESWAP_DATA_DIR=str(tmp_path / "data"), SAFESWAP_STATE_DIR=str(tmp_path / "state"))
    out = tmp_path / "dev.out"
    with open(out, "w") as sink:
        dev = subprocess.Popen(
            [sys.executable, "-m", "safeswap", "dev", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while f"export SAFESWAP_BROKER=127.0.0.1:{port}" not in out.read_text():
            assert dev.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.5)
        # Another command, pointed where it says: the topics are there, the worker answers.
        with_broker = dict(env, SAFESWAP_BROKER=f"127.0.0.1:{port}")
        listed = _safeswap("rollout", "list", "--json", env=with_broker)
        assert listed.returncode == 0, listed.stderr
        # A second stack on the same port is refused with the fix named.
        again = _safeswap("dev", "--port", str(port), env=env)
        assert again.returncode == 2 and f"port {port}" in again.stderr and "--port" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr
        os.killpg(dev.pid, signal.SIGINT)  # Ctrl-C in its terminal
        assert dev.wait(timeout=60) == 0, out.read_text()
        assert not wait_for_port("127.0.0.1", port, 1.0)  # the broker is gone too
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()


def test_commands_that_need_a_broker_say_how_to_get_one():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFESWAP_")}
    result = _safeswap("worker", env=env)
    assert result.returncode == 2 and "safeswap dev" in result.stderr, result.stderr
    helped = _safeswap("rollout", "status", "--help", env=dict(env, COLUMNS="200"))
    assert "safeswap dev" in helped.stdout and "empty: the embedded" not in helped.stdout


def test_a_ctrl_c_in_the_terminal_reaches_the_parent_not_the_broker():
    # The parent stops the worker first (its sinks commit and its checkpoints are written to the
    # broker), then the broker: a broker in the terminal's process group would die first.
    from streams.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        assert os.getpgid(broker.process.pid) != os.getpgrp()
        assert os.getsid(broker.process.pid) == broker.process.pid
