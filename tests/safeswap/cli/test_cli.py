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
    return subprocess.run(
        [sys.executable, "-m", "safeswap", *args], capture_output=True, text=True, env=full_env, timeout=60
    )


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
    demo = subprocess.Popen(
        [sys.executable, "-m", "safeswap", "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
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


# A broker address nobody listens on, and a short wait so a refused connection fails in seconds.
def unreachable_broker_env() -> dict:
    from streams.broker import free_port

    return {"SAFESWAP_BROKER": f"127.0.0.1:{free_port()}", "SAFESWAP_BROKER_WAIT_S": "1"}


@pytest.mark.parametrize("command", [["topics", "create"], ["worker"], ["demo"]])
def test_unreachable_broker_is_one_line_naming_it(command):
    env = unreachable_broker_env()
    result = safeswap(*command, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert "Unable connect" not in output  # aiokafka's per-attempt noise is held back
    assert f"cannot reach the Kafka broker at {env['SAFESWAP_BROKER']}" in result.stderr
    assert "SAFESWAP_BROKER" in result.stderr and "--broker" in result.stderr


@pytest.mark.parametrize("broker", ["a:b", "kafka1", "kafka1:9092,kafka2:99999"])
def test_malformed_broker_names_the_value_and_where_it_came_from(broker):
    for args, env in ((["demo", "--broker", broker], None), (["worker"], {"SAFESWAP_BROKER": broker})):
        result = safeswap(*args, env=env)
        assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, result.stderr
        assert repr(broker) in result.stderr and "SAFESWAP_BROKER" in result.stderr and "--broker" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "variable, value",
    [
        ("SAFESWAP_PARTITIONS", "0"),
        ("SAFESWAP_PARTITIONS", "-2"),
        ("SAFESWAP_SNAPSHOT_INTERVAL_S", "0"),
        ("SAFESWAP_METRICS_PORT", "70000"),
    ],
)
def test_out_of_range_setting_is_refused_before_any_topic_is_made(variable, value):
    result = safeswap("topics", "create", env={**unreachable_broker_env(), variable: value})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{variable}={value}" in result.stderr
    assert "topics ready" not in result.stderr


def test_demo_whose_worker_dies_says_so_at_once_and_keeps_its_log():
    # The demo itself does not read the log level; its worker refuses it and exits at start.
    result = safeswap("demo", "--json", env={"SAFESWAP_BROKER": "", "SAFESWAP_LOG_LEVEL": "loud"})
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "Traceback" not in output
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: the worker exited with code 2")
    log_path = Path(last_line.rsplit("its log: ", 1)[1].strip())
    try:
        assert log_path.exists()  # kept for the user
        assert "--log-level 'loud'" in log_path.read_text()
        assert "--log-level 'loud'" in output  # its tail was printed
        assert "no rollback within" not in output  # it did not wait for the deadline
    finally:
        log_path.unlink(missing_ok=True)


def test_an_unreadable_data_file_from_any_command_is_one_error_line():
    """The demo and simulate read the dataset back too: a broken file there is named, not a traceback."""
    import typer
    from typer.testing import CliRunner

    from safeswap.cli.common import report_user_errors
    from sinks.read import UnreadableFile

    app = typer.Typer()

    @app.command()
    def reads_data() -> None:
        raise UnreadableFile("data/traces/part-0-0-0.parquet", "magic bytes not found")

    @app.command()
    def other() -> None:
        pass

    result = CliRunner().invoke(report_user_errors(app), ["reads-data"])
    assert result.exit_code == 2
    assert "part-0-0-0.parquet" in result.output and "Traceback" not in result.output


def test_every_user_error_is_error_lines_printed_as_written(tmp_path: Path):
    # One style for every command: each line of the message as "error: ...", exit 2, and
    # square brackets in a path or value shown as they are (not taken for console markup).
    result = safeswap("eval-gate", "--baseline", "b.jsonl", "--candidate", "c.jsonl", "--stakes", "[bold]medium")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: --stakes '[bold]medium': use high or low"]

    plan = Path(__file__).resolve().parents[3] / "examples" / "plan.yaml"
    scenario = tmp_path / "[draft] scenario.yaml"
    scenario.write_text("users: many\nbad_field: 1\n")
    result = safeswap("simulate", "--plan", str(plan), "--scenario", str(scenario))
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(lines) == 2 and all(line.startswith(f"error: {scenario}:") for line in lines), lines
    assert "users: unknown field" in lines[0] and "bad_field: unknown field" in lines[1]
