"""The LLM judge: which answer to a real request is better, control's or the candidate's?

Pure parts (prompt, verdict parsing, order combination, cost, sampling, budget)
are plain functions; :class:`Judge` adds the Anthropic client around them. The
judge agent (agents/judge.py) and ``safeswap judge PAIRS.jsonl`` use the same
:class:`Judge`.

Rules (docs/shadow.md):

- A pinned judge model (``SAFESWAP_JUDGE_MODEL``, a snapshot id) and a rubric
  per rollout (``SAFESWAP_JUDGE_RUBRICS`` file, ``"*"`` for the default).
- Every pair is judged twice: control shown as answer A, then the candidate as
  answer A. Both say the same variant: that variant wins; they disagree (the
  position decided) or either says tie: tie.
- The verdict comes back only through a forced tool call ``record_verdict``
  with ``{"winner": "A"|"B"|"tie", "reason": "..."}``. A reply without a valid
  one raises :class:`MalformedVerdict` (the pair goes to the DLQ): never guessed.
- At most ``judge_concurrency`` API calls are in flight (a semaphore around each
  HTTP attempt; it is released while waiting to retry).
- 429 (rate limit), 529 (overloaded), other 5xx, timeouts and connection errors
  are retried up to ``judge_max_retries`` times, waiting ``retry-after-ms`` /
  ``retry-after`` when the API gives one (capped at ``judge_max_retry_after_s``),
  else 0.5 s x 2^n capped at 8 s. The SDK's own retries are off
  (``max_retries=0``) so every wait is ours, counted and capped.
- A per-rollout budget in USD: before a pair is judged its worst-case cost (both
  calls, input estimated at 1 token per UTF-8 byte, output at
  ``judge_max_tokens``) is reserved; a pair that does not fit is not judged
  (``budget_skipped``). The actual cost, from ``usage`` and the price table,
  replaces the reservation when the calls return. ``Budget.committed`` (spent +
  reserved) is what a worker stores to survive a restart; ``Budget.seed`` gives
  it back to a new judge (agents/judge.py).

Live scores (docs/shadow.md "Live judge scores"): in canary and ramp the same judge
scores live responses of both variants, one at a time, against the same rubric:

- sampled by a hash of the trace_id at ``judge_sample_rate x judge_live_sample_rate``
  (a replay picks the same responses); a trace without ``prompt_text`` and
  ``response_text`` is not scoreable and is counted as such;
- an absolute score from 1 (fails the user) to 10 (could not be better), only
  through a forced tool call ``record_score`` with ``{"score": 1..10, "reason":
  "..."}``; a reply without a valid one raises :class:`MalformedScore`;
- the same pinned model, budget (one call's worst case reserved before it), concurrency
  limit and retries as the pairs. The scores are monitored, never a decision input.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safeswap.core.plan import is_pinned
from schemas.events import LIVE_SCORE_MAX, LIVE_SCORE_MIN, Judgment, LiveScore, ShadowPair, TraceEvent
from streams.settings import Settings

log = logging.getLogger(__name__)

TOOL_NAME = "record_verdict"
VERDICT_TOOL: dict[str, Any] = {
    "name": TOOL_NAME,
    "description": "Record which answer better serves the user's request under the rubric.",
    "input_schema": {
        "type": "object",
        "properties": {
            "winner": {
                "type": "string",
                "enum": ["A", "B", "tie"],
                "description": "A or B for the better answer; tie when neither is better.",
            },
            "reason": {"type": "string", "description": "One or two sentences: the deciding difference."},
        },
        "required": ["winner", "reason"],
    },
}
TOOL_CHOICE: dict[str, str] = {"type": "tool", "name": TOOL_NAME}

DEFAULT_RUBRIC = (
    "Judge which answer better serves the user who sent the request: correct and complete first, "
    "then following the request's instructions and format (valid JSON when JSON is asked for), then "
    "concise and clear. A refusal of a reasonable request is worse than a helpful answer; a refusal of "
    "a harmful request is better than compliance. Length and style are not merits by themselves."
)
SYSTEM_PROMPT = (
    "You are an impartial judge comparing two answers, A and B, to the same user request. "
    "The order of the answers is random: do not let it influence you. Rubric:\n{rubric}\n"
    f"Give your verdict only by calling the {TOOL_NAME} tool."
)

SCORE_TOOL_NAME = "record_score"
SCORE_TOOL: dict[str, Any] = {
    "name": SCORE_TOOL_NAME,
    "description": "Record how well the answer serves the user's request under the rubric.",
    "input_schema": {
        "type": "object",
        "properties": {
            "score": {
                "type": "integer",
                "minimum": LIVE_SCORE_MIN,
                "maximum": LIVE_SCORE_MAX,
                "description": f"{LIVE_SCORE_MIN} (fails the user) to {LIVE_SCORE_MAX} (could not be better).",
            },
            "reason": {"type": "string", "description": "One or two sentences: what decided the score."},
        },
        "required": ["score", "reason"],
    },
}
SCORE_TOOL_CHOICE: dict[str, str] = {"type": "tool", "name": SCORE_TOOL_NAME}
# Anchors keep scores comparable between requests; rubrics are often written for comparing
# two answers, so the judge is told to apply their criteria to the one answer shown.
SCORE_SYSTEM_PROMPT = (
    "You are an impartial judge grading one answer to a user request. Apply the rubric's criteria "
    "to this answer alone (if the rubric speaks of comparing answers, judge this answer by the same "
    f"standards). Score from {LIVE_SCORE_MIN} to {LIVE_SCORE_MAX}: 1-2 fails the user (wrong, harmful, "
    "or refuses a reasonable request), 3-4 poor, 5-6 acceptable with clear flaws, 7-8 good, 9-10 "
    f"excellent. Rubric:\n{{rubric}}\nGive your score only by calling the {SCORE_TOOL_NAME} tool."
)

# USD per million tokens (input, output). Check against the current price list;
# SAFESWAP_JUDGE_PRICES adds or overrides entries.
BUILTIN_PRICES: dict[str, tuple[float, float]] = {
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-sonnet-5": (2.0, 10.0),
    "claude-sonnet-4-5-20250929": (3.0, 15.0),  # end of life 2026-11-30
    "claude-sonnet-4-20250514": (3.0, 15.0),
    "claude-haiku-4-5-20251001": (1.0, 5.0),
    "claude-3-5-haiku-20241022": (0.8, 4.0),
    "claude-opus-4-1-20250805": (15.0, 75.0),
}
# Input tokens are estimated at 1 per UTF-8 byte when reserving budget: a byte-level
# BPE token covers at least one byte, so this bounds every script (English runs about
# 4 characters a token, CJK about 1 character but 3 bytes; 1 token per 2 characters
# under-reserved CJK text, and a restarted budget then overspent).
BYTES_PER_TOKEN_ESTIMATE = 1.0
PROMPT_OVERHEAD_TOKENS = 400  # system prompt, tool definition, tags
MAX_BACKOFF_S = 8.0


class MalformedVerdict(ValueError):
    """The judge replied without a valid ``record_verdict`` call."""


class MalformedScore(MalformedVerdict):
    """The judge replied without a valid ``record_score`` call."""


class JudgeCallError(RuntimeError):
    """An API call that failed for good (after retries, or not retryable)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind  # rate_limited | overloaded | timeout | connection | api_error


class JudgeUnavailable(RuntimeError):
    """The judge cannot run: no key, or a model missing from the price table."""


# -- pure parts ----------------------------------------------------------------------
def load_mapping(path: str) -> dict[str, Any]:
    """A JSON or YAML file holding one mapping ("" -> {})."""
    if not path:
        return {}
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except ValueError:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def price_table(path: str = "") -> dict[str, tuple[float, float]]:
    """Built-in prices plus the file's: ``{model: {input_per_mtok: x, output_per_mtok: y}}``."""
    prices = dict(BUILTIN_PRICES)
    for model, entry in load_mapping(path).items():
        try:
            prices[str(model)] = (float(entry["input_per_mtok"]), float(entry["output_per_mtok"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{path}: {model}: give input_per_mtok and output_per_mtok (USD per million tokens)"
            ) from None
    return prices


def call_cost(model: str, input_tokens: int, output_tokens: int, prices: dict[str, tuple[float, float]]) -> float:
    per_in, per_out = prices[model]
    return (input_tokens * per_in + output_tokens * per_out) / 1_000_000


def rubric_hash(rubric: str) -> str:
    return hashlib.sha256(rubric.encode()).hexdigest()[:12]


def sampled(event_id: str, rate: float) -> bool:
    """Deterministic sampling by event id: a replayed pair gets the same answer."""
    if rate >= 1:
        return True
    if rate <= 0:
        return False
    bucket = int.from_bytes(hashlib.sha256(event_id.encode()).digest()[:8], "big") % 1_000_000
    return bucket < rate * 1_000_000


def scoreable(trace: TraceEvent) -> bool:
    """A live response can be scored only with the request and the answer's text."""
    return bool((trace.prompt_text or "").strip()) and bool((trace.response_text or "").strip())


def judgeable(pair: ShadowPair) -> bool:
    """Both variants answered (a refusal is an answer); errors are the tails' business."""
    return all(side.response_text and side.error in ("none", "refusal") for side in (pair.control, pair.candidate))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n[... {len(text) - limit} characters cut]"


def judge_request(
    pair: ShadowPair, rubric: str, candidate_first: bool, *, model: str, max_tokens: int, max_chars: int
) -> dict[str, Any]:
    """The ``messages.create`` arguments for one order (A = the first answer shown)."""
    first, second = (pair.candidate, pair.control) if candidate_first else (pair.control, pair.candidate)
    fmt = "\n(The user's application expects the answer to be valid JSON.)" if pair.expects_json else ""
    content = (
        f"<request>\n{_cut(pair.prompt_text, max_chars)}\n</request>{fmt}\n\n"
        f"<answer_A>\n{_cut(first.response_text or '', max_chars)}\n</answer_A>\n\n"
        f"<answer_B>\n{_cut(second.response_text or '', max_chars)}\n</answer_B>"
    )
    return {
        "model": model,
        "max_tokens": max_tokens,
        "system": SYSTEM_PROMPT.format(rubric=rubric),
        "messages": [{"role": "user", "content": content}],
        "tools": [VERDICT_TOOL],
        "tool_choice": TOOL_CHOICE,
    }


def score_request(trace: TraceEvent, rubric: str, *, model: str, max_tokens: int, max_chars: int) -> dict[str, Any]:
    """The ``messages.create`` arguments that score one live response. The variant is not
    shown: both are graded blind, by the same words."""
    content = (
        f"<request>\n{_cut(trace.prompt_text or '', max_chars)}\n</request>\n\n"
        f"<answer>\n{_cut(trace.response_text or '', max_chars)}\n</answer>"
    )
    return {
        "model": model,
        "max_tokens": max_tokens,
        "system": SCORE_SYSTEM_PROMPT.format(rubric=rubric),
        "messages": [{"role": "user", "content": content}],
        "tools": [SCORE_TOOL],
        "tool_choice": SCORE_TOOL_CHOICE,
    }


def _tool_input(message: Any, name: str, malformed: type[MalformedVerdict]) -> dict[str, Any]:
    """The input of the reply's one ``name`` tool call; ``malformed`` otherwise."""
    content = _get(message, "content") or []
    calls = [block for block in content if _get(block, "type") == "tool_use" and _get(block, "name") == name]
    if len(calls) != 1:
        kinds = [f"{_get(b, 'type')}:{_get(b, 'name') or ''}".rstrip(":") for b in content]
        raise malformed(
            f"expected one {name} tool call, got {len(calls)} (content: {kinds or 'empty'}, "
            f"stop_reason {_get(message, 'stop_reason')!r})"
        )
    arguments = _get(calls[0], "input")
    if not isinstance(arguments, dict):
        raise malformed(f"{name} input is not an object: {arguments!r:.200}")
    return arguments


def parse_score(message: Any) -> tuple[int, str]:
    """(score 1..10, reason) from a Message (SDK object or dict); MalformedScore otherwise."""
    arguments = _tool_input(message, SCORE_TOOL_NAME, MalformedScore)
    score, reason = arguments.get("score"), arguments.get("reason", "")
    # 7.0 is the integer 7 written as JSON may; "7", true or 7.5 are not scores.
    whole = isinstance(score, int) or (isinstance(score, float) and math.isfinite(score) and score.is_integer())
    if isinstance(score, bool) or not whole or not LIVE_SCORE_MIN <= score <= LIVE_SCORE_MAX:
        raise MalformedScore(
            f"{SCORE_TOOL_NAME} score must be a whole number from {LIVE_SCORE_MIN} to {LIVE_SCORE_MAX}, "
            f"got {score!r:.100}"
        )
    if not isinstance(reason, str):
        raise MalformedScore(f"{SCORE_TOOL_NAME} reason must be a string, got {type(reason).__name__}")
    return int(score), reason


def parse_verdict(message: Any) -> tuple[str, str]:
    """("A"|"B"|"tie", reason) from a Message (SDK object or dict); MalformedVerdict otherwise."""
    arguments = _tool_input(message, TOOL_NAME, MalformedVerdict)
    winner, reason = arguments.get("winner"), arguments.get("reason", "")
    if winner not in ("A", "B", "tie"):
        raise MalformedVerdict(f"{TOOL_NAME} winner must be A, B or tie, got {winner!r:.100}")
    if not isinstance(reason, str):
        raise MalformedVerdict(f"{TOOL_NAME} reason must be a string, got {type(reason).__name__}")
    return winner, reason


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def combine(control_first: str, candidate_first: str) -> str:
    """The pair's winner from both orders: agreement wins, disagreement or any tie is a tie."""
    first = {"A": "control", "B": "candidate"}.get(control_first, "tie")
    second = {"A": "candidate", "B": "control"}.get(candidate_first, "tie")
    return first if first == second else "tie"


def _worst_case(
    texts, rubric: str, model: str, max_tokens: int, max_chars: int, prices: dict[str, tuple[float, float]]
) -> float:
    """Worst-case USD of one call showing ``texts`` (each cut to ``max_chars``) and the rubric."""
    size = sum(len(_cut(t or "", max_chars).encode()) for t in texts) + len(rubric.encode())
    input_tokens = math.ceil(size / BYTES_PER_TOKEN_ESTIMATE) + PROMPT_OVERHEAD_TOKENS
    return call_cost(model, input_tokens, max_tokens, prices)


def reserve_estimate(
    pair: ShadowPair, rubric: str, model: str, max_tokens: int, max_chars: int, prices: dict[str, tuple[float, float]]
) -> float:
    """Worst-case USD of judging a pair (both orders)."""
    texts = (pair.prompt_text, pair.control.response_text, pair.candidate.response_text)
    return 2 * _worst_case(texts, rubric, model, max_tokens, max_chars, prices)


def score_reserve_estimate(
    trace: TraceEvent, rubric: str, model: str, max_tokens: int, max_chars: int, prices: dict[str, tuple[float, float]]
) -> float:
    """Worst-case USD of scoring one live response (one call)."""
    return _worst_case((trace.prompt_text, trace.response_text), rubric, model, max_tokens, max_chars, prices)


class Budget:
    """USD per rollout: reserve before calls, settle with the actual cost after."""

    def __init__(self, limit_usd: float):
        self.limit_usd = float(limit_usd)
        self.spent: dict[str, float] = {}
        self.reserved: dict[str, float] = {}

    def remaining(self, rollout_id: str) -> float:
        return self.limit_usd - self.spent.get(rollout_id, 0.0) - self.reserved.get(rollout_id, 0.0)

    def reserve(self, rollout_id: str, amount: float) -> bool:
        if amount > self.remaining(rollout_id):
            return False
        self.reserved[rollout_id] = self.reserved.get(rollout_id, 0.0) + amount
        return True

    def settle(self, rollout_id: str, reserved: float, actual: float) -> None:
        self.reserved[rollout_id] = max(0.0, self.reserved.get(rollout_id, 0.0) - reserved)
        self.spent[rollout_id] = self.spent.get(rollout_id, 0.0) + actual

    def committed(self, rollout_id: str) -> float:
        """Spent plus reserved: the most that may have been spent, what a worker stores."""
        return self.spent.get(rollout_id, 0.0) + self.reserved.get(rollout_id, 0.0)

    def seed(self, rollout_id: str, committed_usd: float) -> None:
        """Take over what the key's previous owner stored (spent + reserved; the larger count
        wins). This worker's own reservations still in flight are in that figure already:
        they are not counted twice when they settle."""
        stored = float(committed_usd) - self.reserved.get(rollout_id, 0.0)
        self.spent[rollout_id] = max(self.spent.get(rollout_id, 0.0), stored)


def retry_after_s(headers: Any, cap_s: float) -> float | None:
    """Seconds the API asked us to wait (retry-after-ms, then retry-after), capped; None if it did not say."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            return max(0.0, min(float(raw) * scale, cap_s))
        except ValueError:
            continue
    return None


# -- the client around it ------------------------------------------------------------
@dataclass
class JudgeStats:
    pairs: int = 0
    judged: int = 0
    candidate_wins: int = 0
    control_wins: int = 0
    ties: int = 0
    errors: int = 0  # API failures after retries
    malformed: int = 0  # replies without a valid record_verdict
    not_sampled: int = 0
    not_judgeable: int = 0  # a side has no answer (error/timeout): the tails count it
    budget_skipped: int = 0
    calls: int = 0  # HTTP attempts
    retries: int = 0
    rate_limited: int = 0  # 429 answers seen
    overloaded: int = 0  # 529 answers seen
    timeouts: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    cost_usd: float = 0.0  # pairs and live scores
    # Live responses (canary and ramp) offered to the judge, and what became of them.
    live_traces: int = 0
    live_scored: int = 0
    live_not_sampled: int = 0
    live_not_scoreable: int = 0  # no prompt_text or response_text
    live_budget_skipped: int = 0
    live_malformed: int = 0  # replies without a valid record_score
    live_errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JudgeResult:
    """What happened to one pair: a judgment, or why there is none."""

    status: str  # judged | scored | malformed | error | not_sampled | not_judgeable | not_scoreable | budget
    judgment: Judgment | None = None
    reason: str = ""
    cost_usd: float = 0.0
    score: LiveScore | None = None  # a live response's score (status "scored")


@dataclass
class Admission:
    """A pair let through sampling, the judgeable check and the budget: its reservation is made."""

    pair: ShadowPair
    rubric: str
    payer: str
    reserved: float


@dataclass
class ScoreAdmission:
    """A live response let through sampling, the scoreable check and the budget: its reservation is made."""

    trace: TraceEvent
    rubric: str
    payer: str
    reserved: float
    stage: str = ""


@dataclass
class _CallOutcome:
    verdict: str
    reason: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    retries: int


class Judge:
    """One AsyncAnthropic client, a concurrency limit, a budget and a price table.

    ``Judge.from_settings(settings)`` returns None (after one clear log line)
    when the judge cannot run, so the caller carries on without it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        client: Any = None,
        prices: dict[str, tuple[float, float]] | None = None,
        rubrics: dict[str, str] | None = None,
        budget: Budget | None = None,
        sample_rate: float | None = None,
        live_sample_rate: float | None = None,
    ):
        self.settings = settings
        self.model = settings.judge_model
        self.prices = prices if prices is not None else price_table(settings.judge_prices)
        if self.model not in self.prices:
            raise JudgeUnavailable(
                f"judge model {self.model!r} has no price in the table (add it with "
                "SAFESWAP_JUDGE_PRICES): without one the budget cannot be kept"
            )
        if not is_pinned(self.model):
            log.warning(
                "judge model %r is an alias, not a pinned snapshot: its verdicts can move when the alias "
                "does (set SAFESWAP_JUDGE_MODEL to a snapshot such as claude-sonnet-4-6)",
                self.model,
            )
        self.rubrics = (
            rubrics
            if rubrics is not None
            else {str(k): str(v) for k, v in load_mapping(settings.judge_rubrics).items()}
        )
        self.budget = budget or Budget(settings.judge_budget_usd)
        self.sample_rate = settings.judge_sample_rate if sample_rate is None else sample_rate
        self.live_sample_rate = (
            settings.judge_sample_rate * settings.judge_live_sample_rate
            if live_sample_rate is None
            else live_sample_rate
        )
        self.stats = JudgeStats()
        self._limit = asyncio.Semaphore(max(1, settings.judge_concurrency))
        self._client = client
        self._owns_client = client is None

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Judge | None:
        if not settings.anthropic_api_key:
            log.warning("judge disabled: ANTHROPIC_API_KEY is not set (shadow pairs are still analysed, not judged)")
            return None
        try:
            return cls(settings, **kwargs)
        except (JudgeUnavailable, ValueError, OSError) as exc:
            log.warning("judge disabled: %s", exc)
            return None

    @property
    def client(self) -> Any:
        if self._client is None:
            from anthropic import AsyncAnthropic

            self._client = AsyncAnthropic(
                api_key=self.settings.anthropic_api_key,
                base_url=self.settings.anthropic_base_url or None,
                timeout=self.settings.judge_timeout_s,
                max_retries=0,  # ours: counted, capped, and the semaphore is free while waiting
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.close()
            self._client = None

    def rubric_for(self, rollout_id: str) -> str:
        return self.rubrics.get(rollout_id) or self.rubrics.get("*") or DEFAULT_RUBRIC

    # -- one pair --------------------------------------------------------------------
    async def judge_pair(self, pair: ShadowPair, budget_key: str | None = None) -> JudgeResult:
        """Judge one pair in both orders; never raises for API or verdict trouble.

        ``budget_key``: whose budget pays (default the rollout; the agent uses
        rollout and partition, each with its share of the rollout's budget)."""
        admission = self.admit(pair, budget_key)
        if isinstance(admission, JudgeResult):
            return admission
        return await self.judge_admitted(admission)

    def admit(self, pair: ShadowPair, budget_key: str | None = None) -> Admission | JudgeResult:
        """Sampling, the judgeable check and the budget reservation, at once (no await): the
        agent stores the reservation before any call is made (agents/judge.py)."""
        self.stats.pairs += 1
        if not sampled(pair.event_id, self.sample_rate):
            self.stats.not_sampled += 1
            return JudgeResult("not_sampled")
        if not judgeable(pair):
            self.stats.not_judgeable += 1
            return JudgeResult("not_judgeable", reason="a side has no answer")
        rubric = self.rubric_for(pair.rollout_id)
        settings = self.settings
        reserved = reserve_estimate(
            pair, rubric, self.model, settings.judge_max_tokens, settings.judge_max_answer_chars, self.prices
        )
        payer = budget_key or pair.rollout_id
        if (refused := self._reserve(payer, reserved, "a pair")) is not None:
            self.stats.budget_skipped += 1
            return refused
        return Admission(pair, rubric, payer, reserved)

    def _reserve(self, payer: str, reserved: float, what: str) -> JudgeResult | None:
        """Reserve ``reserved`` USD of ``payer``'s budget; the refusal when it does not fit."""
        if self.budget.reserve(payer, reserved):
            return None
        return JudgeResult(
            "budget",
            reason=f"judge budget for {payer}: {self.budget.remaining(payer):.4f} USD left, {what} may cost {reserved:.4f}",
        )

    async def judge_admitted(self, admission: Admission) -> JudgeResult:
        """Both orders of an admitted pair; settles its reservation with the actual cost."""
        pair, rubric, payer, reserved = admission.pair, admission.rubric, admission.payer, admission.reserved
        outcomes = await asyncio.gather(
            self._judge_order(pair, rubric, False), self._judge_order(pair, rubric, True), return_exceptions=True
        )
        cost = sum(o.cost_usd for o in outcomes if isinstance(o, _CallOutcome))
        cost += sum(getattr(o, "cost_usd", 0.0) for o in outcomes if isinstance(o, MalformedVerdict))
        self.budget.settle(payer, reserved, cost)
        self.stats.cost_usd += cost
        for outcome in outcomes:
            if isinstance(outcome, MalformedVerdict):
                self.stats.malformed += 1
                return JudgeResult("malformed", reason=f"judge reply without a valid verdict: {outcome}", cost_usd=cost)
        for outcome in outcomes:
            if isinstance(outcome, JudgeCallError):
                self.stats.errors += 1
                return JudgeResult("error", reason=f"judge call failed: {outcome}", cost_usd=cost)
            if isinstance(outcome, BaseException):
                self.stats.errors += 1
                return JudgeResult("error", reason=f"judge call failed: {outcome!r}", cost_usd=cost)
        control_first, candidate_first = outcomes
        winner = combine(control_first.verdict, candidate_first.verdict)
        self.stats.judged += 1
        if winner == "candidate":
            self.stats.candidate_wins += 1
        elif winner == "control":
            self.stats.control_wins += 1
        else:
            self.stats.ties += 1
        judgment = Judgment(
            event_id=f"{pair.event_id}:judge",
            ts=pair.ts,
            rollout_id=pair.rollout_id,
            pair_event_id=pair.event_id,
            user_id=pair.user_id,
            request_id=pair.request_id,
            judge_model=self.model,
            rubric_hash=rubric_hash(rubric),
            winner=winner,
            verdict_control_first=control_first.verdict,
            verdict_candidate_first=candidate_first.verdict,
            reason_control_first=control_first.reason,
            reason_candidate_first=candidate_first.reason,
            input_tokens=control_first.input_tokens + candidate_first.input_tokens,
            output_tokens=control_first.output_tokens + candidate_first.output_tokens,
            cost_usd=cost,
            retries=control_first.retries + candidate_first.retries,
        )
        return JudgeResult("judged", judgment=judgment, cost_usd=cost)

    # -- one live response -----------------------------------------------------------------
    async def score_trace(self, trace: TraceEvent, budget_key: str | None = None, stage: str = "") -> JudgeResult:
        """Score one live response; never raises for API or reply trouble."""
        admission = self.admit_trace(trace, budget_key, stage)
        if isinstance(admission, JudgeResult):
            return admission
        return await self.score_admitted(admission)

    def admit_trace(
        self, trace: TraceEvent, budget_key: str | None = None, stage: str = ""
    ) -> ScoreAdmission | JudgeResult:
        """Sampling (by trace_id), the scoreable check and the budget reservation, at once (no
        await), like :meth:`admit` for pairs; ``stage`` is the rollout's, for the record."""
        self.stats.live_traces += 1
        if not sampled(trace.trace_id, self.live_sample_rate):
            self.stats.live_not_sampled += 1
            return JudgeResult("not_sampled")
        if not scoreable(trace):
            self.stats.live_not_scoreable += 1
            return JudgeResult("not_scoreable", reason="the trace carries no prompt_text or response_text")
        rubric = self.rubric_for(trace.rollout_id)
        settings = self.settings
        reserved = score_reserve_estimate(
            trace, rubric, self.model, settings.judge_max_tokens, settings.judge_max_answer_chars, self.prices
        )
        payer = budget_key or trace.rollout_id
        if (refused := self._reserve(payer, reserved, "a score")) is not None:
            self.stats.live_budget_skipped += 1
            return refused
        return ScoreAdmission(trace, rubric, payer, reserved, stage)

    async def score_admitted(self, admission: ScoreAdmission) -> JudgeResult:
        """The one call of an admitted response; settles its reservation with the actual cost."""
        trace, rubric, settings = admission.trace, admission.rubric, self.settings
        request = score_request(
            trace,
            rubric,
            model=self.model,
            max_tokens=settings.judge_max_tokens,
            max_chars=settings.judge_max_answer_chars,
        )
        cost, input_tokens, output_tokens, retries = 0.0, 0, 0, 0
        try:
            message, retries = await self._create(request)
            usage = _get(message, "usage")
            input_tokens = int(_get(usage, "input_tokens") or 0)
            output_tokens = int(_get(usage, "output_tokens") or 0)
            cost = call_cost(self.model, input_tokens, output_tokens, self.prices)  # paid, valid reply or not
            score, reason = parse_score(message)
        except MalformedScore as exc:
            failure: JudgeResult | None = JudgeResult(
                "malformed", reason=f"judge reply without a valid score: {exc}", cost_usd=cost
            )
            self.stats.live_malformed += 1
        except JudgeCallError as exc:
            failure = JudgeResult("error", reason=f"judge call failed: {exc}", cost_usd=cost)
            self.stats.live_errors += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported, never raised into the agent
            failure = JudgeResult("error", reason=f"judge call failed: {exc!r}", cost_usd=cost)
            self.stats.live_errors += 1
        else:
            failure = None
        self.budget.settle(admission.payer, admission.reserved, cost)
        self.stats.cost_usd += cost
        if failure is not None:
            return failure
        self.stats.live_scored += 1
        live_score = LiveScore(
            event_id=f"{trace.event_id}:score",
            ts=trace.ts,
            rollout_id=trace.rollout_id,
            variant=trace.variant,
            trace_id=trace.trace_id,
            user_id=trace.user_id,
            trace_event_id=trace.event_id,
            session_id=trace.session_id,
            stage=admission.stage,
            model_version=trace.model_version,
            prompt_version=trace.prompt_version,
            judge_model=self.model,
            rubric_hash=rubric_hash(rubric),
            score=score,
            reason=reason,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost,
            retries=retries,
        )
        return JudgeResult("scored", score=live_score, cost_usd=cost)

    async def _judge_order(self, pair: ShadowPair, rubric: str, candidate_first: bool) -> _CallOutcome:
        settings = self.settings
        request = judge_request(
            pair,
            rubric,
            candidate_first,
            model=self.model,
            max_tokens=settings.judge_max_tokens,
            max_chars=settings.judge_max_answer_chars,
        )
        message, retries = await self._create(request)
        usage = _get(message, "usage")
        input_tokens = int(_get(usage, "input_tokens") or 0)
        output_tokens = int(_get(usage, "output_tokens") or 0)
        cost = call_cost(self.model, input_tokens, output_tokens, self.prices)
        try:
            verdict, reason = parse_verdict(message)
        except MalformedVerdict as exc:
            exc.cost_usd = cost  # type: ignore[attr-defined]  # paid for all the same
            raise
        return _CallOutcome(verdict, reason, input_tokens, output_tokens, cost, retries)

    async def _create(self, request: dict[str, Any]) -> tuple[Any, int]:
        """messages.create with our retry policy; at most judge_concurrency in flight."""
        import anthropic

        settings = self.settings
        attempt = 0
        while True:
            async with self._limit:
                self.stats.calls += 1
                self.stats.in_flight += 1
                self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
                try:
                    return await self.client.messages.create(**request), attempt
                except anthropic.APITimeoutError as exc:
                    self.stats.timeouts += 1
                    failure, wait = JudgeCallError("timeout", str(exc)), None
                except anthropic.APIConnectionError as exc:
                    failure, wait = JudgeCallError("connection", str(exc)), None
                except anthropic.APIStatusError as exc:
                    status = exc.status_code
                    kind = {429: "rate_limited", 529: "overloaded"}.get(status, "api_error")
                    if status == 429:
                        self.stats.rate_limited += 1
                    elif status == 529:
                        self.stats.overloaded += 1
                    failure = JudgeCallError(kind, f"HTTP {status}: {exc.message}")
                    if status not in (408, 409, 429) and status < 500:
                        raise failure from None  # a bad request or a bad key: retrying cannot help
                    wait = retry_after_s(exc.response.headers, settings.judge_max_retry_after_s)
                finally:
                    self.stats.in_flight -= 1
            if attempt >= settings.judge_max_retries:
                raise failure
            if wait is None:
                wait = min(0.5 * 2**attempt, MAX_BACKOFF_S) * (1 - 0.25 * random.random())
            attempt += 1
            self.stats.retries += 1
            await asyncio.sleep(wait)  # outside the semaphore: a waiting call is not in flight


# -- a file of pairs (safeswap judge) --------------------------------------------------
def read_pairs(path: Path) -> tuple[list[ShadowPair], list[str]]:
    """Pairs from a JSONL file, and one problem line per line that is not a valid pair.

    Lines are read like every JSONL input (:func:`safeswap.core.evalgate.jsonl_lines`):
    split on newlines only, a non-UTF-8 line is a problem, not a crash."""
    from safeswap.core.evalgate import jsonl_lines
    from schemas import InvalidEvent, decode

    pairs, problems = [], []
    for where, line, problem in jsonl_lines(path):
        if problem is None:
            try:
                pairs.append(decode(ShadowPair, line))
            except InvalidEvent as exc:
                problem = str(exc)
            except RecursionError:
                problem = "undecodable ShadowPair: nested too deeply"
        if problem is not None:
            problems.append(f"{where}: {problem}")
    return pairs, problems


async def judge_pairs(judge: Judge, pairs: list[ShadowPair], on_result=None) -> list[JudgeResult]:
    """Judge many pairs; the judge's semaphore keeps the calls in flight at its limit."""

    async def one(pair: ShadowPair) -> JudgeResult:
        result = await judge.judge_pair(pair)
        if on_result is not None:
            on_result(pair, result)
        return result

    try:
        return list(await asyncio.gather(*(one(pair) for pair in pairs)))
    finally:
        await judge.aclose()


def summary(stats: JudgeStats, bad_lines: int = 0) -> dict[str, Any]:
    """The last line of ``safeswap judge --json``."""
    return {
        "pairs": stats.pairs + bad_lines,
        "judged": stats.judged,
        "candidate_wins": stats.candidate_wins,
        "control_wins": stats.control_wins,
        "ties": stats.ties,
        "errors": stats.errors + stats.malformed + bad_lines,
        "malformed": stats.malformed,
        "invalid_lines": bad_lines,
        "not_sampled": stats.not_sampled,
        "not_judgeable": stats.not_judgeable,
        "budget_skipped": stats.budget_skipped,
        "calls": stats.calls,
        "retries": stats.retries,
        "max_in_flight": stats.max_in_flight,
        "cost_usd": round(stats.cost_usd, 6),
    }


def encode_judgment(judgment: Judgment) -> str:
    from schemas import encode

    return encode(judgment).decode()


__all__ = [
    "Admission",
    "Budget",
    "DEFAULT_RUBRIC",
    "Judge",
    "JudgeCallError",
    "JudgeResult",
    "JudgeStats",
    "JudgeUnavailable",
    "MalformedScore",
    "MalformedVerdict",
    "SCORE_TOOL",
    "SCORE_TOOL_CHOICE",
    "SCORE_TOOL_NAME",
    "ScoreAdmission",
    "TOOL_CHOICE",
    "TOOL_NAME",
    "VERDICT_TOOL",
    "call_cost",
    "combine",
    "judge_pairs",
    "judge_request",
    "judgeable",
    "parse_score",
    "parse_verdict",
    "price_table",
    "read_pairs",
    "reserve_estimate",
    "retry_after_s",
    "rubric_hash",
    "sampled",
    "score_request",
    "score_reserve_estimate",
    "scoreable",
    "summary",
]


# -- safeswap judge PAIRS.jsonl ----------------------------------------------------------
