"""End to end on the embedded broker: a rollout in canary, live traces of both variants from the
Emitter -> the worker's live judge (fake Anthropic) -> live_scores topic and dataset, DLQ, live
judge snapshots -> controller -> rollout status; a small budget stops scoring and says so, and
no decision changes."""

from __future__ import annotations

import asyncio
import time

import msgspec

import sinks
from safeswap.core.live_scores import ROLE
from safeswap.emitter import Emitter
from safeswap.judge import DEFAULT_RUBRIC, price_table, score_reserve_estimate
from schemas import Decision, GuardrailSpec, RolloutPlan, RolloutStatus, StageSpec, VariantSpec, convert, decode, encode
from schemas.events import DeadLetter, LiveScore, TraceEvent
from tests.support.fake_anthropic import FakeAnthropic, trace_fields
from tests.support.kafka import produce, read_topic

MODEL = "claude-haiku-4-5-20251001"
PLAN = RolloutPlan(
    rollout_id="r1",
    stakes="low",
    skip_shadow="a test of the live judge",
    control=VariantSpec(model="m-control", prompt_version="v1"),
    candidate=VariantSpec(model="m-candidate", prompt_version="v1"),
    min_users_per_arm=2,
    stages=[
        StageSpec(name="canary", percent=50, min_duration="24h", min_users_per_arm=2),
        StageSpec(name="ramp", percent=100),
    ],
    guardrails=[GuardrailSpec(metric="thumbs_down_rate", max_relative_increase=0.2, action="rollback")],
)
# Control answers well (9 or 8), the candidate terribly (1 or 2): the judge's verdict on the candidate
# could not be worse, and nothing may act on it.
ANSWERS = {
    "control": ("control answer GOOD", "[score-8] control answer"),
    "candidate": ("[score-1] bad", "[score-2] bad"),
}


def traces() -> list[dict]:
    rows = [
        trace_fields(0, variant="control", answer="[malformed] control answer"),
        trace_fields(1, variant="candidate", answer=None),  # not scoreable
        trace_fields(2, variant="control", prompt=None),  # not scoreable
        trace_fields(3, variant="candidate", rollout_id="not-started", answer="GOOD [never-live]"),
    ]
    for i in range(4, 44):  # the variants alternate, so the budget reaches both
        variant = "control" if i % 2 else "candidate"
        rows.append(trace_fields(i, variant=variant, answer=ANSWERS[variant][(i // 2) % 2]))
    return rows


def latest_status(settings) -> RolloutStatus | None:
    records = asyncio.run(read_topic(settings.broker, settings.topic("status"), timeout_s=2))
    found = [decode(RolloutStatus, r.value) for r in records if r.key == b"r1"]
    return found[-1] if found else None


def settled(status: RolloutStatus | None, live_traces: int) -> bool:
    """Every live trace of r1 counted and resolved (scored, refused or failed)."""
    variants = ((status.live_judge if status else {}) or {}).get("variants") or {}
    seen = sum(v["traces"] for v in variants.values())
    resolved = sum(
        v[k] for v in variants.values() for k in ("scored", "not_scoreable", "budget_skipped", "malformed", "errors")
    )
    return seen == resolved == live_traces


def test_the_worker_scores_canary_traces_of_both_variants_within_budget_and_decides_nothing_on_them(
    settings, worker_factory
):
    rows = traces()
    live_traces = sum(1 for row in rows if row["rollout_id"] == "r1")
    prices = price_table()
    worst = max(
        score_reserve_estimate(convert(TraceEvent, row), DEFAULT_RUBRIC, MODEL, 400, 12_000, prices)
        for row in rows
        if row["response_text"] and row["prompt_text"]
    )
    # Each partition's share lets about two scores be reserved at once, and a few in all.
    budget = settings.partitions * 2.5 * worst
    with FakeAnthropic() as fake:
        worker = worker_factory(
            anthropic_api_key="test-key",
            anthropic_base_url=fake.base_url,
            judge_model=MODEL,
            judge_concurrency=2,
            judge_budget_usd=budget,
            snapshot_interval_s=0.3,
            status_interval_s=0.3,
            sink_idle_s=0.5,
        )

        async def start_rollout():
            await produce(settings.broker, settings.topic("plans"), [(b"r1", encode(PLAN))])
            await read_topic(settings.broker, settings.topic("decisions"), until_count=1, timeout_s=60)

        async def emit():
            async with Emitter(settings=settings) as emitter:
                for row in rows:
                    assert emitter.trace(row)

        asyncio.run(start_rollout())
        asyncio.run(emit())
        deadline = time.monotonic() + 60
        status = latest_status(settings)
        while not settled(status, live_traces) and time.monotonic() < deadline:
            time.sleep(0.5)
            status = latest_status(settings)
        records = asyncio.run(read_topic(settings.broker, settings.topic("live_scores"), timeout_s=5))
        deadline = time.monotonic() + 30
        while sinks.count_rows(settings.data_dir, ["live_scores"])["live_scores"] < len(records):
            assert time.monotonic() < deadline, "the live_scores dataset did not catch up"
            time.sleep(0.5)
        letters = [
            msgspec.json.decode(r.value, type=DeadLetter)
            for r in asyncio.run(read_topic(settings.broker, settings.topic("dlq"), until_count=1, timeout_s=10))
        ]
        decisions = [
            msgspec.json.decode(r.value, type=Decision)
            for r in asyncio.run(read_topic(settings.broker, settings.topic("decisions"), timeout_s=3))
        ]
        worker.stop()
    log = worker.log()
    assert settled(status, live_traces), (status and status.live_judge, log[-3000:])

    # Scores on the topic: both variants, the fake's scripted scores, keyed by rollout.
    scores = [msgspec.json.decode(r.value, type=LiveScore) for r in records]
    assert records and all(r.key == b"r1" for r in records)
    by_variant = {v: [s for s in scores if s.variant == v] for v in ("control", "candidate")}
    assert {s.score for s in by_variant["control"]} <= {8, 9} and {s.score for s in by_variant["candidate"]} <= {1, 2}
    assert len(by_variant["control"]) >= 2 and len(by_variant["candidate"]) >= 2
    assert all(
        s.stage == "canary" and s.judge_model == MODEL and s.event_id == s.trace_event_id + ":score" for s in scores
    )
    # One forced record_score call per response let through; never one for a rollout that is not live.
    assert all(request["tool_choice"] == {"type": "tool", "name": "record_score"} for request in fake.requests)
    assert len(fake.requests) == len(scores) + 1  # and the malformed reply
    assert not any("[never-live]" in request["messages"][0]["content"] for request in fake.requests)
    assert fake.max_in_flight <= 2

    # The budget held and stopped scoring, and the status and the log say so.
    live = status.live_judge
    paid = sum(s.cost_usd for s in scores) + (1000 * 1.0 + 50 * 5.0) / 1e6  # + the malformed reply's
    assert paid <= budget
    assert live["budget_skipped"] > 0 and "judge budget reached" in live["budget"]
    assert "live judge: scoring stops for r1|" in log
    assert len(scores) + live["budget_skipped"] + 3 == live_traces  # 2 not scoreable, 1 malformed

    # The status: per-variant means (users as the unit), counts and the always-valid interval.
    assert live["role"] == ROLE == "monitored, not a decision input"
    for variant, scored in by_variant.items():
        summary = live["variants"][variant]
        assert summary["scored"] == summary["users"] == len(scored)  # one response per user
        assert summary["mean"] == sum(s.score for s in scored) / len(scored)
    assert live["variants"]["candidate"]["not_scoreable"] == 1 == live["variants"]["control"]["not_scoreable"]
    assert live["variants"]["control"]["malformed"] == 1
    difference = live["difference"]
    assert difference["ci_low"] <= difference["estimate"] <= difference["ci_high"] < 0
    assert difference["alpha"] == PLAN.alpha

    # The malformed reply is a dead letter of the live judge, with the reason; no other.
    mine = [letter for letter in letters if letter.agent == "live_judge"]
    assert len(mine) == 1 and "record_score" in mine[0].reason and mine[0].topic == settings.topic("traces")

    # The same scores in the Parquet dataset.
    frame = sinks.scan("live_scores", settings.data_dir).collect()
    assert sorted(frame["event_id"].to_list()) == sorted(s.event_id for s in scores)

    # Nothing decided on them: the start, and no other decision.
    assert [(d.rollout_id, d.action, d.stage) for d in decisions] == [("r1", "start", "canary")]
    assert status.stage == "canary" and status.last_decision.action == "start"
