"""Event builders shared by the outcomes tests."""

from __future__ import annotations

import json
import random

from schemas import FeedbackEvent, TraceEvent, encode

T0 = 1_700_000_000_000  # 2023-11-14: event times in the past of any real clock
NOW = T0 + 48 * 3600 * 1000  # a fixed "wall clock" for the pure tests


def trace(n, ts, user="u1", variant="control", prompt="how do I reset my password", rollout="r1", **fields):
    values = dict(
        event_id=f"te-{n}",
        ts=ts,
        rollout_id=rollout,
        variant=variant,
        user_id=user,
        session_id="s",
        trace_id=f"t-{n}",
        prompt_version="p1",
        model_version="m1",
        latency_ms=100.0,
        input_tokens=10,
        output_tokens=20,
        cost_usd=0.01,
        cache_hit=False,
        prompt_text=prompt,
        response_text="Open settings and click reset.",
    )
    values.update(fields)
    return TraceEvent(**values)


def feedback(n, trace_n, ts, kind, user="u1", variant="control", rollout="r1", final_text=None):
    return FeedbackEvent(
        event_id=f"fe-{n}",
        ts=ts,
        trace_id=f"t-{trace_n}",
        user_id=user,
        session_id="s",
        rollout_id=rollout,
        variant=variant,
        kind=kind,
        final_text=final_text,
    )


PROMPTS = [
    "how do I reset my password",
    "what is the refund policy for annual plans",
    "write a haiku about kafka partitions",
    "summarise this contract clause for me",
    "translate good morning to french",
    "why is my invoice higher this month",
]


def simulated_events(seed: int, users: int, rollout: str = "r1", start: int = T0, text_len: int = 200):
    """A realistic mix: sessions, retries, edits, thumbs, abandons, errors; sorted by event time."""
    rng = random.Random(seed)
    events = []
    n = 0
    for u in range(users):
        variant = "candidate" if rng.random() < 0.5 else "control"
        ts = start + rng.randint(0, 600_000)
        for _session in range(rng.randint(1, 2)):
            prompt = rng.choice(PROMPTS)
            for _turn in range(rng.randint(1, 4)):
                n += 1
                body = " ".join(
                    rng.choice(["alpha", "beta", "gamma", "delta", "kafka", "faust"]) for _ in range(text_len // 6)
                )
                events.append(
                    trace(
                        n,
                        ts,
                        user=f"user-{u}",
                        variant=variant,
                        rollout=rollout,
                        prompt=prompt,
                        response_text=body,
                        latency_ms=rng.lognormvariate(6, 0.5),
                        cache_hit=rng.random() < 0.3,
                        cost_usd=round(rng.random() / 100, 6),
                        model_version=rng.choice(["m1", "m1", "m2"]),
                        error=rng.choice(["none"] * 12 + ["timeout", "rate_limit", "refusal"]),
                    )
                )
                r = rng.random()
                if r < 0.3:
                    kind = rng.choice(["thumbs_down", "thumbs_up", "edit", "retry", "copy", "abandon", "follow_up"])
                    final = body[: len(body) // 2] + " edited" if kind == "edit" else None
                    events.append(
                        feedback(
                            n,
                            n,
                            ts + rng.randint(1_000, 120_000),
                            kind,
                            user=f"user-{u}",
                            variant=variant,
                            rollout=rollout,
                            final_text=final,
                        )
                    )
                if rng.random() < 0.3:  # a retry: similar prompt soon after
                    ts += rng.randint(5_000, 50_000)
                else:
                    prompt = rng.choice(PROMPTS)
                    ts += rng.randint(60_000, 20 * 60_000)
            ts += rng.randint(31 * 60_000, 90 * 60_000)
    events.sort(key=lambda e: e.ts)
    return events


def assert_same_metrics(got: dict, expected: dict, rel: float = 1e-9) -> None:
    """Equal per-variant metrics; floats up to summation order (rel 1e-9), everything else exactly."""
    import math

    assert set(got) == set(expected)
    for variant in expected:
        assert set(got[variant]) == set(expected[variant]), variant
        for name, want in expected[variant].items():
            have = got[variant][name]
            if isinstance(want, float) and isinstance(have, float):
                assert math.isclose(have, want, rel_tol=rel, abs_tol=1e-12), (variant, name, have, want)
            else:
                assert have == want, (variant, name, have, want)


def jsonl(events) -> list[bytes]:
    """Events as the lines of a replay file (``type`` = trace | feedback)."""
    lines = []
    for event in events:
        fields = json.loads(encode(event))
        fields["type"] = "trace" if "latency_ms" in fields else "feedback"
        lines.append(json.dumps(fields).encode())
    return lines
