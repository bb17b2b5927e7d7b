"""A fake Anthropic Messages API on 127.0.0.1 (real HTTP, its own thread and loop: the
package's ``safeswap.tools.judge_sim.MessagesEndpoint``, which ``safeswap simulate`` also uses).

The judge is scripted by markers in the request text:

- the answer containing ``GOOD`` wins (A or B, wherever it is shown); neither: tie;
- ``[bias-A]``: always answers A (a purely positional judge);
- ``[429-once]`` / ``[529-once]``: the first request for that answer text gets
  429 / 529 with ``retry-after-ms: 5``, the next one succeeds;
- ``[429-retry-after-1]``: like ``[429-once]``, but the 429 carries only
  ``retry-after: 1`` (whole seconds, no ``retry-after-ms``);
- ``[529-always]``: always 529;
- ``[hang]``: never answers in time (sleeps ``hang_s``);
- ``[malformed]``: replies with text, no tool call;
- ``[bad-winner]``: calls the tool with ``winner: "C"``.

A live response (the request forces ``record_score``) is scored from its answer:
``[score-N]`` scores N (also out of range: ``[score-11]``), ``[score-text]`` sends
``"seven"``; otherwise ``GOOD`` scores 9 and anything else 4. The markers above
work for it too.

It records every request body, counts requests in flight and keeps the maximum.
``input_tokens=None`` bills one input token per character of the system prompt
and the message, plus 300 for the tool definition (like CJK text, where a
character is about one token).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from typing import Any

from aiohttp import web

from safeswap.judge import SCORE_TOOL_NAME
from safeswap.tools.judge_sim import MessagesEndpoint, forced_tool, request_text
from safeswap.tools.judge_sim import between as _between


class FakeAnthropic(MessagesEndpoint):
    """The scripted judge on the package's endpoint plumbing (safeswap.tools.judge_sim)."""

    def __init__(
        self, delay_s: float = 0.0, hang_s: float = 5.0, input_tokens: int | None = 1000, output_tokens: int = 50
    ):
        super().__init__(record=True)
        self.delay_s = delay_s
        self.hang_s = hang_s
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self._seen: set[str] = set()
        self._seen_lock = threading.Lock()

    async def answer(self, body: dict[str, Any]) -> web.Response:
        text = request_text(body)
        answer_a = _between(text, "answer_A")
        answer_b = _between(text, "answer_B")
        answer = _between(text, "answer")  # a live response's
        key = answer_a + "|" + answer_b + "|" + answer
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if "[hang]" in text:
            await asyncio.sleep(self.hang_s)
        for marker, status in (("[429-once]", 429), ("[529-once]", 529)):
            if marker in text and self._first(marker + key):
                return _error(status)
        if "[429-retry-after-1]" in text and self._first("[429-retry-after-1]" + key):
            return _error(429, {"retry-after": "1"})
        if "[529-always]" in text:
            return _error(529)
        if "[malformed]" in text:
            return self.message([{"type": "text", "text": "I think A is better."}], "end_turn", body)
        if forced_tool(body) == SCORE_TOOL_NAME:
            return self.score(_scripted_score(answer), "scripted score", body)
        if "[bad-winner]" in text:
            winner = "C"
        elif "[bias-A]" in text:
            winner = "A"
        elif "GOOD" in answer_a and "GOOD" not in answer_b:
            winner = "A"
        elif "GOOD" in answer_b and "GOOD" not in answer_a:
            winner = "B"
        else:
            winner = "tie"
        return self.verdict(winner, f"scripted: {winner}", body)

    def _first(self, key: str) -> bool:
        with self._seen_lock:
            first = key not in self._seen
            self._seen.add(key)
        return first

    def usage(self, body: dict[str, Any]) -> tuple[int, int]:
        if self.input_tokens is not None:
            return self.input_tokens, self.output_tokens
        return len(body.get("system", "")) + len(request_text(body)) + 300, self.output_tokens


def _scripted_score(answer: str):
    if "[score-text]" in answer:
        return "seven"
    marked = re.search(r"\[score-(-?\d+)\]", answer)
    if marked:
        return int(marked.group(1))
    return 9 if "GOOD" in answer else 4


def _error(status: int, headers: dict[str, str] | None = None) -> web.Response:
    kind = {429: "rate_limit_error", 529: "overloaded_error"}[status]
    return web.json_response(
        {"type": "error", "error": {"type": kind, "message": kind}},
        status=status,
        headers=headers if headers is not None else {"retry-after-ms": "5", "retry-after": "0"},
    )


def pair_fields(
    index: int,
    *,
    control: str = "control answer",
    candidate: str = "candidate answer GOOD",
    rollout_id: str = "r1",
    prompt: str = "question",
    expects_json: bool = False,
    control_error: str = "none",
    candidate_error: str = "none",
    **extra,
) -> dict[str, Any]:
    def side(text, error, model):
        return {
            "response_text": text,
            "latency_ms": 100.0 + index,
            "cost_usd": 0.001,
            "input_tokens": 10,
            "output_tokens": 20,
            "error": error,
            "model_version": model,
            "prompt_version": "v1",
        }

    return {
        "event_id": f"pair-{index}",
        "ts": 1_767_225_600_000 + index * 1000,
        "rollout_id": rollout_id,
        "user_id": f"u{index}",
        "request_id": f"q{index}",
        "prompt_text": f"{prompt} {index}",
        "expects_json": expects_json,
        "control": side(control, control_error, "m-control"),
        "candidate": side(candidate, candidate_error, "m-candidate"),
        **extra,
    }


def answers_in_order(request: dict[str, Any]) -> tuple[str, str]:
    text = request["messages"][0]["content"]
    return _between(text, "answer_A"), _between(text, "answer_B")


def to_json(fields: dict[str, Any]) -> str:
    return json.dumps(fields)


def trace_fields(
    index: int,
    *,
    variant: str = "candidate",
    answer: str | None = "an answer",
    prompt: str | None = "question",
    rollout_id: str = "r1",
    user: str | None = None,
    **extra,
) -> dict[str, Any]:
    """A live response (TraceEvent fields) with its texts, for the live judge."""
    return {
        "event_id": f"t-{index}",
        "ts": 1_767_225_600_000 + index * 1000,
        "rollout_id": rollout_id,
        "variant": variant,
        "user_id": user or f"u{index}",
        "session_id": f"s{index}",
        "trace_id": f"tr{index}",
        "prompt_version": "v1",
        "model_version": "m-candidate" if variant == "candidate" else "m-control",
        "latency_ms": 100.0 + index,
        "input_tokens": 10,
        "output_tokens": 20,
        "cost_usd": 0.001,
        "cache_hit": False,
        "prompt_text": None if prompt is None else f"{prompt} {index}",
        "response_text": answer,
        **extra,
    }
