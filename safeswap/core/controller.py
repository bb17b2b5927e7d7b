"""The rollout controller as pure functions: plan + snapshots + commands -> decisions.

State machine (event time, never wall-clock, so a replay decides the same)::

    registered -> shadow -> canary -> ramp ... -> complete
         \\__________\\________\\________\\______-> paused (resume: back where it was)
                     \\________\\________\\______-> rolled_back

- ``registered``: a high-stakes plan waits here until it carries a passing
  offline eval gate (unedited, high stakes, no lost case); any other plan starts
  its first stage at once. Only here may the plan change, and only its gate.
- A stage is *promoted* when its minimum duration (event time since the stage
  began) and minimum users per arm are reached, every guardrail is ``ok``
  (enough data, no breach) and the data is healthy. After the last stage the
  rollout is ``complete`` (everyone on the candidate).
- A guardrail breach acts at once: ``rollback`` (control for everyone) or
  ``pause`` (the split is held), as the plan says.
- Broken data pauses instead of deciding on it: sample-ratio mismatch against the
  stage's allocation, users leaking from the candidate back to control, served
  model drift within an arm, or one arm losing events (responses per user differ).
  A cache-hit-rate difference between arms is flagged as a confounder for latency
  and cost in the evidence; it does not act by itself.
- Live judge scores (``source="live_judge:..."`` snapshots) are monitored only: they
  are kept for the status, take no look and never reach a rule (``live_judge_view``).

Guardrail monitors run cumulatively over the whole rollout, each with ``alpha / k``
(Bonferroni over the k guardrails), on exposure cohorts: every promotion starts a new
split period (``cohort_starts``, published in every decision so the outcomes agents
file each new user under the period of its first exposure), and the monitors combine
the cohorts' comparisons with Cochran-Mantel-Haenszel weights, so a baseline that moves
while the split ramps does not bias the comparison. When the plan states the watch time
of its serving stages, each monitor spends most of its alpha group-sequentially over
that horizon (event time) and keeps the rest for an always-valid sequence
(``SequentialSpec``). A plan with ``segments`` also tests every guardrail in each value
of those keys (segment guardrails), on half the alpha (``alpha_split``), so a regression
confined to one language or tier is found and named ("... in locale=ja"). Every decision has a sequence number; the same inputs give the
same decisions, so replays are idempotent.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from safeswap.core import live_scores
from safeswap.core.metrics import model_drift, model_drift_text
from safeswap.core.plan import METRIC_HARM, guarded_metrics, parse_duration
from safeswap.core.stats import GuardrailMonitor, split_alpha, stat_from_dict
from safeswap.core.stats.sequential import stratified_compare
from safeswap.core.stats.srm import srm_test
from schemas import Decision, GuardrailEvidence, HealthSpec, RolloutPlan, RolloutStatus, StatsSnapshot

LIVE = ("shadow", "canary", "ramp")
# Health checks need this much data before they can pause anything.
MIN_TRACES_FOR_DRIFT = 100
EVENT_LOSS_ALPHA = 0.001
HSD_GAMMA = -0.5  # the plans' default Hwang-Shih-DeCani spending (SequentialSpec.param)
# A plan with segments gives this share of its alpha to the segment guardrails.
SEGMENT_ALPHA_SHARE = 0.5


def plan_hash(plan: RolloutPlan) -> str:
    """Content hash of a plan: any change to a plan makes a new rollout."""
    builtins = msgspec.to_builtins(plan)
    if not builtins.get("sequential"):  # the default design: plans written before it keep their hash
        builtins.pop("sequential", None)
    canonical = msgspec.json.encode(builtins, order="sorted")
    return hashlib.sha256(canonical).hexdigest()[:16]


def watch_horizon_s(plan: RolloutPlan) -> float | None:
    """The planned watch time of the serving stages below 100% (event-time seconds), over
    which group-sequential guardrails spend alpha; None when a stage does not state it."""
    serving = [stage for stage in plan.stages if stage.name != "shadow" and 0 < (stage.percent or 0) < 100]
    if not serving or any(not stage.min_duration for stage in serving):
        return None
    return sum(parse_duration(stage.min_duration) for stage in serving) or None


def gate_refusal(plan: RolloutPlan) -> str | None:
    """Why a high-stakes plan may not leave ``registered`` yet; None when its gate lets it.

    ``passed`` alone is not enough: a hand-written ``{passed: true}`` or a
    low-stakes result with losses must not open the way (safeswap.core.evalgate.gate_problem)."""
    from safeswap.core.evalgate import gate_problem

    return gate_problem(plan.eval_gate) if plan.stakes == "high" else None


def only_gate_changed(old: RolloutPlan, new: RolloutPlan) -> bool:
    """The same plan but for the attached eval gate (what a plan waiting in registered may change)."""
    return plan_hash(msgspec.structs.replace(old, eval_gate=None)) == plan_hash(
        msgspec.structs.replace(new, eval_gate=None)
    )


class PlanConflict(ValueError):
    """A different plan under a rollout id that already started."""


@dataclass
class Health:
    """What the data-quality checks found at one look."""

    srm_p_value: float = 1.0
    srm_counts: dict[str, int] = field(default_factory=dict)
    crossover_share: float = 0.0
    model_drift: dict[str, float] = field(default_factory=dict)  # variant -> share off the pinned model
    responses_per_user: dict[str, Any] | None = None  # event-loss check
    cache_skew: dict[str, Any] | None = None  # confounder flag
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (check, action, reason)


@dataclass
class Evaluation:
    """One look at a rollout: guardrails, health, progress in the stage."""

    ts: int
    users: dict[str, int]
    verdicts: dict[str, Any]
    health: Health
    stage_elapsed_s: float
    stage_min_duration_s: float
    stage_min_users: int
    # The shadow analysis (safeswap.core.shadow_analysis.analyze), when there are shadow statistics.
    shadow: dict[str, Any] | None = None
    # Segment guardrails: (segment, metric) -> verdict; segments seen beyond the plan's cap.
    segment_verdicts: dict[tuple[str, str], Any] = field(default_factory=dict)
    segments_untested: list[str] = field(default_factory=list)

    @property
    def evidence(self) -> list[GuardrailEvidence]:
        return [_evidence(metric, verdict) for metric, verdict in self.verdicts.items()]

    @property
    def segment_evidence(self) -> list[GuardrailEvidence]:
        return [_evidence(metric, verdict, segment) for (segment, metric), verdict in self.segment_verdicts.items()]


@dataclass
class RolloutState:
    plan: RolloutPlan
    plan_hash: str
    stage: str = "registered"  # registered | shadow | canary | ramp | complete | paused | rolled_back
    stage_index: int = -1
    percent: float = 0.0
    shadow_percent: float = 0.0
    stage_started_ts: int = 0
    stage_start_exposures: dict[str, int] = field(default_factory=dict)
    paused_stage: str | None = None  # the stage a pause holds, for resume
    # Event times at which the split changed (promotions): the exposure cohorts' boundaries.
    cohort_starts: list[int] = field(default_factory=list)
    watch_started_ts: int = 0  # event time the first serving stage began (0: not yet)
    seq: int = 0
    now_ts: int = 0
    srm_min_p: float = 1.0
    snapshots: dict[int, StatsSnapshot] = field(default_factory=dict)
    monitors: dict[str, GuardrailMonitor] = field(default_factory=dict)
    # Segment guardrails, created as segment values appear: segment -> metric -> monitor.
    segment_monitors: dict[str, dict[str, GuardrailMonitor]] = field(default_factory=dict)
    last_decision: Decision | None = None
    last_evaluation: Evaluation | None = None
    # The judge agent's shadow statistics, latest per (source, partition).
    shadow_snapshots: dict[str, StatsSnapshot] = field(default_factory=dict)
    # The judge agent's live scores, latest per (source, partition): shown, never decided on.
    live_judge_snapshots: dict[str, StatsSnapshot] = field(default_factory=dict)
    # Each kept snapshot's statistics parsed once (not persisted: rebuilt from ``snapshots``).
    parsed: dict[int, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict, repr=False)
    parsed_segments: dict[int, dict[str, dict[str, dict[str, dict[str, Any]]]]] = field(
        default_factory=dict, repr=False
    )

    @property
    def live(self) -> bool:
        return self.stage in LIVE

    @property
    def current_stage(self):
        if 0 <= self.stage_index < len(self.plan.stages):
            return self.plan.stages[self.stage_index]
        return None

    # -- persistence (the decide agent keeps this in a Faust table) --------------
    def to_dict(self) -> dict[str, Any]:
        """For ``msgspec.json.encode``: the events stay Structs (encoded natively, several
        times faster than ``to_builtins`` first; the decide agent does this on every snapshot)."""
        return {
            "plan": self.plan,
            "plan_hash": self.plan_hash,
            "stage": self.stage,
            "stage_index": self.stage_index,
            "percent": self.percent,
            "shadow_percent": self.shadow_percent,
            "stage_started_ts": self.stage_started_ts,
            "stage_start_exposures": self.stage_start_exposures,
            "paused_stage": self.paused_stage,
            "cohort_starts": self.cohort_starts,
            "watch_started_ts": self.watch_started_ts,
            "seq": self.seq,
            "now_ts": self.now_ts,
            "srm_min_p": self.srm_min_p,
            "snapshots": {str(p): s for p, s in self.snapshots.items()},
            "monitors": {m: monitor.to_dict() for m, monitor in self.monitors.items()},
            "segment_monitors": {
                segment: {m: monitor.to_dict() for m, monitor in monitors.items()}
                for segment, monitors in self.segment_monitors.items()
            },
            "last_decision": self.last_decision,
            "shadow_snapshots": dict(self.shadow_snapshots),
            "live_judge_snapshots": dict(self.live_judge_snapshots),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutState:
        state = cls(
            plan=msgspec.convert(data["plan"], RolloutPlan),
            plan_hash=data["plan_hash"],
            stage=data["stage"],
            stage_index=data["stage_index"],
            percent=data["percent"],
            shadow_percent=data["shadow_percent"],
            stage_started_ts=data["stage_started_ts"],
            stage_start_exposures=data["stage_start_exposures"],
            paused_stage=data["paused_stage"],
            cohort_starts=list(data.get("cohort_starts") or []),
            watch_started_ts=data.get("watch_started_ts", 0),
            seq=data["seq"],
            now_ts=data["now_ts"],
            srm_min_p=data["srm_min_p"],
        )
        state.snapshots = {int(p): msgspec.convert(s, StatsSnapshot) for p, s in data["snapshots"].items()}
        state.monitors = {m: GuardrailMonitor.from_dict(d) for m, d in data["monitors"].items()}
        state.segment_monitors = {
            segment: {m: GuardrailMonitor.from_dict(d) for m, d in monitors.items()}
            for segment, monitors in (data.get("segment_monitors") or {}).items()
        }
        if data.get("last_decision"):
            state.last_decision = msgspec.convert(data["last_decision"], Decision)
        state.shadow_snapshots = {
            k: msgspec.convert(s, StatsSnapshot) for k, s in (data.get("shadow_snapshots") or {}).items()
        }
        state.live_judge_snapshots = {
            k: msgspec.convert(s, StatsSnapshot) for k, s in (data.get("live_judge_snapshots") or {}).items()
        }
        return state


# -- entry points ----------------------------------------------------------------
def on_plan(rollouts: dict[str, RolloutState], plan: RolloutPlan, ts: int) -> Decision | None:
    """Register a plan once; the same plan again is a no-op (replay), a changed one is refused,
    except a new eval gate for a plan still waiting in ``registered``."""
    current = rollouts.get(plan.rollout_id)
    if current is not None:
        if current.plan_hash == plan_hash(plan):
            return None
        if current.stage == "registered" and only_gate_changed(current.plan, plan):
            # Nothing has run yet: attaching the gate it waits for is not a new rollout.
            current.plan, current.plan_hash = plan, plan_hash(plan)
            return _start_or_hold(current, ts)
        raise PlanConflict(
            f"rollout {plan.rollout_id!r} already started with plan {current.plan_hash}; "
            "a started plan is immutable: give the changed plan a new rollout_id"
        )
    state = RolloutState(plan=plan, plan_hash=plan_hash(plan))  # now_ts: event time, from the first statistics
    alpha_each, _ = alpha_split(plan)
    for spec in plan.guardrails:
        judged_on = guarded_metrics(spec.metric)  # latency: one monitor per cache stratum
        for metric in judged_on:
            state.monitors[metric] = _monitor(plan, spec, metric, split_alpha(alpha_each, len(judged_on)))
    rollouts[plan.rollout_id] = state
    return _start_or_hold(state, ts)


def alpha_split(plan: RolloutPlan) -> tuple[float, float]:
    """The false-rollback budget: (each guardrail's alpha on the whole population, each
    segment guardrail's). Bonferroni throughout, so the plan as a whole rolls back a
    harmless candidate with probability <= ``plan.alpha``: without segments the k guardrails
    share it; with segments, half goes to the k whole-population guardrails and half is
    shared equally by every (guardrail, segment key, value slot), ``max_segment_values``
    slots a key, whether or not that many values appear. A latency guardrail splits its
    share again over its cache strata."""
    k = max(1, len(plan.guardrails))
    if not plan.segments:
        return split_alpha(plan.alpha, k), 0.0
    segments = plan.alpha * SEGMENT_ALPHA_SHARE
    slots = k * len(plan.segments) * plan.max_segment_values
    return split_alpha(plan.alpha - segments, k), split_alpha(segments, slots)


def _start_or_hold(state: RolloutState, ts: int) -> Decision:
    plan = state.plan
    if not plan.stages:
        return _decide(state, ts, "hold", "registered", "the plan has no stages: nothing to roll out")
    if (refusal := gate_refusal(plan)) is not None:
        return _decide(
            state, ts, "hold", "registered", f"high-stakes plan waits for a passing offline eval gate: {refusal}"
        )
    return _enter_stage(state, 0, ts, "start")


def on_snapshot(state: RolloutState, snapshot: StatsSnapshot) -> Decision | None:
    """Fold one partition's cumulative snapshot in and look at the rollout once more."""
    if snapshot.source.startswith(live_scores.SOURCE_PREFIX):
        # Live judge scores are monitored, never a decision input: kept for the status only,
        # with no look (not even event time moves), so they cannot roll back, pause or hold.
        key = f"{snapshot.source}|{snapshot.partition}"
        previous = state.live_judge_snapshots.get(key)
        if previous is not None and previous.seq >= snapshot.seq:
            return None
        try:
            live_scores.validate(snapshot.live_judge)
        except ValueError as exc:  # refused (the decide agent dead-letters it), never kept
            raise ValueError(
                f"live judge snapshot of {snapshot.rollout_id!r} from partition {snapshot.partition}: {exc}; "
                "the snapshot is ignored (the partition's next snapshot replaces it)"
            ) from None
        state.live_judge_snapshots[key] = snapshot
        return None
    if snapshot.source:  # the judge agent's shadow statistics: kept apart, per (source, partition)
        key = f"{snapshot.source}|{snapshot.partition}"
        previous = state.shadow_snapshots.get(key)
        if previous is not None and previous.seq >= snapshot.seq:
            return None
        state.shadow_snapshots[key] = snapshot
    else:
        previous = state.snapshots.get(snapshot.partition)
        if previous is not None and previous.seq >= snapshot.seq:
            return None  # a replayed or older snapshot: already counted
        # Parsed before it is kept (a bad one must not block every later look), and only what a look reads.
        parsed = parse_snapshot(snapshot, looked_at(state))
        segments = parse_segments(snapshot, state.monitors)
        state.snapshots[snapshot.partition] = snapshot
        state.parsed[snapshot.partition] = parsed
        state.parsed_segments[snapshot.partition] = segments
    state.now_ts = max(state.now_ts, snapshot.ts)
    if not state.live:
        return None
    if state.stage_started_ts == 0:
        # A stage's watch starts in event time: at the first statistics seen in it
        # (the plan itself arrives with a wall-clock timestamp, not event time).
        state.stage_started_ts = snapshot.ts
    if state.watch_started_ts == 0 and state.stage in ("canary", "ramp"):
        state.watch_started_ts = state.stage_started_ts
    evaluation = evaluate(state)
    state.last_evaluation = evaluation
    return decide(state, evaluation)


def on_command(state: RolloutState, command: str, reason: str, ts: int) -> Decision | None:
    """A person's word: pause, resume or abort (abort = roll back now)."""
    ts = max(ts, state.now_ts)
    who = f" ({reason})" if reason else ""
    if command == "pause":
        if not state.live:
            return None
        state.paused_stage = state.stage
        return _decide(state, ts, "pause", "paused", f"paused by an operator{who}")
    if command == "resume":
        if state.stage != "paused" or state.paused_stage is None:
            return None
        stage, state.paused_stage = state.paused_stage, None
        return _decide(state, ts, "resume", stage, f"resumed by an operator{who}")
    if command == "abort":
        if state.stage in ("rolled_back", "complete"):
            return None
        return _decide(state, ts, "rollback", "rolled_back", f"aborted by an operator{who}", percent=0.0)
    raise ValueError(f"unknown command {command!r}: use pause, resume or abort")


# -- one look ----------------------------------------------------------------------
# What the health checks compare between arms, besides the guardrails' metrics.
HEALTH_METRICS = frozenset({"responses_per_user", "cache_hit_rate"})


def looked_at(state: RolloutState) -> frozenset[str]:
    """The metrics a look reads: the guardrails' and the health checks'."""
    return HEALTH_METRICS | frozenset(state.monitors)


def parse_snapshot(
    snapshot: StatsSnapshot, metrics: Collection[str] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """The snapshot's per-cohort statistics, parsed: parsed[cohort][variant][metric], of
    ``metrics`` only when given (a snapshot carries ~30 metrics a cohort; a look reads a few).
    A snapshot without cohorts (written before them) counts as cohort "0". Raises ValueError
    naming the partition, cohort, variant and metric of any statistic that cannot be used (NaN,
    negative sums, inconsistent squares): it never reaches a decision."""
    return _parse_cohorts(snapshot, snapshot.cohorts or {"0": snapshot.metrics}, metrics)


def parse_segments(
    snapshot: StatsSnapshot, metrics: Collection[str] | None = None
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """The snapshot's segment statistics, parsed: parsed[segment][cohort][variant][metric]."""
    return {
        segment: _parse_cohorts(snapshot, cohorts, metrics, f" {segment}")
        for segment, cohorts in snapshot.segments.items()
    }


def _parse_cohorts(
    snapshot: StatsSnapshot, cohorts: dict, metrics: Collection[str] | None, where: str = ""
) -> dict[str, dict[str, dict[str, Any]]]:
    parsed: dict[str, dict[str, dict[str, Any]]] = {}
    for cohort, variants in cohorts.items():
        for variant, stats in variants.items():
            into = parsed.setdefault(cohort, {}).setdefault(variant, {})
            for metric, stat in stats.items():
                if metrics is not None and metric not in metrics:
                    continue
                try:
                    into[metric] = stat_from_dict(stat)
                except ValueError as exc:
                    raise ValueError(
                        f"statistics snapshot of {snapshot.rollout_id!r} from partition "
                        f"{snapshot.partition},{where} cohort {cohort}, {variant} {metric}: {exc}; the "
                        "snapshot is ignored (the partition's next snapshot replaces it)"
                    ) from None
    return parsed


def merge_cohorts(state: RolloutState) -> dict[str, dict[str, dict[str, Any]]]:
    """Add the latest snapshot of every partition per exposure cohort: merged[cohort][variant][metric]."""
    for partition, snapshot in state.snapshots.items():
        if partition not in state.parsed:  # restored state: parse once more
            state.parsed[partition] = parse_snapshot(snapshot, looked_at(state))
    return add_cohorts(state.parsed[p] for p in state.snapshots)


def merge_segments(state: RolloutState) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``merge_cohorts`` per segment: merged[segment][cohort][variant][metric]."""
    by_segment: dict[str, list] = {}
    for partition, snapshot in state.snapshots.items():
        if partition not in state.parsed_segments:  # restored state: parse once more
            state.parsed_segments[partition] = parse_segments(snapshot, state.monitors)
        for segment, parsed in state.parsed_segments[partition].items():
            by_segment.setdefault(segment, []).append(parsed)
    return {segment: add_cohorts(parsed) for segment, parsed in sorted(by_segment.items())}


def add_cohorts(
    parsed_snapshots: Iterable[dict[str, dict[str, dict[str, Any]]]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """Add parsed snapshots (``parse_snapshot``) cohort by cohort: merged[cohort][variant][metric]."""
    merged: dict[str, dict[str, dict[str, Any]]] = {}
    for parsed in parsed_snapshots:
        for cohort, variants in parsed.items():
            for variant, metrics in variants.items():
                into = merged.setdefault(cohort, {}).setdefault(variant, {})
                for metric, value in metrics.items():
                    into[metric] = into[metric] + value if metric in into else value
    return merged


def cohort_strata(cohorts: dict[str, dict[str, dict[str, Any]]], metric: str) -> tuple[list, list]:
    """(control, candidate) statistics of ``metric`` in every cohort that has both."""
    control, candidate = [], []
    for cohort in sorted(cohorts, key=int):
        arms = cohorts[cohort]
        a, b = arms.get("control", {}).get(metric), arms.get("candidate", {}).get(metric)
        if a is not None and b is not None:
            control.append(a)
            candidate.append(b)
    return control, candidate


def watch_fraction(state: RolloutState) -> float | None:
    """Share of the plan's watch horizon elapsed in event time (None without a horizon)."""
    horizon = watch_horizon_s(state.plan)
    if horizon is None or state.watch_started_ts == 0:
        return None
    return max(0.0, (state.now_ts - state.watch_started_ts) / 1000 / horizon)


def _sum_by_variant(snapshots: dict[int, StatsSnapshot], attribute: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for snapshot in snapshots.values():
        for variant, count in getattr(snapshot, attribute).items():
            total[variant] = total.get(variant, 0) + count
    return total


def evaluate(state: RolloutState) -> Evaluation:
    cohorts = merge_cohorts(state)
    users = _sum_by_variant(state.snapshots, "users")
    verdicts: dict[str, Any] = {}
    segment_verdicts: dict[tuple[str, str], Any] = {}
    untested: list[str] = []
    if state.stage != "shadow":  # in shadow nobody is served the candidate: nothing to compare
        fraction = watch_fraction(state)
        for metric, monitor in state.monitors.items():
            strata = cohort_strata(cohorts, metric)
            if strata[0]:
                verdicts[metric] = monitor.update(*strata, fraction=fraction)
        for segment, segment_cohorts in (merge_segments(state) if state.plan.segments else {}).items():
            monitors = segment_monitors(state, segment)
            if monitors is None:
                untested.append(segment)
                continue
            for metric, monitor in monitors.items():
                strata = cohort_strata(segment_cohorts, metric)
                if strata[0]:
                    segment_verdicts[(segment, metric)] = monitor.update(*strata, fraction=fraction)
    stage = state.current_stage
    return Evaluation(
        ts=state.now_ts,
        users=users,
        verdicts=verdicts,
        health=check_health(state, cohorts, users),
        stage_elapsed_s=(state.now_ts - state.stage_started_ts) / 1000,
        stage_min_duration_s=parse_duration(stage.min_duration) if stage and stage.min_duration else 0.0,
        stage_min_users=(stage.min_users_per_arm or 0) if stage else 0,
        shadow=shadow_analysis(state),
        segment_verdicts=segment_verdicts,
        segments_untested=untested,
    )


def segment_monitors(state: RolloutState, segment: str) -> dict[str, GuardrailMonitor] | None:
    """The guardrails of ``segment`` ("locale=ja"), made when the segment first has data, for
    the first ``max_segment_values`` values of its key (the slots ``alpha_split`` budgets);
    None for a value beyond them."""
    monitors = state.segment_monitors.get(segment)
    if monitors is not None:
        return monitors
    plan, key = state.plan, segment.split("=", 1)[0]
    if sum(s.split("=", 1)[0] == key for s in state.segment_monitors) >= plan.max_segment_values:
        return None
    _, alpha_each = alpha_split(plan)
    monitors = state.segment_monitors[segment] = {}
    for spec in plan.guardrails:
        judged_on = guarded_metrics(spec.metric)
        for metric in judged_on:
            monitors[metric] = _monitor(plan, spec, metric, split_alpha(alpha_each, len(judged_on)), segment)
    return monitors


def shadow_analysis(state: RolloutState) -> dict[str, Any] | None:
    """The shadow analysis while in shadow (or whenever shadow statistics exist)."""
    if state.stage != "shadow" and not state.shadow_snapshots:
        return None
    from safeswap.core.shadow_analysis import analyze, merge

    merged = merge([s.shadow for s in state.shadow_snapshots.values()])
    stage = state.current_stage if state.stage == "shadow" else None
    return analyze(merged, state.plan, stage)


def live_judge_view(state: RolloutState) -> dict[str, Any]:
    """The live judge scores per variant and their interval (safeswap.core.live_scores.summarize),
    for the status and the dashboard; {} before any. Nothing in a look reads this."""
    if not state.live_judge_snapshots:
        return {}
    merged = live_scores.merge([s.live_judge for s in state.live_judge_snapshots.values()])
    return live_scores.summarize(merged, state.plan)


def check_health(state: RolloutState, cohorts: dict[str, dict[str, dict[str, Any]]], users: dict[str, int]) -> Health:
    plan, health = state.plan, Health()
    rules = plan.health
    serving = state.stage in ("canary", "ramp") and 0 < state.percent < 100
    # Sample-ratio mismatch on users first seen in this stage, against its split.
    exposures = _sum_by_variant(state.snapshots, "first_exposures")
    if serving and exposures and rules.srm != "ignore":
        counts = _stage_exposures(state, exposures)
        health.srm_counts = {"control": counts[0], "candidate": counts[1]}
        if sum(counts) > 0:
            share = state.percent / 100
            result = srm_test(counts, [1 - share, share])
            state.srm_min_p = min(state.srm_min_p, result.p_value)
            health.srm_p_value = state.srm_min_p
            if state.srm_min_p < rules.srm_alpha:
                health.problems.append(
                    (
                        "srm",
                        rules.srm,
                        (
                            f"sample ratio mismatch: {counts[1]:,} candidate / {counts[0]:,} control new users in "
                            f"this stage, expected {state.percent:g}% candidate (p={state.srm_min_p:.2g})"
                        ),
                    )
                )
    # Users served the candidate, then control: the assignment leaks.
    crossover = sum(s.crossover_users for s in state.snapshots.values())
    total_users = sum(users.values())
    if total_users:
        health.crossover_share = crossover / total_users
        if rules.crossover != "ignore" and health.crossover_share > rules.crossover_max and crossover >= 10:
            health.problems.append(
                (
                    "crossover",
                    rules.crossover,
                    (
                        f"{crossover:,} users ({health.crossover_share:.1%}) were served the candidate and later control, "
                        f"above crossover_max {rules.crossover_max:.1%}: is the app assigning by request, not user?"
                    ),
                )
            )
    # Served-model drift within an arm.
    models = _models_by_variant(state.snapshots)
    for variant in ("control", "candidate"):
        pinned = getattr(plan, variant).model
        seen = models.get(variant, {})
        drift = model_drift(seen, pinned)
        if drift is None or sum(seen.values()) < MIN_TRACES_FOR_DRIFT:
            continue
        health.model_drift[variant] = drift
        if rules.model_drift != "ignore" and drift > rules.model_drift_max_share:
            others = ", ".join(sorted(m for m in seen if m != pinned))
            health.problems.append(
                (
                    "model_drift",
                    rules.model_drift,
                    (f"{variant} served {drift:.1%} of its responses from {others}, not the pinned {pinned}"),
                )
            )
    # One arm losing events: responses per user differ between arms (cohort by cohort: earlier
    # cohorts have had longer to come back, and the arms' shares differ between cohorts).
    if serving:
        strata = cohort_strata(cohorts, "responses_per_user")
        if strata[0] and min(sum(s.n for s in arm) for arm in strata) >= plan.min_users_per_arm:
            try:
                result = stratified_compare(
                    list(zip(*strata)),
                    alpha=EVENT_LOSS_ALPHA,
                    n_tune=plan.n_tune,
                    difference="relative",
                    alternative="two-sided",
                )
            except ValueError:  # no cohort with 2 users in both arms yet
                result = None
            if result is not None:
                health.responses_per_user = result.to_dict()
                if result.p_value < EVENT_LOSS_ALPHA:
                    health.problems.append(
                        (
                            "event_loss",
                            "pause",
                            (
                                f"candidate responses per user {result.estimate:+.1%} vs control (p={result.p_value:.2g}): "
                                "one arm is losing events, or the candidate changed engagement; check the emitters"
                            ),
                        )
                    )
    # Cache-hit skew: a confounder for latency and cost, flagged, not acted on (cohort by cohort).
    strata = cohort_strata(cohorts, "cache_hit_rate")
    if strata[0] and min(sum(s.n for s in arm) for arm in strata) >= plan.min_users_per_arm:
        try:
            result = stratified_compare(
                list(zip(*strata)),
                alpha=rules.cache_skew_alpha,
                n_tune=plan.n_tune,
                difference="absolute",
                alternative="two-sided",
            )
        except ValueError:  # no cohort with 2 users in both arms yet
            result = None
        if result is not None:
            health.cache_skew = {**result.to_dict(), "skewed": result.p_value < rules.cache_skew_alpha}
    return health


def _stage_exposures(state: RolloutState, exposures: dict[str, int]) -> list[int]:
    """New users of each arm in the current split period: the current cohort's first exposures
    (the outcomes agents file a user under the period in force when they learn of it, as the
    apps' flag clients switch splits), else the growth since the stage began."""
    cohort = str(len(state.cohort_starts))
    if all(len(s.cohort_starts) == len(state.cohort_starts) for s in state.snapshots.values()):
        counts = {"control": 0, "candidate": 0}
        for snapshot in state.snapshots.values():
            for variant, n in snapshot.cohort_exposures.get(cohort, {}).items():
                counts[variant] = counts.get(variant, 0) + n
        return [counts["control"], counts["candidate"]]
    return [max(0, exposures.get(v, 0) - state.stage_start_exposures.get(v, 0)) for v in ("control", "candidate")]


def _models_by_variant(snapshots: dict[int, StatsSnapshot]) -> dict[str, dict[str, int]]:
    models: dict[str, dict[str, int]] = {}
    for snapshot in snapshots.values():
        for variant, seen in snapshot.models.items():
            into = models.setdefault(variant, {})
            for model, count in seen.items():
                into[model] = into.get(model, 0) + count
    return models


def decide(state: RolloutState, evaluation: Evaluation) -> Decision | None:
    """The action for one look: rollback > pause > promote > nothing."""
    breaches = [
        (v.reason, spec.action)
        for spec in state.plan.guardrails
        for metric in guarded_metrics(spec.metric)
        if (v := evaluation.verdicts.get(metric)) is not None and v.status == "breach"
    ]
    breaches += [
        (v.reason, spec.action)
        for spec in state.plan.guardrails
        for metric in guarded_metrics(spec.metric)
        for (_, verdict_metric), v in evaluation.segment_verdicts.items()
        if verdict_metric == metric and v.status == "breach"
    ]
    problems = [(reason, action) for _, action, reason in evaluation.health.problems]
    for action in ("rollback", "pause"):
        reasons = [reason for reason, act in breaches + problems if act == action]
        if reasons:
            if action == "rollback":
                return _decide(
                    state,
                    evaluation.ts,
                    "rollback",
                    "rolled_back",
                    "; ".join(reasons),
                    evaluation=evaluation,
                    percent=0.0,
                )
            state.paused_stage = state.stage
            return _decide(state, evaluation.ts, "pause", "paused", "; ".join(reasons), evaluation=evaluation)
    if not _ready_to_promote(state, evaluation):
        return None
    if state.stage_index + 1 < len(state.plan.stages):
        return _enter_stage(state, state.stage_index + 1, evaluation.ts, "promote", evaluation)
    state.stage_index = len(state.plan.stages)
    return _decide(
        state,
        evaluation.ts,
        "complete",
        "complete",
        f"every stage passed; candidate serves everyone ({_summary(evaluation)})",
        evaluation=evaluation,
        percent=100.0,
        shadow_percent=0.0,
    )


def _ready_to_promote(state: RolloutState, evaluation: Evaluation) -> bool:
    if evaluation.stage_elapsed_s < evaluation.stage_min_duration_s:
        return False
    arms = ("control",) if state.stage == "shadow" else ("control", "candidate")
    if any(evaluation.users.get(arm, 0) < evaluation.stage_min_users for arm in arms):
        return False
    if state.stage == "shadow":
        # Evidence, not the absence of a breach: enough shadow and judged pairs, every
        # enforced tail/cost/latency check ok, the judge within the stage's margin
        # (safeswap.core.shadow_analysis, docs/shadow.md).
        return evaluation.shadow is not None and bool(evaluation.shadow["ready"])
    # Every guardrail must have looked and be ok (not insufficient data); a
    # stratified one in every stratum that has data, and at least one.
    for spec in state.plan.guardrails:
        verdicts = [v for m in guarded_metrics(spec.metric) if (v := evaluation.verdicts.get(m)) is not None]
        if not verdicts or any(v.status != "ok" for v in verdicts):
            return False
    return True


def _summary(evaluation: Evaluation) -> str:
    users = evaluation.users
    return f"{users.get('control', 0):,} control / {users.get('candidate', 0):,} candidate users"


def _enter_stage(
    state: RolloutState, index: int, ts: int, action: str, evaluation: Evaluation | None = None
) -> Decision:
    stage = state.plan.stages[index]
    state.stage_index = index
    state.stage_started_ts = evaluation.ts if evaluation is not None else 0
    if action == "promote" and evaluation is not None:
        state.cohort_starts.append(evaluation.ts)  # a new split from here on: a new exposure cohort
    if state.watch_started_ts == 0 and stage.name != "shadow":
        state.watch_started_ts = state.stage_started_ts
    state.stage_start_exposures = _sum_by_variant(state.snapshots, "first_exposures")
    state.srm_min_p = 1.0  # a new split: a new SRM test
    if stage.name == "shadow":
        percent, shadow_percent = 0.0, stage.shadow_percent or 0.0
        what = f"shadow: {shadow_percent:g}% of users' requests also go to the candidate, unseen"
    else:
        percent, shadow_percent = stage.percent or 0.0, 0.0
        what = f"{stage.name}: candidate served to {percent:g}% of users"
    if action == "start":
        reason = f"started; {what}"
    else:
        reason = f"promoted to {what} after {_hours(evaluation.stage_elapsed_s)}, {_summary(evaluation)}"
    return _decide(
        state, ts, action, stage.name, reason, evaluation=evaluation, percent=percent, shadow_percent=shadow_percent
    )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def _decide(
    state: RolloutState,
    ts: int,
    action: str,
    stage: str,
    reason: str,
    *,
    evaluation: Evaluation | None = None,
    percent: float | None = None,
    shadow_percent: float | None = None,
) -> Decision:
    state.seq += 1
    state.stage = stage
    if percent is not None:
        state.percent = percent
    if shadow_percent is not None:
        state.shadow_percent = shadow_percent
    if stage in ("rolled_back", "complete"):
        state.shadow_percent = 0.0
    decision = Decision(
        rollout_id=state.plan.rollout_id,
        seq=state.seq,
        ts=ts,
        action=action,
        stage=stage,
        percent=state.percent,
        salt=state.plan.effective_salt,
        reason=reason,
        plan_hash=state.plan_hash,
        evidence=evaluation.evidence if evaluation else [],
        segment_evidence=evaluation.segment_evidence if evaluation else [],
        shadow_percent=state.shadow_percent,
        control=_variant_meta(state.plan.control),
        candidate=_variant_meta(state.plan.candidate),
        health=health_dict(evaluation.health) if evaluation else {},
        cohort_starts=list(state.cohort_starts),
        segments=list(state.plan.segments),
        segment_metrics=sorted(state.monitors) if state.plan.segments else [],
    )
    state.last_decision = decision
    return decision


def health_dict(health: Health) -> dict[str, Any]:
    return {
        "srm_p_value": health.srm_p_value,
        "srm_new_users": health.srm_counts,
        "crossover_share": health.crossover_share,
        "model_drift": health.model_drift,
        "responses_per_user": health.responses_per_user,
        "cache_skew": health.cache_skew,
        "problems": [{"check": c, "action": a, "reason": r} for c, a, r in health.problems],
    }


def health_checks(health: dict[str, Any], rules: HealthSpec) -> list[dict[str, Any]]:
    """The data-health checks as rows a person can read: each with its value, its threshold,
    its status (``ok``, ``problem``, ``flagged`` for a check that only warns, ``not checked``
    while it cannot run) and what a failure does. ``health`` is a status's or decision's
    ``health`` (``health_dict``)."""

    def mapping(value: Any) -> dict[str, Any]:  # health arrives from events: any shape
        return value if isinstance(value, dict) else {}

    problems = health.get("problems")
    found = {p.get("check") for p in (problems if isinstance(problems, list) else []) if isinstance(p, dict)}

    def row(check: str, value: str, threshold: str, status: str, action: str) -> dict[str, Any]:
        if status != "not checked" and check in found:
            status = "problem"
        return {
            "check": check,
            "value": value,
            "threshold": threshold,
            "status": status,
            "on_failure": "nothing (ignored by the plan)" if action == "ignore" else action,
        }

    rows = []
    srm = health.get("srm_p_value")
    counts = mapping(health.get("srm_new_users"))
    rows.append(
        row(
            "srm",
            f"p={srm:.2g} ({counts.get('candidate', 0):,} candidate / {counts.get('control', 0):,} control new users)"
            if _number(srm) and counts
            else f"p={srm:.2g}"
            if _number(srm)
            else "-",
            f"p < {rules.srm_alpha:g}",
            "ok" if _number(srm) else "not checked",
            rules.srm,
        )
    )
    crossover = health.get("crossover_share")
    rows.append(
        row(
            "crossover",
            f"{crossover:.2%} of users" if _number(crossover) else "-",
            f"> {rules.crossover_max:.1%} (and 10 users)",
            "ok" if _number(crossover) else "not checked",
            rules.crossover,
        )
    )
    drift = mapping(health.get("model_drift"))
    rows.append(
        row(
            "model_drift",
            model_drift_text(drift) if drift else "-",
            f"> {rules.model_drift_max_share:.1%} off the pinned model",
            "ok" if drift else "not checked",
            rules.model_drift,
        )
    )
    loss = mapping(health.get("responses_per_user"))
    rows.append(
        row(
            "event_loss",
            _compared("responses per user", loss, ".1%"),
            f"p < {EVENT_LOSS_ALPHA:g}",
            "ok" if loss else "not checked",
            "pause",
        )
    )
    skew = mapping(health.get("cache_skew"))
    rows.append(
        row(
            "cache_skew",
            _compared("cache-hit rate", skew, ".2%"),
            f"p < {rules.cache_skew_alpha:g}",
            ("flagged" if skew.get("skewed") else "ok") if skew else "not checked",
            "flag only (latency and cost are confounded)",
        )
    )
    return rows


def _compared(what: str, result: dict[str, Any], spec: str) -> str:
    """A two-arm comparison's estimate and p-value as the health table shows them, or "-"."""
    if not (_number(result.get("estimate")) and _number(result.get("p_value"))):
        return "-"
    return f"{what} {result['estimate']:+{spec}}, p={result['p_value']:.2g}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stage_label(stage) -> str:
    if stage.name == "shadow":
        return f"shadow {stage.shadow_percent:g}%"
    return f"{stage.name} {stage.percent:g}%"


def status_of(state: RolloutState) -> RolloutStatus:
    """What ``safeswap rollout status`` shows: the controller's latest look."""
    evaluation = state.last_evaluation
    stage = state.current_stage  # before any statistics: what the stage will need
    min_duration_s = parse_duration(stage.min_duration) if stage and stage.min_duration else 0.0
    min_users = (stage.min_users_per_arm or 0) if stage else 0
    return RolloutStatus(
        rollout_id=state.plan.rollout_id,
        ts=state.now_ts,
        stage=state.stage,
        stage_index=state.stage_index,
        stages=[stage_label(stage) for stage in state.plan.stages],
        percent=state.percent,
        shadow_percent=state.shadow_percent,
        stage_started_ts=state.stage_started_ts,
        stage_elapsed_s=(state.now_ts - state.stage_started_ts) / 1000 if state.stage_started_ts else 0.0,
        stage_min_duration_s=evaluation.stage_min_duration_s if evaluation else min_duration_s,
        stage_min_users=evaluation.stage_min_users if evaluation else min_users,
        users=evaluation.users if evaluation else {},
        guardrails=evaluation.evidence if evaluation else [],
        segment_guardrails=evaluation.segment_evidence if evaluation else [],
        health=health_dict(evaluation.health) if evaluation else {},
        last_decision=state.last_decision,
        plan_hash=state.plan_hash,
        watermark=min((s.ts for s in state.snapshots.values()), default=0),
        shadow=(evaluation.shadow or {}) if evaluation else {},
        segments_untested=evaluation.segments_untested if evaluation else [],
        live_judge=live_judge_view(state),
    )


def _variant_meta(spec) -> dict[str, str]:
    return {k: v for k, v in msgspec.to_builtins(spec).items() if v is not None}


def group_sequential_config(plan: RolloutPlan) -> dict[str, Any] | None:
    """The monitors' group-sequential settings, or None for the confidence sequence alone."""
    sequential = plan.sequential
    if sequential.design == "confidence_sequence" or watch_horizon_s(plan) is None:
        return None
    param = sequential.param
    if param is None and sequential.spending == "hsd":
        # gamma -0.5: 5% -> 6% found in ~92% of runs by a median 0.84x the fixed-horizon n;
        # gamma -1 (the textbook choice) ~92.5% at 0.87-0.90x (docs/statistics.md)
        param = HSD_GAMMA
    return {"spending": sequential.spending, "param": param, "share": sequential.share, "analyses": sequential.analyses}


def _monitor(plan: RolloutPlan, spec, metric: str, alpha: float, segment: str = "") -> GuardrailMonitor:
    direction = METRIC_HARM.get(spec.metric, "increase")
    relative = spec.max_relative_increase if direction == "increase" else spec.max_relative_decrease
    absolute = spec.max_absolute_increase if direction == "increase" else spec.max_absolute_decrease
    return GuardrailMonitor(
        metric,
        max_relative_harm=relative,
        max_absolute_harm=absolute,
        direction=direction,
        alpha=alpha,
        min_units_per_arm=plan.min_users_per_arm,
        n_tune=plan.n_tune,
        group_sequential=group_sequential_config(plan),
        scope=segment,
    )


def _evidence(metric: str, verdict, segment: str = "") -> GuardrailEvidence:
    return GuardrailEvidence(
        metric=metric,
        status=verdict.status,
        estimate=verdict.estimate,
        ci_low=verdict.ci_low,
        ci_high=verdict.ci_high,
        p_value=verdict.p_value,
        threshold=verdict.threshold,
        users_control=verdict.n_control,
        users_candidate=verdict.n_candidate,
        reason=verdict.reason,
        gst_z=verdict.gst_z,
        gst_bound=verdict.gst_bound,
        gst_spent=verdict.gst_spent,
        segment=segment,
    )
