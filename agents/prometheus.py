"""Prometheus ``/metrics`` of a worker (prometheus-client, text format).

Off unless ``metrics_port`` is set (``SAFESWAP_METRICS_PORT``); binds
``metrics_host`` (127.0.0.1 by default). Everything is counted by one Faust
*sensor*, so no agent carries monitoring code:

* ``on_message_in``: every message Faust's consumer reads for the worker's agents, per
  topic and agent (``safeswap_events_processed_total``); statistics snapshots are also
  kept (latest per rollout and source partition) for the per-variant gauges;
* the worker's own consumers report their batches (``count_read``): the outcomes agent's
  (traces, feedback) and the Parquet sinks' (every dataset topic), each under its own
  ``agent`` label, so one message read by both is counted once per reader;
* ``on_send_initiated``: what the agents publish: decisions by action, dead
  letters by agent and reason kind, and each rollout's status (guardrail intervals, split, users,
  the live judge scores per variant: monitored, never a decision input);
* a timer: consumer lag per assigned partition (high water minus position) of every
  consumer: Faust's, the outcomes agent's and the sinks'.

docs/dashboard.md lists every metric with its unit. Names are a contract: the
unit-correct ones (``_seconds``, ``_usd``, ``_ratio``, ``_messages``) were added next
to the first ones, which are kept for the dashboards that already scrape them.

Guardrail and rollout gauges come from the worker that owns the rollout (the
decide agent's partition); variant gauges from the worker that reads its
statistics. Sum or ``max by`` over instances in PromQL.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import faust
import msgspec
from faust.sensors import Sensor
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily

from safeswap.core.metrics import METRICS, variant_values
from streams.deadletter import reason_kind
from streams.settings import Settings

log = logging.getLogger(__name__)

# The per-variant metrics exported as gauges (the catalog's ``exported``; p50/p95 from the histogram).
VARIANT_METRICS: tuple[str, ...] = tuple(name for name, info in METRICS.items() if info.exported)


class _Status(msgspec.Struct):
    """The parts of a RolloutStatus the gauges need (lenient: unknown fields ignored)."""

    rollout_id: str
    percent: float = 0.0
    users: dict[str, int] = {}
    guardrails: list[dict[str, Any]] = []
    live_judge: dict[str, Any] = {}


class _Decision(msgspec.Struct):
    rollout_id: str
    action: str


class _DeadLetter(msgspec.Struct):
    agent: str = "unknown"
    reason: str = ""


# Unit-correct per-variant gauges: metric -> (family, label name, label value, scale).
# Everything not listed is a rate or a normalised distance: safeswap_variant_rate_ratio{metric}.
UNIT_FAMILIES: dict[str, tuple[str, str, str, float]] = {
    "latency_ms_p50": ("safeswap_variant_latency_seconds", "quantile", "0.5", 1e-3),
    "latency_ms_p95": ("safeswap_variant_latency_seconds", "quantile", "0.95", 1e-3),
    "latency_ms_mean": ("safeswap_variant_latency_mean_seconds", "", "", 1e-3),
    "cost_usd_mean": ("safeswap_variant_cost_usd", "per", "response", 1.0),
    "cost_per_session_mean": ("safeswap_variant_cost_usd", "per", "session", 1.0),
}
RATIO_FAMILY = "safeswap_variant_rate_ratio"
FAMILY_HELP: dict[str, tuple[str, list[str]]] = {
    "safeswap_variant_latency_seconds": (
        "Latency quantile per variant (from the latency histogram), seconds.",
        ["quantile"],
    ),
    "safeswap_variant_latency_mean_seconds": ("Mean latency per variant, seconds.", []),
    "safeswap_variant_cost_usd": ("Mean cost per variant, US dollars, per response or per session.", ["per"]),
    RATIO_FAMILY: (
        "Rates (thumbs-down, errors, retry, abandon, edit, cache hit; 0-1) and the normalised edit "
        "distance (0-1) per variant.",
        ["metric"],
    ),
}


def unit_samples(values: dict[str, float]) -> list[tuple[str, dict[str, str], float]]:
    """One variant's point estimates (docs/metrics.md names) as unit-correct samples:
    (family, extra labels, value in the family's unit)."""
    out = []
    for metric, value in sorted(values.items()):
        family, label, label_value, scale = UNIT_FAMILIES.get(metric, (RATIO_FAMILY, "metric", metric, 1.0))
        out.append((family, {label: label_value} if label else {}, value * scale))
    return out


class _Snapshot(msgspec.Struct):
    rollout_id: str
    partition: int
    seq: int
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    source: str = ""


def exported_values(snapshots: list[Any]) -> dict[str, dict[str, float]]:
    """The exported point estimates per variant (``VARIANT_METRICS``) from
    the latest snapshot of each partition; snapshots that cannot be merged export nothing."""
    try:
        values = variant_values(snapshots)
    except (ValueError, TypeError):  # a malformed snapshot must never break a scrape
        return {}
    return {variant: {m: v for m, v in found.items() if m in VARIANT_METRICS} for variant, found in values.items()}


class WorkerMetrics(Sensor):
    """A Faust sensor that keeps the worker's Prometheus metrics."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self._topics = {name: settings.topic(name) for name in ("stats", "status", "decisions", "dlq")}
        self.faust_agents: dict[str, str] | None = None  # topic -> Faust agent reading it; from app, first use
        self.app: faust.App | None = None
        r = self.registry
        self.events = Counter(
            "safeswap_events_processed", "Messages read, per topic and reading agent.", ["topic", "agent"], registry=r
        )
        self.dead_letters = Counter(
            "safeswap_dead_letters",
            "Records sent to the dead-letter topic, by agent and reason kind.",
            ["agent", "reason"],
            registry=r,
        )
        self.decisions = Counter(
            "safeswap_decisions", "Decisions published, by action.", ["rollout_id", "action"], registry=r
        )
        self.otlp_spans = Counter(
            "safeswap_otlp_spans",
            "OTLP spans read, by outcome: mapped (became a trace or feedback event), skipped (not a model call "
            "of a rollout), rejected (dead-lettered).",
            ["outcome"],
            registry=r,
        )
        lag_labels = ["topic", "partition", "agent"]
        self.lag = Gauge(
            "safeswap_consumer_lag",
            "Messages behind the partition's high water (kept for compatibility: safeswap_consumer_lag_messages).",
            lag_labels,
            registry=r,
        )
        self.lag_messages = Gauge(
            "safeswap_consumer_lag_messages", "Messages behind the partition's high water.", lag_labels, registry=r
        )
        labels = ["rollout_id", "metric"]
        self.estimate = Gauge(
            "safeswap_guardrail_estimate", "Candidate vs control, on the guardrail's scale.", labels, registry=r
        )
        self.ci_low = Gauge("safeswap_guardrail_ci_low", "Always-valid interval, lower bound.", labels, registry=r)
        self.ci_high = Gauge("safeswap_guardrail_ci_high", "Always-valid interval, upper bound.", labels, registry=r)
        self.threshold = Gauge(
            "safeswap_guardrail_threshold", "The plan's limit on the guardrail's scale.", labels, registry=r
        )
        self.breach = Gauge("safeswap_guardrail_breach", "1 while the guardrail is breached.", labels, registry=r)
        self.percent = Gauge(
            "safeswap_rollout_percent",
            "Share of users (0-100) served the candidate (kept for compatibility: safeswap_rollout_candidate_ratio).",
            ["rollout_id"],
            registry=r,
        )
        self.candidate_ratio = Gauge(
            "safeswap_rollout_candidate_ratio", "Share of users (0-1) served the candidate.", ["rollout_id"], registry=r
        )
        self.users = Gauge("safeswap_rollout_users", "Users per arm.", ["rollout_id", "variant"], registry=r)
        variant_labels = ["rollout_id", "variant"]
        self.live_score = Gauge(
            "safeswap_live_judge_score",
            "Live judge: mean score (1-10) of canary and ramp responses per variant, users as the unit. "
            "Monitored, not a decision input.",
            variant_labels,
            registry=r,
        )
        self.live_scored = Gauge(
            "safeswap_live_judge_scored", "Live judge: responses scored per variant.", variant_labels, registry=r
        )
        self.live_users = Gauge(
            "safeswap_live_judge_users",
            "Live judge: users with a scored response per variant.",
            variant_labels,
            registry=r,
        )
        self.live_difference = {
            key: Gauge(
                f"safeswap_live_judge_difference_{key}",
                f"Live judge: candidate - control mean score, {text} (always-valid, the plan's alpha).",
                ["rollout_id"],
                registry=r,
            )
            for key, text in (("estimate", "estimate"), ("ci_low", "interval lower bound"), ("ci_high", "upper bound"))
        }
        self._snapshots: dict[str, dict[tuple[str, int], _Snapshot]] = {}
        self._lock = threading.Lock()  # snapshots are read by the scrape thread
        r.register(_VariantCollector(self))
        self._status_decoder = msgspec.json.Decoder(_Status)
        self._decision_decoder = msgspec.json.Decoder(_Decision)
        self._dlq_decoder = msgspec.json.Decoder(_DeadLetter)
        self._snapshot_decoder = msgspec.json.Decoder(_Snapshot)

    def count_read(self, agent: str, topic: str, n: int) -> None:
        """Messages read outside Faust's consumer (the outcomes agent's and the sinks' batches)."""
        self.events.labels(topic, agent).inc(n)

    def otlp_counted(self, outcome: str, n: int) -> None:
        self.otlp_spans.labels(outcome).inc(n)

    def reader(self, agent: str) -> Callable[[str, int], None]:
        """The ``(topic, messages read)`` callback for one of the worker's own consumer loops."""
        return lambda topic, n: self.count_read(agent, topic, n)

    def agent_of(self, topic: str) -> str:
        """The Faust agent reading ``topic`` (looked up once the first message arrives:
        every agent is registered by then)."""
        if self.faust_agents is None:
            self.faust_agents = faust_agents(self.app) if self.app is not None else {}
        return self.faust_agents.get(topic, "faust")

    # -- Faust sensor hooks: never raise --------------------------------------------
    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        try:
            self.events.labels(tp.topic, self.agent_of(tp.topic)).inc()
            if tp.topic == self._topics["stats"]:
                self.observe_snapshot(message.value)
        except Exception:
            log.debug("metrics: message in", exc_info=True)

    def on_send_initiated(self, producer: Any, topic: str, message: Any, keysize: int, valsize: int) -> Any:
        try:
            value = getattr(message, "value", None)
            if isinstance(value, (bytes, bytearray)):
                self.observe_sent(topic, bytes(value))
        except Exception:
            log.debug("metrics: send", exc_info=True)
        return None

    # -- pure-ish updates (tests call these directly) -----------------------------------
    def observe_sent(self, topic: str, value: bytes) -> None:
        if topic == self._topics["dlq"]:
            letter = self._dlq_decoder.decode(value)
            self.dead_letters.labels(letter.agent, reason_kind(letter.reason)).inc()
        elif topic == self._topics["decisions"]:
            decision = self._decision_decoder.decode(value)
            self.decisions.labels(decision.rollout_id, decision.action).inc()
        elif topic == self._topics["status"]:
            self.observe_status(self._status_decoder.decode(value))

    def observe_status(self, status: _Status) -> None:
        rollout = status.rollout_id
        self.percent.labels(rollout).set(status.percent)
        self.candidate_ratio.labels(rollout).set(status.percent / 100)
        for variant, count in status.users.items():
            self.users.labels(rollout, variant).set(count)
        for item in status.guardrails:
            metric = str(item.get("metric"))
            for gauge, key in (
                (self.estimate, "estimate"),
                (self.ci_low, "ci_low"),
                (self.ci_high, "ci_high"),
                (self.threshold, "threshold"),
            ):
                value = item.get(key)
                gauge.labels(rollout, metric).set(float("nan") if value is None else float(value))
            self.breach.labels(rollout, metric).set(1.0 if item.get("status") == "breach" else 0.0)
        self.observe_live_judge(rollout, status.live_judge)

    def observe_live_judge(self, rollout: str, live: dict[str, Any]) -> None:
        """The status's live judge summary (safeswap.core.live_scores.summarize) as gauges."""
        if not live:
            return
        for variant, values in (live.get("variants") or {}).items():
            mean = values.get("mean")
            self.live_score.labels(rollout, variant).set(float("nan") if mean is None else float(mean))
            self.live_scored.labels(rollout, variant).set(float(values.get("scored", 0)))
            self.live_users.labels(rollout, variant).set(float(values.get("users", 0)))
        difference = live.get("difference") or {}
        for key, gauge in self.live_difference.items():
            value = difference.get(key)
            gauge.labels(rollout).set(float("nan") if value is None else float(value))

    def observe_snapshot(self, value: bytes) -> None:
        snapshot = self._snapshot_decoder.decode(value)
        if snapshot.source:  # the judge's shadow statistics: not outcome metrics
            return
        with self._lock:
            latest = self._snapshots.setdefault(snapshot.rollout_id, {})
            key = (snapshot.source, snapshot.partition)
            previous = latest.get(key)
            if previous is None or previous.seq < snapshot.seq:
                latest[key] = snapshot

    def variant_gauges(self) -> dict[str, dict[str, dict[str, float]]]:
        with self._lock:
            current = {rollout: list(parts.values()) for rollout, parts in self._snapshots.items()}
        return {rollout: exported_values(snapshots) for rollout, snapshots in current.items()}

    async def update_lag(self, consumer: Any, agent: str | None = None) -> None:
        """Lag of one consumer's assigned partitions; ``agent`` None: Faust's consumer
        (each topic under the agent reading it)."""
        for tp in sorted(consumer.assignment()):
            try:
                highwater = consumer.highwater(tp)
                position = await consumer.position(tp)
            except Exception:  # noqa: BLE001 - not fetched yet, or mid-rebalance
                continue
            if highwater is None or position is None:
                continue
            labels = (tp.topic, str(tp.partition), agent or self.agent_of(tp.topic))
            self.lag.labels(*labels).set(max(0, highwater - position))
            self.lag_messages.labels(*labels).set(max(0, highwater - position))


class _VariantCollector:
    """Per-variant gauges computed at scrape time from the latest snapshots."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        family = GaugeMetricFamily(
            "safeswap_variant_metric",
            "Point estimate of an outcome metric per variant, in "
            "the metric's own unit (ms, USD or 0-1; kept for compatibility: the _seconds, "
            "_usd and _ratio families).",
            labels=["rollout_id", "variant", "metric"],
        )
        by_unit = {
            name: GaugeMetricFamily(name, text, labels=["rollout_id", "variant", *extra])
            for name, (text, extra) in FAMILY_HELP.items()
        }
        for rollout, variants in sorted(self.metrics.variant_gauges().items()):
            for variant, values in sorted(variants.items()):
                for metric, value in sorted(values.items()):
                    family.add_metric([rollout, variant, metric], value)
                for name, labels, value in unit_samples(values):
                    by_unit[name].add_metric([rollout, variant, *labels.values()], value)
        yield family
        yield from by_unit.values()


def serve(registry: CollectorRegistry, host: str, port: int):
    """Start the /metrics HTTP server in a daemon thread; returns (server, thread)."""
    return start_http_server(port, addr=host, registry=registry)


def faust_agents(app: faust.App) -> dict[str, str]:
    """topic -> name of the Faust agent reading it ("decide", "judge"; joined by "+" if several)."""
    readers: dict[str, list[str]] = {}
    for agent in app.agents.values():
        # The topic the agent was declared with (once running, ``agent.channel`` may be
        # a per-actor channel without topic names).
        declared = getattr(agent, "_channel_arg", None)
        names = [declared] if isinstance(declared, str) else list(getattr(declared, "topics", None) or [])
        for topic in names:
            readers.setdefault(topic, []).append(agent.name)
    return {topic: "+".join(sorted(names)) for topic, names in readers.items()}


def register(
    app: faust.App, settings: Settings, consumers: Callable[[], dict[str, Any]] = dict
) -> WorkerMetrics | None:
    """Add the sensor and the lag timer; serve /metrics when the worker starts. Off when metrics_port is 0.
    ``consumers``: the worker's own aiokafka consumers besides Faust's, by agent
    (``{"outcomes": ..., "sink": ...}``; a loop between restarts has none)."""
    if not settings.metrics_port:
        return None
    metrics = WorkerMetrics(settings)
    metrics.app = app
    app.sensors.add(metrics)
    started: list[Any] = []

    @app.task
    async def start_metrics_server() -> None:
        if not started:
            started.append(serve(metrics.registry, settings.metrics_host, settings.metrics_port))
            log.warning(
                "metrics: serving Prometheus /metrics on http://%s:%d/metrics",
                settings.metrics_host,
                settings.metrics_port,
            )

    @app.timer(5.0)
    async def consumer_lag() -> None:
        for agent, consumer in [(None, app.consumer), *consumers().items()]:
            if consumer is None:
                continue
            try:
                await metrics.update_lag(consumer, agent)
            except Exception:
                log.debug("metrics: lag", exc_info=True)

    return metrics
