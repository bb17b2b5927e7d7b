"""Fault: 10,000 malformed messages (hypothesis) across every input topic, good events interleaved.

Proved: every bad message gets exactly one DLQ record, from the agent that reads
its topic (outcomes for traces and feedback, judge for shadow, decide for plans,
stats and commands; the sinks of those topics skip it) with a reason and the
original bytes; none is an "internal error" (each is refused as invalid input); the
worker process is the one started (same pid, no Faust agent crash in its log);
and the good events interleaved with them give exactly the metrics of a clean
replay. A structurally valid snapshot with unreadable statistics for a *live*
rollout is dead-lettered by the decide agent and does not stop the rollout's
later decisions.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections import Counter, defaultdict

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from safeswap.core.outcomes import merged_snapshot_values
from safeswap.tools.rollouts import start_rollout
from schemas import StatsSnapshot, encode
from streams.process import WorkerProcess
from tests.agents.test_outcomes import FLUSH, ROLLOUT, expected, jsonl, rollout_tail
from tests.faults.badinput import TOPICS, check_rejected, malformed
from tests.faults.helpers import (
    dead_letters,
    decisions,
    fresh_settings,
    produce_many,
    wait_until,
    wait_until_covered,
    walk_plan,
)
from tests.support.events import assert_same_metrics, simulated_events
from tests.support.kafka import read_topic

pytestmark = [pytest.mark.faults, pytest.mark.integration]

N_BAD = 10_000
# One DLQ record per bad message, from the agent that reads the topic (its sink skips it).
CONSUMERS = {
    "traces": ("outcomes",),
    "feedback": ("outcomes",),
    "shadow": ("judge",),
    "plans": ("decide",),
    "stats": ("decide",),
    "commands": ("decide",),
}


def generate_bad(n: int) -> list[tuple[str, bytes]]:
    """``n`` malformed messages, each checked to be refused by its topic's decoder."""
    out: list[tuple[str, bytes]] = []

    @hypothesis_settings(
        max_examples=n,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(TOPICS).flatmap(lambda topic: st.tuples(st.just(topic), malformed(topic))))
    def collect(item):
        check_rejected(*item)
        out.append(item)

    collect()
    return out


def poison_snapshot(partition: int) -> bytes:
    """Valid StatsSnapshot framing, statistics the controller cannot read."""
    return encode(
        StatsSnapshot(
            rollout_id=ROLLOUT,
            partition=partition,
            seq=1,
            ts=1,
            users={"control": 1},
            metrics={"control": {"thumbs_down_rate": {"kind": "bogus"}}},
        )
    )


def rollout_snapshot_seen(settings) -> bool:
    """Has the worker published a snapshot of ROLLOUT (the poison ones have seq 1)?"""
    for record in asyncio.run(read_topic(settings.broker, settings.topic("stats"), timeout_s=5)):
        try:
            snapshot = msgspec.json.decode(record.value, type=StatsSnapshot)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            continue  # one of the bad ones
        if snapshot.rollout_id == ROLLOUT and snapshot.seq > 1:
            return True
    return False


def test_ten_thousand_malformed_messages(broker, tmp_path):
    settings = fresh_settings(broker, tmp_path, "bad", sink_datasets="traces,feedback,shadow,plans,stats")
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        bad = generate_bad(N_BAD)  # while the worker joins its group
        assert len(bad) == N_BAD
        _, first = asyncio.run(start_rollout(settings, walk_plan(ROLLOUT), wait_s=90))
        assert first is not None and first.action == "start", worker.log()[-3000:]

        events = simulated_events(seed=7, users=300, text_len=60)
        good = jsonl(events)
        # 4 h after every bad one, a tail of the rollout's own traffic, then FLUSH's (which closes
        # the tail's sessions). A stage's watch starts at the first snapshot the controller sees
        # in it, so the tail is produced once the rollout has a snapshot: a fast worker could
        # otherwise fold everything into its first one, and the canary's 30 min would never pass.
        tail = jsonl(rollout_tail(settings.partitions, events[-1].ts, ROLLOUT))
        rng = random.Random(9)
        # (topic, key, value, agents that must dead-letter it). The poison snapshots come
        # first, so the rollout's later snapshots must get past them.
        messages = [("stats", ROLLOUT.encode(), poison_snapshot(p), ("decide",)) for p in (0, 7)]
        slots: dict[int, list] = defaultdict(list)
        for topic, value in bad:  # bad ones interleaved at random, the good ones in their order
            slots[rng.randrange(len(good))].append((topic, value))
        for index, line in enumerate(good + tail):
            for topic, value in slots.get(index, ()):
                messages.append((topic, f"bad-{rng.randrange(50)}".encode(), value, CONSUMERS[topic]))
            topic = "traces" if b'"type": "trace"' in line else "feedback"
            messages.append((topic, json.loads(line)["user_id"].encode(), line, ()))
        main = len(messages) - len(tail)
        positions = asyncio.run(produce_many(settings, [m[:3] for m in messages[:main]]))
        wait_until(lambda: rollout_snapshot_seen(settings), 90, "a snapshot of the rollout", worker.log)
        positions += asyncio.run(produce_many(settings, [m[:3] for m in messages[main:]]))
        good = good + tail

        streamed = wait_until_covered(settings, worker, ROLLOUT, FLUSH, timeout_s=150)
        want = expected(good, settings)
        assert_same_metrics(merged_snapshot_values(streamed.values()), want["rollouts"][ROLLOUT]["variants"])

        # Every bad message in the DLQ once, with a reason and its bytes.
        wanted: dict[str, dict[tuple[str, int, int], bytes]] = defaultdict(dict)
        for (_topic, _key, value, agents), position in zip(messages, positions):
            for agent in agents:
                wanted[agent][position] = value
        total = sum(len(v) for v in wanted.values())

        def all_dead() -> list:
            found = dead_letters(settings, until_count=total, timeout_s=10)
            return found if len(found) >= total else []

        found = wait_until(all_dead, 150, f"{total} dead letters", worker.log)
        got: dict[str, dict[tuple[str, int, int], object]] = defaultdict(dict)
        for record in found:
            key = (record.topic, record.partition, record.offset)
            assert key not in got[record.agent], f"{record.agent} dead-lettered {key} twice"
            got[record.agent][key] = record
        assert {a: len(v) for a, v in got.items()} == {a: len(v) for a, v in wanted.items()}
        for agent, records in wanted.items():
            assert set(got[agent]) == set(records), agent
            for key, value in records.items():
                record = got[agent][key]
                assert record.reason and not record.reason.startswith("internal error"), (agent, record.reason)
                assert not record.reason.startswith("invalid: invalid"), record.reason  # one wording
                assert base64.b64decode(record.value_b64) == value, (agent, key)
        print("dead letters per agent:", dict(Counter(r.agent for r in found)))

        # No restart: the same process, no agent crash; the rollout still decides after the poison.
        assert worker.alive()
        log = worker.log()
        assert "crashed" not in log.lower() and "Traceback" not in log, log[-3000:]
        wait_until(
            lambda: any(d.action == "complete" for d in decisions(settings, ROLLOUT)),
            60,
            "the rollout's decisions after the poison snapshot",
            lambda: (
                worker.log()[-2000:]
                + f"\ndecisions: {[(d.seq, d.action, d.reason) for d in decisions(settings, ROLLOUT)]}"
            ),
        )
    finally:
        worker.stop()
