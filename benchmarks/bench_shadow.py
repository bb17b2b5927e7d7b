"""What the shadow helper adds to the caller's path (target: under 1 ms).

An async request handler awaits its control model call (a stand-in that yields
to the loop once), then returns. The same handler is run with and without
``shadow.submit(...)`` right after the control answer; with it, the candidate
call (another stand-in that yields and returns) runs as a background task on the
same event loop and is emitted through a real ``Emitter`` (queued; no broker, so
the benchmark measures the app side only). The FlagClient is real: it holds a
shadow decision at 100% so every request is shadowed (the worst case).

Printed: per-request time of the caller's path (median, p99, mean) in both
modes, their difference, and ``submit()`` alone. The event loop also runs the
background tasks between requests, so their cost shows up in the wall time per
request (``wall per request``), not in the caller's own path.

    python benchmarks/bench_shadow.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safeswap.emitter import Emitter
from safeswap.flags import FlagClient
from safeswap.shadow import CandidateAnswer, Shadow
from schemas import Decision, encode
from schemas.events import ShadowSide
from streams.settings import Settings

CONTROL = ShadowSide(
    response_text="control answer " * 20,
    latency_ms=850.0,
    cost_usd=0.0021,
    input_tokens=420,
    output_tokens=180,
    model_version="claude-sonnet-4-5-20250929",
    prompt_version="v41",
)


async def control_call() -> str:
    await asyncio.sleep(0)
    return CONTROL.response_text


async def candidate_call() -> CandidateAnswer:
    await asyncio.sleep(0)
    return CandidateAnswer("candidate answer " * 20, cost_usd=0.002, input_tokens=420, output_tokens=170)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(requests: int, with_shadow: bool) -> tuple[list[float], float, Shadow]:
    settings = Settings(emitter_buffer=requests * 2 + 10)
    emitter = Emitter(settings=settings)  # not started: events stay queued (no broker in this benchmark)
    flags = FlagClient(settings=settings)
    flags.apply(
        encode(
            Decision(
                rollout_id="bench",
                seq=1,
                ts=0,
                action="start",
                stage="shadow",
                percent=0.0,
                salt="bench",
                reason="bench",
                shadow_percent=100.0,
            )
        )
    )
    shadow = Shadow(emitter, flags, concurrency=64, timeout_s=30)
    path: list[float] = []
    clock = time.perf_counter
    wall_start = clock()
    for i in range(requests):
        start = clock()
        answer = await control_call()
        if with_shadow:
            shadow.submit(
                rollout_id="bench",
                user_id=f"user-{i % 5000}",
                request_id=f"req-{i}",
                prompt_text="What is the refund policy for orders over 30 days?",
                control=CONTROL,
                candidate=candidate_call,
                model_version="claude-sonnet-4-6-20260301",
                prompt_version="v41",
            )
        path.append(clock() - start)
        assert answer
        await asyncio.sleep(0)  # the next request arrives later: background work gets its turn
    await shadow.drain()
    wall = (clock() - wall_start) / requests
    return path, wall, shadow


async def submit_only(calls: int) -> float:
    settings = Settings(emitter_buffer=calls * 2 + 10)
    flags = FlagClient(settings=settings)
    flags.apply(
        encode(
            Decision(
                rollout_id="bench",
                seq=1,
                ts=0,
                action="start",
                stage="shadow",
                percent=0.0,
                salt="bench",
                reason="bench",
                shadow_percent=100.0,
            )
        )
    )
    shadow = Shadow(Emitter(settings=settings), flags, concurrency=calls + 1, timeout_s=30)
    start = time.perf_counter()
    for i in range(calls):
        shadow.submit(
            rollout_id="bench",
            user_id=f"user-{i}",
            request_id=f"req-{i}",
            prompt_text="q",
            control=CONTROL,
            candidate=candidate_call,
        )
    elapsed = (time.perf_counter() - start) / calls
    await shadow.drain()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(run(2000, True))  # warm-up
    base, base_wall, _ = asyncio.run(run(args.requests, False))
    shadowed, shadow_wall, shadow = asyncio.run(run(args.requests, True))
    alone = asyncio.run(submit_only(min(args.requests, 5000)))
    us = 1e6
    print(f"requests: {args.requests:,} per mode; every request shadowed (shadow_percent 100)")
    print(f"{'mode':<22}{'median us':>11}{'p99 us':>10}{'mean us':>10}{'wall per request us':>22}")
    for name, values, wall in (("without shadow", base, base_wall), ("with shadow.submit", shadowed, shadow_wall)):
        print(
            f"{name:<22}{statistics.median(values) * us:>11.1f}{pct(values, 0.99) * us:>10.1f}"
            f"{statistics.fmean(values) * us:>10.1f}{wall * us:>22.1f}"
        )
    added = statistics.median(shadowed) - statistics.median(base)
    added_p99 = pct(shadowed, 0.99) - pct(base, 0.99)
    print(
        f"added to the caller's path: median {added * us:.1f} us, p99 {added_p99 * us:.1f} us "
        f"(target < 1000 us); submit() alone: {alone * us:.1f} us"
    )
    print(f"shadow stats: {shadow.stats}")


if __name__ == "__main__":
    main()
