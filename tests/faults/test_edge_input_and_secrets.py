"""Faults: oversized, future, ancient and unknown-rollout events; and secrets never leak.

One worker, with distinctive values for ``ANTHROPIC_API_KEY`` and the Kafka SASL
password in its settings (the protocol stays PLAINTEXT so it still reaches the
embedded broker; the password is in its settings and environment), at log level
debug, with the judge enabled against a closed local port so its error path runs.

Proved (docs/faults.md): a 10 MB trace goes to the DLQ as ``too_large`` (its
original cut to 256 KiB in the record), a trace 10 h in the future as
``future_timestamp``, an ancient one behind its partition's newest event as
``late_event``; traces of a rollout no plan names are counted as their own
rollout (statistics published) and the controller ignores them (no decision, no
dead letter). And neither secret appears in the worker's log, in any DLQ record,
in any Parquet file, nor in the CLI's error output for bad settings.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from schemas import TraceEvent, encode
from streams.broker import free_port
from streams.process import WorkerProcess
from tests.faults.helpers import dead_letters, decisions, fresh_settings, latest_snapshots, produce_many, wait_until
from tests.support.events import trace
from tests.support.kafka import read_topic

pytestmark = [pytest.mark.faults, pytest.mark.integration]

API_KEY = "sk-ant-FAULTSUITE-7c1d9e52b0a4-secret"
PASSWORD = "pw-FAULTSUITE-44b1f0e8-secret"
SECRETS = (API_KEY.encode(), PASSWORD.encode())
UNKNOWN = "nobody-planned-this"


def raw(event: TraceEvent) -> tuple[str, bytes, bytes]:
    return ("traces", event.user_id.encode(), encode(event))


def shadow_pair(n: int) -> tuple[str, bytes, bytes]:
    side = {"latency_ms": 10.0, "model_version": "m", "prompt_version": "p", "response_text": "hello"}
    value = msgspec.json.encode(
        {
            "event_id": f"sp-{n}",
            "ts": int(time.time() * 1000),
            "rollout_id": UNKNOWN,
            "user_id": f"u{n}",
            "request_id": f"q{n}",
            "prompt_text": "say hello",
            "control": side,
            "candidate": side,
        }
    )
    return ("shadow", f"u{n}".encode(), value)


def test_edge_cases_are_handled_as_documented_and_no_secret_leaks(broker, tmp_path):
    settings = fresh_settings(
        broker,
        tmp_path,
        "edge",
        sink_datasets="traces,shadow,dlq",
        log_level="debug",
        anthropic_api_key=API_KEY,
        anthropic_base_url=f"http://127.0.0.1:{free_port()}",
        judge_max_retries=0,
        judge_timeout_s=2.0,
        kafka_sasl_username="svc-fault",
        kafka_sasl_password=PASSWORD,
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        now = int(time.time() * 1000)
        good = [trace(n, now - 600_000 + n * 1000, user=f"u{n % 5}", rollout=UNKNOWN) for n in range(20)]
        oversized = trace("huge", now - 300_000, user="u0", rollout=UNKNOWN, response_text="x" * 10_000_000)
        future = trace("future", now + 10 * 3600_000, user="u1", rollout=UNKNOWN)
        ancient = trace("ancient", 978_307_200_000, user="u2", rollout=UNKNOWN)  # 2001-01-01, after u2's newer ones
        messages = [raw(e) for e in good] + [raw(oversized), raw(future), raw(ancient)]
        messages += [shadow_pair(n) for n in range(3)] + [("traces", b"u3", b"{not json " + b"z" * 40)]
        positions = asyncio.run(produce_many(settings, messages))
        where = dict(zip(["huge", "future", "ancient"], positions[20:23]))

        def outcome_letters() -> dict:
            found = {
                (r.topic, r.partition, r.offset): r
                for r in dead_letters(settings, timeout_s=5)
                if r.agent == "outcomes"
            }
            return found if all(p in found for p in where.values()) else {}

        found = wait_until(outcome_letters, 90, "the outcomes agent's dead letters", worker.log)
        assert found[where["huge"]].reason.startswith("too_large: event of 10,000,")
        assert len(base64.b64decode(found[where["huge"]].value_b64)) == 256 * 1024  # cut, and said so
        assert "cut to its first 262,144" in found[where["huge"]].reason
        assert found[where["future"]].reason.startswith("future_timestamp: ")
        assert found[where["ancient"]].reason.startswith("late_event: event time 2001-01-01")

        # Unknown rollout: counted as its own rollout, ignored by the controller.
        def counted():
            snaps = latest_snapshots(settings, UNKNOWN)
            total = sum(s.counts.get("control", {}).get("responses", 0) for s in snaps.values())
            return total == len(good)

        wait_until(counted, 60, f"{len(good)} responses counted for {UNKNOWN}", worker.log)
        assert decisions(settings, UNKNOWN) == []
        letters = dead_letters(settings, timeout_s=5)
        assert not [r for r in letters if r.agent == "decide"], [r.reason for r in letters if r.agent == "decide"]

        # The judge ran (and failed against the closed port): its error path is in the log too.
        wait_until(lambda: "judge" in worker.log() and "sp-" in worker.log(), 60, "the judge's attempt", worker.log)
        time.sleep(3)  # sinks flush after 2 s idle
    finally:
        worker.stop()

    # No secret anywhere we write.
    log = worker.log().encode()
    assert len(log) > 10_000 and b"DEBUG" in log  # a debug run really happened
    dlq = b"".join(
        (r.value or b"") + (r.key or b"")
        for r in asyncio.run(read_topic(settings.broker, settings.topic("dlq"), timeout_s=5))
    )
    decoded = b"".join(base64.b64decode(r.value_b64) for r in dead_letters(settings, timeout_s=5))
    parquet = [path for path in Path(settings.data_dir).rglob("*") if path.is_file()]
    assert any(p.suffix == ".parquet" for p in parquet)
    for secret in SECRETS:
        assert secret not in log, "a secret in the worker log"
        assert secret not in dlq and secret not in decoded, "a secret in a DLQ record"
        for path in parquet:
            assert secret not in path.read_bytes(), f"a secret in {path}"


@pytest.mark.parametrize(
    "bad",
    [
        {"SAFESWAP_PARTITIONS": "four"},
        {"SAFESWAP_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SAFESWAP_KAFKA_SASL_MECHANISM": "ROT13"},
        {"SAFESWAP_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SAFESWAP_KAFKA_SASL_USERNAME": ""},
        {"SAFESWAP_KAFKA_SECURITY_PROTOCOL": "PLAINTEXTISH"},
    ],
)
def test_cli_errors_for_bad_settings_do_not_echo_secrets(tmp_path, bad):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFESWAP_")}
    env.update(
        {
            "ANTHROPIC_API_KEY": API_KEY,
            "SAFESWAP_KAFKA_SASL_PASSWORD": PASSWORD,
            "SAFESWAP_KAFKA_SASL_USERNAME": "svc-fault",
            "SAFESWAP_BROKER": f"127.0.0.1:{free_port()}",
            **bad,
        }
    )
    run = subprocess.run(
        [sys.executable, "-m", "safeswap", "topics", "create"], capture_output=True, env=env, cwd=tmp_path, timeout=120
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0 or b"rror" in output, output[-2000:]  # it did refuse
    for secret in SECRETS:
        assert secret not in output, output[-2000:]
