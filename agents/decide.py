"""Decide agent: plans, statistics snapshots and operator commands -> decisions.

Plans, snapshots and commands are all keyed by rollout_id with the same
partition count, so one worker owns each rollout's whole decision state. That
state lives in a Faust table (changelog-backed: a restarted or rebalanced worker
recovers it), written once per event that changed it: snapshots arrive about
once a second per partition, far below the rate where table writes cost.

Decisions are a pure function of the inputs and use event time, so a replay
after a crash republishes the same decision with the same sequence number, which
the compacted topic and the flag client absorb.
"""

from __future__ import annotations

import logging

import faust
import msgspec

from safeswap.core.controller import PlanConflict, RolloutState, on_command, on_plan, on_snapshot, status_of
from schemas import Command, InvalidEvent, RolloutPlan, StatsSnapshot, decode, encode
from streams.app import raw_topic
from streams.deadletter import DeadLetters
from streams.settings import Settings

log = logging.getLogger(__name__)


def register(app: faust.App, settings: Settings) -> None:
    inputs = raw_topic(app, settings, "plans", "stats", "commands")
    decisions = raw_topic(app, settings, "decisions")
    status_topic = raw_topic(app, settings, "status")
    dead_letters = DeadLetters(app, settings, agent="decide")
    plans_name, commands_name = settings.topic("plans"), settings.topic("commands")
    table = app.Table(
        "rollouts",
        partitions=settings.partitions,
        # The changelog's own serializers come from key_type/value_type (not from
        # schema): without value_type=bytes a recovered value came back JSON-decoded.
        key_type=str,
        value_type=bytes,
        schema=faust.Schema(key_type=str, value_type=bytes, key_serializer="raw", value_serializer="raw"),
    )
    cache: dict[str, RolloutState] = {}
    status_due: set[str] = set()  # rollouts looked at since their status was last published

    @app.on_partitions_revoked.connect
    async def forget(app: faust.App, revoked, **kwargs) -> None:
        cache.clear()  # the table is the truth; rebuild lazily for what we still own

    def load(rollout_id: str) -> RolloutState | None:
        state = cache.get(rollout_id)
        if state is None and (raw := table.get(rollout_id)) is not None:
            # bytes; a dict when recovered from a changelog written before value_type=bytes
            data = raw if isinstance(raw, dict) else msgspec.json.decode(raw)
            state = cache[rollout_id] = RolloutState.from_dict(data)
        return state

    @app.agent(inputs, name="decide", concurrency=1)
    async def decide(stream: faust.StreamT) -> None:
        async for event in stream.events():
            message = event.message
            rollout_id = None
            try:
                event_ms = int(message.timestamp * 1000)
                if message.topic == plans_name:
                    plan = decode(RolloutPlan, event.value)
                    rollout_id = plan.rollout_id
                    existing = load(rollout_id)
                    rollouts = {rollout_id: existing} if existing else {}
                    decision = on_plan(rollouts, plan, event_ms)
                    cache[rollout_id] = rollouts[rollout_id]
                elif message.topic == commands_name:
                    command = decode(Command, event.value)
                    rollout_id = command.rollout_id
                    state = load(rollout_id)
                    if state is None:
                        raise InvalidEvent(f"command for unknown rollout {rollout_id!r}: start it first")
                    decision = on_command(state, command.command, command.reason, command.ts or event_ms)
                else:
                    snapshot = decode(StatsSnapshot, event.value)
                    rollout_id = snapshot.rollout_id
                    state = load(rollout_id)
                    decision = on_snapshot(state, snapshot) if state is not None else None
            except (InvalidEvent, PlanConflict, ValueError) as exc:
                if rollout_id is not None:  # a half-applied event must not stay in the state:
                    cache.pop(rollout_id, None)  # the table holds the last good one
                await dead_letters.send(message, str(exc))
                continue
            except Exception as exc:  # never leave the loop
                log.exception("decide: failed on %s[%s]@%s", message.topic, message.partition, message.offset)
                if rollout_id is not None:
                    cache.pop(rollout_id, None)
                await dead_letters.send(message, f"internal error: {exc!r}")
                continue
            state = cache.get(rollout_id) if rollout_id else None
            if state is None:
                continue
            if decision is not None:
                log.warning(
                    "decision %s #%d: %s (%s)", decision.rollout_id, decision.seq, decision.action, decision.reason
                )
                await decisions.send(key=decision.rollout_id.encode(), value=encode(decision))
            table[rollout_id] = msgspec.json.encode(state.to_dict())
            if decision is not None:
                await status_topic.send(key=rollout_id.encode(), value=encode(status_of(state)))
                status_due.discard(rollout_id)
            else:
                status_due.add(rollout_id)

    @app.timer(settings.status_interval_s)
    async def publish_status() -> None:
        # Throttled, and trailing: the last look before traffic pauses is published too.
        while status_due:
            rollout_id = status_due.pop()
            if (state := cache.get(rollout_id)) is not None:
                await status_topic.send(key=rollout_id.encode(), value=encode(status_of(state)))
