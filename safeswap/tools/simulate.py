"""``safeswap simulate``: rehearse a plan in a closed loop before real traffic.

Simulated users are assigned by a real FlagClient, their trace and feedback
events go through a real worker, and the controller's decisions flow back to
the FlagClient, in compressed event time: the simulation advances one step
(default one hour of traffic), emits it, and waits until every partition's
statistics have reached the step's end (the status watermark) before the next,
so the split each step serves is the one the controller decided. Days of
traffic take about a minute.

Event time runs in the past (ending about now): the outcomes agent rejects
events from the future, as it should.

The shadow stage is rehearsed too: each request of a user the FlagClient
shadows (``should_shadow``) becomes a shadow pair, the served control answer
beside a candidate answer drawn from the scenario's candidate model; the user
still sees control only. The worker's judge agent judges the pairs against a
simulated Anthropic endpoint on 127.0.0.1 (safeswap.tools.judge_sim) whose verdicts
follow the scenario's ``judge:`` block, so the real judge path runs and no
real API is called. Each step then also waits until every pair sent is
analysed and has the judge's word.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

import sinks
from safeswap.core.config_files import ConfigIssue, convert_config, read_config
from safeswap.core.plan import parse_duration
from safeswap.emitter import Emitter
from safeswap.flags import FlagClient
from safeswap.tools.judge_sim import CANDIDATE_TAG, SimulatedJudge
from safeswap.tools.rollouts import start_rollout
from schemas import (
    Decision,
    FeedbackEvent,
    RolloutPlan,
    RolloutStatus,
    TraceEvent,
    decode,
)
from schemas.events import ShadowPair, ShadowSide
from streams.broker import EmbeddedBroker
from streams.compacted import CompactedView
from streams.process import WorkerProcess
from streams.settings import Settings
from streams.topics import ensure_topics

HOUR_MS = 3_600_000


# -- the scenario file ---------------------------------------------------------------
class LatencySpec(msgspec.Struct, forbid_unknown_fields=True):
    median: float = 900.0
    p95: float = 2500.0


class CostSpec(msgspec.Struct, forbid_unknown_fields=True):
    mean: float = 0.002


class Behaviour(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Per-response probabilities and distributions; a candidate field left out copies control's."""

    thumbs_down_rate: float | None = None
    thumbs_up_rate: float | None = None
    edit_rate: float | None = None
    retry_rate: float | None = None
    abandon_rate: float | None = None
    error_rate: float | None = None  # timeouts
    refusal_rate: float | None = None  # answers that refuse (error "refusal")
    json_valid_rate: float | None = None  # of the answers to requests that expect JSON, the share that parse
    cache_hit_rate: float | None = None
    latency_ms: LatencySpec | None = None
    cost_usd: CostSpec | None = None


CONTROL_DEFAULTS = Behaviour(
    thumbs_down_rate=0.05,
    thumbs_up_rate=0.2,
    edit_rate=0.1,
    retry_rate=0.05,
    abandon_rate=0.1,
    error_rate=0.01,
    refusal_rate=0.0,
    json_valid_rate=1.0,
    cache_hit_rate=0.3,
    latency_ms=LatencySpec(),
    cost_usd=CostSpec(),
)


class DropEvents(msgspec.Struct, tag="drop_events", tag_field="kind", forbid_unknown_fields=True):
    """Lose a share of one arm's events on the way (a broken emitter)."""

    variant: Literal["control", "candidate"]
    share: float


class ModelSwitch(msgspec.Struct, tag="model_switch", tag_field="kind", forbid_unknown_fields=True):
    """From ``at`` (into the simulation) one arm is served another model."""

    variant: Literal["control", "candidate"]
    at: str
    model: str


class AssignByRequest(msgspec.Struct, tag="assign_by_request", tag_field="kind", forbid_unknown_fields=True):
    """The app picks the variant per request instead of per user (a classic bug)."""


Fault = DropEvents | ModelSwitch | AssignByRequest


class Variants(msgspec.Struct, forbid_unknown_fields=True):
    control: Behaviour = msgspec.field(default_factory=Behaviour)
    candidate: Behaviour = msgspec.field(default_factory=Behaviour)


class JudgeSpec(msgspec.Struct, forbid_unknown_fields=True):
    """The simulated judge's verdicts on shadow pairs (the rest are ties; a refusal always loses)."""

    candidate_wins: float = 0.35
    control_wins: float = 0.35


class SegmentSpec(msgspec.Struct, forbid_unknown_fields=True):
    """A segment key of the simulated users (sent as the traces' ``segment``) and the shares
    of users with each value."""

    key: str
    shares: dict[str, float]


class Scenario(msgspec.Struct, forbid_unknown_fields=True):
    duration: str = "10d"
    users_per_hour: float = 400.0
    requests_per_user: float = 3.0  # mean; each user sends 1 + Poisson(mean - 1)
    expects_json_share: float = 0.0  # share of requests whose answer must be valid JSON
    variants: Variants = msgspec.field(default_factory=Variants)
    judge: JudgeSpec = msgspec.field(default_factory=JudgeSpec)
    faults: list[Fault] = []
    segments: list[SegmentSpec] = []
    # How the users of one segment value ("locale=ja") behave, over the variants' behaviour:
    # its control fields apply to both arms, its candidate fields to the candidate.
    segment_variants: dict[str, Variants] = {}
    step: str = "1h"  # event time per closed-loop step
    seed: int = 0


class ScenarioError(ValueError):
    def __init__(self, source: str, issues: list[ConfigIssue]):
        super().__init__("\n".join(issue.render(source) for issue in issues))
        self.issues = issues


def load_scenario(path: str) -> Scenario:
    data, lines, problem = read_config(path)
    if problem is not None:
        raise ScenarioError(path, [problem])
    scenario, issues = convert_config(data, Scenario, lines, "scenario")
    if scenario is None:
        raise ScenarioError(path, issues)
    checks: list[ConfigIssue] = []
    for field in ("duration", "step"):
        try:
            parse_duration(getattr(scenario, field))
        except ValueError as exc:
            checks.append(ConfigIssue(field, str(exc)))
    for index, fault in enumerate(scenario.faults):
        if isinstance(fault, ModelSwitch):
            try:
                parse_duration(fault.at)
            except ValueError as exc:
                checks.append(ConfigIssue(f"faults[{index}].at", str(exc)))
        if isinstance(fault, DropEvents) and not 0 <= fault.share <= 1:
            checks.append(ConfigIssue(f"faults[{index}].share", "a share is between 0 and 1"))
    if scenario.users_per_hour <= 0 or scenario.requests_per_user < 1:
        checks.append(ConfigIssue("users_per_hour", "users_per_hour > 0 and requests_per_user >= 1"))
    shares = {
        "expects_json_share": scenario.expects_json_share,
        "judge.candidate_wins": scenario.judge.candidate_wins,
        "judge.control_wins": scenario.judge.control_wins,
    }
    for name in ("control", "candidate"):
        behaviour = getattr(scenario.variants, name)
        for field in ("refusal_rate", "json_valid_rate"):
            if getattr(behaviour, field) is not None:
                shares[f"variants.{name}.{field}"] = getattr(behaviour, field)
    checks += [ConfigIssue(name, "a share is between 0 and 1") for name, share in shares.items() if not 0 <= share <= 1]
    for index, segment in enumerate(scenario.segments):
        if not segment.shares or abs(sum(segment.shares.values()) - 1) > 1e-6:
            checks.append(ConfigIssue(f"segments[{index}].shares", "the shares of a key's values add up to 1"))
        if any(not 0 <= share <= 1 for share in segment.shares.values()):
            checks.append(ConfigIssue(f"segments[{index}].shares", "a share is between 0 and 1"))
    known = {f"{s.key}={value}" for s in scenario.segments for value in s.shares}
    for name in scenario.segment_variants:
        if name not in known:
            checks.append(
                ConfigIssue(
                    f"segment_variants.{name}",
                    f"not a segment value of the scenario: use key=value, one of {', '.join(sorted(known)) or 'none'}",
                )
            )
    if scenario.judge.candidate_wins + scenario.judge.control_wins > 1:
        checks.append(ConfigIssue("judge", "candidate_wins + control_wins is at most 1 (the rest are ties)"))
    if checks:
        raise ScenarioError(path, checks)
    return scenario


@dataclass(frozen=True)
class ArmModel:
    """A variant's behaviour with every field filled in."""

    thumbs_down: float
    thumbs_up: float
    edit: float
    retry: float
    abandon: float
    error: float
    refusal: float
    json_valid: float
    cache_hit: float
    latency_mu: float
    latency_sigma: float
    cost_mean: float


def arm_models(scenario: Scenario, segment: Variants | None = None) -> dict[str, ArmModel]:
    """Each variant's behaviour; ``segment``: a segment value's behaviour over it."""

    def merged(*layers: Behaviour) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for layer in layers:
            out.update({k: v for k, v in msgspec.structs.asdict(layer).items() if v is not None})
        return out

    extra = (segment.control, segment.candidate) if segment is not None else ()
    control = merged(CONTROL_DEFAULTS, scenario.variants.control, *extra[:1])
    candidate = merged(CONTROL_DEFAULTS, scenario.variants.control, scenario.variants.candidate, *extra)
    models = {}
    for name, fields in (("control", control), ("candidate", candidate)):
        latency = fields["latency_ms"]
        models[name] = ArmModel(
            thumbs_down=fields["thumbs_down_rate"],
            thumbs_up=fields["thumbs_up_rate"],
            edit=fields["edit_rate"],
            retry=fields["retry_rate"],
            abandon=fields["abandon_rate"],
            error=fields["error_rate"],
            refusal=fields["refusal_rate"],
            json_valid=fields["json_valid_rate"],
            cache_hit=fields["cache_hit_rate"],
            latency_mu=math.log(latency.median),
            latency_sigma=max(1e-6, math.log(latency.p95 / latency.median) / 1.6449),
            cost_mean=fields["cost_usd"].mean,
        )
    return models


# -- traffic ---------------------------------------------------------------------------
WORDS = (
    "refund order invoice shipping account password reset cancel upgrade plan billing address "
    "delivery status warranty return exchange discount coupon login error payment card"
).split()


REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


@dataclass(frozen=True)
class Answer:
    """One variant's simulated answer to one request."""

    text: str
    latency_ms: float
    cache_hit: bool
    cost_usd: float
    output_tokens: int
    error: str


def simulated_answer(rng: random.Random, arm: ArmModel, prompt: str, expects_json: bool, *, tag: str = "") -> Answer:
    """An answer drawn from an arm's model. The draws come in a fixed order (cache, latency,
    length, [JSON validity], cost, error) so a scenario without JSON requests replays the
    same traffic as before refusals and JSON were modelled."""
    hit = rng.random() < arm.cache_hit
    latency = rng.lognormvariate(arm.latency_mu, arm.latency_sigma) * (0.3 if hit else 1.0)
    text = f"answer about {prompt} " + "x" * rng.randint(40, 160)
    if tag:
        text += " " + tag
    if expects_json:
        text = json.dumps({"answer": text})
        if rng.random() >= arm.json_valid:
            text = text[:-2]  # cut short: not JSON
    cost = round(rng.expovariate(1 / arm.cost_mean), 6)
    draw = rng.random()
    error = "timeout" if draw < arm.error else "refusal" if draw < arm.error + arm.refusal else "none"
    if error == "refusal":
        text = f"{REFUSAL_TEXT} {tag}".rstrip()
    return Answer(text, round(latency, 1), hit, cost, len(text) // 4, error)


class Traffic:
    """Generates one step of users' sessions, assigned by a FlagClient (pure but for the client),
    and the shadow pairs of the requests it shadows."""

    def __init__(self, scenario: Scenario, plan: RolloutPlan, rollout_id: str, start_ms: int, lead_ms: int = 150_000):
        self.scenario, self.plan, self.rollout_id, self.start_ms = scenario, plan, rollout_id, start_ms
        self.rng = random.Random(scenario.seed)
        # The candidate's shadow answers draw from their own stream: users' traffic is the
        # same whether or not a shadow stage runs.
        self.shadow_rng = random.Random(f"{scenario.seed}:shadow")
        self.arms = arm_models(scenario)
        # Users' segments draw from their own stream too: a scenario without segments is unchanged.
        self.segment_rng = random.Random(f"{scenario.seed}:segments")
        self.segment_arms = {name: arm_models(scenario, v) for name, v in scenario.segment_variants.items()}
        self.next_user = 0
        self.switches = [
            (f, start_ms + int(parse_duration(f.at) * 1000)) for f in scenario.faults if isinstance(f, ModelSwitch)
        ]
        self.drops = {f.variant: f.share for f in scenario.faults if isinstance(f, DropEvents)}
        self.by_request = any(isinstance(f, AssignByRequest) for f in scenario.faults)
        # Later turns of a step's sessions happen after the step ends. Those within ``lead_ms``
        # of its end go out with it: the watermark then passes the step's end, so a stage that
        # ends there is promoted before the next step's users are assigned (at the old split
        # they would count as the new stage's and trip the SRM check). The rest wait here for
        # the step they happen in: the next step's first events are then never more than
        # ``lead_ms`` behind the newest one sent (the outcomes agent dead-letters events more
        # than its allowed lateness behind).
        self.later: list[TraceEvent | FeedbackEvent | ShadowPair] = []
        self.lead_ms = lead_ms
        self.pinned = {
            "control": plan.control.model or "control-model",
            "candidate": plan.candidate.model or "candidate-model",
        }

    def _poisson(self, mean: float) -> int:
        # Knuth; means here are small
        limit, k, product = math.exp(-mean), 0, self.rng.random()
        while product > limit:
            k += 1
            product *= self.rng.random()
        return k

    def _segment(self) -> tuple[dict[str, str] | None, dict[str, ArmModel]]:
        """A new user's segment values, and the behaviour of the first that has its own."""
        if not self.scenario.segments:
            return None, self.arms
        segment = {}
        for spec in self.scenario.segments:
            values, shares = zip(*spec.shares.items())
            segment[spec.key] = self.segment_rng.choices(values, weights=shares)[0]
        for key, value in segment.items():
            arms = self.segment_arms.get(f"{key}={value}")
            if arms is not None:
                return segment, arms
        return segment, self.arms

    def _model(self, variant: str, ts: int) -> str:
        model = self.pinned[variant]
        for fault, at in self.switches:
            if fault.variant == variant and ts >= at:
                model = fault.model
        return model

    def step(self, flags: FlagClient, step_start: int, step_ms: int) -> list[TraceEvent | FeedbackEvent | ShadowPair]:
        rng, events = self.rng, []
        users = (
            self._poisson(self.scenario.users_per_hour * step_ms / HOUR_MS)
            if step_ms < HOUR_MS
            else int(round(self.scenario.users_per_hour * step_ms / HOUR_MS))
        )
        for _ in range(users):
            self.next_user += 1
            user_id = f"sim-user-{self.next_user}"
            session_id = f"sim-session-{self.next_user}"
            ts = step_start + int(rng.random() * step_ms)
            requests = 1 + self._poisson(self.scenario.requests_per_user - 1)
            prompt = " ".join(rng.choice(WORDS) for _ in range(8))
            user_variant = flags.variant(self.rollout_id, user_id)
            shadowed = flags.should_shadow(self.rollout_id, user_id)
            segment, arms = self._segment()
            for index in range(requests):
                if self.by_request:  # the bug: a coin per request
                    decision = flags.decision(self.rollout_id)
                    share = (decision.percent if decision else 0.0) / 100
                    variant = "candidate" if rng.random() < share else "control"
                else:
                    variant = user_variant
                arm = arms[variant]
                trace_id = f"{user_id}-{index}"
                expects_json = self.scenario.expects_json_share > 0 and rng.random() < self.scenario.expects_json_share
                served = simulated_answer(rng, arm, prompt, expects_json)
                response = served.text
                common = dict(rollout_id=self.rollout_id, variant=variant, user_id=user_id, session_id=session_id)
                trace = TraceEvent(
                    event_id=f"t-{trace_id}",
                    ts=ts,
                    trace_id=trace_id,
                    prompt_version=self._prompt(variant),
                    model_version=self._model(variant, ts),
                    latency_ms=served.latency_ms,
                    input_tokens=300,
                    output_tokens=served.output_tokens,
                    cost_usd=served.cost_usd,
                    cache_hit=served.cache_hit,
                    error=served.error,
                    prompt_text=prompt,
                    response_text=response,
                    segment=segment,
                    **common,
                )
                events.append(trace)
                if shadowed and variant == "control":  # the user sees control; the candidate answers unseen
                    events.append(self._shadow_pair(trace, expects_json))
                reaction = rng.random()
                kind = None
                if reaction < arm.thumbs_down:
                    kind = "thumbs_down"
                elif reaction < arm.thumbs_down + arm.thumbs_up:
                    kind = "thumbs_up"
                if kind:
                    events.append(
                        FeedbackEvent(
                            event_id=f"f-{trace_id}-{kind}", ts=ts + 4_000, trace_id=trace_id, kind=kind, **common
                        )
                    )
                if rng.random() < arm.edit:
                    events.append(
                        FeedbackEvent(
                            event_id=f"f-{trace_id}-edit",
                            ts=ts + 6_000,
                            trace_id=trace_id,
                            kind="edit",
                            final_text=response[: len(response) // 2] + " edited",
                            **common,
                        )
                    )
                last = index == requests - 1
                if last and rng.random() < arm.abandon:
                    events.append(
                        FeedbackEvent(
                            event_id=f"f-{trace_id}-abandon", ts=ts + 8_000, trace_id=trace_id, kind="abandon", **common
                        )
                    )
                if not last and rng.random() < arm.retry:
                    events.append(
                        FeedbackEvent(
                            event_id=f"f-{trace_id}-retry", ts=ts + 2_000, trace_id=trace_id, kind="retry", **common
                        )
                    )
                    ts += 20_000  # a retry comes quickly, with the same prompt
                else:
                    ts += int(rng.expovariate(1 / 90_000)) + 5_000
                    prompt = " ".join(rng.choice(WORDS) for _ in range(8))
        # A broken emitter loses traces and feedback (shadow pairs have their own path).
        events = [e for e in events if isinstance(e, ShadowPair) or rng.random() >= self.drops.get(e.variant, 0.0)]
        events += self.later
        end = step_start + step_ms + self.lead_ms
        self.later = [e for e in events if e.ts >= end]
        events = [e for e in events if e.ts < end]
        events.sort(key=lambda e: e.ts)  # the outcomes agent treats far-behind events as late
        return events

    def _shadow_pair(self, trace: TraceEvent, expects_json: bool) -> ShadowPair:
        """The served control answer beside the candidate's, drawn from the candidate's model (and
        tagged so the simulated judge knows it). A timed-out side has no answer, as in the helper."""
        answer = simulated_answer(
            self.shadow_rng, self.arms["candidate"], trace.prompt_text, expects_json, tag=CANDIDATE_TAG
        )
        control = ShadowSide(
            response_text=None if trace.error == "timeout" else trace.response_text,
            latency_ms=trace.latency_ms,
            cost_usd=trace.cost_usd,
            input_tokens=trace.input_tokens,
            output_tokens=trace.output_tokens,
            error=trace.error,
            model_version=trace.model_version,
            prompt_version=trace.prompt_version,
        )
        candidate = ShadowSide(
            response_text=None if answer.error == "timeout" else answer.text,
            latency_ms=answer.latency_ms,
            cost_usd=answer.cost_usd,
            input_tokens=trace.input_tokens,
            output_tokens=answer.output_tokens,
            error=answer.error,
            model_version=self._model("candidate", trace.ts),
            prompt_version=self._prompt("candidate"),
        )
        return ShadowPair(
            event_id=f"s-{trace.trace_id}",
            ts=trace.ts,
            rollout_id=self.rollout_id,
            user_id=trace.user_id,
            request_id=trace.trace_id,
            prompt_text=trace.prompt_text,
            expects_json=expects_json,
            control=control,
            candidate=candidate,
            session_id=trace.session_id,
        )

    def _prompt(self, variant: str) -> str:
        return getattr(self.plan, variant).prompt_version or "v1"


def status_view(settings: Settings) -> CompactedView[RolloutStatus]:
    """The compacted status topic, tailed: ``latest`` is the controller's latest look per rollout."""
    return CompactedView(
        settings,
        "status",
        lambda raw: decode(RolloutStatus, raw),
        key=lambda status: status.rollout_id,
        fetch_max_wait_ms=50,
    )


# -- the loop ----------------------------------------------------------------------------
TERMINAL = ("rolled_back", "complete", "paused")


async def closed_loop(
    settings: Settings, plan: RolloutPlan, scenario: Scenario, *, progress=None, step_timeout_s: float = 30.0
) -> dict[str, Any]:
    duration_ms = int(parse_duration(scenario.duration) * 1000)
    step_ms = int(parse_duration(scenario.step) * 1000)
    # Not rounded: the plan record is stamped at the start, and two rehearsals into one folder
    # must not publish byte-identical plans at the same time (a fresh broker's identical first
    # record reads, to a sink resuming from its checkpoint, as one it already wrote).
    start_ms = int(time.time() * 1000) - duration_ms - 10 * 60_000
    # half the allowed lateness: see Traffic.later
    traffic = Traffic(scenario, plan, plan.rollout_id, start_ms, lead_ms=int(settings.allowed_lateness_s * 500))
    decisions: list[Decision] = []
    sent = shadow_sent = 0
    outcome, first = await start_rollout(settings, plan, wait_s=60, at_ms=start_ms)
    if first is None:
        raise RuntimeError("the worker did not register the plan within 60 s")
    watcher = await status_view(settings).start()
    try:
        async with Emitter(settings=settings, buffer=1_000_000) as emitter, FlagClient(settings=settings) as flags:
            flags.on_change(lambda d: decisions.append(d) if d.rollout_id == plan.rollout_id else None)
            decisions.extend(d for d in [flags.decision(plan.rollout_id)] if d and d not in decisions)
            step_start = start_ms
            while step_start < start_ms + duration_ms:
                current = flags.decision(plan.rollout_id)
                if current is not None and current.stage in TERMINAL:
                    break
                events = traffic.step(flags, step_start, step_ms)
                for event in events:
                    if isinstance(event, ShadowPair):
                        shadow_sent += emitter.shadow_pair(event)
                    else:
                        sent += (emitter.trace if isinstance(event, TraceEvent) else emitter.feedback)(event)
                step_start += step_ms
                await _wait_for_watermark(
                    watcher,
                    plan.rollout_id,
                    step_start - step_ms // 4,
                    emitter,
                    step_timeout_s,
                    shadow_pairs=shadow_sent,
                )
                if progress:
                    progress(step_start - start_ms, duration_ms, sent, flags.decision(plan.rollout_id))
            await asyncio.sleep(0.5)  # the last decision's way to the client
    finally:
        await watcher.stop()
    final = watcher.latest.get(plan.rollout_id)
    seen, unique = set(), []
    for decision in sorted(decisions, key=lambda d: d.seq):
        if decision.seq not in seen:
            seen.add(decision.seq)
            unique.append(decision)
    return {
        "decisions": unique,
        "status": final,
        "events_sent": sent,
        "shadow_pairs_sent": shadow_sent,
        "simulated_hours": round((step_start - start_ms) / HOUR_MS, 2),
        "start_ms": start_ms,
    }


async def _wait_for_watermark(
    watcher: CompactedView[RolloutStatus],
    rollout_id: str,
    target: int,
    emitter: Emitter,
    timeout_s: float,
    shadow_pairs: int = 0,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = watcher.latest.get(rollout_id)
        if status is not None and (
            status.stage in TERMINAL or (status.watermark >= target and shadow_settled(status.shadow, shadow_pairs))
        ):
            return
        await asyncio.sleep(0.05)


def shadow_settled(shadow: dict[str, Any], pairs_sent: int) -> bool:
    """Every shadow pair sent is in the controller's shadow analysis and has the judge's word
    (a verdict, or why there is none: not sampled, over budget, no judge, an error)."""
    if pairs_sent == 0:
        return True
    judge = (shadow or {}).get("judge") or {}
    accounted = sum(judge.get(key, 0) for key in ("judged", "malformed", "errors", "not_judged"))
    return (shadow or {}).get("pairs", 0) >= pairs_sent and accounted >= pairs_sent


# The share of live canary and ramp responses the simulated judge scores (at most).
SIMULATED_LIVE_SAMPLE_RATE = 0.02


def run_simulation(settings: Settings, plan: RolloutPlan, scenario: Scenario, *, progress=None) -> dict[str, Any]:
    """Start what is needed (embedded broker, worker), run the loop, stop everything.

    ``rows``: the rows this run added to each dataset of ``data_dir`` for the rollout
    (the folder may hold earlier runs of the same plan). With an external broker the
    cluster's workers write the dataset wherever they are configured to, so nothing is
    counted here: ``rows`` and ``data_dir`` are None."""
    started = time.monotonic()
    rows_before: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        if not settings.broker:
            broker = stack.enter_context(EmbeddedBroker())
            settings = settings.replace(broker=broker.bootstrap)
            own_worker = True
        else:
            own_worker = False
            # A shared cluster: never collide with a real rollout.
            plan = msgspec.structs.replace(plan, rollout_id=f"{plan.rollout_id}-sim-{uuid.uuid4().hex[:6]}")
            if any(stage.name == "shadow" for stage in plan.stages):
                print(
                    "note: with --broker the cluster's workers judge the shadow pairs (their own "
                    "ANTHROPIC_API_KEY, or no judge); the scenario's judge: block is not used",
                    file=sys.stderr,
                )
        if own_worker:
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="safeswap-sim-"))
            # The worker's judge calls a simulated endpoint, never the real API (whatever key is set).
            judge = stack.enter_context(SimulatedJudge(scenario.judge.candidate_wins, scenario.judge.control_wins))
            settings = settings.replace(
                state_dir=state_dir,
                snapshot_interval_s=0.2,
                status_interval_s=0.2,
                sink_idle_s=1.0,
                anthropic_api_key="simulated-judge-no-key",
                anthropic_base_url=judge.base_url,
                # A few live scores show the live judge; every response would slow the closed loop.
                judge_live_sample_rate=min(settings.judge_live_sample_rate, SIMULATED_LIVE_SAMPLE_RATE),
            )
            asyncio.run(ensure_topics(settings))
            rows_before = sinks.count_rows(settings.data_dir, rollout_id=plan.rollout_id)
            stack.enter_context(WorkerProcess(settings))
        result = asyncio.run(closed_loop(settings, plan, scenario, progress=progress))
        if own_worker:
            # Stopping the worker flushes what its sinks hold, not what they have not read
            # yet: wait until every event sent and every decision the loop saw is on disk
            # first (as the demo does; the last decision is published just before the loop ends).
            events = ("traces", "feedback", "shadow", "judgments")
            status = result["status"]
            judged = ((status.shadow or {}).get("judge") or {}).get("judged", 0) if status is not None else 0
            sent = result["events_sent"] + result["shadow_pairs_sent"] + judged
            sinks.wait_for_rows(
                settings.data_dir,
                {
                    events: sum(rows_before.get(name, 0) for name in events) + sent,
                    ("decisions",): rows_before.get("decisions", 0) + len(result["decisions"]),
                },
                rollout_id=plan.rollout_id,
                timeout_s=60.0,
            )
    result["seconds"] = round(time.monotonic() - started, 2)
    result["rollout_id"] = plan.rollout_id
    if own_worker:
        after = sinks.count_rows(settings.data_dir, rollout_id=plan.rollout_id)
        result["rows"] = {name: count - rows_before.get(name, 0) for name, count in after.items()}
        result["data_dir"] = os.path.abspath(settings.data_dir)
    else:
        result["rows"] = result["data_dir"] = None
    return result
