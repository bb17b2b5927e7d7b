"""The audit of issue #4: distinct users, abandonment that late feedback can change, retries
that stay inside their session, retried xor followed up, and replay's stderr/JSON contract."""

from __future__ import annotations

import json
import pickle

from safeswap.outcomes import OutcomeConfig, OutcomeProcessor, merged_snapshot_values
from safeswap.replay import replay_lines
from schemas import encode
from streams.checkpoint import decode_state, encode_state
from streams.dedup import DistinctHashes, id_hash
from tests.outcomes.helpers import NOW, T0, assert_same_metrics, simulated_events, trace

MIN = 60_000
HOUR = 60 * MIN


def jsonl(events) -> list[bytes]:
    lines = []
    for event in events:
        fields = json.loads(encode(event))
        fields["type"] = "trace" if "latency_ms" in fields else "feedback"
        lines.append(json.dumps(fields).encode())
    return lines


def run(events, config=None, collect=False):
    processor = OutcomeProcessor(0, config)
    processor.collect_outcomes = collect
    verdicts = [processor.apply(event, NOW) for event in events]
    assert verdicts == [None] * len(events), verdicts
    processor.finish()
    return processor


def values(processor, rollout="r1"):
    return merged_snapshot_values([processor.snapshot(rollout, 1)])


# -- users: distinct user_ids ---------------------------------------------------------------

def test_distinct_hashes_membership_survives_merges_and_pickling():
    hashes = DistinctHashes(min_merge=4)
    ids = [id_hash(f"user-{i}") for i in range(1000)]
    assert all(hashes.add(h) for h in ids)
    assert not any(hashes.add(h) for h in ids)  # every one already a member, merged or recent
    assert len(hashes) == 1000 and len(hashes.members) > 900  # most live in the compact array
    restored = pickle.loads(pickle.dumps(hashes))
    assert len(restored) == 1000 and all(h in restored for h in ids)
    assert id_hash("user-1000") not in restored
    assert id_hash("user-7") == id_hash("user-7") != id_hash("user-8")


def test_a_user_back_after_three_hours_is_one_user_and_a_second_unit():
    events = [trace(1, T0, user="u1"), trace(2, T0 + 3 * HOUR, user="u1", prompt="again"),
              trace(3, T0 + 3 * HOUR, user="u2", prompt="other")]
    got = values(run(events))["control"]
    assert got["users"] == 2 and got["n_units"] == 3  # u1's two visits are two units of the Ratio stats
    assert got["responses"] == 3
    replayed = replay_lines(jsonl(events), OutcomeConfig(), partitions=3, now_ms=NOW)
    assert replayed["rollouts"]["r1"]["variants"]["control"]["users"] == 2
    assert replayed["rollouts"]["r1"]["variants"]["control"]["n_units"] == 3


def test_distinct_users_survive_a_checkpoint_round_trip_while_the_state_is_released():
    events = simulated_events(seed=11, users=80)
    variant_of = {e.user_id: e.variant for e in events}
    back = [f"user-{i}" for i in range(0, 80, 3)]
    returning = [trace(f"back-{i}", events[-1].ts + 6 * HOUR + i, user=user, variant=variant_of[user],
                       prompt=f"back {i}") for i, user in enumerate(back)]
    everything = events + returning
    uninterrupted = run(everything)
    processor = OutcomeProcessor(0)
    for event in events:
        processor.apply(event, NOW)
    assert any(("r1", user) not in processor.users for user in back)  # only the distinct sets remember them
    restored = decode_state(encode_state(processor))  # what the agent's checkpoint carries
    assert restored is not processor
    for event in returning:
        assert restored.apply(event, NOW) is None
    restored.finish()
    assert_same_metrics(values(restored), values(uninterrupted))
    users = {variant: got["users"] for variant, got in values(uninterrupted).items()}
    assert sum(users.values()) == 80  # each simulated user has one variant
    first = values(run(events))
    assert {v: got["users"] for v, got in first.items()} == users  # the returning users are no new users
    assert sum(got["n_units"] for got in values(uninterrupted).values()) > sum(got["n_units"] for got in first.values())
