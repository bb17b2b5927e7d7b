"""A simulated Anthropic Messages endpoint on 127.0.0.1, for rehearsals and tests.

``safeswap simulate`` must not call the real API, yet the judge agent's whole
path (the SDK over HTTP, both orders, the forced ``record_verdict`` call, usage
and cost, the budget) should run as in production. So the simulation starts a
:class:`SimulatedJudge` and gives its address to the worker as
``ANTHROPIC_BASE_URL`` (with a placeholder key).

:class:`MessagesEndpoint` is the HTTP plumbing (aiohttp in its own thread and
loop, ``POST /v1/messages``, the Message shape); the test fake
(tests/support/fake_anthropic.py) builds on it with its scripted answers.

Live responses (canary and ramp) get a forced ``record_score`` call instead: a refusal
scores 2, any other answer 5 to 9 from a stable hash of the request and the answer.

The simulated verdicts follow the scenario's ``judge:`` block
(``candidate_wins``, ``control_wins``, the rest ties). The simulated candidate's
answers carry :data:`CANDIDATE_TAG`, so the endpoint knows which position holds
the candidate; the pair's winner comes from a stable hash of the request and
both answers, so the control-first and candidate-first calls agree and the
judge agent combines them into that winner. An answer that refuses loses to one
that does not, as a real judge under the default rubric would rule.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from typing import Any

from aiohttp import web

from safeswap.core.shadow_analysis import REFUSAL_OPENINGS
from safeswap.judge import SCORE_TOOL_NAME, TOOL_NAME

# Appended (or, in a JSON answer, written inside a string) to every simulated
# candidate answer: the endpoint finds the candidate by it, whatever the order.
CANDIDATE_TAG = "[simulated candidate]"


class MessagesEndpoint:
    """``POST /v1/messages`` on 127.0.0.1 (a free port), served from its own thread.

    Subclasses implement :meth:`answer`. Requests in flight are counted
    (``max_in_flight``); with ``record=True`` every body and its headers are kept."""

    def __init__(self, *, record: bool = False):
        self.record = record
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> MessagesEndpoint:
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()
        if not self._started.wait(10) or self._failure is not None:
            raise RuntimeError(f"the simulated Anthropic endpoint did not start: {self._failure!r}")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
        runner = web.AppRunner(app, access_log=None)
        try:
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._failure = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def stop(self) -> None:
        # Also before run_forever has begun: the queued stop ends it as soon as it starts.
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:  # closed meanwhile: the thread is ending by itself
                pass
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the API -------------------------------------------------------------------------
    async def _messages(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            self.calls += 1
            if self.record:
                self.requests.append(body)
                self.headers.append({k.lower(): v for k, v in request.headers.items()})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.answer(body)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def answer(self, body: dict[str, Any]) -> web.Response:
        raise NotImplementedError

    def message(self, content: list[dict[str, Any]], stop_reason: str, body: dict[str, Any]) -> web.Response:
        """A Messages API reply with ``usage`` from :meth:`usage`."""
        input_tokens, output_tokens = self.usage(body)
        return web.json_response(
            {
                "id": "msg_simulated",
                "type": "message",
                "role": "assistant",
                "model": body.get("model", "simulated"),
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            }
        )

    def verdict(self, winner: str, reason: str, body: dict[str, Any]) -> web.Response:
        """The forced tool call the judge asks for."""
        return self.tool_call(TOOL_NAME, {"winner": winner, "reason": reason}, body)

    def score(self, score: Any, reason: str, body: dict[str, Any]) -> web.Response:
        """The forced ``record_score`` call the judge asks for a live response."""
        return self.tool_call(SCORE_TOOL_NAME, {"score": score, "reason": reason}, body)

    def tool_call(self, name: str, arguments: dict[str, Any], body: dict[str, Any]) -> web.Response:
        tool = {"type": "tool_use", "id": "toolu_simulated", "name": name, "input": arguments}
        return self.message([tool], "tool_use", body)

    def usage(self, body: dict[str, Any]) -> tuple[int, int]:
        """(input, output) tokens billed: about 4 bytes a token of the prompt, plus the tool definition."""
        size = len(body.get("system", "").encode()) + len(request_text(body).encode())
        return size // 4 + 300, 60


def forced_tool(body: dict[str, Any]) -> str:
    """The tool the request forces (``record_verdict`` for a pair, ``record_score`` for a live response)."""
    choice = body.get("tool_choice")
    return choice.get("name", "") if isinstance(choice, dict) else ""


def request_text(body: dict[str, Any]) -> str:
    content = body["messages"][0]["content"]
    if isinstance(content, list):  # content blocks
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return content


def between(text: str, tag: str) -> str:
    """The text inside ``<tag>`` ... ``</tag>`` as safeswap.judge.judge_request writes it."""
    match = re.search(f"<{tag}>\n(.*?)\n</{tag}>", text, re.S)
    return match.group(1) if match else ""


# -- the simulated judge -------------------------------------------------------------------
def simulated_winner(request: str, control: str, candidate: str, candidate_wins: float, control_wins: float) -> str:
    """``candidate`` | ``control`` | ``tie`` for one pair, the same in both orders.

    A refusal loses to an answer; otherwise a stable hash of the request and both
    answers falls into [0, 1): below ``candidate_wins`` the candidate wins, in the
    next ``control_wins`` control does, above both it is a tie."""
    refused = {
        name: REFUSAL_OPENINGS.match(text[:200]) is not None
        for name, text in (("control", control), ("candidate", candidate))
    }
    if refused["control"] != refused["candidate"]:
        return "control" if refused["candidate"] else "candidate"
    digest = hashlib.sha256("\x00".join((request, control, candidate)).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < candidate_wins:
        return "candidate"
    if u < candidate_wins + control_wins:
        return "control"
    return "tie"


def simulated_score(request: str, answer: str) -> int:
    """A live response's score: 2 for a refusal, else 5 to 9 from a stable hash."""
    if REFUSAL_OPENINGS.match(answer[:200]) is not None:
        return 2
    digest = hashlib.sha256("\x00".join((request, answer)).encode()).digest()
    return 5 + int.from_bytes(digest[:8], "big") % 5


class SimulatedJudge(MessagesEndpoint):
    """Answers the judge's ``record_verdict`` call as the scenario's ``judge:`` block says, and
    its ``record_score`` call with :func:`simulated_score`."""

    def __init__(self, candidate_wins: float = 0.35, control_wins: float = 0.35):
        super().__init__()
        self.candidate_wins, self.control_wins = candidate_wins, control_wins

    async def answer(self, body: dict[str, Any]) -> web.Response:
        text = request_text(body)
        if forced_tool(body) == SCORE_TOOL_NAME:
            score = simulated_score(between(text, "request"), between(text, "answer"))
            return self.score(score, f"simulated judge: {score}", body)
        answer_a, answer_b = between(text, "answer_A"), between(text, "answer_B")
        candidate_is_a, candidate_is_b = CANDIDATE_TAG in answer_a, CANDIDATE_TAG in answer_b
        if candidate_is_a == candidate_is_b:  # not a simulated pair: no side to prefer
            return self.verdict("tie", "simulated judge: cannot tell which answer is the candidate's", body)
        candidate, control = (answer_a, answer_b) if candidate_is_a else (answer_b, answer_a)
        winner = simulated_winner(between(text, "request"), control, candidate, self.candidate_wins, self.control_wins)
        if winner == "tie":
            return self.verdict("tie", "simulated judge: neither answer is better", body)
        position = "A" if (winner == "candidate") == candidate_is_a else "B"
        return self.verdict(position, f"simulated judge: the {winner}'s answer is better", body)
