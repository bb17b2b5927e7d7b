"""Rollout plans: load a YAML/JSON file, validate it, say exactly what is wrong.

``load_plan(path)`` returns a :class:`PlanReport`: the plan (if it decodes), the
errors that refuse it and the warnings that explain a risk, each naming the
field (``stages[1].percent``), the line in the file and the fix. Pure: no Kafka.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeswap.core.config_files import ConfigIssue, convert_config, line_for, read_config
from safeswap.core.metrics import GUARDABLE
from schemas import RolloutPlan

# Guardrail metrics are the outcome metrics (docs/metrics.md), each with the direction
# that is harm (the catalog in safeswap.core.metrics).
METRIC_HARM: dict[str, str] = GUARDABLE
# Latency depends on cache hits; a cache-rate skew between arms must not pass for
# a model effect, so latency guardrails are judged within these strata.
CACHE_STRATA = ("cache_hit", "cache_miss")


def guarded_metrics(metric: str) -> list[str]:
    """The statistics a guardrail on ``metric`` is judged on."""
    if metric.startswith("latency_ms") and all(f"{metric}_{s}" in METRIC_HARM for s in CACHE_STRATA):
        return [f"{metric}_{stratum}" for stratum in CACHE_STRATA]
    return [metric]


CHANGEABLE = ("model", "prompt_version", "tools_version", "system_prompt_version", "retrieval_version")
# Changes that carry a model swap's risk: users must not see them before a shadow stage.
MAJOR_CHANGES = {
    "model": "a model change",
    "tools_version": "a tool-definition change (treat it as a major change: the model now calls "
    "different tools, with different arguments)",
    "retrieval_version": "a retrieval change (an indexing migration plus a model swap: every answer "
    "reads different context)",
}
# A pinned model names a dated snapshot (claude-sonnet-4-5-20250929, gpt-4o-2024-08-06)
# or an explicit version/digest (name@v3); an alias can change under you.
PINNED_MODEL = re.compile(r"(\d{8}|\d{4}-\d{2}-\d{2}|@[\w.:-]+)$")


@functools.cache
def _anthropic_snapshots() -> frozenset[str]:
    """Anthropic model ids that are snapshots without a date (claude-sonnet-4-6 and later).

    From the installed SDK's model list: an undated id is an alias when a dated
    sibling exists (claude-sonnet-4-5 -> claude-sonnet-4-5-20250929), else it is
    the snapshot itself. Read on first use: importing the SDK's types takes ~1.2 s,
    which every CLI command paid before."""
    from typing import get_args

    from anthropic.types import Model

    names = {a for arg in get_args(Model) for a in (get_args(arg) or (arg,)) if isinstance(a, str)}
    return frozenset(
        n
        for n in names
        if not PINNED_MODEL.search(n)
        and not n.endswith("-latest")
        and not any(re.fullmatch(re.escape(n) + r"-\d{8}", m) for m in names)
    )


def is_pinned(model: str) -> bool:
    """Whether ``model`` names one fixed version (see ``PINNED_MODEL``)."""
    return bool(PINNED_MODEL.search(model)) or model in _anthropic_snapshots()


_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(w|d|h|m|s)\s*")
_UNIT_S = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
DAY_S = 86_400


def parse_duration(text: str) -> float:
    """ "24h" -> 86400.0; "1d12h" -> 129600.0. Raises ValueError with the accepted form."""
    position, total = 0, 0.0
    text = str(text)
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if not match or match.end() == position:
            raise ValueError(f"{text!r} is not a duration: use a number and a unit, like 30m, 24h, 7d or 1d12h")
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        position = match.end()
    if not text.strip():
        raise ValueError("empty duration: use a number and a unit, like 24h")
    return total


PlanIssue = ConfigIssue


@dataclass
class PlanReport:
    source: str
    plan: RolloutPlan | None
    errors: list[PlanIssue] = field(default_factory=list)
    warnings: list[PlanIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.plan is not None and not self.errors

    def lines(self) -> list[str]:
        return [f"error: {i.render(self.source)}" for i in self.errors] + [
            f"warning: {i.render(self.source)}" for i in self.warnings
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "ok": self.ok,
            "rollout_id": self.plan.rollout_id if self.plan else None,
            "errors": [i.__dict__ for i in self.errors],
            "warnings": [i.__dict__ for i in self.warnings],
        }


def load_plan(path: str | Path) -> PlanReport:
    """Read and validate a plan file (YAML or JSON). Never raises for a bad plan."""
    data, lines, problem = read_config(path)
    if problem is not None:
        return PlanReport(str(path), None, [problem])
    return validate_plan_data(data, source=str(path), lines=lines)


def validate_plan_data(data: Any, *, source: str = "<plan>", lines: dict[str, int] | None = None) -> PlanReport:
    lines = lines or {}
    plan, issues = convert_config(data, RolloutPlan, lines, "plan")
    if plan is None:
        return PlanReport(source, None, issues)
    errors, warnings = check_plan(plan)
    return PlanReport(
        source,
        plan,
        [PlanIssue(p, m, line_for(p, lines)) for p, m in errors],
        [PlanIssue(p, m, line_for(p, lines)) for p, m in warnings],
    )


# -- the rules -------------------------------------------------------------------
def changed_parts(plan: RolloutPlan) -> list[str]:
    return [name for name in CHANGEABLE if getattr(plan.control, name) != getattr(plan.candidate, name)]


def check_plan(plan: RolloutPlan) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(errors, warnings) as (field path, message with the fix)."""
    errors: list[tuple[str, str]] = []
    warnings: list[tuple[str, str]] = []

    if not plan.stages:
        errors.append(("stages", "missing: list the stages, e.g. shadow, canary 5%, ramp 10%, 50%, 100%"))
    durations: list[float] = []
    previous_percent = 0.0
    seen_serving = False
    for index, stage in enumerate(plan.stages):
        path = f"stages[{index}]"
        if stage.min_duration is not None:
            try:
                durations.append(parse_duration(stage.min_duration))
            except ValueError as exc:
                errors.append((f"{path}.min_duration", str(exc)))
        if stage.name == "shadow":
            if seen_serving:
                errors.append((f"{path}.name", "shadow must come before canary and ramp stages"))
            if stage.percent:
                errors.append((f"{path}.percent", "a shadow stage serves no user the candidate: use shadow_percent"))
            if stage.shadow_percent is None:
                errors.append((f"{path}.shadow_percent", "missing: the share of users whose requests are shadowed"))
            continue
        seen_serving = True
        if stage.shadow_percent is not None:
            errors.append((f"{path}.shadow_percent", "only a shadow stage shadows traffic: remove it"))
        for name in ("judge_max_control_preference", "min_shadow_pairs", "min_judged_pairs"):
            if getattr(stage, name) is not None:
                errors.append((f"{path}.{name}", "only the shadow stage is judged on shadow pairs: remove it"))
        if stage.percent is None or stage.percent <= 0:
            errors.append((f"{path}.percent", "missing: the share of users (0-100] served the candidate"))
            continue
        if stage.percent <= previous_percent:
            errors.append(
                (
                    f"{path}.percent",
                    f"{stage.percent:g} does not go up from {previous_percent:g}: "
                    "percentages must increase stage after stage",
                )
            )
        if stage.name == "canary" and previous_percent > 0:
            errors.append((f"{path}.name", "the canary comes before the ramp stages"))
        if stage.name == "canary":
            if stage.percent > 5:
                warnings.append(
                    (
                        f"{path}.percent",
                        f"a canary of {stage.percent:g}% exposes more users than the "
                        "usual 1-5% before the guardrails have data",
                    )
                )
            duration = _safe_duration(stage.min_duration)
            if duration < DAY_S:
                warnings.append(
                    (
                        f"{path}.min_duration",
                        "a canary watched less than 24 h misses time-of-day "
                        "effects (traffic mix changes between day and night)",
                    )
                )
        previous_percent = stage.percent
    if durations and sum(durations) < 7 * DAY_S:
        warnings.append(
            (
                "stages",
                f"the stages watch {sum(durations) / DAY_S:.1f} days in all; under 7 days a "
                "weekday/weekend difference can pass for a variant effect",
            )
        )
    if plan.stages and previous_percent < 100 and not any(s.name == "ramp" and s.percent == 100 for s in plan.stages):
        warnings.append(
            ("stages", "no stage serves 100%: the rollout completes by switching everyone after the last stage passes")
        )

    changes = changed_parts(plan)
    for side in ("control", "candidate"):
        model = getattr(plan, side).model
        if model is None:
            errors.append((f"{side}.model", "missing: name the model (a dated snapshot) this variant serves"))
        elif not is_pinned(model) and not plan.allow_unpinned:
            errors.append(
                (
                    f"{side}.model",
                    f"{model!r} is an alias, not a pinned snapshot: use a dated version "
                    "(like claude-sonnet-4-5-20250929; Anthropic's ids from claude-sonnet-4-6 "
                    "on are snapshots) or set allow_unpinned: true",
                )
            )
    if len(changes) > 1 and not (plan.allow_multiple_changes or "").strip():
        errors.append(
            (
                "candidate",
                f"changes {len(changes)} things at once ({', '.join(changes)}): a regression "
                "could not be traced to one of them; split the rollout or give "
                "allow_multiple_changes: <reason>",
            )
        )
    if not changes:
        warnings.append(("candidate", "identical to control: this rollout is an A/A rehearsal"))
    has_shadow = any(stage.name == "shadow" for stage in plan.stages)
    major = [MAJOR_CHANGES[c] for c in changes if c in MAJOR_CHANGES]
    if (major or plan.stakes == "high") and not has_shadow and not (plan.skip_shadow or "").strip():
        why = " and ".join(major) if major else "a high-stakes plan"
        errors.append(
            (
                "stages",
                f'{why} needs a shadow stage before users see it ("evals passed" is how '
                "regressions ship): add {name: shadow, shadow_percent: 10, min_duration: 24h} "
                "or give skip_shadow: <reason>",
            )
        )

    if "retrieval_version" in changes:
        index = plan.candidate.retrieval_index
        if not index:
            errors.append(
                (
                    "candidate.retrieval_index",
                    "missing: a retrieval change must pin the candidate's index like a model version "
                    "(e.g. docs-index-20261130 or docs-index@v7), so the rollout tests one index that cannot "
                    "change under it",
                )
            )
        elif not PINNED_MODEL.search(index) and not plan.allow_unpinned:
            errors.append(
                (
                    "candidate.retrieval_index",
                    f"{index!r} does not name one version of the index: end it with a date (-20261130) or "
                    "@version (like a pinned model), or set allow_unpinned: true",
                )
            )
    if not plan.guardrails:
        warnings.append(("guardrails", "no guardrails: nothing can roll this rollout back automatically"))
    for index, guardrail in enumerate(plan.guardrails):
        path = f"guardrails[{index}]"
        if guardrail.metric not in METRIC_HARM:
            errors.append((f"{path}.metric", f"unknown metric {guardrail.metric!r}; known: {', '.join(METRIC_HARM)}"))
            continue
        limits = [
            name
            for name in (
                "max_relative_increase",
                "max_absolute_increase",
                "max_relative_decrease",
                "max_absolute_decrease",
            )
            if getattr(guardrail, name) is not None
        ]
        if len(limits) > 1:
            errors.append((path, f"give one limit, not {', '.join(limits)}"))
        harm = METRIC_HARM[guardrail.metric]
        if limits and harm not in limits[0]:
            errors.append(
                (
                    f"{path}.{limits[0]}",
                    f"harm for {guardrail.metric} is a {harm}: use max_{limits[0].split('_')[1]}_{harm}",
                )
            )
    metrics = [g.metric for g in plan.guardrails]
    for metric in {m for m in metrics if metrics.count(m) > 1}:
        errors.append(("guardrails", f"{metric} is guarded twice: keep one rule per metric"))
    if plan.segments:
        for key in {k for k in plan.segments if plan.segments.count(k) > 1}:
            errors.append(("segments", f"{key} is listed twice"))
        if not plan.guardrails:
            errors.append(("segments", "segment guardrails test the plan's guardrails per segment: add guardrails"))
        slots = max(1, len(plan.guardrails)) * len(plan.segments) * plan.max_segment_values
        warnings.append(
            (
                "segments",
                f"half the alpha ({plan.alpha / 2:g}) is shared by {slots} segment tests "
                f"(guardrails x keys x max_segment_values), {plan.alpha / 2 / slots:.2g} each: a segment "
                "needs more users than the whole population to show the same harm",
            )
        )
    return errors, warnings


def _safe_duration(text: str | None) -> float:
    try:
        return parse_duration(text) if text else 0.0
    except ValueError:
        return 0.0
