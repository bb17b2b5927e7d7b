"""The forked checkpoint encoder: the state as of the fork, whatever the parent does next."""

from __future__ import annotations

import asyncio

from safeswap.core.outcomes import OutcomeProcessor
from streams.checkpoint import ForkedEncoding, decode_state, encode_state
from tests.support.events import simulated_events


def test_forked_encoding_is_the_state_at_the_fork_and_the_loop_runs_meanwhile():
    events = simulated_events(seed=7, users=200, text_len=200)
    half = len(events) // 2
    processor = OutcomeProcessor(0)
    for event in events[:half]:
        processor.apply(event, now_ms=events[-1].ts)
    at_fork = encode_state(processor.to_state())

    async def scenario():
        ticks = 0

        async def heartbeat():
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        beat = asyncio.create_task(heartbeat())
        encoding = ForkedEncoding.start(processor.to_state)
        for event in events[half:]:  # the parent goes on changing the state
            processor.apply(event, now_ms=events[-1].ts)
        payload = await encoding.payload()
        beat.cancel()
        return payload, ticks, encoding

    payload, ticks, encoding = asyncio.run(scenario())
    restored = decode_state(payload)
    assert restored == decode_state(at_fork) != processor.to_state()  # the whole state, as of the fork
    assert restored.counts != processor.counts
    assert ticks > 0 and encoding.pid > 0 and encoding.encode_s >= encoding.blocked_s


def test_a_failing_child_is_an_error_not_a_checkpoint():
    def unbuildable():
        raise KeyError("a response whose cell is not in the state")

    async def scenario():
        return await ForkedEncoding.start(unbuildable).payload()

    try:
        asyncio.run(scenario())
    except RuntimeError as exc:
        assert "failed" in str(exc)
    else:
        raise AssertionError("a child that could not encode returned a payload")
