"""Operating rollouts from outside the worker: start, command, read state.

``safeswap rollout start|status|pause|resume|abort|list`` are thin wrappers over
these coroutines. State is read from the compacted topics (``decisions``,
``status``): the last record per rollout is its current state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer

from safeswap.core.controller import only_gate_changed, plan_hash
from schemas import (
    Command,
    Decision,
    RolloutPlan,
    RolloutStatus,
    decode,
    encode,
)
from streams.compacted import CompactedView, TopicMissing
from streams.kafka import client_options
from streams.settings import Settings


class RolloutError(Exception):
    """An operation that cannot go ahead; the message says why and what to do."""


async def read_latest(settings: Settings, topic: str, event_type: type, timeout_s: float = 10.0) -> dict[str, Any]:
    """The last decodable record per rollout of a compacted topic, read from the beginning to its end now."""
    view = CompactedView(settings, topic, lambda raw: decode(event_type, raw), key=lambda value: value.rollout_id)
    try:
        return await view.read_to_end(timeout_s)
    except TopicMissing as exc:
        raise RolloutError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any connect failure becomes a sentence for the CLI
        raise RolloutError(
            f"cannot reach Kafka at {settings.broker}: {exc} (set SAFESWAP_BROKER or --broker)"
        ) from None


async def _send(settings: Settings, topic: str, key: str, value: bytes, timestamp_ms: int | None = None) -> None:
    producer = AIOKafkaProducer(**client_options(settings), request_timeout_ms=10_000)
    try:
        await asyncio.wait_for(producer.start(), 10)
        await producer.send_and_wait(settings.topic(topic), value, key=key.encode(), timestamp_ms=timestamp_ms)
    except RolloutError:
        raise
    except Exception as exc:  # noqa: BLE001 - any publish failure becomes a sentence for the CLI
        raise RolloutError(f"cannot publish to {settings.topic(topic)} at {settings.broker}: {exc}") from None
    finally:
        await producer.stop()


async def wait_for_decision(
    settings: Settings, rollout_id: str, accept: Callable[[Decision], bool], timeout_s: float
) -> Decision | None:
    from safeswap.flags import FlagClient

    async with FlagClient(settings=settings) as flags:
        try:
            return await flags.wait_for(lambda d: d.rollout_id == rollout_id and accept(d), timeout_s)
        except TimeoutError:
            return None


async def start_rollout(
    settings: Settings, plan: RolloutPlan, wait_s: float, at_ms: int | None = None
) -> tuple[str, Decision | None]:
    """Publish a plan once. Returns ("started" | "already started" | "gate attached", first decision or None).

    ``at_ms``: the plan's record timestamp, which stamps its first decision (default: now).
    A rehearsal of past event time (``safeswap simulate``) gives its start, so every
    decision of the rollout is in event time.

    A plan still waiting in ``registered`` (a high-stakes plan without a passing
    gate) may be published again with only its eval gate changed."""
    digest = plan_hash(plan)
    current = (await read_latest(settings, "decisions", Decision)).get(plan.rollout_id)
    outcome = "started"
    if current is not None:
        if current.plan_hash == digest:
            return "already started", current
        if current.stage != "registered" or not await _registered_plan_differs_only_in_gate(settings, plan, current):
            raise RolloutError(
                f"rollout {plan.rollout_id!r} already started with plan {current.plan_hash} (this plan is {digest}); "
                "a started plan is immutable: give the changed plan a new rollout_id"
            )
        outcome = "gate attached"
    await _send(settings, "plans", plan.rollout_id, encode(plan), timestamp_ms=at_ms)
    decision = await wait_for_decision(settings, plan.rollout_id, lambda d: d.plan_hash == digest, wait_s)
    return outcome, decision


async def _registered_plan_differs_only_in_gate(settings: Settings, plan: RolloutPlan, current: Decision) -> bool:
    """Whether the plan the controller holds in ``registered`` is this one but for its eval gate."""
    registered = (await read_latest(settings, "plans", RolloutPlan)).get(plan.rollout_id)
    return registered is not None and plan_hash(registered) == current.plan_hash and only_gate_changed(registered, plan)


async def command_rollout(
    settings: Settings, rollout_id: str, command: str, reason: str, wait_s: float
) -> Decision | None:
    current = (await read_latest(settings, "decisions", Decision)).get(rollout_id)
    if current is None:
        raise RolloutError(f"no rollout {rollout_id!r}: `safeswap rollout list` shows the known ones")
    await _send(
        settings,
        "commands",
        rollout_id,
        encode(Command(rollout_id=rollout_id, command=command, reason=reason, ts=int(time.time() * 1000))),
    )
    return await wait_for_decision(settings, rollout_id, lambda d: d.seq > current.seq, wait_s)


async def rollout_states(settings: Settings) -> tuple[dict[str, Decision], dict[str, RolloutStatus]]:
    decisions = await read_latest(settings, "decisions", Decision)
    statuses = await read_latest(settings, "status", RolloutStatus)
    return decisions, statuses


def to_json(value: Any) -> Any:
    return msgspec.to_builtins(value)
