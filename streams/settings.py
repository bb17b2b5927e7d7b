"""The one Settings object: built from environment variables, overridden by flags.

No other module reads ``os.environ``. Every variable is ``SAFESWAP_<FIELD>`` in
upper case (``SAFESWAP_BROKER=kafka1:9092``), except the few in ``EXPLICIT_ENV``
(``ANTHROPIC_API_KEY``, ``ANTHROPIC_BASE_URL``); docker-compose.yml sets the same
names, and a test checks that it sets nothing the code does not read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

ENV_PREFIX = "SAFESWAP_"


@dataclass(frozen=True)
class Settings:
    # Kafka: "" means "start the embedded Tansu broker" for commands that can.
    broker: str = ""
    # How long `topics create`, the worker and the demo retry an unreachable broker before
    # giving up (compose starts the broker and them together).
    broker_wait_s: float = 30.0
    topic_prefix: str = "safeswap"
    partitions: int = 4
    replication_factor: int = 1
    app_id: str = "safeswap-worker"
    # Faust group timings. Short values make a worker join in seconds on the
    # embedded broker; production clusters commonly use 10/3/60.
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    rebalance_timeout_s: float = 10.0
    # How long a fetch may wait at the broker for data (Faust hard-codes 1,500 ms). A fetch
    # covers every partition that has nothing buffered, quiet ones (stats, plans) included,
    # and holds back the next fetch of the busy ones: this is decision latency.
    consumer_fetch_max_wait_ms: int = 100
    # How long the worker's producer waits to fill a batch (Faust's default is 0: one request
    # per outcome record, a socket write each, ~25% of the worker at full load).
    producer_linger_ms: int = 5
    # Largest batch per partition. aiokafka keeps one open batch per partition and makes a
    # send wait while a full one waits for the request in flight: at Faust's 16 KB (~20
    # outcome records) the agent waited on the broker's round trip every few batches.
    producer_max_batch_bytes: int = 262_144
    # How often each partition publishes its statistics snapshot.
    snapshot_interval_s: float = 1.0
    snapshot_every_events: int = 5000
    # Where worker state lives between restarts (Faust tables).
    state_dir: str = "./safeswap-state"
    data_dir: str = "./safeswap-data"
    log_level: str = "warn"
    # Emitter: events buffered in the app before it starts dropping (and counting).
    emitter_buffer: int = 10_000
    # Emitter: how long an event is retried (broker down, no leader) before it counts as a send error.
    emitter_delivery_timeout_s: float = 120.0
    # Outcomes (docs/metrics.md): event-time windows of the outcomes agent.
    session_gap_s: float = 1800.0  # a session ends after this long without a request
    retry_window_s: float = 60.0  # a similar next request within this is an implicit retry
    retry_similarity: float = 80.0  # rapidfuzz.fuzz.ratio of the prompts, 0..100
    join_ttl_s: float = 3600.0  # feedback joins a trace at most this far apart in event time
    allowed_lateness_s: float = 300.0  # behind its topic's newest event time: late (DLQ)
    max_topic_skew_s: float = 86400.0  # an idle input (no feedback at all) holds the watermark back at most this long
    max_future_s: float = 3600.0  # event times beyond wall clock + this are rejected (DLQ)
    max_edit_chars: int = 10_000  # texts are truncated to this for edit distance
    max_event_bytes: int = 1_000_000  # larger messages go to the DLQ undecoded
    # Crash safety of the outcomes agent: whole-partition checkpoints (agents/outcomes.py).
    checkpoint_interval_s: float = 30.0  # a checkpoint encodes the whole partition: not too often
    checkpoint_every_events: int = 200_000
    # Parquet sinks (sinks/, agents/sink.py): which datasets the worker writes
    # ("all", "" for none, or names: "traces,feedback,decisions"), and when a
    # partition's buffer becomes a file (whichever comes first). Offsets are
    # committed only after the file is in place, so max age also bounds replays.
    sink_datasets: str = "all"
    sink_max_rows: int = 100_000
    sink_max_bytes: int = 64 * 1024 * 1024
    sink_max_age_s: float = 30.0
    sink_idle_s: float = 2.0
    # Controller: how often (at most) the decide agent publishes a rollout's status.
    status_interval_s: float = 1.0
    # Shadow traffic and the LLM judge (docs/shadow.md). The two Anthropic fields
    # are read from ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL (the SDK's own names, see
    # EXPLICIT_ENV); without a key the judge is disabled and everything else runs.
    anthropic_api_key: str = dataclasses.field(default="", repr=False)  # never printed or logged
    anthropic_base_url: str = ""  # "" = the SDK's default endpoint
    judge_model: str = "claude-sonnet-4-6"  # pinned: a judge that changes under you moves the verdicts
    judge_concurrency: int = 4  # judge API calls in flight per worker, never more
    judge_sample_rate: float = 1.0  # share of shadow pairs judged (by event_id hash: replays pick the same)
    # Live scoring in canary and ramp (docs/shadow.md "Live judge scores"): responses of both
    # variants are scored at judge_sample_rate x this (by trace_id hash); 0 turns it off.
    judge_live_sample_rate: float = 1.0
    judge_budget_usd: float = 20.0  # per rollout (a worker spends at most its partitions' share)
    judge_prices: str = ""  # JSON/YAML file {model: {input_per_mtok, output_per_mtok}} added to the built-in table
    judge_rubrics: str = ""  # JSON/YAML file {rollout_id: rubric, "*": default rubric}
    judge_timeout_s: float = 60.0  # one judge API call
    judge_max_retries: int = 4  # 429/529/5xx/timeouts, waiting retry-after (capped below)
    judge_max_retry_after_s: float = 60.0
    judge_max_tokens: int = 400  # the verdict tool call's output cap
    judge_max_answer_chars: int = 12_000  # each answer (and the prompt) is cut to this in the judge prompt
    # The app-side shadow helper (safeswap.shadow): background candidate calls.
    shadow_concurrency: int = 8  # candidate calls in flight per process; more are skipped and counted
    shadow_timeout_s: float = 30.0  # a candidate call slower than this is recorded as a timeout
    # Dashboard (safeswap dashboard, docs/dashboard.md): loopback unless told otherwise;
    # a non-empty token is required as "Authorization: Bearer <token>" (or ?token= once).
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8050
    dashboard_token: str = dataclasses.field(default="", repr=False)  # never printed or logged
    # OTLP ingest (agents/otlp.py, README "OpenTelemetry ingest"): the topic the OpenTelemetry
    # Collector's Kafka exporter writes (its full name, e.g. "otlp_spans"); "" = off.
    otlp_topic: str = ""
    otlp_encoding: str = "otlp_proto"  # otlp_proto | otlp_json (the exporter's `encoding`)
    # Prometheus /metrics of the worker (agents/prometheus.py): 0 = off.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # Kafka security (streams/kafka.py): passed to Faust and to every aiokafka client.
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    kafka_sasl_mechanism: str = "PLAIN"  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = dataclasses.field(default="", repr=False)  # never printed or logged
    kafka_ssl_cafile: str = ""  # PEM; empty: the system's CAs
    kafka_ssl_certfile: str = ""  # client certificate (mutual TLS)
    kafka_ssl_keyfile: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``SAFESWAP_*`` variables, then non-None ``overrides`` (flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        hints = get_type_hints(cls)
        for field in fields(cls):
            raw = environ.get(env_name(field.name))
            # Empty means "not set", except for text settings, where "" is a value
            # (SAFESWAP_SINK_DATASETS="" turns the sinks off).
            if raw is not None and (raw != "" or hints[field.name] is str):
                values[field.name] = _parse(field, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        problems = settings_problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def topic(self, name: str) -> str:
        """Full topic name: ``topic("traces")`` -> ``safeswap.traces``."""
        return f"{self.topic_prefix}.{name}"


# Fields read from a variable other than SAFESWAP_<FIELD>: the names the Anthropic SDK
# and its users already know.
EXPLICIT_ENV: dict[str, str] = {
    "anthropic_api_key": "ANTHROPIC_API_KEY",
    "anthropic_base_url": "ANTHROPIC_BASE_URL",
}


def env_name(field_name: str) -> str:
    """The environment variable a Settings field is read from."""
    return EXPLICIT_ENV.get(field_name) or ENV_PREFIX + field_name.upper()


def env_names() -> set[str]:
    """Every environment variable the code reads."""
    return {env_name(field.name) for field in fields(Settings)}


# Ranges outside which a numeric setting is clearly a mistake (SAFESWAP_PARTITIONS=0 created
# topics no worker could consume). The lower bound is inclusive unless the name is in POSITIVE.
AT_LEAST_ONE = (
    "partitions",
    "replication_factor",
    "producer_max_batch_bytes",
    "snapshot_every_events",
    "emitter_buffer",
    "max_edit_chars",
    "max_event_bytes",
    "checkpoint_every_events",
    "sink_max_rows",
    "sink_max_bytes",
    "judge_concurrency",
    "judge_max_tokens",
    "judge_max_answer_chars",
    "shadow_concurrency",
)
POSITIVE = (  # intervals, timeouts and windows a zero would turn into a busy loop or an instant expiry
    "broker_wait_s",
    "session_timeout_s",
    "heartbeat_interval_s",
    "rebalance_timeout_s",
    "snapshot_interval_s",
    "emitter_delivery_timeout_s",
    "session_gap_s",
    "join_ttl_s",
    "checkpoint_interval_s",
    "sink_max_age_s",
    "sink_idle_s",
    "status_interval_s",
    "judge_timeout_s",
    "shadow_timeout_s",
)
NOT_NEGATIVE = (  # zero is a meaningful "none" here
    "consumer_fetch_max_wait_ms",
    "producer_linger_ms",
    "retry_window_s",
    "allowed_lateness_s",
    "max_topic_skew_s",
    "max_future_s",
    "judge_budget_usd",
    "judge_max_retries",
    "judge_max_retry_after_s",
)
BOUNDED = {  # inclusive ranges; port 0 = off (metrics) or any free port (dashboard)
    "judge_sample_rate": (0.0, 1.0),
    "judge_live_sample_rate": (0.0, 1.0),
    "retry_similarity": (0.0, 100.0),
    "dashboard_port": (0, 65535),
    "metrics_port": (0, 65535),
}


def settings_problems(settings: Settings) -> list[str]:
    """Every value that cannot be right, each naming its variable; empty when all are usable."""
    problems = []
    broker = broker_problem(settings.broker)
    if broker:
        problems.append(broker)

    def value_of(name: str) -> str:
        return f"{env_name(name)}={getattr(settings, name)!r}"

    # `not (x >= low)` rather than `x < low`: NaN fails every comparison and must be refused too.
    for name in AT_LEAST_ONE:
        if not getattr(settings, name) >= 1:
            problems.append(f"{value_of(name)}: must be at least 1")
    for name in POSITIVE:
        if not getattr(settings, name) > 0:
            problems.append(f"{value_of(name)}: must be greater than 0")
    for name in NOT_NEGATIVE:
        if not getattr(settings, name) >= 0:
            problems.append(f"{value_of(name)}: must not be negative")
    for name, (low, high) in BOUNDED.items():
        if not low <= getattr(settings, name) <= high:
            problems.append(f"{value_of(name)}: must be between {low:g} and {high:g}")
    if settings.otlp_encoding not in ("otlp_proto", "otlp_json"):
        problems.append(f"{value_of('otlp_encoding')}: use otlp_proto or otlp_json")
    return problems


def broker_problem(broker: str) -> str | None:
    """Why a bootstrap list is not ``host:port[,host:port...]``; None when it is (or empty: embedded)."""
    if not broker:
        return None
    for entry in broker.split(","):
        entry = entry.strip()
        host, colon, port = entry.rpartition(":")
        unbracketed_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
        if not colon or not host or unbracketed_ipv6:
            reason = f"{entry!r} is not host:port"
        elif not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            reason = f"port {port!r} of {entry!r} is not a number from 1 to 65535"
        else:
            continue
        return f"SAFESWAP_BROKER / --broker {broker!r}: {reason} (give host:port, comma-separated for several)"
    return None


def _parse(field: dataclasses.Field, raw: str) -> Any:
    kind = get_type_hints(Settings)[field.name]
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {ENV_PREFIX + field.name.upper()}={raw!r} is not a valid {kind.__name__}"
        ) from None
