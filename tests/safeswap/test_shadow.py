"""The app-side shadow helper: background, bounded, never in the user's way (no broker, no timing)."""

from __future__ import annotations

import asyncio

from safeswap.shadow import CandidateAnswer, Shadow
from schemas import convert
from schemas.events import ShadowPair, ShadowSide


class RecordingEmitter:
    def __init__(self) -> None:
        self.pairs: list[ShadowPair] = []

    def shadow_pair(self, event) -> bool:
        self.pairs.append(convert(ShadowPair, event))  # the Emitter validates the same way
        return True


class Flags:
    def __init__(self, shadowed: set[str]) -> None:
        self.shadowed = shadowed

    def should_shadow(self, rollout_id: str, user_id: str) -> bool:
        return user_id in self.shadowed


CONTROL = ShadowSide(
    response_text="control says hi",
    latency_ms=120.0,
    cost_usd=0.002,
    input_tokens=10,
    output_tokens=5,
    model_version="m-control",
    prompt_version="v1",
)


def submit(shadow: Shadow, user: str, candidate, **kw) -> bool:
    return shadow.submit(
        rollout_id="r1",
        user_id=user,
        request_id=f"req-{user}",
        prompt_text="hello",
        control=CONTROL,
        candidate=candidate,
        model_version="m-cand",
        prompt_version="v2",
        **kw,
    )


def test_the_candidate_runs_in_the_background_and_a_pair_is_emitted():
    async def scenario():
        emitter, release = RecordingEmitter(), asyncio.Event()

        async def candidate():
            await release.wait()
            return CandidateAnswer("candidate says hi", cost_usd=0.003, input_tokens=10, output_tokens=7)

        shadow = Shadow(emitter, Flags({"u1"}), concurrency=4, timeout_s=30)
        assert submit(shadow, "u1", candidate) is True
        # submit returned while the candidate call is still waiting: nothing in the user's path
        assert shadow.in_flight == 1 and emitter.pairs == []
        release.set()
        await shadow.drain()
        return emitter, shadow

    emitter, shadow = asyncio.run(scenario())
    [pair] = emitter.pairs
    assert (pair.rollout_id, pair.user_id, pair.request_id, pair.prompt_text) == ("r1", "u1", "req-u1", "hello")
    assert pair.control == CONTROL
    assert pair.candidate.response_text == "candidate says hi" and pair.candidate.error == "none"
    assert (pair.candidate.model_version, pair.candidate.prompt_version) == ("m-cand", "v2")
    assert pair.candidate.cost_usd == 0.003 and pair.candidate.latency_ms >= 0
    assert shadow.stats.completed == 1


def test_users_not_shadowed_and_a_full_pool_are_skipped_and_counted():
    async def scenario():
        emitter, release = RecordingEmitter(), asyncio.Event()

        async def candidate():
            await release.wait()
            return "x"

        shadow = Shadow(emitter, Flags({f"u{i}" for i in range(5)}), concurrency=2, timeout_s=30)
        started = [submit(shadow, f"u{i}", candidate) for i in range(6)]  # u5 is not shadowed
        assert shadow.in_flight == 2
        release.set()
        await shadow.drain()
        return started, shadow, emitter

    started, shadow, emitter = asyncio.run(scenario())
    assert started == [True, True, False, False, False, False]
    assert (shadow.stats.skipped_busy, shadow.stats.not_shadowed, len(emitter.pairs)) == (3, 1, 2)


def test_candidate_errors_and_timeouts_become_part_of_the_pair_never_the_callers_problem():
    async def scenario():
        emitter = RecordingEmitter()

        async def boom():
            raise RuntimeError("candidate exploded")

        async def forever():
            await asyncio.Event().wait()

        async def rate_limited():
            class RateLimitError(Exception):
                status_code = 429

            raise RateLimitError("slow down")

        shadow = Shadow(emitter, Flags({"a", "b", "c"}), concurrency=4, timeout_s=0.05)
        assert submit(shadow, "a", boom) and submit(shadow, "b", forever) and submit(shadow, "c", rate_limited)
        await shadow.drain()
        return emitter, shadow

    emitter, shadow = asyncio.run(scenario())
    errors = {pair.user_id: pair.candidate for pair in emitter.pairs}
    assert errors["a"].error == "other" and "candidate exploded" in errors["a"].error_detail
    assert errors["b"].error == "timeout" and errors["b"].response_text is None
    assert errors["c"].error == "rate_limit"
    assert (shadow.stats.timeouts, shadow.stats.candidate_errors) == (1, 2)


def test_submit_outside_an_event_loop_or_with_broken_input_never_raises():
    shadow = Shadow(RecordingEmitter(), Flags({"u1"}))
    assert submit(shadow, "u1", lambda: None) is False  # no running loop: counted, not raised
    assert shadow.stats.internal_errors == 1
