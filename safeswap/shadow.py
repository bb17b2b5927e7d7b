"""Shadow traffic from an app: the candidate answers the same request in the background.

::

    shadow = Shadow(emitter, flags)                 # once per process
    answer = await call_model(CONTROL, prompt)      # what the user gets, as always
    shadow.submit(rollout_id="support-bot", user_id=user, request_id=req, prompt_text=prompt,
                  control=ShadowSide(response_text=answer.text, latency_ms=..., cost_usd=..., ...),
                  candidate=lambda: call_candidate(prompt), expects_json=False)
    return answer

``submit`` never delays, changes or fails the user's response: it checks
``flags.should_shadow(rollout_id, user_id)`` (a dict lookup and a hash), and if
the user is shadowed and fewer than ``shadow_concurrency`` candidate calls are in
flight, it starts the candidate call as a background task and returns at once.
Otherwise it counts the skip (``stats``) and returns. It never raises.

The background task times the candidate call, stops it after
``shadow_timeout_s`` (recorded as ``error="timeout"``), records any exception as
an error kind (rate limit, other) and emits one shadow pair through the
Emitter (``safeswap.shadow`` keyed by user_id), where the judge agent picks it up.

The candidate callable returns a :class:`CandidateAnswer`, a dict with the same
fields, or a plain string (the response text; cost and tokens then 0). Its
``model_version``/``prompt_version`` default to the ones given to ``submit``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from schemas.events import ShadowPair, ShadowSide
from streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class CandidateAnswer:
    response_text: str
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    model_version: str | None = None
    prompt_version: str | None = None
    error: str = "none"  # e.g. "refusal" when the API said so


@dataclass
class ShadowStats:
    submitted: int = 0
    not_shadowed: int = 0  # the flag said no
    skipped_busy: int = 0  # shadow_concurrency calls already in flight
    started: int = 0
    completed: int = 0
    candidate_errors: int = 0
    timeouts: int = 0
    emit_failures: int = 0
    internal_errors: int = 0


def _error_kind(exc: BaseException) -> str:
    name = type(exc).__name__
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or "Timeout" in name:
        return "timeout"
    if "RateLimit" in name or getattr(exc, "status_code", None) == 429:
        return "rate_limit"
    return "other"


class Shadow:
    """Background candidate calls with bounded concurrency and a timeout, emitted as shadow pairs."""

    def __init__(
        self,
        emitter,
        flags=None,
        *,
        settings: Settings | None = None,
        concurrency: int | None = None,
        timeout_s: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        settings = settings or getattr(emitter, "settings", None) or Settings()
        self.emitter = emitter
        self.flags = flags
        self.concurrency = concurrency if concurrency is not None else settings.shadow_concurrency
        self.timeout_s = timeout_s if timeout_s is not None else settings.shadow_timeout_s
        self.stats = ShadowStats()
        self._clock = clock
        self._tasks: set[asyncio.Task] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(
        self,
        *,
        rollout_id: str,
        user_id: str,
        request_id: str,
        prompt_text: str,
        control: ShadowSide | dict[str, Any],
        candidate: Callable[[], Awaitable[Any]],
        model_version: str = "candidate",
        prompt_version: str = "candidate",
        expects_json: bool = False,
        session_id: str | None = None,
        force: bool = False,
    ) -> bool:
        """Start the candidate call in the background if this user is shadowed; True if started.

        ``force=True`` skips the flag check (the app decided itself). Never raises."""
        try:
            self.stats.submitted += 1
            if not force and (self.flags is None or not self.flags.should_shadow(rollout_id, user_id)):
                self.stats.not_shadowed += 1
                return False
            if len(self._tasks) >= self.concurrency:
                self.stats.skipped_busy += 1
                return False
            task = asyncio.get_running_loop().create_task(
                self._run(
                    rollout_id,
                    user_id,
                    request_id,
                    prompt_text,
                    control,
                    candidate,
                    model_version,
                    prompt_version,
                    expects_json,
                    session_id,
                    int(time.time() * 1000),
                )
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self.stats.started += 1
            return True
        except Exception as exc:  # noqa: BLE001 - the user's response must not fail because of shadowing
            self.stats.internal_errors += 1
            log.warning("shadow: could not start the candidate call: %r", exc)
            return False

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for the background calls in flight (at shutdown, in tests)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def _run(
        self,
        rollout_id,
        user_id,
        request_id,
        prompt_text,
        control,
        candidate,
        model_version,
        prompt_version,
        expects_json,
        session_id,
        ts_ms,
    ) -> None:
        try:
            start = self._clock()
            error, detail, answer = "none", None, None
            try:
                answer = await asyncio.wait_for(candidate(), self.timeout_s)
            except TimeoutError:
                error, detail = "timeout", f"no answer within {self.timeout_s:g} s"
                self.stats.timeouts += 1
            except Exception as exc:  # noqa: BLE001 - the candidate's failure is data (its error kind), not a crash
                error, detail = _error_kind(exc), f"{type(exc).__name__}: {exc}"[:500]
                self.stats.candidate_errors += 1
            latency_ms = (self._clock() - start) * 1000
            if isinstance(answer, str):
                answer = CandidateAnswer(answer)
            elif isinstance(answer, dict):
                answer = CandidateAnswer(**answer)
            side = ShadowSide(
                response_text=answer.response_text if answer is not None else None,
                latency_ms=latency_ms,
                cost_usd=answer.cost_usd if answer is not None else 0.0,
                input_tokens=answer.input_tokens if answer is not None else 0,
                output_tokens=answer.output_tokens if answer is not None else 0,
                error=answer.error if answer is not None and error == "none" else error,
                model_version=(answer.model_version if answer is not None and answer.model_version else model_version),
                prompt_version=(
                    answer.prompt_version if answer is not None and answer.prompt_version else prompt_version
                ),
                error_detail=detail,
            )
            if isinstance(control, dict):
                control = ShadowSide(**control)
            pair = ShadowPair(
                event_id=uuid.uuid4().hex,
                ts=ts_ms,
                rollout_id=rollout_id,
                user_id=user_id,
                request_id=request_id,
                prompt_text=prompt_text,
                expects_json=expects_json,
                control=control,
                candidate=side,
                session_id=session_id,
            )
            self.stats.completed += 1
            if not self.emitter.shadow_pair(msgspec.to_builtins(pair)):  # validated on the way out
                self.stats.emit_failures += 1
        except Exception as exc:  # noqa: BLE001 - a background task must not die with an unread exception
            self.stats.internal_errors += 1
            log.warning("shadow: pair for request %s not emitted: %r", request_id, exc)
