"""A fake Anthropic Messages API on 127.0.0.1 (real HTTP, its own thread and loop).

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


class FakeAnthropic:
    def __init__(self, delay_s: float = 0.0, hang_s: float = 5.0, input_tokens: int | None = 1000,
                 output_tokens: int = 50):
        self.delay_s = delay_s
        self.hang_s = hang_s
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> "FakeAnthropic":
        self._thread = threading.Thread(target=self._run, name="fake-anthropic", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fake Anthropic server did not start")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "FakeAnthropic":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the API -------------------------------------------------------------------------
    async def _messages(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            self.requests.append(body)
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(body)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _answer(self, body: dict[str, Any]) -> web.Response:
        text = body["messages"][0]["content"]
        answer_a = _between(text, "answer_A")
        answer_b = _between(text, "answer_B")
        key = answer_a + "|" + answer_b
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if "[hang]" in text:
            await asyncio.sleep(self.hang_s)
        for marker, status in (("[429-once]", 429), ("[529-once]", 529)):
            if marker in text:
                with self._lock:
                    first = (marker + key) not in self._seen
                    self._seen.add(marker + key)
                if first:
                    return _error(status)
        if "[429-retry-after-1]" in text:
            with self._lock:
                first = ("[429-retry-after-1]" + key) not in self._seen
                self._seen.add("[429-retry-after-1]" + key)
            if first:
                return _error(429, {"retry-after": "1"})
        if "[529-always]" in text:
            return _error(529)
        if "[malformed]" in text:
            return self._message([{"type": "text", "text": "I think A is better."}], "end_turn", body)
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
        tool = {"type": "tool_use", "id": "toolu_01", "name": "record_verdict",
                "input": {"winner": winner, "reason": f"scripted: {winner}"}}
        return self._message([tool], "tool_use", body)

    def _message(self, content: list, stop_reason: str, body: dict) -> web.Response:
        return web.json_response({
            "id": "msg_fake", "type": "message", "role": "assistant", "model": body.get("model", "fake"),
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": self._input_tokens(body), "output_tokens": self.output_tokens},
        })


    def _input_tokens(self, body: dict) -> int:
        if self.input_tokens is not None:
            return self.input_tokens
        return len(body.get("system", "")) + len(body["messages"][0]["content"]) + 300


def _error(status: int, headers: dict[str, str] | None = None) -> web.Response:
    kind = {429: "rate_limit_error", 529: "overloaded_error"}[status]
    return web.json_response({"type": "error", "error": {"type": kind, "message": kind}}, status=status,
                             headers=headers if headers is not None else {"retry-after-ms": "5", "retry-after": "0"})


def _between(text: str, tag: str) -> str:
    match = re.search(f"<{tag}>\n(.*?)\n</{tag}>", text, re.S)
    return match.group(1) if match else ""


def pair_fields(index: int, *, control: str = "control answer", candidate: str = "candidate answer GOOD",
                rollout_id: str = "r1", prompt: str = "question", expects_json: bool = False,
                control_error: str = "none", candidate_error: str = "none", **extra) -> dict[str, Any]:
    def side(text, error, model):
        return {"response_text": text, "latency_ms": 100.0 + index, "cost_usd": 0.001, "input_tokens": 10,
                "output_tokens": 20, "error": error, "model_version": model, "prompt_version": "v1"}

    return {"event_id": f"pair-{index}", "ts": 1_767_225_600_000 + index * 1000, "rollout_id": rollout_id,
            "user_id": f"u{index}", "request_id": f"q{index}", "prompt_text": f"{prompt} {index}",
            "expects_json": expects_json, "control": side(control, control_error, "m-control"),
            "candidate": side(candidate, candidate_error, "m-candidate"), **extra}


def answers_in_order(request: dict[str, Any]) -> tuple[str, str]:
    text = request["messages"][0]["content"]
    return _between(text, "answer_A"), _between(text, "answer_B")


def to_json(fields: dict[str, Any]) -> str:
    return json.dumps(fields)
