r"""Quantile guardrails (p95 latency, p95 time-to-first-token) under continuous monitoring.

Sufficient statistic
--------------------
``LatencyHistogram``: counts in fixed log-spaced bins (default 1 ms .. 10^6 ms,
50 bins per decade, i.e. each bin spans a factor 10^(1/50) = 1.047), plus an
underflow and an overflow bin.  Mergeable with ``a + b``.

Confidence sequence for one quantile (Howard & Ramdas 2022)
------------------------------------------------------------
Howard, S. R. & Ramdas, A. (2022), "Sequential estimation of quantiles with
applications to A/B-testing and best-arm identification", Bernoulli 28(3).
For a continuous distribution with q-quantile Q, the count
``S_t = #{i <= t : X_i <= Q}`` is Binomial(t, q) at every t.  The beta-binomial
mixture of likelihood ratios

    M_t(s) = B(a + s, b + t - s) / B(a, b) / (q^s (1 - q)^(t - s)),
    a = q c, b = (1 - q) c

is a nonnegative martingale at s = S_t, so by Ville's inequality
``P(exists t: M_t(S_t) >= 1/alpha) <= alpha``.  ``log M_t(s)`` is convex in s with
its minimum near t q, hence on that event, for every bin edge e with
``N_t(e)`` = number of observations below e:

* ``N_t(e) < t q`` and ``M_t(N_t(e)) >= 1/alpha``  =>  e < Q   (lower bound)
* ``N_t(e) > t q`` and ``M_t(N_t(e)) >= 1/alpha``  =>  e >= Q  (upper bound)

Only one martingale is needed (no union over edges), and it is exact
(non-asymptotic).  The concentration c plays the role of ``rho``: the prior
variance q(1-q)/(c+1) is matched to the normal-mixture optimum so the sequence
is tightest around n_tune/2 units per arm.

Comparison
----------
Each arm's sequence at alpha/2 (two-sided from its one martingale); with
probability >= 1 - alpha all four bounds hold at all times, so

    relative:  [L_b / U_a - 1,  U_b / L_a - 1]      absolute: [L_b - U_a,  U_b - L_a]

The always-valid p-value for H0: difference <= null (``greater``) is the
smallest alpha' at which some pair of edges certifies
``Q_b > e_b >= (1 + null) e_a >= (1 + null) Q_a``:
``p = min over pairs of 2 exp(-min(log M_a, log M_b))`` (closed form).

Limits
------
* Resolution: bounds sit on bin edges, so they are conservative by up to one
  bin (4.7% with 50 bins/decade); effects smaller than ~2 bins are hard to
  certify.  Values outside [lo, hi) only count in under/overflow.
* Independence: the binomial argument treats requests as i.i.d.  When users
  send many requests with user-specific latency (clustering), the effective
  sample size is smaller and the sequence is anti-conservative; prefer
  per-user aggregates (e.g. a ``Mean`` of per-user p95) in that case.
* Ties / discrete latencies: fine at bin level (we only use counts below edges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

import numpy as np
from scipy.special import betaln

from safeswap.stats.sequential import _check_alpha, _check_n_tune, _json_float
from safeswap.stats.sufficient import _check_kind, _count, _finite

__all__ = ["LatencyHistogram", "QuantileResult", "quantile_compare", "quantile_bounds"]


def _counts(values: Any) -> tuple[int, ...]:
    """Bin counts as ints, checked in one vectorised pass (merging snapshots is the
    controller's hot path: hundreds of bins per histogram, many histograms per look)."""
    values = tuple(values)
    if all(type(v) is int for v in values):
        if values and min(values) < 0:
            i = next(i for i, v in enumerate(values) if v < 0)
            raise ValueError(f"counts[{i}] must be >= 0, got {values[i]!r}")
        return values
    return tuple(_count(f"counts[{i}]", v) for i, v in enumerate(values))  # slow path names the bad bin


@dataclass(frozen=True, slots=True)
class LatencyHistogram:
    """Counts per log-spaced bin: index 0 is underflow (< lo), index K+1 overflow (>= hi),
    index i in 1..K covers [edges[i-1], edges[i])."""

    counts: tuple[int, ...]
    lo: float = 1.0
    hi: float = 1e6
    bins_per_decade: int = 50
    _edges: np.ndarray = field(init=False, repr=False, compare=False)
    kind = "latency_histogram"

    def __post_init__(self) -> None:
        lo = _finite("lo", self.lo)
        hi = _finite("hi", self.hi)
        if lo <= 0 or hi <= lo:
            raise ValueError(f"lo and hi must satisfy 0 < lo < hi, got lo={lo}, hi={hi}")
        bpd = _count("bins_per_decade", self.bins_per_decade)
        if bpd < 1:
            raise ValueError("bins_per_decade must be >= 1")
        n_bins = int(round(math.log10(hi / lo) * bpd))
        if n_bins < 1:
            raise ValueError("hi/lo must span at least one bin")
        counts = _counts(self.counts)
        if len(counts) != n_bins + 2:
            raise ValueError(f"counts must have {n_bins + 2} entries for this layout, got {len(counts)}")
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        object.__setattr__(self, "bins_per_decade", bpd)
        object.__setattr__(self, "_edges", lo * 10.0 ** (np.arange(n_bins + 1) / bpd))

    # -- construction -------------------------------------------------------
    @classmethod
    def empty(cls, lo: float = 1.0, hi: float = 1e6, bins_per_decade: int = 50) -> "LatencyHistogram":
        lo, hi = _finite("lo", lo), _finite("hi", hi)
        if lo <= 0 or hi <= lo:
            raise ValueError(f"lo and hi must satisfy 0 < lo < hi, got lo={lo}, hi={hi}")
        n_bins = int(round(math.log10(hi / lo) * _count("bins_per_decade", bins_per_decade)))
        return cls((0,) * (n_bins + 2), lo, hi, bins_per_decade)

    @classmethod
    def from_values(cls, values: Iterable[Any], lo: float = 1.0, hi: float = 1e6,
                    bins_per_decade: int = 50) -> "LatencyHistogram":
        x = np.asarray(values, dtype=float).ravel()
        if not np.all(np.isfinite(x)):
            raise ValueError("values must be finite")
        if np.any(x < 0):
            raise ValueError("values must be >= 0 (latencies)")
        proto = cls.empty(lo, hi, bins_per_decade)
        idx = np.searchsorted(proto._edges, x, side="right")  # 0 = underflow, K+1 = overflow
        counts = np.bincount(idx, minlength=len(proto.counts))
        return cls(tuple(int(c) for c in counts), lo, hi, bins_per_decade)

    def __add__(self, other: object) -> "LatencyHistogram":
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        if (self.lo, self.hi, self.bins_per_decade) != (other.lo, other.hi, other.bins_per_decade):
            raise ValueError("cannot merge histograms with different bin layouts")
        return LatencyHistogram(tuple(map(int.__add__, self.counts, other.counts)),
                                self.lo, self.hi, self.bins_per_decade)

    # -- views --------------------------------------------------------------
    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def edges(self) -> np.ndarray:
        return self._edges.copy()

    def counts_below_edges(self) -> np.ndarray:
        """N(e_j) = number of observations < edges[j], for every edge."""
        return np.cumsum(np.asarray(self.counts[:-1], dtype=float))

    def quantile(self, q: float) -> float:
        """Point estimate: geometric interpolation inside the bin holding the q-th observation."""
        q = _check_q(q)
        n = self.n
        if n == 0:
            raise ValueError("histogram is empty: the quantile is undefined")
        target = q * n
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, target, side="left"))
        if i == 0:
            return self.lo
        if i == len(self.counts) - 1:
            return self.hi
        below = cum[i - 1]
        frac = (target - below) / self.counts[i]
        e0, e1 = self._edges[i - 1], self._edges[i]
        return float(e0 * (e1 / e0) ** frac)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lo": self.lo,
            "hi": self.hi,
            "bins_per_decade": self.bins_per_decade,
            "counts": [[i, c] for i, c in enumerate(self.counts) if c],  # sparse: most bins empty
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyHistogram":
        _check_kind(cls.kind, data)
        proto = cls.empty(data.get("lo", 1.0), data.get("hi", 1e6), data.get("bins_per_decade", 50))
        counts = list(proto.counts)
        pairs = data.get("counts")
        if not isinstance(pairs, list):
            raise ValueError("counts must be a list of [index, count] pairs")
        for pair in pairs:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"counts entries must be [index, count], got {pair!r}")
            i = _count("counts index", pair[0])
            if i >= len(counts):
                raise ValueError(f"counts index {i} out of range for this layout")
            counts[i] += pair[1]  # validated once, all bins together, by the constructor
        return cls(tuple(counts), proto.lo, proto.hi, proto.bins_per_decade)


def _check_q(q: float) -> float:
    q = _finite("q", q)
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    return q


def _concentration(q: float, alpha: float, n_tune_per_arm: float) -> float:
    """Beta-prior concentration c with prior variance q(1-q)/(c+1) = q(1-q) x*/n."""
    log_a = math.log(alpha)
    x_star = -2.0 * log_a + math.log(1.0 - 2.0 * log_a)
    return max(n_tune_per_arm / x_star - 1.0, 1.0)


def _log_evidence(hist: LatencyHistogram, q: float, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Per edge: log M for "Q <= e" (counts above t q) and for "Q > e" (counts below t q)."""
    s = hist.counts_below_edges()
    t = float(hist.n)
    a, b = q * c, (1.0 - q) * c
    log_m = betaln(a + s, b + t - s) - betaln(a, b) - s * math.log(q) - (t - s) * math.log1p(-q)
    log_m = np.maximum(log_m, 0.0)
    return np.where(s > t * q, log_m, 0.0), np.where(s < t * q, log_m, 0.0)


def quantile_bounds(hist: LatencyHistogram, q: float, alpha: float, n_tune: float = 5000) -> tuple[float, float]:
    """Always-valid (1 - alpha) bounds (L, U) on one arm's q-quantile; 0 / inf when uninformative.

    ``n_tune`` is per arm here.
    """
    q, alpha = _check_q(q), _check_alpha(alpha, one_sided=False)
    c = _concentration(q, alpha, _check_n_tune(n_tune))
    ev_le, ev_gt = _log_evidence(hist, q, c)
    thr = -math.log(alpha)
    edges = hist._edges
    lower = edges[ev_gt >= thr]
    upper = edges[ev_le >= thr]
    return (float(lower.max()) if lower.size else 0.0, float(upper.min()) if upper.size else math.inf)


@dataclass(frozen=True, slots=True)
class QuantileResult:
    """Candidate vs control on the q-quantile; bounds hold jointly over all looks w.p. 1 - alpha."""

    q: float
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    control_quantile: float
    candidate_quantile: float
    control_bounds: tuple[float, float]
    candidate_bounds: tuple[float, float]
    n_control: int
    n_candidate: int
    difference: str
    alternative: str
    alpha: float
    null: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "q": self.q,
            "estimate": self.estimate,
            "ci_low": _json_float(self.ci_low),
            "ci_high": _json_float(self.ci_high),
            "p_value": self.p_value,
            "control_quantile": self.control_quantile,
            "candidate_quantile": self.candidate_quantile,
            "control_bounds": [_json_float(x) for x in self.control_bounds],
            "candidate_bounds": [_json_float(x) for x in self.candidate_bounds],
            "n_control": self.n_control,
            "n_candidate": self.n_candidate,
            "difference": self.difference,
            "alternative": self.alternative,
            "alpha": self.alpha,
            "null": self.null,
        }


def _diff(b: float, a: float, relative: bool) -> float:
    if relative:
        if a == 0:
            return math.inf if b > 0 else 0.0
        return b / a - 1.0 if math.isfinite(a) else -1.0
    return b - a


def _pair_p_value(ev_a: np.ndarray, ev_b: np.ndarray, edges: np.ndarray, null: float,
                  relative: bool, greater: bool) -> float:
    """min over edge pairs certifying the claim of 2 exp(-min(evidence_a, evidence_b))."""
    if greater:
        # Q_b > e_b >= f(e_a) >= f(Q_a): for each e_a take the smallest e_b >= f(e_a).
        target = edges * (1.0 + null) if relative else edges + null
        jb = np.searchsorted(edges, target * (1 - 1e-12), side="left")
    else:
        # Q_b <= e_b <= f(e_a) < f(Q_a): for each e_a take the largest e_b <= f(e_a).
        target = edges * (1.0 + null) if relative else edges + null
        jb = np.searchsorted(edges, target * (1 + 1e-12), side="right") - 1
    ok = (jb >= 0) & (jb < edges.size)
    if not ok.any():
        return 1.0
    best = np.minimum(ev_a[ok], ev_b[jb[ok]]).max()
    return float(min(1.0, 2.0 * math.exp(-best)))


def quantile_compare(
    control_hist: LatencyHistogram,
    candidate_hist: LatencyHistogram,
    *,
    q: float = 0.95,
    alpha: float = 0.05,
    n_tune: float = 5000,
    difference: Literal["relative", "absolute"] = "relative",
    alternative: Literal["two-sided", "greater", "less"] = "greater",
    null: float = 0.0,
) -> QuantileResult:
    """Always-valid comparison of the q-quantile of two histograms (see module docstring).

    ``alternative="greater"``: candidate's quantile larger (slower).  The p-value
    tests H0: difference <= null (``greater``), >= null (``less``) or either
    (``two-sided``).  ``n_tune`` is in total units, as in ``sequential_compare``.
    """
    if not isinstance(control_hist, LatencyHistogram) or not isinstance(candidate_hist, LatencyHistogram):
        raise ValueError("control_hist and candidate_hist must be LatencyHistogram")
    if (control_hist.lo, control_hist.hi, control_hist.bins_per_decade) != (
            candidate_hist.lo, candidate_hist.hi, candidate_hist.bins_per_decade):
        raise ValueError("control_hist and candidate_hist must share the bin layout")
    if difference not in ("relative", "absolute"):
        raise ValueError(f"difference must be 'relative' or 'absolute', got {difference!r}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    q = _check_q(q)
    alpha = _check_alpha(alpha, one_sided=False)
    null = _finite("null", null)
    n_tune = _check_n_tune(n_tune)
    for name, h in (("control_hist", control_hist), ("candidate_hist", candidate_hist)):
        if h.n < 2:
            raise ValueError(f"{name} needs at least 2 observations, got {h.n}")
    relative = difference == "relative"
    c = _concentration(q, alpha / 2, n_tune / 2)
    la, ua = quantile_bounds(control_hist, q, alpha / 2, n_tune / 2)
    lb, ub = quantile_bounds(candidate_hist, q, alpha / 2, n_tune / 2)
    ev_a_le, ev_a_gt = _log_evidence(control_hist, q, c)
    ev_b_le, ev_b_gt = _log_evidence(candidate_hist, q, c)
    edges = control_hist._edges
    p_greater = _pair_p_value(ev_a_le, ev_b_gt, edges, null, relative, greater=True)
    p_less = _pair_p_value(ev_a_gt, ev_b_le, edges, null, relative, greater=False)
    p = {"greater": p_greater, "less": p_less, "two-sided": min(p_greater, p_less)}[alternative]
    qa, qb = control_hist.quantile(q), candidate_hist.quantile(q)
    return QuantileResult(
        q=q,
        estimate=_diff(qb, qa, relative),
        ci_low=_diff(lb, ua, relative),
        ci_high=_diff(ub, la, relative),
        p_value=p,
        control_quantile=qa,
        candidate_quantile=qb,
        control_bounds=(la, ua),
        candidate_bounds=(lb, ub),
        n_control=control_hist.n,
        n_candidate=candidate_hist.n,
        difference=difference,
        alternative=alternative,
        alpha=alpha,
        null=null,
    )
