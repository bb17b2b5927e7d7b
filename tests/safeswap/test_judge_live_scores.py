"""Live judge scores: the request and its forced record_score call, parsing, sampling, the budget,
the judge against the fake Anthropic server (real HTTP, no key), and the per-variant statistics."""

from __future__ import annotations

import asyncio
import math

import pytest

from safeswap.core.live_scores import ROLE, LiveScoreAccumulator, merge, summarize, validate
from safeswap.core.stats import Mean, sequential_compare
from safeswap.judge import (
    DEFAULT_RUBRIC,
    SCORE_TOOL_CHOICE,
    Budget,
    Judge,
    MalformedScore,
    MalformedVerdict,
    parse_score,
    rubric_hash,
    score_request,
    score_reserve_estimate,
    scoreable,
)
from schemas import RolloutPlan, convert
from schemas.events import TraceEvent
from tests.safeswap.test_judge import MODEL, pair, settings_for
from tests.support.fake_anthropic import FakeAnthropic, trace_fields


@pytest.fixture
def fake():
    with FakeAnthropic() as server:
        yield server


def live(index: int, **kwargs) -> TraceEvent:
    return convert(TraceEvent, trace_fields(index, **kwargs))


def tool_reply(*calls: dict, stop_reason: str = "tool_use") -> dict:
    return {"content": list(calls), "stop_reason": stop_reason}


def score_call(arguments) -> dict:
    return {"type": "tool_use", "name": "record_score", "input": arguments}


# -- the request and the reply ---------------------------------------------------------------
def test_the_request_forces_record_score_shows_request_and_answer_but_not_the_variant():
    trace = live(1, variant="candidate", answer="the answer text", prompt="the question")
    request = score_request(trace, "RUBRIC-X", model=MODEL, max_tokens=300, max_chars=1000)
    assert request["tool_choice"] == SCORE_TOOL_CHOICE == {"type": "tool", "name": "record_score"}
    assert [tool["name"] for tool in request["tools"]] == ["record_score"]
    schema = request["tools"][0]["input_schema"]["properties"]["score"]
    assert (schema["type"], schema["minimum"], schema["maximum"]) == ("integer", 1, 10)
    assert request["model"] == MODEL and request["max_tokens"] == 300
    assert "RUBRIC-X" in request["system"] and "record_score" in request["system"]
    content = request["messages"][0]["content"]
    assert "<request>\nthe question 1\n</request>" in content and "<answer>\nthe answer text\n</answer>" in content
    assert "candidate" not in content and "control" not in content and "m-candidate" not in content


def test_long_texts_are_cut_in_the_request_and_in_the_reservation():
    trace = live(1, answer="x" * 5000)
    request = score_request(trace, "r", model=MODEL, max_tokens=100, max_chars=200)
    assert "[... 4800 characters cut]" in request["messages"][0]["content"]
    prices = {MODEL: (1.0, 5.0)}
    cut = score_reserve_estimate(trace, "r", MODEL, 100, 200, prices)
    whole = score_reserve_estimate(trace, "r", MODEL, 100, 10_000, prices)
    assert cut < whole
    # One call: (UTF-8 bytes of the cut texts + rubric + 400 overhead) in x $1 + 100 out x $5, per million.
    size = len("question 1") + len("x" * 200 + "\n[... 4800 characters cut]") + len("r")
    assert cut == pytest.approx(((size + 400) * 1.0 + 100 * 5.0) / 1e6)


def test_a_valid_score_is_parsed_and_a_whole_float_is_the_same_score():
    assert parse_score(tool_reply(score_call({"score": 7, "reason": "ok"}))) == (7, "ok")
    assert parse_score(tool_reply(score_call({"score": 7.0, "reason": ""}))) == (7, "")
    assert parse_score(tool_reply(score_call({"score": 1}))) == (1, "")  # reason optional


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        (tool_reply({"type": "text", "text": "I'd say 7"}, stop_reason="end_turn"), "expected one record_score"),
        (tool_reply(score_call({"score": 7}), score_call({"score": 8})), "got 2"),
        (tool_reply({"type": "tool_use", "name": "record_verdict", "input": {"winner": "A"}}), "got 0"),
        (tool_reply(score_call("7")), "not an object"),
        (tool_reply(score_call({"score": 11})), "from 1 to 10, got 11"),
        (tool_reply(score_call({"score": 0})), "got 0"),
        (tool_reply(score_call({"score": 7.5})), "got 7.5"),
        (tool_reply(score_call({"score": "7"})), "got '7'"),
        (tool_reply(score_call({"score": True})), "got True"),
        (tool_reply(score_call({"score": float("nan")})), "got nan"),
        (tool_reply(score_call({"reason": "no score"})), "got None"),
        (tool_reply(score_call({"score": 5, "reason": 3})), "reason must be a string"),
        ({"content": None, "stop_reason": "max_tokens"}, "content: empty"),
    ],
)
def test_a_reply_without_a_valid_score_is_malformed_never_guessed(reply, says):
    with pytest.raises(MalformedScore) as info:
        parse_score(reply)
    assert says in str(info.value)
    assert isinstance(info.value, MalformedVerdict)  # handled wherever a bad verdict is


def test_a_trace_without_both_texts_is_not_scoreable():
    assert scoreable(live(1))
    assert not scoreable(live(1, answer=None))
    assert not scoreable(live(1, answer="  \n"))
    assert not scoreable(live(1, prompt=None))


# -- admission: sampling and the budget -------------------------------------------------------
def test_sampling_is_by_trace_id_and_the_same_in_every_judge(fake):
    settings = settings_for(fake, judge_sample_rate=0.5, judge_live_sample_rate=0.5)
    first, second = Judge(settings), Judge(settings)
    assert first.live_sample_rate == 0.25
    traces = [live(i) for i in range(400)]
    picked = [not _skipped(first.admit_trace(t)) for t in traces]
    assert picked == [not _skipped(second.admit_trace(t)) for t in traces]  # a replay picks the same
    assert 60 < sum(picked) < 140  # about a quarter
    # The trace id decides, not the event id or the variant.
    again = [live(i, variant="control", event_id=f"other-{i}") for i in range(400)]
    assert picked == [not _skipped(Judge(settings).admit_trace(t)) for t in again]
    assert first.stats.live_not_sampled == 400 - sum(picked)
    off = Judge(settings_for(fake, judge_live_sample_rate=0.0))
    assert all(off.admit_trace(t).status == "not_sampled" for t in traces[:20])


def _skipped(admission) -> bool:
    return getattr(admission, "status", None) == "not_sampled"


def test_an_unscoreable_trace_is_counted_and_costs_nothing(fake):
    judge = Judge(settings_for(fake))
    result = asyncio.run(judge.score_trace(live(1, answer=None)))
    assert result.status == "not_scoreable" and "response_text" in result.reason
    assert judge.stats.live_not_scoreable == 1 and fake.requests == [] and judge.budget.committed("r1") == 0


def test_the_budget_refuses_a_score_that_does_not_fit_and_says_so(fake):
    judge = Judge(settings_for(fake))
    trace = live(1)
    worst = score_reserve_estimate(trace, DEFAULT_RUBRIC, MODEL, 400, 12_000, judge.prices)
    judge.budget = Budget(worst * 1.5)
    first = judge.admit_trace(trace, "r1|0", "canary")
    refused = judge.admit_trace(live(2), "r1|0", "canary")  # the first still holds its reservation
    assert first.reserved == pytest.approx(worst) and first.stage == "canary"
    assert refused.status == "budget" and "judge budget for r1|0" in refused.reason
    assert "a score may cost" in refused.reason
    assert judge.stats.live_budget_skipped == 1 and judge.budget.committed("r1|0") <= judge.budget.limit_usd
    assert fake.requests == []  # admission alone calls nothing


# -- the judge against the fake server ---------------------------------------------------------
def test_a_live_response_is_scored_by_one_forced_call_with_its_cost_and_rubric(fake):
    judge = Judge(settings_for(fake), rubrics={"r1": "RUBRIC FOR R1"})
    result = asyncio.run(judge.score_trace(live(3, answer="a GOOD answer"), "r1|2", "ramp"))
    assert result.status == "scored"
    [request] = fake.requests
    assert request["tool_choice"] == {"type": "tool", "name": "record_score"} and request["model"] == MODEL
    assert "RUBRIC FOR R1" in request["system"]
    score = result.score
    assert score.score == 9 and score.reason == "scripted score"
    assert (score.event_id, score.trace_event_id, score.trace_id) == ("t-3:score", "t-3", "tr3")
    assert (score.rollout_id, score.variant, score.user_id, score.stage) == ("r1", "candidate", "u3", "ramp")
    assert score.ts == live(3).ts and score.model_version == "m-candidate" and score.judge_model == MODEL
    assert score.rubric_hash == rubric_hash("RUBRIC FOR R1")
    # Cost from usage and the price table: 1000 in x $1 + 50 out x $5, per million; the reservation settled.
    assert score.cost_usd == pytest.approx((1000 * 1.0 + 50 * 5.0) / 1e6) == result.cost_usd
    assert judge.budget.committed("r1|2") == pytest.approx(score.cost_usd)
    assert judge.stats.live_scored == 1 and judge.stats.calls == 1


@pytest.mark.parametrize("answer", ["[malformed]", "[score-11]", "[score-0]", "[score-text]"])
def test_a_malformed_reply_is_counted_paid_for_and_not_a_score(fake, answer):
    judge = Judge(settings_for(fake))
    result = asyncio.run(judge.score_trace(live(1, answer=answer)))
    assert result.status == "malformed" and result.score is None
    assert "record_score" in result.reason and "judge reply without a valid score" in result.reason
    assert result.cost_usd > 0 and judge.budget.committed("r1") == pytest.approx(result.cost_usd)
    assert judge.stats.live_malformed == 1 and judge.stats.live_scored == 0


def test_a_429_is_retried_and_a_persistent_529_is_an_error_with_the_reservation_released(fake):
    judge = Judge(settings_for(fake, judge_max_retries=1))

    async def both():
        return await asyncio.gather(
            judge.score_trace(live(1, answer="[429-once] GOOD")), judge.score_trace(live(2, answer="[529-always]"))
        )

    retried, failed = asyncio.run(both())
    assert retried.status == "scored" and retried.score.retries == 1 and retried.score.score == 9
    assert failed.status == "error" and "overloaded" in failed.reason and failed.cost_usd == 0
    assert judge.stats.live_errors == 1 and judge.stats.rate_limited == 1
    # Only what was paid stays committed: the failed call's reservation is released.
    assert judge.budget.committed("r1") == pytest.approx(retried.cost_usd)


def test_live_scores_and_pairs_share_the_concurrency_limit(fake):
    fake.delay_s = 0.05
    judge = Judge(settings_for(fake, judge_concurrency=2))

    async def many():
        scores = [judge.score_trace(live(i, answer="GOOD")) for i in range(6)]
        return await asyncio.gather(*scores, *(judge.judge_pair(pair(i)) for i in range(3)))

    results = asyncio.run(many())
    assert [r.status for r in results] == ["scored"] * 6 + ["judged"] * 3
    assert len(fake.requests) == 6 + 2 * 3
    assert fake.max_in_flight <= 2 and judge.stats.max_in_flight <= 2


# -- statistics ---------------------------------------------------------------------------------
PLAN = RolloutPlan(rollout_id="r1", stakes="low", stages=[{"name": "canary", "percent": 50}], min_users_per_arm=3)


def fold(accumulator: LiveScoreAccumulator, variant: str, scores: dict[str, list[int]], ts: int = 1000) -> None:
    for user, values in scores.items():
        for value in values:
            accumulator.add_trace(variant, ts)
            accumulator.add_result(variant, "scored", user, value, 0.001)


def test_users_are_the_unit_each_user_mean_counts_once():
    accumulator = LiveScoreAccumulator()
    fold(accumulator, "control", {"a": [2, 4], "b": [9], "c": [6, 6, 6, 6]})
    control = accumulator.to_dict()["variants"]["control"]
    assert Mean.from_dict(control["score"]) == Mean.from_values([3.0, 9.0, 6.0])  # users' means: 3, 9, 6
    assert control["scored"] == 7 and control["traces"] == 7 and control["scores"] == {"2": 1, "4": 1, "9": 1, "6": 4}
    assert control["cost_usd"] == pytest.approx(0.007)


def test_partitions_merge_to_the_statistics_of_all_their_users():
    parts = [LiveScoreAccumulator() for _ in range(3)]
    whole = LiveScoreAccumulator()
    rows = [("control", f"u{i}", 3 + i % 5) for i in range(30)] + [("candidate", f"v{i}", 1 + i % 4) for i in range(21)]
    for index, (variant, user, score) in enumerate(rows):
        for accumulator in (parts[int(user[1:]) % 3], whole):  # a user lives on one partition
            accumulator.add_trace(variant, 1000 + index)
            accumulator.add_result(variant, "scored", user, score)
    merged = merge([p.to_dict() for p in parts] + [{}])
    expected = whole.to_dict()
    for variant in ("control", "candidate"):
        mine, theirs = merged["variants"][variant], expected["variants"][variant]
        assert Mean.from_dict(mine["score"]).n == Mean.from_dict(theirs["score"]).n
        assert Mean.from_dict(mine["score"]).total == pytest.approx(Mean.from_dict(theirs["score"]).total)
        assert mine["scores"] == theirs["scores"] and mine["scored"] == theirs["scored"]
    assert merged["ts"] == expected["ts"] == 1000 + len(rows) - 1


def test_the_summary_gives_means_counts_and_the_always_valid_interval_of_the_difference():
    accumulator = LiveScoreAccumulator()
    control = {f"c{i}": [7 + i % 3] for i in range(40)}
    candidate = {f"k{i}": [4 + i % 3, 5] for i in range(30)}
    fold(accumulator, "control", control)
    fold(accumulator, "candidate", candidate)
    accumulator.add_trace("candidate", 1000)
    accumulator.add_result("candidate", "not_scoreable")
    accumulator.add_trace("control", 1000)
    accumulator.add_result("control", "error")
    summary = summarize(merge([accumulator.to_dict()]), PLAN)
    assert summary["role"] == ROLE == "monitored, not a decision input" and summary["scale"] == [1, 10]
    a = Mean.from_values([sum(v) / len(v) for v in control.values()])
    b = Mean.from_values([sum(v) / len(v) for v in candidate.values()])
    expected = sequential_compare(a, b, alpha=PLAN.alpha, n_tune=PLAN.n_tune, difference="absolute")
    got = summary["difference"]
    assert got["estimate"] == pytest.approx(b.estimate - a.estimate)
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(expected.ci_low), pytest.approx(expected.ci_high))
    assert got["ci_high"] < 0 and (got["users_control"], got["users_candidate"]) == (40, 30)
    assert "candidate - control" in summary["reason"] and "always-valid 95% interval" in summary["reason"]
    cand = summary["variants"]["candidate"]
    assert cand["mean"] == pytest.approx(b.estimate) and (cand["scored"], cand["users"]) == (60, 30)
    assert cand["not_scoreable"] == 1 and cand["traces"] == 61 and sum(cand["scores"].values()) == 60
    assert summary["variants"]["control"]["errors"] == 1
    assert summary["budget_skipped"] == 0 and summary["budget"] == ""


def test_no_interval_below_the_plans_users_per_arm_and_a_spent_budget_is_said():
    accumulator = LiveScoreAccumulator()
    fold(accumulator, "control", {"a": [5], "b": [6], "c": [7]})
    fold(accumulator, "candidate", {"x": [5], "y": [6]})
    for _ in range(4):
        accumulator.add_trace("candidate", 2000)
        accumulator.add_result("candidate", "budget")
    summary = summarize(merge([accumulator.to_dict()]), PLAN)
    assert summary["difference"] is None
    assert summary["reason"] == "no interval yet: 2 users scored in the smaller arm, needs 3"
    assert summary["budget_skipped"] == 4 and "judge budget reached: 4 sampled responses" in summary["budget"]
    # With few users the interval is wide: it is cut to the possible differences, -9..+9.
    fold(accumulator, "candidate", {"z": [10]})
    wide = summarize(merge([accumulator.to_dict()]), PLAN)["difference"]
    assert wide["ci_low"] == -9 and wide["ci_high"] == 9 and wide["estimate"] == pytest.approx(7 - 6)
    empty = summarize(merge([]), PLAN)
    assert empty["variants"]["control"]["mean"] is None and empty["difference"] is None


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"variants": []},
        {"variants": {"control": 3}},
        {"variants": {"control": {"scored": -1}}},
        {"variants": {"control": {"scored": 1.5}}},
        {"variants": {"control": {"cost_usd": float("nan")}}},
        {"variants": {"control": {"scores": {"7": "x"}}}},
        {"variants": {"control": {"score": {"kind": "mean", "n": 2, "total": 10.0, "total_sq": 1.0}}}},
    ],
)
def test_a_malformed_live_judge_dict_is_refused_with_a_reason(bad):
    with pytest.raises(ValueError) as info:
        validate(bad)
    assert "live_judge" in str(info.value)


def test_an_unknown_status_is_a_programming_error_not_a_silent_count():
    with pytest.raises(ValueError, match="unknown live judge status"):
        LiveScoreAccumulator().add_result("control", "judged")
    assert math.isfinite(summarize(merge([]), PLAN)["cost_usd"])
