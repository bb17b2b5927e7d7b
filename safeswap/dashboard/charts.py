"""Charts as inline SVG, rendered on the server in pure Python (no JavaScript, no CDN).

Every text that reaches the SVG goes through :func:`esc`; numbers are formatted
here, so event data can only ever appear as escaped text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from html import escape
from typing import Any

W, H = 560, 210
PAD_L, PAD_R, PAD_T, PAD_B = 58, 12, 24, 26
COLORS = {"control": "#4c78a8", "candidate": "#e45756"}
ACTION_COLORS = {
    "start": "#4c78a8",
    "promote": "#54a24b",
    "complete": "#2f7d32",
    "rollback": "#d62728",
    "pause": "#f58518",
    "resume": "#72b7b2",
    "hold": "#9d9d9d",
}


def esc(text: Any) -> str:
    return escape(str(text), quote=True)


def when(ts_ms: int | float) -> str:
    """Event time as the page shows it; a time no calendar holds (event data can say
    anything) shows as the raw number instead of failing the page."""
    try:
        return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%m-%d %H:%M")
    except (OverflowError, OSError, ValueError, TypeError):
        return f"ts {ts_ms!r}"


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "pct":
        return f"{value * 100:+.1f}%"
    if unit == "rate":
        return f"{value * 100:.2f}%"
    if unit == "ms":
        return f"{value:,.0f} ms"
    if unit == "usd":
        return f"${value:.4f}"
    return f"{value:.4g}"


def interval_text(low: float | None, high: float | None, unit: str) -> str:
    """An interval written whole: an end that is not finite yet (too few users in one arm)
    reads as unbounded, never as a dash."""
    if low is None and high is None:
        return "none yet"
    return f"[{'-inf' if low is None else fmt(low, unit)}, {'+inf' if high is None else fmt(high, unit)}]"


class _Axes:
    def __init__(self, x0: float, x1: float, y0: float, y1: float, width: int = W, height: int = H) -> None:
        if x1 <= x0:
            x1 = x0 + 1
        if y1 <= y0:
            pad = abs(y0) * 0.1 or 1.0
            y0, y1 = y0 - pad, y1 + pad
        self.x0, self.x1, self.y0, self.y1, self.w, self.h = x0, x1, y0, y1, width, height

    def x(self, value: float) -> float:
        return PAD_L + (value - self.x0) / (self.x1 - self.x0) * (self.w - PAD_L - PAD_R)

    def y(self, value: float) -> float:
        value = min(max(value, self.y0), self.y1)
        return self.h - PAD_B - (value - self.y0) / (self.y1 - self.y0) * (self.h - PAD_T - PAD_B)


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    step = 10 ** math.floor(math.log10(span / n))
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= n:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _frame(axes: _Axes, y_unit: str, label: str, behind: list[str] = ()) -> list[str]:
    parts = [
        f'<rect x="{PAD_L}" y="{PAD_T}" width="{axes.w - PAD_L - PAD_R}" height="{axes.h - PAD_T - PAD_B}" '
        'class="plot"/>',
        *behind,
    ]
    for tick in _ticks(axes.y0, axes.y1):
        y = axes.y(tick)
        parts.append(f'<line x1="{PAD_L}" x2="{axes.w - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(
            f'<text x="{PAD_L - 4}" y="{y + 3:.1f}" class="tick" text-anchor="end">{esc(fmt(tick, y_unit))}</text>'
        )
    for tick in (axes.x0, (axes.x0 + axes.x1) / 2, axes.x1):
        anchor = "start" if tick == axes.x0 else ("end" if tick == axes.x1 else "middle")
        parts.append(
            f'<text x="{axes.x(tick):.1f}" y="{axes.h - 8}" class="tick" text-anchor="{anchor}">'
            f"{esc(when(tick))}</text>"
        )
    parts.append(f'<text x="{PAD_L}" y="16" class="label">{esc(label)}</text>')  # above the plot, clear of the data
    return parts


def _svg(
    parts: Iterable[str], title: str, width: int = W, height: int = H, x_range: tuple[float, float] | None = None
) -> str:
    # data-range: the event-time range on the x axis (every chart of a view shares one)
    shown = f' data-range="{int(x_range[0])},{int(x_range[1])}"' if x_range else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{esc(title)}" class="chart"{shown}>'
        f"<title>{esc(title)}</title>{''.join(parts)}</svg>"
    )


def _path(points: list[tuple[float, float]]) -> str:
    return "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in points)


def _markers(axes: _Axes, decisions: list[dict[str, Any]]) -> list[str]:
    parts = []
    for d in decisions:
        if axes.x0 <= d["x"] <= axes.x1:
            x = axes.x(d["x"])
            color = ACTION_COLORS.get(d["action"], "#777")
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{axes.h - PAD_B}" stroke="{color}" '
                f'class="decision"><title>#{int(d["seq"])} {esc(d["action"])} -&gt; {esc(d["stage"])}'
                f"</title></line>"
            )
    return parts


def _current_stage(axes: _Axes, current: dict[str, Any] | None) -> list[str]:
    """The current stage's period, shaded behind the data (the same on every chart of a view)."""
    if not current:
        return []
    x0, x1 = axes.x(max(current["from"], axes.x0)), axes.x(min(current["to"], axes.x1))
    return [
        f'<rect x="{x0:.1f}" y="{PAD_T}" width="{max(x1 - x0, 1.5):.1f}" height="{axes.h - PAD_T - PAD_B}" '
        f'class="current-stage"><title>current stage: {esc(current["label"])}</title></rect>'
    ]


def _x_range(time_range: list[float] | None, xs: list[float]) -> tuple[float, float]:
    return (time_range[0], time_range[1]) if time_range else (min(xs), max(xs))


def interval_chart(
    guardrail: dict[str, Any],
    decisions: list[dict[str, Any]],
    time_range: list[float] | None = None,
    current: dict[str, Any] | None = None,
) -> str:
    """The always-valid interval over time (band), its estimate (line) and the threshold (dashed),
    over the view's ``time_range`` with the ``current`` stage shaded."""
    points = [
        p
        for p in guardrail["points"]
        if p["ci_low"] is not None or p["ci_high"] is not None or p["estimate"] is not None
    ]
    unit = "pct" if guardrail["scale"] == "relative" else "num"
    title = f"{guardrail['metric']}: always-valid interval vs threshold"
    threshold = guardrail.get("threshold")
    if not points:
        return _svg(
            [
                f'<text x="{W / 2}" y="{H / 2}" class="empty" text-anchor="middle">'
                "no interval yet (not enough users per arm, or shadow stage)</text>"
            ],
            title,
        )
    values = [v for p in points for v in (p["estimate"], p["ci_low"], p["ci_high"]) if v is not None]
    if threshold is not None:
        values.append(threshold)
    values.append(0.0)
    lo, hi = min(values), max(values)
    # Keep the plot readable when an early interval is huge: clip to 4x the later spread.
    tail = [v for p in points[len(points) // 3 :] for v in (p["ci_low"], p["ci_high"]) if v is not None]
    if tail:
        spread = max(max(tail) - min(tail), abs(threshold or 0.0), 1e-9)
        lo = max(lo, min(min(tail), 0.0, threshold or 0.0) - 1.5 * spread)
        hi = min(hi, max(max(tail), 0.0, threshold or 0.0) + 1.5 * spread)
    axes = _Axes(*_x_range(time_range, [p["ts"] for p in points]), lo, hi)
    parts = _frame(axes, unit, title, _current_stage(axes, current))
    band = [p for p in points if p["ci_low"] is not None and p["ci_high"] is not None]
    if band:
        upper = [(axes.x(p["ts"]), axes.y(p["ci_high"])) for p in band]
        lower = [(axes.x(p["ts"]), axes.y(p["ci_low"])) for p in reversed(band)]
        parts.append(f'<path d="{_path(upper + lower)} Z" class="band"/>')
    estimate = [(axes.x(p["ts"]), axes.y(p["estimate"])) for p in points if p["estimate"] is not None]
    if estimate:
        parts.append(f'<path d="{_path(estimate)}" class="estimate"/>')
    parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{axes.y(0):.1f}" y2="{axes.y(0):.1f}" class="zero"/>')
    if threshold is not None:
        y = axes.y(threshold)
        parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" class="threshold"/>')
        parts.append(
            f'<text x="{W - PAD_R - 4}" y="{y - 4:.1f}" class="threshold-label" text-anchor="end">'
            f"limit {esc(fmt(threshold, unit))}</text>"
        )
    parts.extend(_markers(axes, decisions))
    return _svg(parts, title, x_range=(axes.x0, axes.x1))


def trend_chart(
    metric: str,
    label: str,
    unit: str,
    series: dict[str, list[list[float]]],
    decisions: list[dict[str, Any]],
    time_range: list[float] | None = None,
    current: dict[str, Any] | None = None,
) -> str:
    """One metric per variant over time (the view's ``time_range``, the ``current`` stage shaded)."""
    title = f"{label} by variant"
    lines = {v: pts for v, pts in series.items() if pts}
    if not lines:
        return _svg([f'<text x="{W / 2}" y="{H / 2}" class="empty" text-anchor="middle">no data yet</text>'], title)
    xs = [p[0] for pts in lines.values() for p in pts]
    ys = [p[1] for pts in lines.values() for p in pts]
    axes = _Axes(*_x_range(time_range, xs), min(0.0, min(ys)), max(ys) * 1.05 if max(ys) > 0 else 1.0)
    parts = _frame(axes, unit, title, _current_stage(axes, current))
    for offset, (variant, pts) in enumerate(sorted(lines.items())):
        color = COLORS.get(variant, "#555")
        parts.append(f'<path d="{_path([(axes.x(x), axes.y(y)) for x, y in pts])}" stroke="{color}" class="line"/>')
        parts.append(
            f'<text x="{W - PAD_R - 4}" y="{PAD_T + 12 + 12 * offset}" fill="{color}" class="legend" '
            f'text-anchor="end">{esc(variant)}</text>'
        )
    parts.extend(_markers(axes, decisions))
    return _svg(parts, title, x_range=(axes.x0, axes.x1))


def stage_timeline(
    decisions: list[dict[str, Any]], time_range: list[float] | None, width: int = 900, height: int = 74
) -> str:
    """Stages as segments (each decision starts one), the split in each, decisions as markers,
    over the view's ``time_range``; the current (last) stage is outlined."""
    title = "stage timeline"
    if not decisions:
        return _svg(
            [f'<text x="{width / 2}" y="{height / 2}" class="empty" text-anchor="middle">no decision yet</text>'],
            title,
            width,
            height,
        )
    xs = [d["x"] for d in decisions]
    x0, x1 = _x_range(time_range, xs)
    if x1 <= x0:
        x1 = x0 + 1
    left, right = 10, width - 10

    def x(value: float) -> float:
        return left + (value - x0) / (x1 - x0) * (right - left)

    parts = []
    ordered = sorted(decisions, key=lambda d: (d["x"], d["seq"]))
    for i, d in enumerate(ordered):
        start = x(d["x"])
        stop = x(ordered[i + 1]["x"]) if i + 1 < len(ordered) else right
        color = ACTION_COLORS.get(d["action"], "#777")
        label = f"{d['stage']} {d['percent']:g}%"
        current = " current" if i == len(ordered) - 1 else ""
        parts.append(
            f'<rect x="{start:.1f}" y="14" width="{max(stop - start, 2):.1f}" height="22" fill="{color}" '
            f'class="segment{current}"><title>#{int(d["seq"])} {esc(d["action"])}: {esc(d["reason"])}'
            "</title></rect>"
        )
        if stop - start > 60:
            parts.append(f'<text x="{start + 4:.1f}" y="29" class="segment-label">{esc(label)}</text>')
        parts.append(f'<circle cx="{start:.1f}" cy="44" r="4" fill="{color}"/>')
        # Near an edge the label grows inwards, so it is never cut off.
        anchor = "start" if start - left < 60 else ("end" if right - start < 60 else "middle")
        parts.append(
            f'<text x="{start:.1f}" y="{58 + 10 * (i % 2)}" class="tick" text-anchor="{anchor}">'
            f"#{int(d['seq'])} {esc(d['action'])}</text>"
        )
    parts.append(f'<text x="{left}" y="10" class="tick">{esc(when(x0))}</text>')
    parts.append(f'<text x="{right}" y="10" class="tick" text-anchor="end">{esc(when(x1))}</text>')
    return _svg(parts, title, width, height, x_range=(x0, x1))
