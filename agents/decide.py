"""Decide agent: plans + statistics snapshots -> decisions on the compacted control topic.

Plans and snapshots are both keyed by rollout_id with the same partition count,
so one worker owns each rollout's whole decision state.
"""

from __future__ import annotations

import logging
import time

import faust

from agents.dlq import DeadLetters
from safeswap.controller import PlanConflict, RolloutState, on_plan, on_snapshot
from schemas import InvalidEvent, RolloutPlan, StatsSnapshot, decode, encode
from streams.app import raw_topic
from streams.settings import Settings

log = logging.getLogger(__name__)


def register(app: faust.App, settings: Settings) -> None:
    inputs = raw_topic(app, settings, "plans", "stats")
    decisions = raw_topic(app, settings, "decisions")
    dead_letters = DeadLetters(app, settings, agent="decide")
    plans_name = settings.topic("plans")
    rollouts: dict[str, RolloutState] = {}

    @app.agent(inputs, name="decide", concurrency=1)
    async def decide(stream: faust.StreamT) -> None:
        async for event in stream.events():
            message = event.message
            try:
                if message.topic == plans_name:
                    decision = on_plan(rollouts, decode(RolloutPlan, event.value), int(time.time() * 1000))
                else:
                    snapshot = decode(StatsSnapshot, event.value)
                    state = rollouts.get(snapshot.rollout_id)
                    decision = on_snapshot(state, snapshot) if state is not None else None
            except (InvalidEvent, PlanConflict) as exc:
                await dead_letters.send(message, str(exc))
                continue
            except Exception as exc:  # never leave the loop
                log.exception("decide: failed on %s[%s]@%s", message.topic, message.partition, message.offset)
                await dead_letters.send(message, f"internal error: {exc!r}")
                continue
            if decision is not None:
                log.warning("decision %s #%d: %s (%s)", decision.rollout_id, decision.seq, decision.action, decision.reason)
                await decisions.send(key=decision.rollout_id.encode(), value=encode(decision))
