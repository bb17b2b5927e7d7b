"""What the dashboard shows, as plain data: one model fed the same way live or recorded.

:class:`DashboardModel` takes plans, statistics snapshots, decisions, statuses and
judgments, in the order their topics hold them, and answers
:meth:`DashboardModel.rollouts` (the list) and :meth:`DashboardModel.view` (one
rollout, JSON-ready). A live source feeds it from Kafka, a recorded one from the
Parquet datasets: the page cannot tell them apart.

The guardrail intervals *over time* are recomputed here by running the
controller's own pure functions (``safeswap.core.controller.on_plan`` /
``on_snapshot``) over the plan and the statistics snapshots, in the order the
decide agent read them (snapshots are keyed by rollout, so one partition holds
them all, in order). Every snapshot is one look, as in the worker, so the
intervals are the ones the controller saw. The *decisions* shown are the
recorded ones (the truth; operator commands are not in the statistics); a
decision the replay also made at a look is drawn at that look's event time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgspec

from safeswap.core.controller import (
    LIVE,
    PlanConflict,
    RolloutState,
    add_cohorts,
    cohort_strata,
    health_checks,
    live_judge_view,
    on_plan,
    on_snapshot,
    parse_snapshot,
)
from safeswap.core.metrics import METRICS, variant_values
from safeswap.core.plan import METRIC_HARM, guarded_metrics, parse_duration
from safeswap.core.stats.sequential import stratified_compare
from schemas import DeadLetter, Decision, HealthSpec, RolloutPlan, RolloutStatus, StatsSnapshot
from streams.deadletter import reason_kind

# Per-variant rows of the page: (key, label, unit), from the metric catalog.
VARIANT_ROWS: tuple[tuple[str, str, str], ...] = tuple(
    (name, info.label, info.unit) for name, info in METRICS.items() if info.shown
)
# Metrics drawn over time per variant (a subset: the charts people watch).
TREND_METRICS: tuple[str, ...] = ("latency_ms_p95", "cost_usd_mean", "error_rate", "thumbs_down_rate")
MAX_POINTS = 1500  # per rollout: older looks are thinned (every other one) beyond this
# Rows compared with an always-valid interval (users as the unit, cohort by cohort, as the
# guardrails are): every row but the latency quantiles, which the guardrails compare per
# cache stratum.
COMPARED_ROWS: frozenset[str] = frozenset(key for key, _, _ in VARIANT_ROWS) - {"latency_ms_p50", "latency_ms_p95"}
# The topics apps write: dead letters from them, over the records they hold, are the DLQ rate.
EVENT_TOPICS: tuple[str, ...] = ("traces", "feedback", "shadow")
DLQ_ALERT_RATE = 0.01  # a dead-letter rate above this share of the events is flagged


def topic_kind(topic: str) -> str:
    """``safeswap.traces`` -> ``traces`` (topics are ``<prefix>.<name>``)."""
    return topic.rsplit(".", 1)[-1]


def variant_differences(snapshots: list[StatsSnapshot], plan: RolloutPlan) -> dict[str, dict[str, Any]]:
    """Candidate vs control for every compared row, from the latest snapshot of each partition:
    the relative difference with its always-valid two-sided interval at the plan's alpha, per
    row (users as the unit, cohort by cohort, as the guardrails compare). A row with fewer than
    the plan's ``min_users_per_arm`` gets ``{"too_few_users": n}`` instead of a difference. These
    are for reading, not for deciding: only the guardrails act, with their alpha split."""
    cohorts = add_cohorts(parse_snapshot(s, COMPARED_ROWS) for s in snapshots)
    out: dict[str, dict[str, Any]] = {}
    for metric in COMPARED_ROWS:
        strata = cohort_strata(cohorts, metric)
        users = min((sum(s.n for s in arm) for arm in strata), default=0) if strata[0] else 0
        if users < plan.min_users_per_arm:
            out[metric] = {"too_few_users": users}
            continue
        try:
            result = stratified_compare(
                list(zip(*strata)), alpha=plan.alpha, n_tune=plan.n_tune, difference="relative", alternative="two-sided"
            )
        except (ValueError, ZeroDivisionError):  # a control mean of zero, or no cohort with 2 users an arm
            continue
        out[metric] = {
            "estimate": _finite(result.estimate),
            "ci_low": _finite(result.ci_low),
            "ci_high": _finite(result.ci_high),
            "alpha": plan.alpha,
        }
    return out


@dataclass
class DeadLetterTally:
    """Dead letters of the whole worker (they need not name a rollout): counts by reason kind
    and topic, the latest reason of each kind, and the rate over the events the apps wrote."""

    by_kind: dict[str, int] = field(default_factory=dict)
    by_topic: dict[str, int] = field(default_factory=dict)
    latest: dict[str, tuple[int, str]] = field(default_factory=dict)  # kind -> (wall-clock ms, reason)
    events: int | None = None  # records on EVENT_TOPICS; None until the source has counted them

    def add(self, letter: DeadLetter) -> None:
        kind, topic = reason_kind(letter.reason), topic_kind(letter.topic)
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        self.by_topic[topic] = self.by_topic.get(topic, 0) + 1
        if letter.ts >= self.latest.get(kind, (-1, ""))[0]:
            self.latest[kind] = (letter.ts, letter.reason[:500])

    def view(self) -> dict[str, Any]:
        total = sum(self.by_kind.values())
        from_events = sum(self.by_topic.get(topic, 0) for topic in EVENT_TOPICS)
        rate = from_events / self.events if self.events else None
        return {
            "total": total,
            "from_events": from_events,
            "events": self.events,
            "rate": rate,
            "alert_rate": DLQ_ALERT_RATE,
            "status": "not checked" if rate is None else ("problem" if rate > DLQ_ALERT_RATE else "ok"),
            "kinds": [
                {
                    "kind": kind,
                    "count": n,
                    "share": n / total,
                    "latest_ts": self.latest[kind][0],
                    "latest_reason": self.latest[kind][1],
                }
                for kind, n in sorted(self.by_kind.items(), key=lambda item: (-item[1], item[0]))
            ],
            "topics": dict(sorted(self.by_topic.items())),
        }


def coalesce(snapshots: list[StatsSnapshot], chunk: int) -> list[StatsSnapshot]:
    """Keep, within every run of ``chunk`` snapshots, only the newest per (rollout, source,
    partition), in their original order. Snapshots are cumulative, so this is what a
    worker publishing ``chunk`` times less often would have sent: fewer looks, the
    same data at each, every interval still always-valid."""
    if chunk <= 1:
        return list(snapshots)
    kept: list[StatsSnapshot] = []
    for start in range(0, len(snapshots), chunk):
        run = snapshots[start : start + chunk]
        newest: dict[tuple[str, str, int], int] = {}
        for index, snapshot in enumerate(run):
            newest[(snapshot.rollout_id, _source(snapshot), snapshot.partition)] = index
        kept.extend(run[i] for i in sorted(newest.values()))
    return kept


@dataclass
class Look:
    """One statistics snapshot folded in: what the rollout looked like then."""

    ts: int
    users: dict[str, int]
    evidence: list[dict[str, Any]]  # empty when the controller did not evaluate (shadow, after the end)
    trends: dict[str, dict[str, float]]  # variant -> TREND_METRICS value


@dataclass
class RolloutTrack:
    rollout_id: str
    plan: RolloutPlan | None = None
    plan_ts: int = 0
    replay: RolloutState | None = None
    pending: list[StatsSnapshot] = field(default_factory=list)  # snapshots before their plan
    decisions: dict[int, Decision] = field(default_factory=dict)
    replay_decision_ts: dict[int, int] = field(default_factory=dict)  # seq -> look ts where the replay made it
    status: RolloutStatus | None = None
    looks: list[Look] = field(default_factory=list)
    judgments: dict[str, int] = field(default_factory=lambda: {"candidate": 0, "control": 0, "tie": 0})
    current: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> latest values
    latest_snapshots: dict[tuple[str, int], StatsSnapshot] = field(default_factory=dict)
    last_ts: int = 0
    differences: tuple[tuple, dict[str, dict[str, Any]]] | None = None  # (snapshot seqs, variant_differences)


def _source(snapshot: StatsSnapshot) -> str:
    return getattr(snapshot, "source", "") or ""


class DashboardModel:
    """Every rollout's plan, looks, decisions and status; pure (no I/O)."""

    def __init__(self, max_points: int = MAX_POINTS) -> None:
        self.tracks: dict[str, RolloutTrack] = {}
        self.version = 0  # bumps on every change: the page polls it
        self.max_points = max_points
        self.source = ""  # "live: <broker>" or "recorded: <dir>", for the page header
        self.dead_letters = DeadLetterTally()

    def _track(self, rollout_id: str) -> RolloutTrack:
        track = self.tracks.get(rollout_id)
        if track is None:
            track = self.tracks[rollout_id] = RolloutTrack(rollout_id)
        return track

    # -- input ----------------------------------------------------------------------
    def add_plan(self, plan: RolloutPlan, ts: int) -> None:
        track = self._track(plan.rollout_id)
        # The replay's state goes through the controller's on_plan, as the decide agent's
        # does: a republished plan changes nothing, except an eval gate attached to a
        # plan still waiting in registered.
        rollouts: dict[str, RolloutState] = {} if track.replay is None else {plan.rollout_id: track.replay}
        try:
            first = on_plan(rollouts, plan, ts)
        except (PlanConflict, ValueError):
            return
        if track.plan is None:
            track.plan_ts = ts
        track.plan = rollouts[plan.rollout_id].plan
        track.replay = rollouts.get(plan.rollout_id)
        if first is not None:
            track.replay_decision_ts.setdefault(first.seq, ts)
        pending, track.pending = track.pending, []
        for snapshot in pending:
            self.add_snapshot(snapshot)
        self.version += 1

    def add_snapshot(self, snapshot: StatsSnapshot) -> None:
        track = self._track(snapshot.rollout_id)
        if track.replay is None:
            track.pending.append(snapshot)
            return
        key = (_source(snapshot), snapshot.partition)
        previous = track.latest_snapshots.get(key)
        if previous is not None and previous.seq >= snapshot.seq:
            return
        current = None
        if not _source(snapshot):
            # Merged before anything changes: a snapshot that cannot be merged (malformed
            # histogram counts, say) raises here and leaves the rollout as it was, instead
            # of staying among the latest and breaking every later look.
            outcome_snapshots = [
                s for (source, _), s in {**track.latest_snapshots, key: snapshot}.items() if not source
            ]
            try:
                current = variant_values(outcome_snapshots)
            except Exception as exc:
                raise ValueError(
                    f"statistics snapshot {snapshot.rollout_id!r} partition {snapshot.partition} "
                    f"seq {snapshot.seq} cannot be merged: {exc!r}"
                ) from exc
        track.latest_snapshots[key] = snapshot
        state = track.replay
        before = state.last_evaluation
        was_live = state.live
        try:
            decision = on_snapshot(state, snapshot)
        except Exception:  # noqa: BLE001 - the replay is a view: never let it stop the feed
            decision = None
        if decision is not None:
            track.replay_decision_ts.setdefault(decision.seq, state.now_ts)
        if _source(snapshot):
            self.version += 1
            return  # shadow-analysis statistics: not outcome metrics
        evaluation = state.last_evaluation
        evaluated = evaluation is not None and evaluation is not before and (was_live or decision is not None)
        outcome_snapshots = [s for (source, _), s in track.latest_snapshots.items() if not source]
        track.current = current or {}
        ts = max(s.ts for s in outcome_snapshots)
        track.last_ts = max(track.last_ts, ts)
        users: dict[str, int] = {}
        for s in outcome_snapshots:
            for variant, count in s.users.items():
                users[variant] = users.get(variant, 0) + count
        look = Look(
            ts=ts,
            users=users,
            evidence=[msgspec.to_builtins(e) for e in evaluation.evidence] if evaluated else [],
            trends={v: {m: values[m] for m in TREND_METRICS if m in values} for v, values in track.current.items()},
        )
        track.looks.append(look)
        if len(track.looks) > self.max_points:
            keep = track.looks[-self.max_points // 2 :]
            track.looks = track.looks[: -len(keep)][::2] + keep
        self.version += 1

    def add_decision(self, decision: Decision) -> None:
        track = self._track(decision.rollout_id)
        if track.decisions.get(decision.seq) == decision:
            return
        track.decisions[decision.seq] = decision
        self.version += 1

    def add_status(self, status: RolloutStatus) -> None:
        track = self._track(status.rollout_id)
        track.status = status
        self.version += 1

    def add_dead_letter(self, letter: DeadLetter) -> None:
        self.dead_letters.add(letter)
        self.version += 1

    def set_event_count(self, events: int) -> None:
        """Records on the events topics (the DLQ rate's denominator), as the source counted them."""
        if events != self.dead_letters.events:
            self.dead_letters.events = events
            self.version += 1

    def add_judgment(self, rollout_id: str, winner: str) -> None:
        track = self._track(rollout_id)
        if winner in track.judgments:
            track.judgments[winner] += 1
            self.version += 1

    # -- output ---------------------------------------------------------------------
    def rollouts(self) -> list[dict[str, Any]]:
        out = []
        for rollout_id in sorted(self.tracks):
            track = self.tracks[rollout_id]
            last = self._last_decision(track)
            out.append(
                {
                    "rollout_id": rollout_id,
                    "stage": last.stage if last else (track.status.stage if track.status else "registered"),
                    "percent": last.percent if last else 0.0,
                    "last_action": last.action if last else None,
                    "decisions": len(track.decisions),
                }
            )
        return out

    @staticmethod
    def _last_decision(track: RolloutTrack) -> Decision | None:
        return track.decisions[max(track.decisions)] if track.decisions else None

    def view(self, rollout_id: str) -> dict[str, Any] | None:
        """Everything the page shows for one rollout, JSON-ready."""
        track = self.tracks.get(rollout_id)
        if track is None:
            return None
        plan = track.plan
        last = self._last_decision(track)
        status = track.status
        decisions = [track.decisions[seq] for seq in sorted(track.decisions)]
        look_range = (track.looks[0].ts, track.looks[-1].ts) if track.looks else None

        # Where each decision is drawn: its own event time unless that lies after the last
        # look (a plan or command stamped with a later wall-clock time, say): then the look
        # where the replay made the same decision, else the end. Never before an earlier
        # decision, so one stray clock cannot squash or reorder the timeline.
        positions: dict[int, int] = {}
        previous: int | None = None
        for d in decisions:
            replayed = track.replay_decision_ts.get(d.seq)
            if look_range is None or d.ts <= look_range[1]:
                x = d.ts
            elif replayed is not None and look_range[0] <= replayed <= look_range[1]:
                x = replayed
            elif previous is None:
                x = look_range[0]
            else:
                x = look_range[1]
            x = max(x, previous) if previous is not None else x
            positions[d.seq] = previous = x

        stages = [_stage_label(s) for s in plan.stages] if plan else (status.stages if status else [])
        stage_index = status.stage_index if status else (track.replay.stage_index if track.replay else -1)
        split = {
            "stage": last.stage if last else (status.stage if status else "registered"),
            "percent": last.percent if last else (status.percent if status else 0.0),
            "shadow_percent": last.shadow_percent if last else (status.shadow_percent if status else 0.0),
        }
        users = status.users if status and status.users else (track.looks[-1].users if track.looks else {})
        # One time range for every chart of the view (event time): the first look or decision
        # to the latest; the current stage runs from the decision that entered it.
        as_of = track.last_ts or (status.ts if status else 0)
        xs = [x for x in [*(look_range or ()), *positions.values(), as_of] if x]
        time_range = [min(xs), max(xs)] if xs else None
        current_stage = (
            {
                "from": positions[decisions[-1].seq],
                "to": time_range[1],
                "label": f"{decisions[-1].stage} {decisions[-1].percent:g}%",
            }
            if decisions and time_range
            else None
        )
        health = (
            status.health
            if status and status.health
            else (decisions[-1].health if decisions and decisions[-1].health else {})
        )
        differences = self._differences(track)
        return {
            "rollout_id": rollout_id,
            "description": plan.description if plan else None,
            "plan_hash": (last.plan_hash if last else None) or (track.replay.plan_hash if track.replay else None),
            "variants": {
                "control": dict(last.control) if last else _spec(plan, "control"),
                "candidate": dict(last.candidate) if last else _spec(plan, "candidate"),
            },
            "stages": stages,
            "stage_index": stage_index,
            "split": split,
            "users": users,
            "first_ts": track.looks[0].ts if track.looks else None,
            "as_of": as_of,
            "time_range": time_range,
            "current_stage": current_stage,
            "decisions": [
                {
                    "seq": d.seq,
                    "ts": d.ts,
                    "x": positions[d.seq],
                    "action": d.action,
                    "stage": d.stage,
                    "percent": d.percent,
                    "shadow_percent": d.shadow_percent,
                    "reason": d.reason,
                    "breached": [e.metric for e in d.evidence if e.status == "breach"],
                }
                for d in decisions
            ],
            "guardrails": self._guardrails(track),
            "segment_guardrails": self._segment_guardrails(track),
            "variant_rows": [
                {
                    "key": key,
                    "label": label,
                    "unit": unit,
                    "values": {v: track.current.get(v, {}).get(key) for v in ("control", "candidate")},
                    "difference": differences.get(key),
                }
                for key, label, unit in VARIANT_ROWS
            ],
            "trends": self._trends(track),
            "judge": self._judge(track),
            # Live judge scores by variant: the controller's own summary of the same snapshots.
            "live_judge": live_judge_view(track.replay) if track.replay is not None else {},
            "health": health,
            "health_checks": health_checks(
                health if isinstance(health, dict) else {}, plan.health if plan else HealthSpec()
            ),
            "dead_letters": self.dead_letters.view(),
            "status_live": status is not None,
            "min_duration_s": {
                label: parse_duration(s.min_duration) if s.min_duration else 0.0
                for label, s in zip(stages, plan.stages)
            }
            if plan
            else {},
        }

    @staticmethod
    def _differences(track: RolloutTrack) -> dict[str, dict[str, Any]]:
        if track.plan is None:
            return {}
        outcome = sorted((key, s.seq) for key, s in track.latest_snapshots.items() if not key[0])
        if track.differences is None or track.differences[0] != tuple(outcome):
            snapshots = [s for key, s in track.latest_snapshots.items() if not key[0]]
            try:
                found = variant_differences(snapshots, track.plan)
            except ValueError:  # a snapshot that cannot be parsed: no intervals, rather than wrong ones
                found = {}
            track.differences = (tuple(outcome), found)
        return track.differences[1]

    def _segment_guardrails(self, track: RolloutTrack) -> dict[str, Any]:
        """The plan's segment guardrails at the worker's latest look (live status, else the last
        decision): a row per (segment value, guardrail), breaches first."""
        keys = list(track.plan.segments) if track.plan is not None else []
        rows, untested = [], []
        if track.status is not None:
            rows, untested = list(track.status.segment_guardrails), list(track.status.segments_untested)
        elif (decision := self._last_decision(track)) is not None:
            rows = list(decision.segment_evidence)
        order = {"breach": 0, "ok": 1}
        return {
            "keys": keys,
            "rows": [msgspec.to_builtins(e) for e in sorted(rows, key=lambda e: (order.get(e.status, 2), e.segment))],
            "untested": untested,
        }

    def _guardrails(self, track: RolloutTrack) -> list[dict[str, Any]]:
        plan = track.plan
        specs: dict[str, Any] = {}
        if plan is not None:
            for spec in plan.guardrails:
                for metric in guarded_metrics(spec.metric):
                    specs[metric] = spec
        series: dict[str, list[dict[str, Any]]] = {}
        for look in track.looks:
            for item in look.evidence:
                series.setdefault(item["metric"], []).append(
                    {
                        "ts": look.ts,
                        "estimate": _finite(item.get("estimate")),
                        "ci_low": _finite(item.get("ci_low")),
                        "ci_high": _finite(item.get("ci_high")),
                        "status": item.get("status"),
                        "threshold": _finite(item.get("threshold")),
                    }
                )
        # The latest evidence is the worker's own: the live status if there is one, else the
        # last decision's evidence (recorded mode: the replay's coalesced looks can differ from
        # the worker's at the look that decided), else the replay's last look.
        latest: dict[str, dict[str, Any]] = {}
        if track.status is not None:
            latest = {g.metric: msgspec.to_builtins(g) for g in track.status.guardrails}
        elif track.decisions:
            latest = {e.metric: msgspec.to_builtins(e) for e in self._last_decision(track).evidence}
        for metric, points in series.items():
            latest.setdefault(metric, points[-1])
        out = []
        for metric in list(dict.fromkeys([*specs, *series, *latest])):
            spec = specs.get(metric)
            absolute = bool(spec and (spec.max_absolute_increase or spec.max_absolute_decrease))
            base = spec.metric if spec else metric
            points = series.get(metric, [])
            threshold = next((p["threshold"] for p in reversed(points) if p["threshold"] is not None), None)
            now = latest.get(metric, {})
            out.append(
                {
                    "metric": metric,
                    "guardrail": base,
                    "scale": "absolute" if absolute else "relative",
                    "harm": METRIC_HARM.get(base, "increase"),
                    "action": spec.action if spec else None,
                    "threshold": threshold if threshold is not None else _finite(now.get("threshold")),
                    "status": now.get("status", "insufficient_data"),
                    "estimate": _finite(now.get("estimate")),
                    "ci_low": _finite(now.get("ci_low")),
                    "ci_high": _finite(now.get("ci_high")),
                    "reason": now.get("reason") or "",
                    "points": points,
                }
            )
        return out

    @staticmethod
    def _trends(track: RolloutTrack) -> dict[str, dict[str, list[list[float]]]]:
        trends: dict[str, dict[str, list[list[float]]]] = {m: {} for m in TREND_METRICS}
        for look in track.looks:
            for variant, values in look.trends.items():
                for metric, value in values.items():
                    trends[metric].setdefault(variant, []).append([look.ts, value])
        return trends

    @staticmethod
    def _judge(track: RolloutTrack) -> dict[str, Any]:
        counts = dict(track.judgments)
        decided = counts["candidate"] + counts["control"]
        total = decided + counts["tie"]
        shadow = track.status.shadow if track.status is not None and getattr(track.status, "shadow", None) else {}
        gated = (
            any(s.name == "shadow" for s in track.plan.stages) if track.plan else False
        )  # every shadow stage checks the judge
        return {
            "counts": counts,
            "judged": total,
            "candidate_preference": (counts["candidate"] - counts["control"]) / decided if decided else None,
            "control_share_of_decided": counts["control"] / decided if decided else None,
            "analysis": shadow,
            "gates_shadow": gated,
        }


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _stage_label(stage) -> str:
    if stage.name == "shadow":
        return f"shadow {stage.shadow_percent or 0:g}%"
    return f"{stage.name} {stage.percent or 0:g}%"


def _spec(plan: RolloutPlan | None, variant: str) -> dict[str, str]:
    if plan is None:
        return {}
    return {k: v for k, v in msgspec.to_builtins(getattr(plan, variant)).items() if v is not None}


__all__ = ["LIVE", "TREND_METRICS", "VARIANT_ROWS", "DashboardModel"]
