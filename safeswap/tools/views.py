"""Rich renderings of decisions and rollout status, shared by the CLI and the demo."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.table import Table

from safeswap.core.metrics import model_drift_text
from schemas import Decision, GuardrailEvidence, RolloutStatus


def _when(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _num(value: float | None, relative: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.1f}%" if relative else f"{value:+.4g}"


def evidence_table(evidence: list[GuardrailEvidence], title: str) -> Table:
    table = Table(title=title)
    segmented = any(item.segment for item in evidence)
    for column in (
        *(("segment",) if segmented else ()),
        "guardrail",
        "status",
        "estimate",
        "always-valid CI",
        "p-value",
        "limit",
        "users ctl / cand",
    ):
        table.add_column(column)
    notes = [item for item in evidence if item.reason and (item.status != "ok" or item.estimate is None)]
    if notes:  # what a bare status cannot say: insufficient data (a segment too small to test), a zero control rate
        table.caption = "\n".join(_note(item) for item in notes)
    for item in evidence:
        interval = (
            "-" if item.ci_low is None and item.ci_high is None else f"[{_num(item.ci_low)}, {_num(item.ci_high)}]"
        )
        style = {"breach": "bold red", "ok": "green"}.get(item.status, "yellow")
        table.add_row(
            *((item.segment,) if segmented else ()),
            item.metric,
            f"[{style}]{item.status}[/]",
            _num(item.estimate),
            interval,
            "-" if item.p_value is None else f"{item.p_value:.2g}",
            _num(item.threshold),
            f"{item.users_control:,} / {item.users_candidate:,}",
        )
    return table


def _note(item: GuardrailEvidence) -> str:
    name = f"{item.metric} in {item.segment}" if item.segment else item.metric
    return f"{name}: {item.reason.removeprefix(name + ': ')}"


def decision_line(decision: Decision) -> str:
    return (
        f"#{decision.seq} {_when(decision.ts)} {decision.action} -> {decision.stage} "
        f"({decision.percent:g}%): {decision.reason}"
    )


def status_view(status: RolloutStatus | None, decision: Decision | None) -> list:
    """Renderables for `safeswap rollout status`."""
    out: list = []
    if status is None and decision is None:
        return out
    summary = Table(show_header=False, title=f"rollout {(status or decision).rollout_id}")
    if status is not None:
        stages = " -> ".join(f"[bold]{s}[/]" if i == status.stage_index else s for i, s in enumerate(status.stages))
        summary.add_row(
            "stage",
            f"{status.stage} ({status.percent:g}% candidate"
            f"{f', {status.shadow_percent:g}% shadowed' if status.shadow_percent else ''})",
        )
        summary.add_row("plan", stages)
        waiting = status.ts == 0  # no statistics from the worker yet: nothing has been watched
        if status.stage in ("shadow", "canary", "ramp") and waiting:
            summary.add_row(
                "time in stage",
                f"not started: the watch begins at the first statistics (event time); "
                f"needs {status.stage_min_duration_s / 3600:.1f} h",
            )
        elif status.stage in ("shadow", "canary", "ramp"):
            left_h = max(0.0, status.stage_min_duration_s - status.stage_elapsed_s) / 3600
            summary.add_row("time in stage", f"{status.stage_elapsed_s / 3600:.1f} h (event time), {left_h:.1f} h left")
        if status.stage in ("shadow", "canary", "ramp"):
            users_left = {v: max(0, status.stage_min_users - status.users.get(v, 0)) for v in ("control", "candidate")}
            summary.add_row(
                "users per arm",
                f"{status.users.get('control', 0):,} control / "
                f"{status.users.get('candidate', 0):,} candidate "
                f"(need {status.stage_min_users:,}; left {users_left['control']:,} / "
                f"{users_left['candidate']:,})",
            )
        health = status.health or {}
        if health:
            skew = health.get("cache_skew") or {}
            summary.add_row(
                "health",
                (
                    f"SRM p={health.get('srm_p_value', 1):.2g}, crossover "
                    f"{health.get('crossover_share', 0):.2%}, model drift "
                    f"{model_drift_text(health.get('model_drift'))}"
                    + (
                        " | [yellow]cache-hit rate differs between arms: latency and cost are confounded[/]"
                        if skew.get("skewed")
                        else ""
                    )
                ),
            )
            for problem in health.get("problems", []):
                summary.add_row("problem", f"[red]{problem['reason']}[/]")
        summary.add_row(
            "as of",
            "waiting for statistics: no snapshot from a worker yet (is `safeswap worker` "
            "running, and are apps emitting events of this rollout?)"
            if waiting
            else f"{_when(status.ts)} (event time)",
        )
    if decision is not None:
        summary.add_row("last decision", decision_line(decision))
    out.append(summary)
    evidence = (
        status.guardrails if status is not None and status.guardrails else (decision.evidence if decision else [])
    )
    if evidence:
        out.append(evidence_table(evidence, "guardrails"))
    segments = (
        status.segment_guardrails
        if status is not None and status.segment_guardrails
        else (decision.segment_evidence if decision else [])
    )
    if segments:
        table = evidence_table(segments, "segment guardrails (each value tested on its share of half the alpha)")
        if status is not None and status.segments_untested:
            untested = f"not tested (beyond max_segment_values): {', '.join(status.segments_untested)}"
            table.caption = f"{table.caption}\n{untested}" if table.caption else untested
        out.append(table)
    if status is not None and getattr(status, "shadow", None):
        out.extend(shadow_view(status.shadow))
    if status is not None and getattr(status, "live_judge", None):
        out.append(live_judge_table(status.live_judge))
    return out


def live_judge_table(live: dict) -> Table:
    """The live judge scores per variant (safeswap.core.live_scores.summarize): monitored only."""
    low, high = live.get("scale") or [1, 10]
    table = Table(title=f"judge score by variant, {low}-{high} ({live.get('role', '')})")
    for column in ("variant", "mean score", "scored", "users", "seen", "not scoreable", "over budget", "bad replies"):
        table.add_column(column)
    for variant in ("control", "candidate"):
        v = (live.get("variants") or {}).get(variant) or {}
        mean = v.get("mean")
        table.add_row(
            variant,
            "-" if mean is None else f"{mean:.2f}",
            f"{v.get('scored', 0):,}",
            f"{v.get('users', 0):,}",
            f"{v.get('traces', 0):,}",
            f"{v.get('not_scoreable', 0):,}",
            f"{v.get('budget_skipped', 0):,}",
            f"{v.get('malformed', 0) + v.get('errors', 0):,}",
        )
    notes = [live.get("reason", ""), live.get("budget", "")]
    table.caption = "\n".join(note for note in notes if note)
    return table


def shadow_view(shadow: dict) -> list:
    """The shadow analysis (safeswap.core.shadow_analysis): judge, tails, cost, latency."""
    judge = shadow.get("judge") or {}
    summary = Table(show_header=False, title=f"shadow analysis ({shadow.get('pairs', 0):,} pairs)")
    preference = judge.get("control_preference")
    line = (
        f"{judge.get('candidate_wins', 0):,} candidate / {judge.get('ties', 0):,} tie / "
        f"{judge.get('control_wins', 0):,} control wins of {judge.get('judged', 0):,} judged"
        f" ({judge.get('malformed', 0):,} malformed, {judge.get('errors', 0):,} errors, "
        f"{judge.get('cost_usd', 0.0):.2f} USD)"
    )
    summary.add_row("judge", line)
    rates = judge.get("rates") or {}
    for key, label in (
        ("candidate_wins", "judge: candidate wins"),
        ("ties", "judge: ties"),
        ("control_wins", "judge: control wins"),
    ):
        if (rate := rates.get(key)) is not None:
            summary.add_row(label, f"{rate['estimate']:.1%} [{rate['ci_low']:.1%}, {rate['ci_high']:.1%}] always-valid")
    if preference:
        margin = judge.get("margin")
        summary.add_row(
            "control preference",
            (
                f"{preference['estimate']:+.1%} [{preference['ci_low']:+.1%}, "
                f"{preference['ci_high']:+.1%}] always-valid; margin "
                f"{'none' if margin is None else f'{margin:.1%}'}: {judge.get('status')}"
            ),
        )
    rule = shadow.get("rule")
    if rule:
        summary.add_row(
            "needs",
            f"{rule['min_shadow_pairs']:,} pairs, {rule['min_judged_pairs']:,} judged, "
            f"control preference <= {rule['judge_max_control_preference']:.1%}",
        )
    for reason in shadow.get("blocking", []):
        summary.add_row("blocks promotion", f"[red]{reason}[/]")
    out: list = [summary]
    checks = Table(title="shadow checks (candidate vs control on the same requests)")
    for column in ("check", "status", "control", "candidate", "difference", "always-valid CI", "limit", "enforced"):
        checks.add_column(column)
    for check in shadow.get("checks", []):
        relative = check.get("difference") == "relative"
        style = {"breach": "bold red", "ok": "green"}.get(check["status"], "yellow")
        interval = (
            "-"
            if check.get("ci_low") is None and check.get("ci_high") is None
            else f"[{_num(check.get('ci_low'), relative)}, {_num(check.get('ci_high'), relative)}]"
        )
        checks.add_row(
            f"shadow_{check['metric']}",
            f"[{style}]{check['status']}[/]",
            "-" if check.get("control") is None else f"{check['control']:.4g}",
            "-" if check.get("candidate") is None else f"{check['candidate']:.4g}",
            _num(check.get("estimate"), relative),
            interval,
            _num(check.get("threshold"), relative),
            "yes" if check.get("enforced") else "no",
        )
    out.append(checks)
    return out


def rollout_list_table(decisions: dict[str, Decision]) -> Table:
    table = Table(title="rollouts")
    for column in ("rollout", "stage", "percent", "last action", "when", "reason"):
        table.add_column(column)
    for rollout_id, d in sorted(decisions.items()):
        table.add_row(rollout_id, d.stage, f"{d.percent:g}%", d.action, _when(d.ts), d.reason)
    return table
