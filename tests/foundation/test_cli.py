"""The CLI as a user meets it: one clear line on misuse, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest


def safeswap(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("SAFESWAP_BROKER", None) if env is None or "SAFESWAP_BROKER" not in env else None
    return subprocess.run([sys.executable, "-m", "safeswap", *args], capture_output=True, text=True,
                          env=full_env, timeout=60)


def test_schema_export_writes_valid_json_schemas(tmp_path: Path):
    result = safeswap("schema", "export", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "trace.schema.json" in files and "feedback.schema.json" in files
    for path in (tmp_path / "out").iterdir():
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


def test_schema_export_to_an_unwritable_place_is_one_line(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = safeswap("schema", "export", str(blocker / "sub"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(blocker / "sub") in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_worker_without_a_broker_says_how_to_give_one():
    result = safeswap("worker", env={"SAFESWAP_BROKER": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "SAFESWAP_BROKER" in result.stderr and "--broker" in result.stderr


def test_bad_environment_value_names_the_variable():
    result = safeswap("worker", env={"SAFESWAP_BROKER": "x:1", "SAFESWAP_PARTITIONS": "four"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "SAFESWAP_PARTITIONS" in result.stderr


def test_unknown_command_and_flag_exit_non_zero_without_traceback():
    for args in (["frobnicate"], ["demo", "--no-such-flag"]):
        result = safeswap(*args)
        assert result.returncode != 0 and "Traceback" not in result.stderr


def test_demo_on_ctrl_c_stops_the_worker_and_the_broker():
    import re
    import signal

    from streams.broker import wait_for_port

    env = dict(os.environ, COLUMNS="200")
    env.pop("SAFESWAP_BROKER", None)
    demo = subprocess.Popen([sys.executable, "-m", "safeswap", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in demo.stdout:
            lines.append(line)
            if "worker started" in line:
                break
        text = "".join(lines)
        port = int(re.search(r"on 127\.0\.0\.1:(\d+)", text).group(1))
        worker_pid = int(re.search(r"pid (\d+)", text).group(1))
        demo.send_signal(signal.SIGINT)
        rest = demo.communicate(timeout=60)[0]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 130, rest[-2000:]
    assert "Traceback" not in rest
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)  # the worker is gone (and reaped: no zombie answers)
    assert not wait_for_port("127.0.0.1", port, timeout_s=0.5)  # the broker is gone
