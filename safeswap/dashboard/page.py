"""The page: HTML rendered on the server from a rollout view, plus its one style
sheet and one small script, both served by safeswap itself (nothing from a CDN).

Everything that comes from events (rollout ids, stages, reasons, prompt and
model versions, metric names) goes through :func:`esc`; the Content-Security-
Policy the server sends allows scripts and styles from this origin only, and no
inline script, so even an escaping mistake could not run injected code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from safeswap.core.metrics import METRICS
from safeswap.dashboard.charts import esc, fmt, interval_chart, interval_text, stage_timeline, trend_chart, when

STATUS_CLASS = {
    "breach": "bad",
    "ok": "good",
    "insufficient_data": "wait",
    "problem": "bad",
    "flagged": "wait",
    "not checked": "muted",
}
log = logging.getLogger(__name__)


def guarded(label: str, render: Callable[..., str], *args: Any) -> str:
    """``render(*args)``, or a short placeholder saying why not: one malformed event
    costs its own section, never the whole page (an HTTP 500)."""
    try:
        return render(*args)
    except Exception as exc:
        log.warning("dashboard: could not render %s", label, exc_info=True)
        reason = f"{type(exc).__name__}: {exc}"
        return (
            f'<section class="broken"><h3>{esc(label)}</h3>'
            f'<p class="bad">could not render: {esc(reason[:300])}</p></section>'
        )


def rollout_link(rollout_id: str) -> str:
    return "./?rollout=" + quote(rollout_id, safe="")


def nav_html(rollouts: list[dict[str, Any]], selected: str | None) -> str:
    if not rollouts:
        return '<p class="muted">no rollouts yet</p>'
    items = []
    for r in rollouts:
        current = ' class="current"' if r["rollout_id"] == selected else ""
        items.append(
            f'<li{current}><a href="{esc(rollout_link(r["rollout_id"]))}">{esc(r["rollout_id"])}</a>'
            f'<span class="stage stage-{esc(r["stage"])}">{esc(r["stage"])} {r["percent"]:g}%</span></li>'
        )
    return '<ul class="rollouts">' + "".join(items) + "</ul>"


def _variant_spec(spec: dict[str, Any]) -> str:
    return ", ".join(f"{esc(k)} {esc(v)}" for k, v in sorted(spec.items())) or "-"


def rollout_html(view: dict[str, Any] | None) -> str:
    if view is None:
        return '<section class="empty-state"><p>Pick a rollout on the left.</p></section>'
    return "".join(guarded(label, render, view) for label, render in SECTIONS)


def _summary_html(view: dict[str, Any]) -> str:
    split = view["split"]
    users = view["users"]
    parts = [f'<section class="summary"><h2>{esc(view["rollout_id"])}</h2>']
    if view.get("description"):
        parts.append(f'<p class="muted">{esc(view["description"])}</p>')
    shadow = f", {split['shadow_percent']:g}% shadowed" if split.get("shadow_percent") else ""
    parts.append(
        '<dl class="facts">'
        f'<dt>stage</dt><dd><span class="stage stage-{esc(split["stage"])}">{esc(split["stage"])}</span></dd>'
        f'<dt>split</dt><dd class="split">{split["percent"]:g}% candidate / {100 - split["percent"]:g}% '
        f"control{esc(shadow)}</dd>"
        f"<dt>users</dt><dd>{users.get('control', 0):,} control / {users.get('candidate', 0):,} candidate</dd>"
        f"<dt>control</dt><dd>{_variant_spec(view['variants']['control'])}</dd>"
        f"<dt>candidate</dt><dd>{_variant_spec(view['variants']['candidate'])}</dd>"
        f"<dt>as of</dt><dd>{esc(when(view['as_of'])) if view['as_of'] else '-'} (event time, UTC)</dd>"
        f"<dt>shown</dt><dd>{_range_text(view)}</dd>"
        f"<dt>plan</dt><dd>{esc(view.get('plan_hash') or '-')}</dd>"
        "</dl>"
    )
    stages = "".join(
        f'<li class="{"current" if i == view["stage_index"] else ""}">{esc(s)}</li>'
        for i, s in enumerate(view["stages"])
    )
    parts.append(f'<ol class="plan-stages">{stages}</ol></section>')
    return "".join(parts)


def _range_text(view: dict[str, Any]) -> str:
    """The one time range every chart of the view shows, and the current stage's period."""
    span = view.get("time_range")
    if not span:
        return "-"
    text = f"{esc(when(span[0]))} to {esc(when(span[1]))} (event time, UTC)"
    current = view.get("current_stage")
    if current:
        text += (
            f'; current stage <span class="current-stage-key">{esc(current["label"])}</span> since '
            f"{esc(when(current['from']))}"
        )
    return text


def _timeline_html(view: dict[str, Any]) -> str:
    decisions = view["decisions"]
    parts = ["<section><h3>Stage timeline</h3>" + stage_timeline(decisions, view.get("time_range"))]
    rows = "".join(
        f'<tr class="action-{esc(d["action"])}"><td>#{int(d["seq"])}</td><td>{esc(when(d["ts"]))}</td>'
        f"<td>{esc(d['action'])}</td><td>{esc(d['stage'])} {d['percent']:g}%</td><td>{esc(d['reason'])}</td></tr>"
        for d in decisions
    )
    parts.append(
        '<table class="decisions"><thead><tr><th>seq</th><th>event time (UTC)</th><th>action</th>'
        f"<th>stage</th><th>why</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )
    return "".join(parts)


def _guardrail_card(g: dict[str, Any], view: dict[str, Any]) -> str:
    unit = "pct" if g["scale"] == "relative" else "num"
    interval = esc(interval_text(g["ci_low"], g["ci_high"], unit))
    return (
        f'<div class="card guardrail"><h4>{esc(g["metric"])} '
        f'<span class="badge {STATUS_CLASS.get(g["status"], "wait")}">{esc(g["status"])}</span></h4>'
        f"<p>estimate {esc(fmt(g['estimate'], unit))}, interval {interval}, limit "
        f"{esc(fmt(g['threshold'], unit))} ({esc(g['scale'])}, harm = {esc(g['harm'])}"
        f"{', on breach: ' + esc(g['action']) if g['action'] else ''})</p>"
        + (f'<p class="muted">{esc(g["reason"])}</p>' if g.get("reason") else "")
        + interval_chart(g, view["decisions"], view.get("time_range"), view.get("current_stage"))
        + "</div>"
    )


def _guardrails_html(view: dict[str, Any]) -> str:
    parts = [
        "<section><h3>Guardrails: always-valid intervals over time</h3>"
        '<p class="muted">Band: the always-valid interval of the candidate vs control; line: the estimate; '
        "dashed: the plan's limit. The controller acts when the interval clears the limit.</p>"
        '<div class="grid">'
    ]
    if not view["guardrails"]:
        parts.append('<p class="muted">no guardrails in the plan</p>')
    for g in view["guardrails"]:
        parts.append(
            guarded(f"guardrail {g.get('metric', '?') if isinstance(g, dict) else '?'}", _guardrail_card, g, view)
        )
    parts.append("</div></section>")
    return "".join(parts)


def _difference_text(row: dict[str, Any]) -> str:
    """Candidate vs control with its interval, or why there is none (never a bare estimate)."""
    found = row.get("difference")
    if found is None:
        if row["key"].startswith("latency_ms_p"):
            return "compared per cache stratum: see the latency guardrails"
        return "no interval (no data, or a control rate of zero)"
    if "too_few_users" in found:
        return f"no interval yet: {found['too_few_users']:,} users in the smaller arm"
    if found.get("estimate") is None:
        return "no interval yet"
    return f"{fmt(found['estimate'], 'pct')} {interval_text(found.get('ci_low'), found.get('ci_high'), 'pct')}"


def _variants_html(view: dict[str, Any]) -> str:
    decisions = view["decisions"]
    rows = []
    alpha = next(
        (r["difference"]["alpha"] for r in view["variant_rows"] if (r.get("difference") or {}).get("alpha")), None
    )
    for row in view["variant_rows"]:
        a, b = row["values"]["control"], row["values"]["candidate"]
        rows.append(
            f"<tr><td>{esc(row['label'])}</td><td>{esc(fmt(a, row['unit']))}</td>"
            f"<td>{esc(fmt(b, row['unit']))}</td><td>{esc(_difference_text(row))}</td></tr>"
        )
    confidence = f"{(1 - alpha) * 100:g}% " if alpha else ""
    parts = [
        "<section><h3>Per variant</h3>"
        f'<p class="muted">Candidate vs control: relative difference and its always-valid {confidence}interval '
        "(users as the unit, by exposure cohort, valid however often you look), for reading: only the "
        'guardrails decide.</p><table class="variants"><thead><tr><th>metric</th>'
        '<th class="control">control</th><th class="candidate">candidate</th><th>candidate vs control</th>'
        f'</tr></thead><tbody>{"".join(rows)}</tbody></table><div class="grid">'
    ]
    for metric, series in view["trends"].items():
        label, unit = METRICS[metric].label, METRICS[metric].unit
        parts.append(
            '<div class="card">'
            + trend_chart(metric, label, unit, series, decisions, view.get("time_range"), view.get("current_stage"))
            + "</div>"
        )
    parts.append("</div></section>")
    return "".join(parts)


def _judge_html(view: dict[str, Any]) -> str:
    judge = view["judge"]
    counts = judge["counts"]
    preference = judge["candidate_preference"]
    note = (
        "monitored, not a decision input"
        if not judge["gates_shadow"]
        else "monitored; not a guardrail (the plan's shadow stage checks the judge before promoting)"
    )
    return (
        f'<section class="judge"><h3>Judge preference <span class="badge wait">{esc(note)}</span></h3>'
        f"<p>{judge['judged']:,} shadow pairs judged: candidate better {counts['candidate']:,}, "
        f"control better {counts['control']:,}, tie {counts['tie']:,}. "
        f"Preference for the candidate: {esc(fmt(preference, 'pct')) if preference is not None else '-'} "
        "(candidate wins minus control wins, over decided pairs).</p></section>"
    )


def _live_judge_html(view: dict[str, Any]) -> str:
    live = view.get("live_judge") or {}
    head = '<section class="live-judge"><h3>Judge score by variant (monitored, not a decision input)</h3>'
    if not live:
        return (
            head + '<p class="muted">No live judge scores: the judge scores canary and ramp responses that carry '
            "their prompt and response texts, when it runs (ANTHROPIC_API_KEY).</p></section>"
        )
    low, high = live.get("scale") or [1, 10]
    rows = []
    for variant in ("control", "candidate"):
        v = (live.get("variants") or {}).get(variant) or {}
        mean = v.get("mean")
        rows.append(
            f'<tr><td class="{variant}">{variant}</td><td>{"-" if mean is None else f"{mean:.2f}"}</td>'
            f"<td>{v.get('scored', 0):,}</td><td>{v.get('users', 0):,}</td><td>{v.get('traces', 0):,}</td>"
            f"<td>{v.get('not_scoreable', 0):,}</td><td>{v.get('budget_skipped', 0):,}</td>"
            f"<td>{v.get('malformed', 0) + v.get('errors', 0):,}</td><td>{v.get('cost_usd', 0.0):.2f}</td></tr>"
        )
    budget = f'<p class="wait">{esc(live["budget"])}</p>' if live.get("budget") else ""
    return (
        head + f'<p class="muted">Scores from {low} (fails the user) to {high} (could not be better) against the '
        "rollout's rubric; the mean is each user's mean score averaged over users. The judge measures what the "
        "judge measures: watch it beside the guardrails, never decide on it.</p>"
        f"<p>{esc(live.get('reason', ''))}</p>{budget}"
        '<table class="live-judge"><thead><tr><th>variant</th><th>mean score</th><th>scored</th><th>users</th>'
        "<th>responses seen</th><th>not scoreable</th><th>over budget</th><th>malformed / errors</th>"
        f"<th>cost (USD)</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _problem_text(problem: Any) -> str:
    return str(problem.get("reason", "")) if isinstance(problem, dict) else str(problem)


def _badge(status: str) -> str:
    return f'<span class="badge {STATUS_CLASS.get(status, "wait")}">{esc(status)}</span>'


def _segments_html(view: dict[str, Any]) -> str:
    segments = view.get("segment_guardrails") or {}
    keys = segments.get("keys") or []
    if not keys:
        return ""
    rows = "".join(
        f"<tr><td>{esc(e.get('segment'))}</td><td>{esc(e.get('metric'))}</td><td>{_badge(e.get('status'))}</td>"
        f"<td>{esc(fmt(e.get('estimate'), 'pct'))} {esc(interval_text(e.get('ci_low'), e.get('ci_high'), 'pct'))}</td>"
        f"<td>{e.get('users_control', 0):,} / {e.get('users_candidate', 0):,}</td>"
        f"<td>{esc(e.get('reason') if e.get('status') != 'ok' else '')}</td></tr>"
        for e in segments.get("rows") or []
    )
    untested = segments.get("untested") or []
    note = (
        f'<p class="muted">Not tested (beyond max_segment_values): {esc(", ".join(untested))}</p>' if untested else ""
    )
    return (
        f'<section class="segments"><h3>Segment guardrails <span class="muted">({esc(", ".join(keys))})</span></h3>'
        '<p class="muted">Every guardrail tested again in each segment value, on its share of half the alpha: '
        "a regression confined to one segment rolls back, named. A segment too small to test says so.</p>"
        '<table class="checks"><thead><tr><th>segment</th><th>guardrail</th><th>status</th>'
        "<th>candidate vs control (always-valid interval)</th><th>users ctl / cand</th><th>why</th></tr></thead>"
        f"<tbody>{rows or '<tr><td colspan=6>no segment has data yet</td></tr>'}</tbody></table>{note}</section>"
    )


def _health_html(view: dict[str, Any]) -> str:
    health = view.get("health") or {}
    if not isinstance(health, dict):
        health = {}
    found = health.get("problems") or []
    problems = "".join(
        f'<li class="bad">{esc(_problem_text(p))}</li>' for p in (found if isinstance(found, list) else [found])
    )
    rows = "".join(
        f"<tr><td>{esc(c['check'])}</td><td>{esc(c['value'])}</td><td>{esc(c['threshold'])}</td>"
        f"<td>{_badge(c['status'])}</td><td>{esc(c['on_failure'])}</td></tr>"
        for c in view.get("health_checks") or []
    )
    return (
        '<section class="health"><h3>Data health</h3>'
        '<p class="muted">Checks that the data can be trusted, at the latest look; a failure acts as '
        "the plan says. SRM, event loss and crossover are checked while the candidate serves 0-100% of users.</p>"
        '<table class="checks"><thead><tr><th>check</th><th>value</th><th>fails when</th><th>status</th>'
        f"<th>on failure</th></tr></thead><tbody>{rows}</tbody></table><ul>{problems}</ul></section>"
    )


def _dead_letters_html(view: dict[str, Any]) -> str:
    letters = view.get("dead_letters") or {}
    total = letters.get("total", 0)
    rate, events = letters.get("rate"), letters.get("events")
    share = (
        f"{letters.get('from_events', 0):,} of the {events:,} events apps wrote ({rate:.2%})"
        if rate is not None
        else "the events apps wrote are not counted yet"
    )
    head = (
        f"<p>{total:,} dead letters in all; from the event topics: {esc(share)}. Flagged above "
        f"{letters.get('alert_rate', 0):.0%}. {_badge(letters.get('status', 'not checked'))}</p>"
    )
    rows = "".join(
        f"<tr><td>{esc(k['kind'])}</td><td>{k['count']:,}</td><td>{k['share']:.1%}</td>"
        f'<td>{esc(when(k["latest_ts"]))}</td><td class="reason">{esc(k["latest_reason"])}</td></tr>'
        for k in letters.get("kinds", [])
    )
    topics = ", ".join(f"{esc(t)} {n:,}" for t, n in (letters.get("topics") or {}).items())
    table = (
        (
            '<table class="dead-letters"><thead><tr><th>reason</th><th>count</th><th>share</th>'
            "<th>latest (wall clock, UTC)</th><th>latest reason</th></tr></thead>"
            f'<tbody>{rows}</tbody></table><p class="muted">by topic: {topics}</p>'
        )
        if rows
        else ""
    )
    return (
        '<section class="dlq"><h3>Dead letters <span class="muted">(the whole worker, every rollout)</span></h3>'
        f"{head}{table}</section>"
    )


# The rollout page, section by section; each renders on its own (see guarded).
SECTIONS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("summary", _summary_html),
    ("stage timeline", _timeline_html),
    ("guardrails", _guardrails_html),
    ("segment guardrails", _segments_html),
    ("per variant", _variants_html),
    ("judge preference", _judge_html),
    ("judge score by variant", _live_judge_html),
    ("data health", _health_html),
    ("dead letters", _dead_letters_html),
)


def page_html(nav: str, main: str, *, selected: str | None, source: str, live: bool, version: int) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>safeswap dashboard{" - " + esc(selected) if selected else ""}</title>
<link rel="stylesheet" href="static/dashboard.css">
</head>
<body data-rollout="{esc(selected or "")}" data-live="{"1" if live else "0"}" data-version="{int(version)}">
<header><h1>safeswap</h1><span class="source">{esc(source)}</span>
<span id="live" class="{"live" if live else "recorded"}">{"live" if live else "recorded"}</span></header>
<div class="layout"><nav id="nav">{nav}</nav><main id="main">{main}</main></div>
<script src="static/dashboard.js"></script>
</body></html>
"""


CSS = """
:root { --bg:#f7f7f5; --fg:#1f2328; --muted:#6a737d; --card:#fff; --line:#d8dde3; --good:#2f7d32; --bad:#c62828;
        --wait:#8a6d00; --control:#4c78a8; --candidate:#e45756; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg);
       background:var(--bg); }
header { display:flex; gap:16px; align-items:baseline; padding:10px 20px; background:#1f2328; color:#fff; }
header h1 { margin:0; font-size:18px; }
header .source { color:#c9d1d9; font-size:12px; }
#live { margin-left:auto; font-size:12px; padding:2px 8px; border-radius:10px; background:#555; }
#live.live { background:var(--good); }
#live.stale { background:var(--bad); }
.layout { display:grid; grid-template-columns: 240px 1fr; min-height: calc(100vh - 44px); }
nav { border-right:1px solid var(--line); padding:12px; background:#fff; }
nav ul { list-style:none; margin:0; padding:0; }
nav li { padding:6px 4px; border-bottom:1px solid var(--line); display:flex; flex-direction:column; }
nav li.current { background:#eef3fb; }
nav a { color:var(--fg); font-weight:600; text-decoration:none; word-break:break-all; }
main { padding:12px 20px 40px; max-width:1240px; }
section { margin:14px 0; }
h2 { margin:4px 0; } h3 { margin:14px 0 6px; font-size:15px; } h4 { margin:0 0 4px; font-size:13px; }
.muted { color:var(--muted); font-size:12px; }
.facts { display:grid; grid-template-columns: 90px 1fr 90px 1fr; gap:2px 12px; margin:8px 0; }
.facts dt { color:var(--muted); } .facts dd { margin:0; }
.plan-stages { display:flex; gap:6px; list-style:none; padding:0; margin:6px 0; flex-wrap:wrap; }
.plan-stages li { padding:2px 8px; border:1px solid var(--line); border-radius:10px; background:#fff; font-size:12px; }
.plan-stages li.current { border-color:var(--fg); font-weight:700; }
.stage { font-size:12px; color:var(--muted); }
.stage-rolled_back { color:var(--bad); font-weight:700; } .stage-complete { color:var(--good); font-weight:700; }
.stage-paused { color:var(--wait); font-weight:700; }
table { border-collapse:collapse; background:#fff; width:100%; font-size:12.5px; }
th, td { border:1px solid var(--line); padding:3px 6px; text-align:left; vertical-align:top; }
th.control { color:var(--control); } th.candidate { color:var(--candidate); }
tr.action-rollback td { background:#fdecea; } tr.action-pause td { background:#fff4e5; }
tr.action-promote td, tr.action-complete td { background:#edf7ed; }
.grid { display:grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap:12px; margin-top:8px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:8px; }
.card p { margin:2px 0 6px; font-size:12px; }
.badge { font-size:11px; padding:1px 7px; border-radius:9px; color:#fff; background:var(--muted); font-weight:600; }
.badge.good { background:var(--good); } .badge.bad { background:var(--bad); } .badge.wait { background:var(--wait); }
.badge.muted { background:#9aa1a9; }
td.reason { word-break:break-word; }
.current-stage-key { background:rgba(255,196,0,.25); padding:0 4px; border-radius:3px; }
li.bad, p.bad { color:var(--bad); }
.broken { border:1px dashed var(--bad); padding:4px 8px; }
svg.chart { width:100%; height:auto; display:block; }
svg .plot { fill:#fcfcfd; stroke:var(--line); }
svg .grid { stroke:#eceff3; }
svg .tick { font-size:10px; fill:var(--muted); }
svg .label { font-size:11px; fill:var(--fg); font-weight:600; }
svg .legend { font-size:11px; font-weight:600; }
svg .empty { font-size:12px; fill:var(--muted); }
svg .band { fill:rgba(76,120,168,.25); stroke:none; }
svg .estimate { fill:none; stroke:#4c78a8; stroke-width:1.6; }
svg .zero { stroke:#888; stroke-width:.8; }
svg .threshold { stroke:var(--bad); stroke-width:1.4; stroke-dasharray:6 4; }
svg .threshold-label { font-size:10px; fill:var(--bad); }
svg .decision { stroke-width:1.2; stroke-dasharray:2 2; }
svg .line { fill:none; stroke-width:1.6; }
svg .segment { opacity:.85; }
svg .segment.current { stroke:#1f2328; stroke-width:1.5; }
svg .current-stage { fill:rgba(255,196,0,.16); stroke:none; }
svg .segment-label { font-size:11px; fill:#fff; font-weight:600; }
"""

# Polls a tiny version endpoint while live; when something changed, fetches the
# server-rendered fragment and swaps it in (no page reload, no framework).
JS = """
(function () {
  "use strict";
  var body = document.body;
  if (body.getAttribute("data-live") !== "1") { return; }
  var version = body.getAttribute("data-version");
  var rollout = body.getAttribute("data-rollout");
  var badge = document.getElementById("live");
  function query() { return rollout ? "?rollout=" + encodeURIComponent(rollout) : ""; }
  function refresh() {
    fetch("api/version", {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.json(); })
      .then(function (v) {
        badge.className = v.error ? "stale" : "live";
        badge.textContent = v.error ? "live: " + v.error : "live";
        if (String(v.version) === version) { return null; }
        return fetch("fragment" + query(), {credentials: "same-origin", cache: "no-store"})
          .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.json(); })
          .then(function (f) {
            version = String(f.version);
            document.getElementById("nav").innerHTML = f.nav;
            document.getElementById("main").innerHTML = f.main;
            body.setAttribute("data-version", version);
          });
      })
      .catch(function () { badge.className = "stale"; badge.textContent = "disconnected"; })
      .then(function () { window.setTimeout(refresh, 2000); });
  }
  window.setTimeout(refresh, 2000);
})();
"""
