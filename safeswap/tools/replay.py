"""``safeswap replay EVENTS.jsonl``: the outcomes logic offline, no Kafka.

Each line is one JSON trace or feedback event with ``"type": "trace"|"feedback"``.
Lines are routed to partitions exactly like the emitters' Kafka producer does
(murmur2 of the user_id, ``--partitions``, default ``SAFESWAP_PARTITIONS``), and
each partition runs the same :class:`~safeswap.core.outcomes.OutcomeProcessor` as the
streaming agent, in file order per event type (= per topic). Its snapshots are
merged the way the decide agent merges them, so replay and the streaming path
give the same metrics on the same events (tests/agents/test_outcomes.py).
At the end of the input every session is closed and every join expired.

Lines with ``"type": "decision"`` (a recorded ``Decision``, e.g. from the Parquet
``decisions`` dataset) tell the processors where the recorded split periods began
(``cohort_starts``): the recorded traffic followed them, so the exposure cohorts do too.
Without them, ``--plan`` files users under the split periods of replay's own decisions,
which match the recording only as far as replay promotes when the recording did.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from safeswap.core.metrics import model_drift
from safeswap.core.outcomes import FEEDBACK, TRACE, OutcomeConfig, OutcomeProcessor, merged_snapshot_values
from schemas import Decision, RolloutPlan


class _Head(msgspec.Struct):
    type: str
    user_id: str = ""


_head = msgspec.json.Decoder(_Head)
VALUE_CHARS = 60  # an echoed value in a rejection reason is cut to this (never the line number or the reason)
# a quoted value (not an apostrophe inside a word) longer than VALUE_CHARS
_QUOTED = re.compile(rf"""(?<!\w)(?:'([^']{{{VALUE_CHARS}}})([^']+)'|"([^"]{{{VALUE_CHARS}}})([^"]+)")""")


def short_values(reason: str) -> str:
    """``reason`` with each quoted value longer than VALUE_CHARS cut: one line per rejected input
    stays short even when a 10 MB text is echoed back by the validator."""

    def cut(m: re.Match) -> str:
        quote = "'" if m[1] is not None else '"'
        head, rest = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
        return f"{quote}{head}...{quote} ({len(head) + len(rest):,} chars)"

    return _QUOTED.sub(cut, reason)


def partition_for(user_id: str, partitions: int) -> int:
    """The partition aiokafka's default partitioner (murmur2, like the Java client) picks."""
    from aiokafka.partitioner import murmur2

    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def replay_lines(
    lines: Iterable[bytes],
    config: OutcomeConfig,
    partitions: int,
    now_ms: int | None = None,
    report=None,
    look=None,
    look_every: int = 1000,
    pinned: tuple[str, dict[str, str | None]] | None = None,
    on_recorded_decision=None,
    decisions: Iterable[Decision] = (),
) -> dict[str, Any]:
    """Run the outcome logic over JSONL lines; ``report(line_no, reason)`` hears every rejected line,
    ``look(processors)`` is called every ``look_every`` lines and at the end (the controller's looks).
    ``pinned = (rollout_id, {variant: model})`` (from a plan) adds each variant's ``model_drift``;
    ``decisions`` are known before the first line (a plan's start decision)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    processors = [OutcomeProcessor(p, config) for p in range(partitions)]
    for decision in decisions:  # a plan's start: its segment keys, before the first event
        for processor in processors:
            processor.on_decision(decision)
    counts = {"read": 0, "invalid": 0, "duplicates": 0, "late": 0}
    reasons: dict[str, int] = {}
    report = report or (lambda line_no, reason: None)
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            head = _head.decode(line)
            if head.type == "decision":  # a recorded decision: its split periods, for every partition
                recorded = msgspec.json.decode(line, type=Decision)
                for processor in processors:
                    processor.on_decision(recorded)
                if on_recorded_decision is not None:
                    on_recorded_decision(recorded)
                continue
            if head.type not in (TRACE, FEEDBACK):
                raise ValueError(f"field `type` must be trace, feedback or decision, got {head.type!r}")
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            counts["read"] += 1
            counts["invalid"] += 1
            reasons["invalid"] = reasons.get("invalid", 0) + 1
            report(line_no, f"invalid: {exc}")
            continue
        processor = processors[partition_for(head.user_id, partitions)]
        reason = processor.fold_raw(head.type, line, now_ms, origin=line_no)
        if reason is not None:
            report(line_no, reason)
        for origin, why in processor.rejected:
            report(origin, why)
        processor.rejected.clear()
        if look is not None and line_no % look_every == 0:
            look(processors)
    for processor in processors:
        processor.finish()
        for origin, why in processor.rejected:
            report(origin, why)
        processor.rejected.clear()
        for name, value in processor.counts.items():
            counts[name] += value
        for name, value in processor.reasons.items():
            reasons[name] = reasons.get(name, 0) + value
    if look is not None:
        look(processors)
    rollouts: dict[str, Any] = {}
    for rollout_id in sorted({r for p in processors for r in p.rollouts()}):
        snapshots = [p.snapshot(rollout_id, seq=p.counts["read"]) for p in processors if rollout_id in p.rollouts()]
        variants = merged_snapshot_values(snapshots)
        if pinned is not None and pinned[0] == rollout_id:  # only a plan knows the pinned models
            for variant, values in variants.items():
                values["model_drift"] = model_drift(values["models"], pinned[1].get(variant))
        rollouts[rollout_id] = {"variants": variants}
    return {"events": counts, "reasons": reasons, "rollouts": rollouts}


class DecisionReplay:
    """Feeds the controller the snapshots a worker would have published, as the
    events are replayed: the decisions a plan would have taken on recorded traffic.
    The split is what was recorded (replay cannot re-assign users); ``percent`` in
    the decisions is what the controller would have asked for."""

    def __init__(self, plan: RolloutPlan):
        from safeswap.core.controller import on_plan
        from safeswap.core.evalgate import assumed_gate

        if plan.stakes == "high" and plan.eval_gate is None:
            plan.eval_gate = assumed_gate("replay")
        self.rollouts: dict[str, Any] = {}
        self.rollout_id = plan.rollout_id
        self.decisions = [d for d in [on_plan(self.rollouts, plan, ts=0)] if d is not None]
        self.seq = 0
        self.follows_recording = False  # recorded decisions set the cohorts, not replay's own

    def recorded(self, decision: Decision) -> None:
        if decision.rollout_id == self.rollout_id:
            self.follows_recording = True

    def look(self, processors: list[OutcomeProcessor]) -> None:
        from safeswap.core.controller import on_snapshot

        self.seq += 1
        state = self.rollouts[self.rollout_id]
        for processor in processors:
            if self.rollout_id in processor.rollouts():
                decision = on_snapshot(state, processor.snapshot(self.rollout_id, seq=self.seq))
                if decision is not None:
                    self.decisions.append(decision)
                    if not self.follows_recording:  # the new split period's users form a new exposure cohort
                        for each in processors:
                            each.on_decision(decision)

    def summary(self) -> dict[str, Any]:
        state = self.rollouts[self.rollout_id]
        return {
            "rollout_id": self.rollout_id,
            "decisions": [
                {
                    "seq": d.seq,
                    "ts": d.ts,
                    "action": d.action,
                    "stage": d.stage,
                    "percent": d.percent,
                    "reason": d.reason,
                }
                for d in self.decisions
            ],
            "final_stage": state.stage,
            "cohort_starts": "recorded decisions" if self.follows_recording else "replay's own decisions",
            "guardrails": [msgspec.to_builtins(e) for e in state.last_evaluation.evidence]
            if state.last_evaluation
            else [],
        }


def result_table(result: dict[str, Any]):
    from rich.table import Table

    table = Table(title="safeswap replay: " + ", ".join(f"{k} {v:,}" for k, v in result["events"].items()))
    table.add_column("rollout / metric")
    variants = sorted({v for r in result["rollouts"].values() for v in r["variants"]})
    for variant in variants:
        table.add_column(variant, justify="right")
    for rollout_id, rollout in result["rollouts"].items():
        table.add_row(f"[bold]{rollout_id}[/bold]", *[""] * len(variants))
        names = [n for n in next(iter(rollout["variants"].values())) if n != "models"]
        for name in names:
            cells = []
            for variant in variants:
                value = rollout["variants"].get(variant, {}).get(name)
                cells.append("-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.4g}")
            table.add_row(name, *cells)
        table.add_row(
            "models",
            *[
                ", ".join(f"{m}: {n}" for m, n in rollout["variants"].get(v, {}).get("models", {}).items())
                for v in variants
            ],
        )
    return table
