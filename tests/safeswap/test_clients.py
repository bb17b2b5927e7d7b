"""Emitter and FlagClient: never block or raise into the app; fail safe to control."""

from __future__ import annotations

import asyncio
import base64

import msgspec

from safeswap.emitter import Emitter
from safeswap.flags import FlagClient
from schemas import DeadLetter, Decision, encode
from streams.broker import free_port
from streams.settings import Settings
from tests.support.kafka import produce, read_topic

TRACE = dict(
    event_id="e1",
    ts=1793611000000,
    rollout_id="r",
    variant="control",
    user_id="u1",
    session_id="s",
    trace_id="t1",
    prompt_version="v1",
    model_version="m",
    latency_ms=10,
    input_tokens=1,
    output_tokens=1,
    cost_usd=0.0,
    cache_hit=False,
)


def decision(seq: int, action: str = "start", percent: float = 50.0) -> Decision:
    return Decision(
        rollout_id="r", seq=seq, ts=seq, action=action, stage="canary", percent=percent, salt="r", reason="test"
    )


def test_emitter_with_unreachable_broker_never_blocks_and_counts_drops():
    settings = Settings(broker=f"127.0.0.1:{free_port()}")  # nothing listens there

    async def scenario():
        emitter = await Emitter(settings=settings, buffer=100).start()
        # Plain synchronous calls: nothing here can wait for the broker.
        accepted = [emitter.trace(dict(TRACE, event_id=f"e{i}")) for i in range(1000)]
        await emitter.stop(flush_timeout_s=0.2)
        return accepted, emitter.stats

    accepted, stats = asyncio.run(scenario())
    assert sum(accepted) == 100 and stats.dropped_full == 900  # bounded buffer, counted drops
    assert stats.sent == 0 and stats.send_errors == 100  # every accepted event accounted for at stop


def test_emitter_sends_invalid_events_to_the_dlq_and_returns_false(settings):
    async def scenario():
        async with Emitter(settings=settings) as emitter:
            ok = emitter.trace(TRACE)
            bad = emitter.trace(dict(TRACE, variant="treatment"))
            weird = emitter.feedback(object())  # not even a mapping: still no exception
        dead = await read_topic(settings.broker, settings.topic("dlq"), until_count=2)
        sent = await read_topic(settings.broker, settings.topic("traces"), until_count=1)
        return ok, bad, weird, emitter.stats, dead, sent

    ok, bad, weird, stats, dead, sent = asyncio.run(scenario())
    assert (ok, bad, weird) == (True, False, False)
    assert stats.invalid == 2 and stats.sent >= 1
    records = [msgspec.json.decode(message.value, type=DeadLetter) for message in dead]
    assert len(records) == 2 and {r.agent for r in records} == {"emitter"}
    assert any("`$.variant`" in r.reason and b"treatment" in base64.b64decode(r.value_b64) for r in records)
    assert len(sent) == 1 and sent[0].key == b"u1"  # keyed by user_id


def test_flag_client_orders_by_seq_and_keeps_last_good_state_on_garbage():
    flags = FlagClient(settings=Settings(broker="unused:1"))
    assert flags.variant("r", "anyone") == "control"  # no state yet: control
    flags.apply(encode(decision(2, percent=100)))
    flags.apply(encode(decision(1, percent=0)))  # older: ignored
    assert flags.variant("r", "anyone") == "candidate"
    flags.apply(b"{not a decision")
    assert flags.decode_errors == 1 and flags.decision("r").seq == 2
    flags.apply(encode(decision(3, action="rollback", percent=0)))
    assert flags.variant("r", "anyone") == "control"
    assert flags.variant("unknown-rollout", "anyone") == "control"


def test_flag_client_with_unreachable_broker_serves_control_without_raising():
    async def scenario():
        flags = FlagClient(settings=Settings(broker=f"127.0.0.1:{free_port()}"))
        await flags.start(catch_up_timeout_s=0.5)
        variant = flags.variant("r", "u1")
        await flags.stop()
        return variant

    assert asyncio.run(scenario()) == "control"


def test_flag_client_reads_existing_state_then_tails_changes(settings):
    async def scenario():
        topic = settings.topic("decisions")
        await produce(settings.broker, topic, [(b"r", encode(decision(1, percent=100)))])
        async with FlagClient(settings=settings) as flags:
            before = flags.variant("r", "u1")  # state read at start
            seen = []
            flags.on_change(seen.append)
            await produce(settings.broker, topic, [(b"r", encode(decision(2, action="rollback", percent=0)))])
            await flags.wait_for(lambda d: d.action == "rollback", 10)
            return before, flags.variant("r", "u1"), seen

    before, after, seen = asyncio.run(scenario())
    assert (before, after) == ("candidate", "control")
    assert [d.seq for d in seen] == [2]
