"""Per-partition outcome statistics, with users as the unit.

The outcome metrics of docs/metrics.md live in :class:`VariantSums` (one per
rollout and variant).

Request-level rates (thumbs-down per response, errors per response) are ratios
of per-user sums: a user who sends 20 requests is one unit, not 20, so the
delta-method variance in :mod:`safeswap.core.stats` sees the clustering. Each
accumulator keeps every user's running (numerator, denominator) and updates the
sums of squares and cross-products incrementally, O(1) per event.
"""

from __future__ import annotations

import math
import sys
from array import array
from bisect import bisect_right
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from safeswap.core.stats import Ratio
from safeswap.core.stats.quantiles import LatencyHistogram
from schemas import CellSums, StatsSnapshot
from schemas.events import ERROR_KINDS

# --- Outcome metrics (docs/metrics.md) -------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    """What one per-variant metric is: how people read it, its unit, which way is harm, and
    whether the worker exports it on ``/metrics``. The one catalog: plans, the dashboard and
    the Prometheus gauges read it; docs/metrics.md describes each."""

    label: str
    unit: Literal["rate", "ratio", "ms", "usd", "count"]
    harm: Literal["increase", "decrease"] = "increase"
    exported: bool = False  # a gauge on /metrics (safeswap_variant_*)
    shown: bool = True  # a row of the dashboard's per-variant table


ERROR_KIND_METRICS: tuple[str, ...] = tuple(f"error_rate_{kind}" for kind in ERROR_KINDS)
METRICS: dict[str, MetricInfo] = {
    "latency_ms_p50": MetricInfo("latency p50", "ms", exported=True),  # from the latency histogram
    "latency_ms_p95": MetricInfo("latency p95", "ms", exported=True),
    "latency_ms_p95_cache_hit": MetricInfo("latency p95, cache hits", "ms", shown=False),
    "latency_ms_p95_cache_miss": MetricInfo("latency p95, cache misses", "ms", shown=False),
    "latency_ms_mean": MetricInfo("latency mean", "ms", exported=True, shown=False),
    "latency_ms_mean_cache_hit": MetricInfo("latency mean, cache hits", "ms", shown=False),
    "latency_ms_mean_cache_miss": MetricInfo("latency mean, cache misses", "ms", shown=False),
    "cost_usd_mean": MetricInfo("cost per response", "usd", exported=True),
    "cost_per_session_mean": MetricInfo("cost per session", "usd", exported=True),
    "error_rate": MetricInfo("errors (all kinds)", "rate", exported=True),
    **{f"error_rate_{kind}": MetricInfo(f"errors: {kind.replace('_', ' ')}", "rate") for kind in ERROR_KINDS},
    "thumbs_down_rate": MetricInfo("thumbs-down", "rate", exported=True),
    "thumbs_up_rate": MetricInfo("thumbs-up", "rate", harm="decrease", exported=True),
    "edit_rate": MetricInfo("edited", "rate", exported=True),
    "edit_distance_mean": MetricInfo("edit distance (normalised)", "ratio", exported=True),
    "edit_distance_words_mean": MetricInfo("edit distance (words)", "ratio", shown=False),
    "retry_rate": MetricInfo("retry", "rate", exported=True),
    "follow_up_rate": MetricInfo("follow-up", "rate", harm="decrease", shown=False),
    "session_turns_mean": MetricInfo("turns per session", "count", harm="decrease", shown=False),
    "abandon_rate": MetricInfo("abandon", "rate", exported=True),
    "cache_hit_rate": MetricInfo("cache hit", "rate", harm="decrease", exported=True),
    "responses_per_user": MetricInfo("responses per user", "count", shown=False),
}
# Every ratio metric: per-user numerator and denominator sums (safeswap.core.stats.Ratio).
RATIO_METRICS: tuple[str, ...] = (
    "thumbs_down_rate",
    "thumbs_up_rate",
    "edit_rate",
    "edit_distance_mean",
    "edit_distance_words_mean",
    "retry_rate",
    "follow_up_rate",
    "session_turns_mean",
    "abandon_rate",
    "error_rate",
    *ERROR_KIND_METRICS,
    "latency_ms_mean",
    "latency_ms_mean_cache_hit",
    "latency_ms_mean_cache_miss",
    "cost_usd_mean",
    "cost_per_session_mean",
    "cache_hit_rate",
    "responses_per_user",
)
M = {name: index for index, name in enumerate(RATIO_METRICS)}
N_RATIO = len(RATIO_METRICS)
# Latency quantiles (safeswap.core.stats LatencyHistogram with users' hash buckets as clusters), per cache stratum.
HISTOGRAM_METRICS: dict[str, str] = {
    "latency_ms_p95": "all",
    "latency_ms_p95_cache_hit": "cache_hit",
    "latency_ms_p95_cache_miss": "cache_miss",
}
QUANTILE = 0.95

_LAYOUT = LatencyHistogram.empty()
HIST_EDGES: list[float] = [float(edge) for edge in _LAYOUT.edges]
HIST_BINS = len(_LAYOUT.counts)


# Users are summed into this many hash buckets per (rollout, arm, cohort) and partition:
# the buckets are the statistical units (a user never changes bucket, so the delta
# method over buckets is the user-level one) and memory stays constant however many
# users there are or how often they come back (docs/statistics.md "The unit").
UNIT_BUCKETS = 1024
# Latency quantiles take users as the unit too, in fewer buckets (``uid % LATENCY_BUCKETS``):
# a bucket keeps a whole histogram (two, cache hits and misses), so memory is per bucket x bin;
# 128 buckets per cell and partition give the delta-method variance 127+ degrees of freedom
# (docs/statistics.md "Quantile guardrail").
LATENCY_BUCKETS = 128
# Per-bucket counts: a compact unsigned 32-bit array (4 bytes a bin instead of a list's 8-byte
# pointer), bins of cache hits first, then of misses.
_LAT_TYPE = "I" if array("I").itemsize == 4 else "L"
_LAT_DTYPE = np.dtype(f"u{array(_LAT_TYPE).itemsize}")
_LAT_ZERO = array(_LAT_TYPE, [0]) * (2 * HIST_BINS)
_LITTLE_ENDIAN = sys.byteorder == "little"


def _le_bytes(values: array) -> bytes:
    """An array's items as little-endian bytes (the checkpoint's byte order)."""
    if _LITTLE_ENDIAN:
        return values.tobytes()
    swapped = array(values.typecode, values)
    swapped.byteswap()
    return swapped.tobytes()


def _from_le_bytes(typecode: str, raw: bytes, length: int) -> array:
    values = array(typecode)
    values.frombytes(raw)
    if len(values) != length:  # another metric or bin layout than this version's
        raise ValueError(f"a checkpointed row has {len(values)} values, this version keeps {length}")
    if not _LITTLE_ENDIAN:
        values.byteswap()
    return values


class VariantSums:
    """Sufficient statistics of one (rollout, arm, exposure cohort) on one partition.

    ``sums[6*m : 6*m+6]`` = (n_units, num, num_sq, den, den_sq, num_den) of ratio
    metric ``m`` over the cell's user buckets, kept exact under increments *and*
    retractions from each bucket's running totals (``buckets[b][2*m]`` = num,
    ``[2*m+1]`` = den): a user's responses always land in the same bucket, so the
    sums are those of per-user totals since first exposure, added up per bucket.

    Latency: ``latency[b]`` = bin counts of the requests of the users in latency bucket
    ``b = uid % LATENCY_BUCKETS`` (cache hits in ``[:HIST_BINS]``, misses after), allocated
    on the bucket's first request; the histograms and their cluster moments (the buckets
    are the units of the p95 test) are computed only when a snapshot is built.
    """

    __slots__ = ("sums", "latency", "users", "responses", "sessions", "buckets", "cached_histograms")

    def __init__(self) -> None:
        self.sums = [0.0] * (6 * N_RATIO)
        self.latency: dict[int, array] = {}
        self.users = 0  # distinct users first exposed in this arm and cohort
        self.responses = 0
        self.sessions = 0
        self.buckets: dict[int, array] = {}
        # (responses, users) when the histograms were last built, and them: a cell with no new
        # request since its last snapshot (an older cohort, an idle arm) is not summed again.
        self.cached_histograms: tuple[tuple[int, int], dict[str, Any]] | None = None

    def to_state(self) -> CellSums:
        """Everything but the histogram cache, which the next snapshot rebuilds."""
        return CellSums(
            sums=list(self.sums),
            buckets={b: _le_bytes(totals) for b, totals in self.buckets.items()},
            latency={b: _le_bytes(counts) for b, counts in self.latency.items()},
            users=self.users,
            responses=self.responses,
            sessions=self.sessions,
        )

    @classmethod
    def from_state(cls, state: CellSums) -> VariantSums:
        if len(state.sums) != 6 * N_RATIO:
            raise ValueError(f"a checkpointed cell has {len(state.sums)} sums, this version keeps {6 * N_RATIO}")
        sums = cls()
        sums.sums = list(state.sums)
        sums.buckets = {b: _from_le_bytes("d", raw, 2 * N_RATIO) for b, raw in state.buckets.items()}
        sums.latency = {b: _from_le_bytes(_LAT_TYPE, raw, 2 * HIST_BINS) for b, raw in state.latency.items()}
        sums.users, sums.responses, sums.sessions = state.users, state.responses, state.sessions
        return sums

    def bucket(self, uid: int) -> array:
        """The running totals of the bucket that holds user hash ``uid``: doubles in an
        ``array`` (0.4 MB per cell once all buckets are used; a list of floats takes 1.6 MB
        and is no faster)."""
        b = uid % UNIT_BUCKETS
        totals = self.buckets.get(b)
        if totals is None:
            totals = self.buckets[b] = array("d", bytes(16 * N_RATIO))
        return totals

    def absorb(self, other: VariantSums) -> None:
        """Add another cell's statistics (disjoint users): the arm's figures over all cohorts.
        Its latency histograms join the pooled ones as counts only: the pooled view gives the
        arm's p95, the tests read each cohort's cluster moments (docs/metrics.md)."""
        self.sums = [a + b for a, b in zip(self.sums, other.sums)]
        pooled = self.cached_histograms[1] if self.cached_histograms is not None else {}
        for stratum, hist in other.histograms().items():
            hist = hist.counts_only()
            pooled[stratum] = pooled[stratum] + hist if stratum in pooled else hist
        self.cached_histograms = ((-1, -1), pooled)  # never matches a live key: a view, not a cell
        self.users += other.users
        self.responses += other.responses
        self.sessions += other.sessions

    @classmethod
    def combined(cls, cells: list[VariantSums]) -> VariantSums:
        """A read-only view of cells of disjoint users (one arm and cohort, all its segments)
        whose every (cell, bucket) stays a unit of its own: sums add, latency buckets are
        listed side by side. One cell is returned as it is."""
        if len(cells) == 1:
            return cells[0]
        view = cls()
        view.sums = [sum(column) for column in zip(*(cell.sums for cell in cells))]
        view.latency = dict(enumerate(row for cell in cells for row in cell.latency.values()))
        view.users = sum(cell.users for cell in cells)
        view.responses = sum(cell.responses for cell in cells)
        view.sessions = sum(cell.sessions for cell in cells)
        return view

    def add(self, totals: list[float], m: int, d_num: float, d_den: float) -> None:
        i = 2 * m
        a = totals[i]
        b = totals[i + 1]
        a2 = a + d_num
        b2 = b + d_den
        totals[i] = a2
        totals[i + 1] = b2
        s = self.sums
        j = 6 * m
        if b == 0.0 and b2 != 0.0:
            s[j] += 1
        elif b != 0.0 and b2 == 0.0:
            s[j] -= 1
        s[j + 1] += d_num
        s[j + 2] += a2 * a2 - a * a
        s[j + 3] += d_den
        s[j + 4] += b2 * b2 - b * b
        s[j + 5] += a2 * b2 - a * b

    def add_response(self, totals: list[float], increments) -> None:
        """``add(totals, m, x, 1.0)`` for every ``(m, x)``: one response counted in each
        metric's denominator. The hot path (one call per trace instead of ~17); a zero
        numerator skips its two sums, which ``add`` would change by exactly 0."""
        s = self.sums
        for m, x in increments:
            i = 2 * m
            a = totals[i]
            b = totals[i + 1]
            b2 = b + 1.0
            totals[i + 1] = b2
            j = 6 * m
            if b == 0.0:
                s[j] += 1
            if x:
                a2 = a + x
                totals[i] = a2
                s[j + 1] += x
                s[j + 2] += a2 * a2 - a * a
                s[j + 5] += a2 * b2 - a * b
            elif a:
                s[j + 5] += a * b2 - a * b
            s[j + 3] += 1.0
            s[j + 4] += b2 * b2 - b * b

    def add_latency(self, latency_ms: float, cache_hit: bool, uid: int) -> None:
        """Count one request's latency in the bucket of user hash ``uid``."""
        if not HIST_BINS:
            return
        b = uid % LATENCY_BUCKETS
        counts = self.latency.get(b)
        if counts is None:
            counts = self.latency[b] = _LAT_ZERO[:]
        index = bisect_right(HIST_EDGES, latency_ms)
        counts[index if cache_hit else index + HIST_BINS] += 1

    def ratio(self, m: int) -> Ratio | None:
        j = 6 * m
        n, num, num_sq, den, den_sq, num_den = self.sums[j : j + 6]
        if n <= 0 or den == 0:
            return None
        units = int(round(n))
        # ``users``: the cell's distinct users (those with a response); per-metric users
        # (e.g. only those who edited) are not tracked per user, buckets are.
        return Ratio(
            n_units=units,
            num=num,
            num_sq=max(num_sq, 0.0),
            den=den,
            den_sq=max(den_sq, 0.0),
            num_den=num_den,
            users=max(self.users, units),
        )

    def histograms(self) -> dict[str, Any]:
        """Per stratum ("all", "cache_hit", "cache_miss"), the cell's LatencyHistogram with
        the cluster moments of its latency buckets (strata without requests left out)."""
        if self.cached_histograms is not None and self.cached_histograms[0] in ((self.responses, self.users), (-1, -1)):
            return self.cached_histograms[1]

        if not HIST_BINS or not self.latency:
            return {}
        key = (self.responses, self.users)
        rows = list(self.latency.values())
        matrix = np.frombuffer(b"".join(rows), dtype=_LAT_DTYPE).reshape(len(rows), 2 * HIST_BINS)
        hit, miss = matrix[:, :HIST_BINS], matrix[:, HIST_BINS:]
        out = {}
        for stratum, counts in (("all", hit + miss), ("cache_hit", hit), ("cache_miss", miss)):
            if counts.any():
                units = int(np.count_nonzero(counts.any(axis=1)))
                out[stratum] = LatencyHistogram.from_cluster_counts(counts, users=max(self.users, units))
        self.cached_histograms = (key, out)
        return out

    def histogram(self, stratum: str):
        return self.histograms().get(stratum)

    def stats(self, metrics: Collection[str] | None = None) -> dict[str, dict]:
        """``metrics[metric] = stat.to_dict()`` for a StatsSnapshot (empty metrics left out);
        of ``metrics`` only, when given."""
        out: dict[str, dict] = {}
        for m, name in enumerate(RATIO_METRICS):
            if metrics is not None and name not in metrics:
                continue
            ratio = self.ratio(m)
            if ratio is not None:
                out[name] = ratio.to_dict()
        if metrics is not None and not any(name in metrics for name in HISTOGRAM_METRICS):
            return out
        hists = self.histograms()
        for name, stratum in HISTOGRAM_METRICS.items():
            if metrics is not None and name not in metrics:
                continue
            hist = hists.get(stratum)
            if hist is not None:
                out[name] = hist.to_dict()
        return out


def metric_values(stats: dict[str, object]) -> dict[str, float | None]:
    """Point estimates from merged statistics (``stat_from_dict`` objects): what
    ``safeswap replay`` prints. Every metric of docs/metrics.md appears; None = no data."""
    values: dict[str, float | None] = {}
    for name in RATIO_METRICS:
        stat = stats.get(name)
        values[name] = None if stat is None or stat.den == 0 else stat.estimate
    for name in HISTOGRAM_METRICS:
        stat = stats.get(name)
        values[name] = None if stat is None or stat.n == 0 else stat.quantile(QUANTILE)
    return values


def add_published(snapshots: Iterable[StatsSnapshot]) -> dict[str, dict[str, dict[str, Any]]]:
    """Add the partitions' published statistics as plain dicts (``to_dict`` form):
    sums of every numeric field, sparse histogram counts added bin by bin. Much
    cheaper than building and adding one validated statistic per partition."""
    merged: dict[str, dict[str, dict[str, Any]]] = {}
    for snapshot in snapshots:
        for variant, metrics in snapshot.metrics.items():
            into = merged.setdefault(variant, {})
            for metric, stat in metrics.items():
                if not isinstance(stat, dict):
                    continue
                total = into.get(metric)
                if total is None:
                    # the point estimates need the counts, not a histogram's cluster moments
                    total = into[metric] = {k: v for k, v in stat.items() if k not in ("counts", "clusters")}
                    if "counts" in stat:
                        total["counts"] = {}
                    else:
                        continue
                else:
                    for key, value in stat.items():
                        if key not in ("kind", "counts", "lo", "hi", "bins_per_decade") and isinstance(
                            value, (int, float)
                        ):
                            total[key] = total.get(key, 0) + value
                if isinstance(stat.get("counts"), list) and isinstance(total.get("counts"), dict):
                    bins = total["counts"]
                    for index, count in stat["counts"]:
                        bins[index] = bins.get(index, 0) + count
    for metrics in merged.values():
        for stat in metrics.values():
            if isinstance(stat.get("counts"), dict):
                stat["counts"] = sorted([i, c] for i, c in stat["counts"].items())
    return merged


def merge_variant_stats(snapshots: Iterable[StatsSnapshot]) -> dict[str, dict[str, Any]]:
    """The latest snapshot of every partition added into one statistic per variant and metric
    ({variant: {metric: stat}}), as a look sees the pooled arms: the published dicts are summed
    first, then each metric is parsed once. A statistic that cannot be parsed (a kind this
    version does not know) is left out; one whose parts cannot be added raises ValueError."""
    from safeswap.core.stats import stat_from_dict

    merged: dict[str, dict[str, Any]] = {}
    for variant, raw in add_published(snapshots).items():
        stats = merged[variant] = {}
        for metric, data in raw.items():
            try:
                stats[metric] = stat_from_dict(data)
            except (ValueError, TypeError):
                continue
    return merged


def point_estimates(stats: dict[str, Any]) -> dict[str, float]:
    """The finite point estimates of merged statistics (``metric_values``), plus the median
    latency ``latency_ms_p50``: what the dashboard and ``/metrics`` show per variant."""
    values = {k: v for k, v in metric_values(stats).items() if v is not None and math.isfinite(v)}
    histogram = stats.get("latency_ms_p95")
    if histogram is not None and histogram.n:
        values["latency_ms_p50"] = float(histogram.quantile(0.5))
    return values


def variant_values(snapshots: Iterable[StatsSnapshot]) -> dict[str, dict[str, float]]:
    """Point estimates per variant from the latest snapshot of each partition."""
    return {variant: point_estimates(stats) for variant, stats in merge_variant_stats(snapshots).items()}


def model_drift(models: dict[str, int], pinned: str | None) -> float | None:
    """Served-model drift of a variant: the share of its traces not served by the model its plan
    pins (what the controller's health check compares with model_drift_max_share). None
    without a pin or traces."""
    traces = sum(models.values())
    if pinned is None or not traces:
        return None
    return (traces - models.get(pinned, 0)) / traces


def model_drift_text(drift: Any) -> str:
    """The share of each variant's traces off its pinned model, as percentages
    ("control 0.0%, candidate 3.2%"); "none" when nothing drifted."""
    if not drift:
        return "none"
    if not isinstance(drift, dict):
        return str(drift)
    order = {"control": 0, "candidate": 1}
    parts = []
    for variant in sorted(drift, key=lambda v: (order.get(v, 2), str(v))):
        share = drift[variant]
        parts.append(f"{variant} {share:.1%}" if isinstance(share, (int, float)) else f"{variant} {share}")
    return ", ".join(parts)


# Every metric a guardrail can watch, with the direction that is harm.
GUARDABLE: dict[str, str] = {name: METRICS[name].harm for name in (*RATIO_METRICS, *HISTOGRAM_METRICS)}
