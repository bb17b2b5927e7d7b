"""The checkpoint's state struct (schemas/state.py): a processor restored from it goes on exactly
like the one that wrote it, and the payload is plain msgpack that names no Python class."""

from __future__ import annotations

import random
import zlib

import msgspec
import pytest

from agents.outcomes import restore_processor
from safeswap.core.metrics import UNIT_BUCKETS
from safeswap.core.outcomes import OutcomeConfig, OutcomeProcessor
from schemas import Decision, FeedbackEvent, PartitionState, TraceEvent, encode
from streams.checkpoint import decode_state, encode_state
from tests.support.events import NOW, T0, feedback, simulated_events, trace

MIN = 60_000
HOUR = 60 * MIN


def decision(rollout: str, starts: list[int], segments: tuple[str, ...] = ()) -> Decision:
    return Decision(
        rollout_id=rollout,
        seq=len(starts),
        ts=starts[-1],
        action="promote",
        stage="ramp",
        percent=50.0,
        salt="s",
        reason="a ramp step",
        cohort_starts=starts,
        segments=list(segments),
        segment_metrics=["thumbs_down_rate", "latency_ms_p95"] if segments else [],
    )


def traffic(seed: int) -> list[tuple[TraceEvent | FeedbackEvent, tuple]]:
    """Two rollouts, returning users, crossovers, repeats, feedback ahead of its trace (and some
    whose trace never comes), each event with an origin as the agent gives it."""
    rng = random.Random(seed)
    locales = ("en", "ja", "de")
    first = [  # r1's users carry a locale (its segment guardrails keep it per user)
        msgspec.structs.replace(e, segment={"locale": locales[int(e.user_id.split("-")[1]) % 3]})
        if isinstance(e, TraceEvent)
        else e
        for e in simulated_events(seed, users=60, rollout="r1")
    ] + simulated_events(seed + 1000, users=40, rollout="r2", start=T0 + 20 * MIN)
    later = []
    r1_variant = {e.user_id: e.variant for e in first if e.rollout_id == "r1"}
    for i, user in enumerate(sorted(r1_variant)[::4]):  # back 5 h later: released state, remembered arm
        ts = T0 + 5 * HOUR + i * 20_000
        later.append(trace(f"back-{seed}-{i}", ts, user=user, variant=r1_variant[user], prompt=f"back {i}"))
        later.append(feedback(f"back-{seed}-{i}", f"back-{seed}-{i}", ts + 5_000, "thumbs_up", user=user))
    candidates = [user for user, variant in r1_variant.items() if variant == "candidate"]
    for i, user in enumerate(candidates[:6]):  # candidate users later served control: crossovers
        ts = T0 + (45 * MIN if i % 2 else 5 * HOUR + 30 * MIN) + i
        later.append(trace(f"cross-{seed}-{i}", ts, user=user, variant="control"))
    for i in range(3):  # feedback whose trace never comes: waits, then expires to the DLQ
        later.append(feedback(f"orphan-{seed}-{i}", f"never-{seed}-{i}", T0 + 90 * MIN + i * MIN, "thumbs_down"))
    events = first + later
    events += rng.sample(events, 15)  # a producer's retries: repeats of event ids already seen
    # feedback read up to 4 min ahead of the traces (within the allowed lateness): it often waits
    # for its trace
    events.sort(key=lambda e: e.ts - (rng.randint(0, 240_000) if isinstance(e, FeedbackEvent) else 0))
    out = []
    for offset, event in enumerate(events):
        topic = "feedback" if isinstance(event, FeedbackEvent) else "traces"
        out.append((event, (topic, 0, offset, event.user_id.encode(), encode(event))))
    return out


def feed(processor: OutcomeProcessor, events) -> list:
    """What the agent would send on: each event's verdict, then the rejected and outcome records."""
    out = [processor.apply(event, NOW, origin) for event, origin in events]
    out += processor.rejected + processor.outcome_records
    processor.rejected, processor.outcome_records = [], []
    return out


def snapshots(processor: OutcomeProcessor) -> list[bytes]:
    return [encode(processor.snapshot(rollout, 7)) for rollout in processor.rollouts()]


def held_responses(processor: OutcomeProcessor):
    return [(user, r) for user in processor.users.values() for r in user.by_trace.values()]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_a_restored_processor_goes_on_exactly_like_the_original(seed):
    config = OutcomeConfig()
    events = traffic(seed)
    original = OutcomeProcessor(2, config)
    original.collect_outcomes = True
    original.on_decision(decision("r1", [T0 + 5 * MIN], segments=("locale",)))  # a second cohort from 5 min on
    cut = T0 + random.Random(seed).randint(60, 150) * MIN  # some sessions closed, some users released
    split = next(i for i, (event, _) in enumerate(events) if event.ts >= cut)
    feed(original, events[:split])
    while not original.state_size()["pending_feedback"]:  # cut where feedback waits for its trace
        feed(original, [events[split]])
        split += 1
    size = original.state_size()
    assert size["open_responses"] and size["join_responses"], size
    assert any(response.last for _, response in held_responses(original))  # closed, waiting for the TTL
    assert original.crossed_users and events[split][0].ts < T0 + 5 * HOUR  # more crossovers after the cut
    assert {cohort for _, _, cohort, _ in original.cells} == {0, 1} and len(original.rollouts()) == 2
    assert {segment for *_, segment in original.cells} == {"", "locale=en", "locale=ja", "locale=de"}

    restored = restore_processor(encode_state(original.to_state()), config)
    assert restored is not None and restored is not original
    assert restored.to_state() == original.to_state()
    assert snapshots(restored) == snapshots(original)
    assert restored.segment_keys == {"r1": ("locale",)} and restored.segment_values == original.segment_values
    # the shared references are shared again: each response adds to its cell's bucket of its user
    for user, response in held_responses(restored):
        cell = restored.cells[(user.rollout_id, user.arm, user.cohort, user.segment)]
        assert response.cell is cell and response.totals is cell.buckets[user.uid % UNIT_BUCKETS]
    for user in restored.users.values():
        assert all(user.by_trace[r.trace_id] is r for r in user.open)

    for processor in (original, restored):
        processor.on_decision(decision("r1", [T0 + 40 * MIN, T0 + 5 * HOUR]))  # and a third from 5 h
    rest_original, rest_restored = feed(original, events[split:]), feed(restored, events[split:])
    assert rest_restored == rest_original
    assert any(isinstance(item, msgspec.Struct) for item in rest_original)  # outcome records came out
    assert snapshots(restored) == snapshots(original)
    original.finish()
    restored.finish()
    assert feed(restored, []) == feed(original, [])
    assert snapshots(restored) == snapshots(original)
    assert original.counts["duplicates"] and original.reasons["feedback_unjoined"]  # repeats, orphans met
    crossed = original.snapshot("r1", 7).crossover_users
    assert crossed and restored.snapshot("r1", 7).crossover_users == crossed
    assert restored.to_state() == original.to_state()


def _strings(node, found: set[str]) -> None:
    if isinstance(node, str):
        found.add(node)
    elif isinstance(node, dict):
        for key, value in node.items():
            _strings(key, found)
            _strings(value, found)
    elif isinstance(node, list):
        for item in node:
            _strings(item, found)


def test_the_payload_is_plain_msgpack_that_names_no_class_or_module():
    processor = OutcomeProcessor(0)
    events = traffic(9)
    feed(processor, events[: len(events) // 2])
    payload = encode_state(processor.to_state())
    raw = zlib.decompress(payload)
    plain = msgspec.msgpack.decode(raw)  # no types given: msgpack alone
    assert isinstance(plain, dict) and plain["version"] == OutcomeProcessor.STATE_VERSION
    assert msgspec.convert(plain, PartitionState) == decode_state(payload)
    assert not raw.startswith(b"\x80")  # a pickle's first opcode (PROTO)
    found: set[str] = set()
    _strings(plain, found)
    names = (
        "safeswap",
        "schemas",
        "streams",
        "builtins",
        "numpy",
        "array",
        "copyreg",
        "OutcomeProcessor",
        "UserState",
        "Response",
        "VariantSums",
        "DistinctHashes",
        "DueQueue",
        "PendingJoin",
        "Watermarks",
        "TraceEvent",
        "FeedbackEvent",
    )
    assert not [s for s in found for name in names if name in s]
    assert not [name for name in names if name.encode() in raw]
