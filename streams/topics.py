"""The topic registry: every topic safeswap reads or writes, with its shape.

Source topics are created with the admin client before a worker starts; Faust
creates only its own internal topics (changelogs, repartition, assignor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError, for_code

from streams.kafka import client_options
from streams.settings import Settings

log = logging.getLogger(__name__)

COMPACT = {"cleanup.policy": "compact"}


class TopicCreationError(RuntimeError):
    """The broker refused to create a topic (replication factor, ACL, policy): retrying cannot help."""


@dataclass(frozen=True)
class TopicSpec:
    name: str  # short name; the full name is settings.topic(name)
    key: str  # what the key is, for people reading this registry
    config: dict[str, str] = field(default_factory=dict)


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("traces", key="user_id"),
    TopicSpec("feedback", key="user_id"),
    TopicSpec("shadow", key="user_id"),
    TopicSpec("outcomes", key="user_id"),
    TopicSpec("stats", key="rollout_id"),
    TopicSpec("plans", key="rollout_id", config=COMPACT),
    TopicSpec("decisions", key="rollout_id", config=COMPACT),
    TopicSpec("commands", key="rollout_id"),
    TopicSpec("status", key="rollout_id", config=COMPACT),
    TopicSpec("judgments", key="rollout_id"),
    # The judge's scores of live canary and ramp responses (monitored, never a decision input).
    TopicSpec("live_scores", key="rollout_id"),
    TopicSpec("dlq", key="source key"),
    # The outcomes agent's whole-partition state checkpoints (streams/checkpoint.py).
    TopicSpec("checkpoints", key="source partition", config=COMPACT),
)


async def ensure_topics(settings: Settings, timeout_s: float = 20.0) -> list[str]:
    """Create every missing topic; returns the names created. Idempotent.

    Raises TopicCreationError when the broker refuses one; warns about existing topics
    whose partition count or cleanup policy differs from the registry."""
    with quiet_connection_retries() as failures:
        admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=int(timeout_s * 1000))
        try:
            try:
                await asyncio.wait_for(admin.start(), timeout_s)
            except KafkaConnectionError as exc:  # "Unable to bootstrap from [(host, port, family)]": say why
                raise ConnectionError(failures[-1] if failures else str(exc)) from None
            existing = set(await admin.list_topics())
            missing = [
                NewTopic(
                    name=settings.topic(spec.name),
                    num_partitions=settings.partitions,
                    replication_factor=settings.replication_factor,
                    topic_configs=dict(spec.config),
                )
                for spec in TOPICS
                if settings.topic(spec.name) not in existing
            ]
            if settings.otlp_topic and settings.otlp_topic not in existing:  # the Collector's, if nothing made it
                missing.append(
                    NewTopic(
                        name=settings.otlp_topic,
                        num_partitions=settings.partitions,
                        replication_factor=settings.replication_factor,
                    )
                )
            if missing:
                response = await admin.create_topics(missing)
                refused = creation_errors(response.topic_errors)
                if refused:
                    raise TopicCreationError(
                        f"the broker at {settings.broker} refused to create {'; '.join(refused)} "
                        "(check SAFESWAP_PARTITIONS, SAFESWAP_REPLICATION_FACTOR and the principal's ACLs)"
                    )
                transient = creation_errors(response.topic_errors, retriable=True)
                if transient:  # e.g. NotControllerError during a failover: ensure_topics_with_retry retries
                    raise KafkaError(f"topic creation must be retried: {'; '.join(transient)}")
            present = [settings.topic(spec.name) for spec in TOPICS if settings.topic(spec.name) in existing]
            if present:
                try:
                    await _warn_about_drift(admin, settings, present)
                except Exception as exc:  # noqa: BLE001 - advisory: never a reason to refuse (or retry) topic creation
                    log.debug("could not compare the existing topics with the registry: %r", exc)
            return [topic.name for topic in missing]
        finally:
            await admin.close()


def creation_errors(topic_errors: Iterable[tuple], retriable: bool = False) -> list[str]:
    """``topic: KafkaErrorName (message)`` for each topic a CreateTopicsResponse refused for good
    (or, with ``retriable=True``, for now: a controller moving, a timeout).

    Already-exists is not a refusal: another worker or `topics create` won the race."""
    refused = []
    for entry in topic_errors:
        topic, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None  # v0 responses carry no message
        if code == 0 or code == TopicAlreadyExistsError.errno or for_code(code).retriable != retriable:
            continue
        refused.append(f"{topic}: {for_code(code).__name__}" + (f" ({message})" if message else ""))
    return refused


def drift_warnings(settings: Settings, partitions: Mapping[str, int], policies: Mapping[str, str | None]) -> list[str]:
    """Why existing topics differ from the registry. ``partitions``: topic -> count;
    ``policies``: topic -> cleanup.policy (None: not reported, i.e. the broker default, delete)
    for the topics whose configs could be read; a topic missing from a mapping is not checked."""
    warnings = []
    for spec in TOPICS:
        name = settings.topic(spec.name)
        if name in partitions and partitions[name] != settings.partitions:
            warnings.append(
                f"topic {name} has {partitions[name]} partitions, SAFESWAP_PARTITIONS is "
                f"{settings.partitions}: the extra workers idle or the partitions are unevenly shared"
            )
        wanted = spec.config.get("cleanup.policy")
        if wanted == "compact" and name in policies and "compact" not in (policies[name] or "").split(","):
            warnings.append(
                f"topic {name} is not compacted (cleanup.policy={policies[name] or 'delete'}): "
                "its latest state per key can be deleted by retention; set cleanup.policy=compact"
            )
    return warnings


async def _warn_about_drift(admin: AIOKafkaAdminClient, settings: Settings, topics: list[str]) -> None:
    described = await admin.describe_topics(topics)
    partitions = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
    policies: dict[str, str | None] = {}
    compacted = {settings.topic(spec.name) for spec in TOPICS if spec.config.get("cleanup.policy") == "compact"}
    to_check = [name for name in topics if name in compacted]
    if to_check:
        try:
            responses = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, name) for name in to_check]
            )
        except Exception as exc:  # noqa: BLE001 - a broker (or ACL) without DescribeConfigs: skip only this check
            log.debug("cannot describe topic configs on %s, cleanup policy not checked: %r", settings.broker, exc)
            responses = []
        for response in responses:
            for error_code, _message, _type, name, entries, *_ in response.resources:
                if error_code == 0:
                    policies[name] = {entry[0]: entry[1] for entry in entries}.get("cleanup.policy")
                else:
                    log.debug(
                        "cannot describe topic %s (%s), cleanup policy not checked", name, for_code(error_code).__name__
                    )
    for warning in drift_warnings(settings, partitions, policies):
        log.warning(warning)


@contextlib.contextmanager
def quiet_connection_retries() -> Iterator[list[str]]:
    """Hold back aiokafka's per-attempt 'Unable connect' errors (~60 lines in 35 s of retries):
    the caller says once that the broker cannot be reached. Yields the messages held back."""
    client_log = logging.getLogger("aiokafka")  # aiokafka.client logs under this name
    quiet = _HoldConnectFailures()
    client_log.addFilter(quiet)
    try:
        yield quiet.held
    finally:
        client_log.removeFilter(quiet)


class _HoldConnectFailures(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.held: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Unable connect"):
            # The reason is the last argument of both of aiokafka's messages ("[Errno 111] ...").
            self.held.append(str(record.args[-1]) if record.args else record.getMessage())
            return False
        return True
