"""The judge against a fake Anthropic server on 127.0.0.1 given as base_url (real HTTP, no key, no internet)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from safeswap.judge import (
    Budget,
    Judge,
    JudgeResult,
    combine,
    judge_pairs,
    parse_verdict,
    reserve_estimate,
    sampled,
    summary,
)
from schemas import convert
from schemas.events import ShadowPair
from streams.settings import Settings
from tests.support.fake_anthropic import FakeAnthropic, answers_in_order, pair_fields

MODEL = "claude-haiku-4-5-20251001"  # $1 / $5 per million tokens in the built-in table


@pytest.fixture
def fake():
    with FakeAnthropic() as server:
        yield server


def settings_for(fake: FakeAnthropic, **overrides) -> Settings:
    values = dict(
        anthropic_api_key="test-key",
        anthropic_base_url=fake.base_url,
        judge_model=MODEL,
        judge_concurrency=4,
        judge_max_retries=2,
        judge_timeout_s=5.0,
        judge_budget_usd=100.0,
    )
    values.update(overrides)
    return Settings(**values)


def pair(index: int, **kwargs) -> ShadowPair:
    return convert(ShadowPair, pair_fields(index, **kwargs))


def run(judge: Judge, pairs: list[ShadowPair]):
    return asyncio.run(judge_pairs(judge, pairs))


def test_each_pair_is_judged_in_both_orders_with_a_forced_record_verdict_call(fake):
    judge = Judge(settings_for(fake))
    [result] = run(judge, [pair(1)])
    assert result.status == "judged" and result.judgment.winner == "candidate"
    assert len(fake.requests) == 2
    orders = {answers_in_order(request) for request in fake.requests}
    assert orders == {("control answer", "candidate answer GOOD"), ("candidate answer GOOD", "control answer")}
    for request in fake.requests:
        assert request["tool_choice"] == {"type": "tool", "name": "record_verdict"}
        assert [tool["name"] for tool in request["tools"]] == ["record_verdict"]
        assert request["model"] == MODEL
    # The key from Settings reaches the server (this SDK sends it as a bearer token).
    assert all("test-key" in (h.get("x-api-key", "") + h.get("authorization", "")) for h in fake.headers)
    judgment = result.judgment
    assert (judgment.verdict_control_first, judgment.verdict_candidate_first) == ("B", "A")
    # Cost from usage and the price table: 2 calls x (1000 in x $1 + 50 out x $5) / 1M.
    assert judgment.cost_usd == pytest.approx(2 * (1000 * 1.0 + 50 * 5.0) / 1e6)
    assert judgment.event_id == "pair-1:judge" and judgment.ts == pair(1).ts


def test_a_positional_judge_scores_a_tie_and_control_wins_when_control_is_better(fake):
    judge = Judge(settings_for(fake))
    results = run(judge, [pair(1, prompt="[bias-A]"), pair(2, control="GOOD one", candidate="meh")])
    assert [r.judgment.winner for r in results] == ["tie", "control"]
    assert (judge.stats.ties, judge.stats.control_wins, judge.stats.candidate_wins) == (1, 1, 0)


def test_a_429_then_success_is_retried_after_retry_after(fake):
    judge = Judge(settings_for(fake))
    [result] = run(judge, [pair(1, prompt="[429-once]")])
    assert result.status == "judged" and result.judgment.winner == "candidate"
    assert judge.stats.rate_limited == 2 and judge.stats.retries == 2  # once per order
    assert len(fake.requests) == 4 and result.judgment.retries == 2


def test_a_529_overloaded_is_retried_and_a_persistent_one_is_an_error_not_a_verdict(fake):
    judge = Judge(settings_for(fake, judge_max_retries=1))
    once, always = run(judge, [pair(1, prompt="[529-once]"), pair(2, prompt="[529-always]")])
    assert once.status == "judged"
    assert always.status == "error" and "overloaded" in always.reason and always.judgment is None
    assert judge.stats.overloaded >= 4 and judge.stats.errors == 1


def test_a_timeout_is_retried_then_counted_as_an_error(fake):
    fake.hang_s = 1.0
    judge = Judge(settings_for(fake, judge_timeout_s=0.3, judge_max_retries=1))
    [result] = run(judge, [pair(1, prompt="[hang]")])
    assert result.status == "error" and "timeout" in result.reason
    assert judge.stats.timeouts == 4  # 2 orders x (1 try + 1 retry)


@pytest.mark.parametrize("marker", ["[malformed]", "[bad-winner]"])
def test_a_reply_without_a_valid_verdict_is_counted_never_guessed(fake, marker):
    judge = Judge(settings_for(fake))
    [result] = run(judge, [pair(1, prompt=marker)])
    assert result.status == "malformed" and result.judgment is None
    assert "record_verdict" in result.reason
    assert judge.stats.malformed == 1 and judge.stats.judged == 0
    assert result.cost_usd > 0  # the calls were paid for


def test_the_budget_cap_stops_calls(fake):
    # A pair's worst case: 2 x ((UTF-8 bytes + 400) in x $1 + 400 out x $5) / 1M, about 0.0057 USD.
    judge = Judge(settings_for(fake, judge_budget_usd=0.02, judge_concurrency=1))
    results = run(judge, [pair(i) for i in range(10)])
    statuses = [r.status for r in results]
    assert statuses.count("judged") >= 2 and statuses.count("budget") >= 5
    assert judge.budget.spent["r1"] <= 0.02
    assert len(fake.requests) == 2 * statuses.count("judged")  # no call for a skipped pair
    # Budgets are per rollout: another rollout still gets judged.
    [other] = run(Judge(settings_for(fake, judge_budget_usd=0.02), budget=judge.budget), [pair(99, rollout_id="r2")])
    assert other.status == "judged"


def test_never_more_than_the_concurrency_limit_in_flight(fake):
    fake.delay_s = 0.05
    judge = Judge(settings_for(fake, judge_concurrency=3))
    results = run(judge, [pair(i) for i in range(12)])
    assert all(r.status == "judged" for r in results)
    assert fake.max_in_flight == 3 and judge.stats.max_in_flight == 3


def test_sampling_and_unjudgeable_pairs_make_no_calls(fake):
    judge = Judge(settings_for(fake, judge_sample_rate=0.0))
    assert run(judge, [pair(1)])[0].status == "not_sampled"
    judge = Judge(settings_for(fake))
    assert run(judge, [pair(2, candidate=None, candidate_error="timeout")])[0].status == "not_judgeable"
    assert fake.requests == []
    assert sampled("e1", 0.5) == sampled("e1", 0.5)  # deterministic
    assert 0.45 < sum(sampled(f"e{i}", 0.5) for i in range(4000)) / 4000 < 0.55


def test_without_a_key_the_judge_is_disabled_with_one_log_line(caplog):
    with caplog.at_level(logging.WARNING):
        assert Judge.from_settings(Settings(anthropic_api_key="")) is None
    lines = [r.getMessage() for r in caplog.records if "judge disabled" in r.getMessage()]
    assert lines == ["judge disabled: ANTHROPIC_API_KEY is not set (shadow pairs are still analysed, not judged)"]


def test_a_model_without_a_price_disables_the_judge(caplog):
    with caplog.at_level(logging.WARNING):
        assert Judge.from_settings(Settings(anthropic_api_key="k", judge_model="claude-unknown-20990101")) is None
    assert any("no price" in r.getMessage() for r in caplog.records)


def test_pure_parts():
    assert combine("B", "A") == "candidate" and combine("A", "B") == "control"
    assert combine("A", "A") == "tie" and combine("tie", "A") == "tie" and combine("B", "tie") == "tie"
    ok = {"content": [{"type": "tool_use", "name": "record_verdict", "input": {"winner": "tie", "reason": "same"}}]}
    assert parse_verdict(ok) == ("tie", "same")
    two = {"content": ok["content"] * 2}
    with pytest.raises(ValueError, match="expected one record_verdict"):
        parse_verdict(two)
    stats = Judge(Settings(anthropic_api_key="k")).stats
    assert set(summary(stats)) >= {"pairs", "judged", "candidate_wins", "control_wins", "ties", "errors", "cost_usd"}


def test_a_429_with_only_retry_after_seconds_waits_that_long_then_succeeds(fake):
    import time

    judge = Judge(settings_for(fake))
    started = time.monotonic()
    [result] = run(judge, [pair(1, prompt="[429-retry-after-1]")])
    waited = time.monotonic() - started
    assert result.status == "judged" and result.judgment.winner == "candidate"
    assert judge.stats.rate_limited == 2 and result.judgment.retries == 2 and len(fake.requests) == 4
    assert waited >= 1.0  # retry-after: 1 means one whole second, not the 0.5 s default backoff


def test_a_restarted_judge_seeded_with_the_stored_spend_stays_within_the_budget(fake):
    limit, per_call = 0.02, (1000 * 1.0 + 50 * 5.0) / 1e6  # the fake bills 1000 in + 50 out per call

    def one_by_one(judge: Judge, indexes) -> list:  # as the worker's stream brings them
        return [run(judge, [pair(i)])[0] for i in indexes]

    first = Judge(settings_for(fake, judge_budget_usd=limit))
    assert [r.status for r in one_by_one(first, range(3))] == ["judged"] * 3
    in_flight = first.admit(pair(3))  # admitted, its calls billed, then the worker died
    assert not isinstance(in_flight, JudgeResult)
    stored = first.budget.committed("r1")  # what the worker stored: spent + reserved
    spent_before = (len(fake.requests) + 2) * per_call

    restarted = Judge(settings_for(fake, judge_budget_usd=limit), budget=Budget(limit))
    restarted.budget.seed("r1", stored)
    calls_before = len(fake.requests)
    statuses = [r.status for r in one_by_one(restarted, range(10, 30))]
    assert "judged" in statuses and statuses[-1] == "budget"
    assert spent_before + (len(fake.requests) - calls_before) * per_call <= limit
    # without the seed the same restart spends past the limit: the test can tell
    unseeded = Judge(settings_for(fake, judge_budget_usd=limit), budget=Budget(limit))
    calls_before = len(fake.requests)
    one_by_one(unseeded, range(30, 50))
    assert spent_before + (len(fake.requests) - calls_before) * per_call > limit


def test_the_reservation_covers_non_latin_text(fake):
    fake.input_tokens = None  # billed one token per character, as CJK text about is
    text = "这个答案比另一个更好" * 300  # 3,000 characters, 9,000 UTF-8 bytes
    cjk = pair(1, prompt=text, control=text, candidate=text + " GOOD")
    judge = Judge(settings_for(fake))
    reserved = reserve_estimate(
        cjk,
        judge.rubric_for("r1"),
        MODEL,
        judge.settings.judge_max_tokens,
        judge.settings.judge_max_answer_chars,
        judge.prices,
    )
    [result] = run(judge, [cjk])
    assert result.status == "judged" and result.judgment.input_tokens > 2 * 9_000
    assert result.cost_usd <= reserved


def test_seeding_a_budget_does_not_count_this_workers_own_reservations_twice():
    budget = Budget(1.0)
    assert budget.reserve("r1|0", 0.3)
    stored = budget.committed("r1|0")  # 0.3: what the worker wrote to its table before the call
    budget.seed("r1|0", stored)  # the key seeded again after a rebalance that kept it here
    budget.settle("r1|0", 0.3, 0.1)
    assert budget.committed("r1|0") == pytest.approx(0.1)  # not 0.3 + 0.1
    budget.seed("r1|0", 0.5)  # another worker meanwhile spent more: its figure wins
    assert budget.committed("r1|0") == pytest.approx(0.5)
