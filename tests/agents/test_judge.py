"""End to end on the embedded broker: Emitter -> shadow topic -> judge agent (fake Anthropic) ->
judgments, DLQ, shadow statistics -> controller -> rollout status."""

from __future__ import annotations

import asyncio
import time

import msgspec

from safeswap.emitter import Emitter
from schemas import RolloutPlan, RolloutStatus, StageSpec, VariantSpec, decode, encode
from schemas.events import DeadLetter, Judgment
from tests.support.fake_anthropic import FakeAnthropic, pair_fields
from tests.support.kafka import produce, read_topic


def test_the_worker_judges_shadow_pairs_and_rollout_status_shows_the_analysis(settings, worker_factory):
    plan = RolloutPlan(
        rollout_id="r1",
        stakes="low",
        control=VariantSpec(model="m-20250101", prompt_version="v1"),
        candidate=VariantSpec(model="m-20260101", prompt_version="v1"),
        min_users_per_arm=2,
        stages=[
            StageSpec(
                name="shadow",
                shadow_percent=10,
                min_duration="24h",
                min_users_per_arm=2,
                judge_max_control_preference=0.05,
            ),
            StageSpec(name="canary", percent=5),
        ],
    )
    rows = [pair_fields(i) for i in range(6)] + [pair_fields(6, prompt="[malformed]")]
    with FakeAnthropic() as fake:
        # The child gets them as ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL (streams.process, env_name).
        worker = worker_factory(
            anthropic_api_key="test-key",
            anthropic_base_url=fake.base_url,
            judge_model="claude-haiku-4-5-20251001",
            judge_concurrency=2,
            snapshot_interval_s=0.3,
            status_interval_s=0.3,
        )

        async def scenario():
            await produce(settings.broker, settings.topic("plans"), [(b"r1", encode(plan))])
            async with Emitter(settings=settings) as emitter:
                for row in rows:
                    assert emitter.shadow_pair(row)
                emitter.shadow_pair({"event_id": "bad"})  # invalid: the emitter's DLQ, not the topic
            judgments = await read_topic(settings.broker, settings.topic("judgments"), until_count=6, timeout_s=60)
            deadline = time.monotonic() + 30
            while True:
                statuses = await read_topic(settings.broker, settings.topic("status"), timeout_s=2)
                latest = [decode(RolloutStatus, m.value) for m in statuses]
                if (latest and latest[-1].shadow.get("pairs") == 7) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            dlq = await read_topic(settings.broker, settings.topic("dlq"), until_count=2, timeout_s=20)
            return judgments, latest, dlq

        judgments, statuses, dlq = asyncio.run(scenario())
        worker.stop()
    assert worker.log().count("judge disabled") == 0, worker.log()[-2000:]
    verdicts = [msgspec.json.decode(m.value, type=Judgment) for m in judgments]
    assert len(verdicts) == 6 and {v.winner for v in verdicts} == {"candidate"}
    assert all(m.key == b"r1" for m in judgments)
    assert fake.max_in_flight <= 2 and len(fake.requests) == 14
    reasons = [msgspec.json.decode(m.value, type=DeadLetter).reason for m in dlq]
    assert any("record_verdict" in r for r in reasons), reasons
    shadow = statuses[-1].shadow
    assert shadow["pairs"] == 7 and shadow["judge"]["candidate_wins"] == 6 and shadow["judge"]["malformed"] == 1
    assert {c["metric"] for c in shadow["checks"]} >= {"refusal", "json_break", "timeout", "cost_usd_mean"}
