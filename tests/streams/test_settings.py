"""Settings refuse values that cannot be right, naming the variable to fix."""

from __future__ import annotations

import math

import pytest

from streams.settings import Settings, broker_problem


@pytest.mark.parametrize(
    "broker",
    ["", "kafka:9092", "k1:9092,k2:9093", "k1:9092, k2:9093", "[::1]:9092", "127.0.0.1:1", "broker.example.com:65535"],
)
def test_usable_bootstrap_lists_pass(broker):
    assert broker_problem(broker) is None
    assert Settings(broker=broker).broker == broker


@pytest.mark.parametrize(
    "broker, named",
    [
        ("a:b", "'b'"),
        ("kafka", "'kafka'"),
        (":9092", "':9092'"),
        ("k:0", "'0'"),
        ("k:65536", "'65536'"),
        ("k1:9092,", "''"),
        ("::1:9092", "'::1:9092'"),
        ("k:-1", "'-1'"),
    ],
)
def test_malformed_bootstrap_lists_name_the_bad_entry(broker, named):
    problem = broker_problem(broker)
    assert problem is not None and named in problem and repr(broker) in problem
    with pytest.raises(ValueError, match="SAFESWAP_BROKER / --broker"):
        Settings(broker=broker)


@pytest.mark.parametrize(
    "field, value, variable",
    [
        ("partitions", 0, "SAFESWAP_PARTITIONS"),
        ("partitions", -2, "SAFESWAP_PARTITIONS"),
        ("replication_factor", 0, "SAFESWAP_REPLICATION_FACTOR"),
        ("snapshot_interval_s", 0.0, "SAFESWAP_SNAPSHOT_INTERVAL_S"),
        ("session_timeout_s", -1.0, "SAFESWAP_SESSION_TIMEOUT_S"),
        ("broker_wait_s", math.nan, "SAFESWAP_BROKER_WAIT_S"),
        ("allowed_lateness_s", -1.0, "SAFESWAP_ALLOWED_LATENESS_S"),
        ("judge_sample_rate", 1.5, "SAFESWAP_JUDGE_SAMPLE_RATE"),
        ("dashboard_port", 65536, "SAFESWAP_DASHBOARD_PORT"),
        ("metrics_port", -1, "SAFESWAP_METRICS_PORT"),
        ("emitter_buffer", 0, "SAFESWAP_EMITTER_BUFFER"),
    ],
)
def test_out_of_range_values_name_their_variable(field, value, variable):
    with pytest.raises(ValueError, match=variable):
        Settings(**{field: value})
    with pytest.raises(ValueError, match=variable):  # from the environment, as the CLI reads it
        Settings.from_env({variable: str(value)})


def test_zero_where_zero_means_none_is_accepted():
    settings = Settings(
        metrics_port=0,
        dashboard_port=0,
        producer_linger_ms=0,
        allowed_lateness_s=0.0,
        judge_sample_rate=0.0,
        judge_max_retries=0,
        retry_window_s=0.0,
    )
    assert settings.metrics_port == 0 and settings.judge_sample_rate == 0.0


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as raised:
        Settings.from_env({"SAFESWAP_PARTITIONS": "0", "SAFESWAP_SINK_IDLE_S": "-1", "SAFESWAP_BROKER": "x"})
    message = str(raised.value)
    assert "SAFESWAP_PARTITIONS" in message and "SAFESWAP_SINK_IDLE_S" in message and "SAFESWAP_BROKER" in message


def test_replace_is_checked_too():
    with pytest.raises(ValueError, match="SAFESWAP_PARTITIONS"):
        Settings().replace(partitions=0)
