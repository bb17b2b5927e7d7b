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

Limits of that request-level sequence
-------------------------------------
* Resolution: bounds sit on bin edges, so they are conservative by up to one
  bin (4.7% with 50 bins/decade); effects smaller than ~2 bins are hard to
  certify.  Values outside [lo, hi) only count in under/overflow.
* Independence: the binomial argument treats requests as i.i.d.  When users
  send many requests with user-specific latency (clustering), the effective
  sample size is smaller and the sequence is anti-conservative.  Histograms
  that carry cluster moments use the user-level test below instead.
* Ties / discrete latencies: fine at bin level (we only use counts below edges).

Users as the unit: delta method for quantiles (clustered histograms)
-------------------------------------------------------------------
Deng, Knoblich & Lu (2018), "Applying the delta method in metric analytics: a
practical guide with novel ideas", KDD, section on quantile metrics.  Requests
are grouped in clusters b (hash buckets of users: a user never changes bucket,
so buckets are independent when users are); per arm, with ``n_b`` requests in
cluster b, ``C_b(e)`` of them below edge e, ``N = sum n_b`` and ``K`` clusters
with data, the empirical CDF ``F(e) = sum C_b(e) / N`` is a ratio of cluster
sums, so by the delta method

    Var(F(e)) = [sum_b (C_b(e) - F(e) n_b)^2 / (K - 1)] / (K nbar^2),   nbar = N / K,

computed from ``S2(e) = sum C_b(e)^2``, ``S1(e) = sum C_b(e) n_b`` and
``Sn2 = sum n_b^2`` as ``sum (C_b - F n_b)^2 = S2 - 2 F S1 + F^2 Sn2``.  Those
cluster moments are what a histogram carries (``clusters``); they add when
histograms of disjoint clusters are merged.  The quantile's standard error
comes from the "outer" confidence interval, which needs no density estimate:
with ``sigma = sqrt(Var(F(Q)))`` (interpolated between the edges around Q),

    SE(Q) = (Q(q + z sigma) - Q(q - z sigma)) / (2 z),   z = 1.96,

``Q(.)`` being the histogram's interpolated quantile function.  z only sets the
span of the CDF over which the density is averaged (asymptotically any z gives
the same SE); 1.96 is the paper's choice and spans several bins once sigma is
larger than a bin's probability mass.  The difference of the arms' quantiles
(absolute, or relative by the delta method) is then tested with the asymptotic
confidence sequence of ``safeswap.core.stats.sequential`` with ``t`` = users of both
arms: by the Bahadur representation, Q is asymptotically a mean of independent
per-user terms, which is what that sequence needs.  Exposure cohorts combine
with Cochran-Mantel-Haenszel weights (``quantile_strata_moments``).

Assumptions: users independent; large-sample normality of each arm's quantile
(at least a few hundred users per arm); the quantile and the outer interval
inside [lo, hi); with few buckets (K = 128 per cell) the variance estimate has
only K - 1 degrees of freedom, which the conservative boundary absorbs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Literal

import numpy as np
from scipy.special import betaln

from safeswap.core.stats.sequential import _check_alpha, _check_n_tune, _compare_moments, _json_float
from safeswap.core.stats.sufficient import _check_kind, _count, _finite, _nonneg

__all__ = [
    "LatencyHistogram",
    "QuantileResult",
    "quantile_compare",
    "quantile_bounds",
    "quantile_moments",
    "quantile_strata_moments",
    "quantile_std_error",
]

# z of the "outer" interval q +- z sigma that gives a quantile's standard error (Deng et al. 2018).
OUTER_Z = 1.96


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


def _sparse(name: str, value: Any) -> dict[int, float]:
    """{edge index: value} from a mapping or a list of [index, value] pairs (JSON)."""
    # Fast path (snapshots are built, loaded and merged on every look): plain ints and floats.
    if isinstance(value, dict):
        keys, values = value.keys(), value.values()
    elif isinstance(value, list) and all(type(p) is list and len(p) == 2 for p in value):
        keys, values = [p[0] for p in value], [p[1] for p in value]
    else:
        keys = values = None
    if (
        keys is not None
        and all(type(k) is int for k in keys)
        and all(type(v) is int or type(v) is float for v in values)
        and (not keys or (min(keys) >= 0 and min(values) >= 0 and math.isfinite(sum(values))))
    ):
        return dict(zip(keys, values))
    items = value.items() if isinstance(value, Mapping) else value
    if not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
        raise ValueError(f"{name} must be a list of [edge index, value] pairs")
    out: dict[int, float] = {}
    for pair in items:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{name} entries must be [edge index, value], got {pair!r}")
        out[_count(f"{name} index", pair[0])] = _moment(f"{name}[{pair[0]}]", pair[1])
    return out


def _moment(name: str, value: Any) -> int | float:
    """A sum of squares or products of counts: >= 0, kept an int when given one (exact in JSON)."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        return int(value)
    return _nonneg(name, value)


def _check_clusters(data: Any, counts: tuple[int, ...]) -> dict[str, Any] | None:
    """Normalised cluster moments (see ``LatencyHistogram``), checked against the counts."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ValueError(f"clusters must be a mapping, got {type(data).__name__}")
    units = _count("clusters.units", data.get("units"))
    users = _count("clusters.users", data.get("users", units))
    if users < units:
        raise ValueError(
            f"clusters.users must be >= clusters.units (a cluster holds at least one user), got {users} < {units}"
        )
    n_sq = _moment("clusters.n_sq", data.get("n_sq"))
    c_sq = _sparse("clusters.c_sq", data.get("c_sq", ()))
    c_n = _sparse("clusters.c_n", data.get("c_n", ()))
    n = sum(counts)
    if "n" in data and _count("clusters.n", data["n"]) != n:
        raise ValueError(f"clusters describe {data['n']} observations, the counts hold {n}")
    if (units == 0) != (n == 0) or units > n:
        raise ValueError(f"clusters.units = {units} is inconsistent with {n} observations")
    slack = 1e-9 * n * n + 1e-9
    if n and not (n * n / units - slack <= n_sq <= n * n + slack):
        raise ValueError(f"clusters.n_sq = {n_sq} is inconsistent with {n} observations in {units} clusters")
    cum = np.cumsum(counts[:-1])
    interior = set(np.flatnonzero((cum > 0) & (cum < n)).tolist())
    for name, sparse in (("c_sq", c_sq), ("c_n", c_n)):
        if sparse.keys() != interior:
            raise ValueError(
                f"clusters.{name} must have one entry per edge with 0 < observations below it < n "
                f"({len(interior)} edges), got {len(sparse)}"
            )
    return {"units": units, "users": users, "n_sq": n_sq, "c_sq": c_sq, "c_n": c_n}


@dataclass(frozen=True, slots=True)
class LatencyHistogram:
    """Counts per log-spaced bin: index 0 is underflow (< lo), index K+1 overflow (>= hi),
    index i in 1..K covers [edges[i-1], edges[i]).

    ``clusters`` (optional): cluster moments for the user-level test (module docstring,
    Deng et al. 2018), with clusters = hash buckets of users::

        {"units": K (clusters with data), "users": distinct users in them,
         "n_sq": sum_b n_b^2,
         "c_sq": {j: sum_b C_b(edges[j])^2}, "c_n": {j: sum_b C_b(edges[j]) n_b}}

    ``c_sq``/``c_n`` hold only the edges with 0 < observations below < n: below the
    data both are 0 and above it both equal ``n_sq``.  Treat the mapping as read-only.
    """

    counts: tuple[int, ...]
    lo: float = 1.0
    hi: float = 1e6
    bins_per_decade: int = 50
    clusters: dict[str, Any] | None = field(default=None, hash=False)
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
        object.__setattr__(self, "clusters", _check_clusters(self.clusters, counts))
        object.__setattr__(self, "_edges", _layout_edges(lo, hi, bpd))

    @classmethod
    def _trusted(
        cls, counts: tuple[int, ...], lo: float, hi: float, bins_per_decade: int, clusters: dict[str, Any] | None
    ) -> LatencyHistogram:
        """A histogram from parts this module computed from valid histograms (sums, cluster
        moments): built without checking them again (the snapshot path builds thousands)."""
        hist = object.__new__(cls)
        for name, value in (
            ("counts", counts),
            ("lo", lo),
            ("hi", hi),
            ("bins_per_decade", bins_per_decade),
            ("clusters", clusters),
            ("_edges", _layout_edges(lo, hi, bins_per_decade)),
        ):
            object.__setattr__(hist, name, value)
        return hist

    # -- construction -------------------------------------------------------
    @classmethod
    def empty(cls, lo: float = 1.0, hi: float = 1e6, bins_per_decade: int = 50) -> LatencyHistogram:
        lo, hi = _finite("lo", lo), _finite("hi", hi)
        if lo <= 0 or hi <= lo:
            raise ValueError(f"lo and hi must satisfy 0 < lo < hi, got lo={lo}, hi={hi}")
        bins_per_decade = _count("bins_per_decade", bins_per_decade)
        if bins_per_decade < 1:
            raise ValueError("bins_per_decade must be >= 1")
        n_bins = int(round(math.log10(hi / lo) * bins_per_decade))
        if n_bins < 1:
            raise ValueError("hi/lo must span at least one bin")
        return cls._trusted((0,) * (n_bins + 2), lo, hi, bins_per_decade, None)

    @classmethod
    def from_values(
        cls,
        values: Iterable[Any],
        lo: float = 1.0,
        hi: float = 1e6,
        bins_per_decade: int = 50,
        *,
        clusters: Iterable[Any] | None = None,
        users: int | None = None,
    ) -> LatencyHistogram:
        """Histogram of ``values``; with ``clusters`` (one label per value, e.g. the user's
        hash bucket) it also carries the cluster moments (``users`` defaults to the number
        of clusters: one user per label)."""
        x = np.asarray(values, dtype=float).ravel()
        if not np.all(np.isfinite(x)):
            raise ValueError("values must be finite")
        if np.any(x < 0):
            raise ValueError("values must be >= 0 (latencies)")
        proto = cls.empty(lo, hi, bins_per_decade)
        idx = np.searchsorted(proto._edges, x, side="right")  # 0 = underflow, K+1 = overflow
        if clusters is not None:
            labels = np.asarray(clusters).ravel()
            if labels.shape != x.shape:
                raise ValueError(f"clusters must have one label per value, got {labels.size} for {x.size}")
            _, row = np.unique(labels, return_inverse=True)
            width = len(proto.counts)
            n_rows = int(row.max()) + 1 if row.size else 0
            matrix = np.bincount(row.ravel() * width + idx, minlength=n_rows * width).reshape(n_rows, width)
            return cls.from_cluster_counts(matrix, users=users, lo=lo, hi=hi, bins_per_decade=bins_per_decade)
        counts = np.bincount(idx, minlength=len(proto.counts))
        return cls(tuple(int(c) for c in counts), lo, hi, bins_per_decade)

    @classmethod
    def from_cluster_counts(
        cls, matrix: Any, users: int | None = None, lo: float = 1.0, hi: float = 1e6, bins_per_decade: int = 50
    ) -> LatencyHistogram:
        """Histogram with cluster moments from per-cluster bin counts (one row per cluster,
        e.g. per hash bucket of users; empty rows are ignored)."""
        proto = cls.empty(lo, hi, bins_per_decade)
        m = np.asarray(matrix)
        if m.ndim != 2 or m.shape[1] != len(proto.counts):
            raise ValueError(f"matrix must have shape (clusters, {len(proto.counts)}), got {m.shape}")
        if m.size and (not np.issubdtype(m.dtype, np.integer) or m.min() < 0):
            raise ValueError("matrix must hold counts (non-negative integers)")
        m = m.astype(np.int64, copy=False)
        n_b = m.sum(axis=1)
        m, n_b = m[n_b > 0], n_b[n_b > 0]
        counts = m.sum(axis=0) if m.size else np.zeros(len(proto.counts), dtype=np.int64)
        n = int(counts.sum())
        if n == 0:
            return cls(
                proto.counts, proto.lo, proto.hi, proto.bins_per_decade, {"units": 0, "users": users or 0, "n_sq": 0}
            )
        # The edges with data on both sides are those from the first occupied bin up to the
        # last one (exclusive); C_b(edges[j]) = the cluster's counts in bins 0..j.
        occupied = np.flatnonzero(counts)
        first, last = int(occupied[0]), int(occupied[-1])
        # Exact integer sums while they fit in int64, floats beyond (statistically the same).
        exact = int(n_b.max()) ** 2 * len(n_b) < 2**62
        c = np.cumsum(m[:, first:last], axis=1, dtype=np.int64 if exact else np.float64)
        nb = n_b.astype(c.dtype)
        c_sq = (c * c).sum(axis=0).tolist()
        c_n = (c * nb[:, None]).sum(axis=0).tolist()
        j = list(range(first, last))
        return cls._trusted(
            tuple(counts.tolist()),
            proto.lo,
            proto.hi,
            proto.bins_per_decade,
            {
                "units": len(n_b),
                "users": len(n_b) if users is None else max(int(users), len(n_b)),
                "n_sq": (nb * nb).sum().item(),
                "c_sq": dict(zip(j, c_sq)),
                "c_n": dict(zip(j, c_n)),
            },
        )

    def __add__(self, other: object) -> LatencyHistogram:
        """Merge.  Cluster moments add (the clusters of the two histograms are different
        units: other partitions' or cohorts' buckets); if only one side carries them, the
        sum keeps them when the other side is empty and drops them otherwise (that sum is
        then compared by the request-level sequence)."""
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        if (self.lo, self.hi, self.bins_per_decade) != (other.lo, other.hi, other.bins_per_decade):
            raise ValueError("cannot merge histograms with different bin layouts")
        counts = tuple(map(int.__add__, self.counts, other.counts))
        a, b = self.clusters, other.clusters
        if a is None or b is None:
            clusters = b if a is None and self.n == 0 else a if b is None and other.n == 0 else None
            return LatencyHistogram._trusted(counts, self.lo, self.hi, self.bins_per_decade, clusters)
        c_sq_a, c_n_a = self._cluster_sums()
        c_sq_b, c_n_b = other._cluster_sums()
        n = sum(counts)
        cum = np.cumsum(counts[:-1])
        j = np.flatnonzero((cum > 0) & (cum < n))
        keys = j.tolist()
        return LatencyHistogram._trusted(
            counts,
            self.lo,
            self.hi,
            self.bins_per_decade,
            {
                "units": a["units"] + b["units"],
                "users": a["users"] + b["users"],
                "n_sq": a["n_sq"] + b["n_sq"],
                "c_sq": dict(zip(keys, (c_sq_a[j] + c_sq_b[j]).tolist())),
                "c_n": dict(zip(keys, (c_n_a[j] + c_n_b[j]).tolist())),
            },
        )

    def counts_only(self) -> LatencyHistogram:
        """The same counts without cluster moments (a point estimate's view: the p95 an arm shows)."""
        if self.clusters is None:
            return self
        return LatencyHistogram._trusted(self.counts, self.lo, self.hi, self.bins_per_decade, None)

    # -- views --------------------------------------------------------------
    @property
    def n(self) -> int:
        """Observations (requests)."""
        return sum(self.counts)

    @property
    def users(self) -> int | None:
        """Distinct users in the clusters (the user-level test's units); None without clusters."""
        return None if self.clusters is None else self.clusters["users"]

    @property
    def edges(self) -> np.ndarray:
        return self._edges.copy()

    def counts_below_edges(self) -> np.ndarray:
        """N(e_j) = number of observations < edges[j], for every edge."""
        return np.cumsum(np.asarray(self.counts[:-1], dtype=float))

    def _cluster_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Dense S2(e_j) = sum_b C_b^2 and S1(e_j) = sum_b C_b n_b at every edge."""
        cl = self.clusters
        if cl is None:
            raise ValueError("this histogram carries no cluster moments")
        cum = self.counts_below_edges()
        full = np.where(cum >= self.n, float(cl["n_sq"]), 0.0)
        c_sq, c_n = full.copy(), full
        if cl["c_sq"]:
            j = np.fromiter(cl["c_sq"].keys(), dtype=np.int64, count=len(cl["c_sq"]))
            c_sq[j] = np.fromiter(cl["c_sq"].values(), dtype=float, count=len(j))
            j = np.fromiter(cl["c_n"].keys(), dtype=np.int64, count=len(cl["c_n"]))
            c_n[j] = np.fromiter(cl["c_n"].values(), dtype=float, count=len(j))
        return c_sq, c_n

    def cdf_variance(self) -> np.ndarray:
        """Var(F(e_j)) at every edge, F(e) = share of observations below e, by the delta
        method over clusters (Deng, Knoblich & Lu 2018):
        ``[sum_b (C_b - F n_b)^2 / (K - 1)] / (K nbar^2)``."""
        cl = self.clusters
        if cl is None:
            raise ValueError("this histogram carries no cluster moments (no users as the unit)")
        k, n = cl["units"], self.n
        if n == 0:
            raise ValueError("histogram is empty: the quantile is undefined")
        if k < 2:
            raise ValueError(f"needs data from at least 2 clusters (hash buckets of users), got {k}")
        c_sq, c_n = self._cluster_sums()
        f = self.counts_below_edges() / n
        resid = np.maximum(c_sq - 2.0 * f * c_n + f * f * float(cl["n_sq"]), 0.0)
        nbar = n / k
        return resid / (k - 1) / (k * nbar * nbar)

    def _locate(self, q: float) -> tuple[int, float, float]:
        """(bin index, fraction of the bin below the q-quantile, interpolated quantile)."""
        n = self.n
        if n == 0:
            raise ValueError("histogram is empty: the quantile is undefined")
        target = q * n
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, target, side="left"))
        if i == 0:
            return 0, 0.0, self.lo
        if i == len(self.counts) - 1:
            return i, 0.0, self.hi
        below = cum[i - 1]
        frac = (target - below) / self.counts[i]
        e0, e1 = self._edges[i - 1], self._edges[i]
        return i, float(frac), float(e0 * (e1 / e0) ** frac)

    def quantile(self, q: float) -> float:
        """Point estimate: geometric interpolation inside the bin holding the q-th observation."""
        return self._locate(_check_q(q))[2]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "lo": self.lo,
            "hi": self.hi,
            "bins_per_decade": self.bins_per_decade,
            "counts": [[i, self.counts[i]] for i in np.flatnonzero(self.counts).tolist()],  # sparse: most bins empty
        }
        cl = self.clusters
        if cl is not None:
            out["clusters"] = {
                "n": self.n,
                "units": cl["units"],
                "users": cl["users"],
                "n_sq": cl["n_sq"],
                "c_sq": [[j, v] for j, v in cl["c_sq"].items()],
                "c_n": [[j, v] for j, v in cl["c_n"].items()],
            }
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyHistogram:
        """Rebuild from ``to_dict()``; dicts written before cluster moments existed load
        without them (and are compared by the request-level sequence).

        The moments name the number of observations they describe (``clusters.n``).  A dict
        whose counts were added up without its moments (a raw merge of several partitions'
        dicts that carried one partition's moments along) loads without them too: its
        counts are right, those moments belong to a part of them."""
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
        clusters = data.get("clusters")
        if (
            isinstance(clusters, Mapping)
            and "n" in clusters
            and clusters["n"] != sum(c for c in counts if isinstance(c, (int, float)))
        ):
            clusters = None
        return cls(tuple(counts), proto.lo, proto.hi, proto.bins_per_decade, clusters)


@functools.lru_cache(maxsize=8)
def _layout_edges(lo: float, hi: float, bins_per_decade: int) -> np.ndarray:
    """The bin edges of a layout, computed once and shared read-only by its histograms."""
    n_bins = int(round(math.log10(hi / lo) * bins_per_decade))
    edges = lo * 10.0 ** (np.arange(n_bins + 1) / bins_per_decade)
    edges.flags.writeable = False
    return edges


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


def quantile_std_error(hist: LatencyHistogram, q: float, z: float = OUTER_Z) -> tuple[float, float]:
    """(q-quantile, its standard error) with users as the unit: the "outer" interval of
    Deng, Knoblich & Lu (2018), ``(Q(q + z sigma) - Q(q - z sigma)) / (2 z)`` with
    ``sigma^2 = Var(F(Q))`` from the cluster moments (``LatencyHistogram.cdf_variance``,
    interpolated linearly between the edges around Q, as the quantile itself is).

    Raises ValueError when the histogram has no cluster moments, no data, fewer than 2
    clusters, or when the quantile or the outer interval falls outside [lo, hi)."""
    q = _check_q(q)
    z = _finite("z", z)
    if z <= 0:
        raise ValueError(f"z must be > 0, got {z}")
    var_f = hist.cdf_variance()  # raises on no clusters / no data / K < 2
    i, frac, value = hist._locate(q)
    last = len(hist.counts) - 1
    if i in (0, last):
        side = "below lo" if i == 0 else "at or above hi"
        raise ValueError(
            f"the q={q:g} quantile is in the {'underflow' if i == 0 else 'overflow'} bin "
            f"({side} = {hist.lo if i == 0 else hist.hi:g} ms): outside the histogram's range"
        )
    sigma = math.sqrt((1.0 - frac) * var_f[i - 1] + frac * var_f[i])
    p_lo, p_hi = q - z * sigma, q + z * sigma
    if p_lo <= 0.0 or p_hi >= 1.0:
        raise ValueError(
            f"too few data for the q={q:g} quantile's standard error: the outer interval "
            f"q +- {z:g} sigma = [{p_lo:.3g}, {p_hi:.3g}] leaves (0, 1)"
        )
    (i_lo, _, q_lo), (i_hi, _, q_hi) = hist._locate(p_lo), hist._locate(p_hi)
    if i_lo == 0 or i_hi == last:
        raise ValueError(
            f"the outer interval of the q={q:g} quantile reaches the "
            f"{'underflow' if i_lo == 0 else 'overflow'} bin: outside the histogram's range"
        )
    return value, (q_hi - q_lo) / (2.0 * z)


def _arm(name: str, hist: Any, q: float) -> tuple[float, float]:
    if not isinstance(hist, LatencyHistogram):
        raise ValueError(f"{name} must be a LatencyHistogram, got {type(hist).__name__}")
    try:
        return quantile_std_error(hist, q)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def quantile_moments(
    control: LatencyHistogram, candidate: LatencyHistogram, q: float, difference: str = "relative"
) -> tuple[float, float, float, float]:
    """(estimate, variance of the estimate, control quantile, candidate quantile) of the
    difference of the arms' q-quantiles, users as the unit (``quantile_std_error``).

    ``absolute``: Q_b - Q_a, variance SE_a^2 + SE_b^2; ``relative``: Q_b / Q_a - 1 by the
    delta method, ``SE_b^2 / Q_a^2 + Q_b^2 SE_a^2 / Q_a^4`` (arms independent).  Feed the
    result to the sequential test with the arms' users (``LatencyHistogram.users``)."""
    if difference not in ("relative", "absolute"):
        raise ValueError(f"difference must be 'relative' or 'absolute', got {difference!r}")
    q = _check_q(q)
    _check_layouts(control, candidate)
    qa, se_a = _arm("control", control, q)
    qb, se_b = _arm("candidate", candidate, q)
    if difference == "absolute":
        return qb - qa, se_a * se_a + se_b * se_b, qa, qb
    qa2 = qa * qa
    return qb / qa - 1.0, se_b * se_b / qa2 + qb * qb * se_a * se_a / (qa2 * qa2), qa, qb


def quantile_strata_moments(
    strata, q: float, difference: str = "relative"
) -> tuple[float, float, float, float, int, int]:
    """(estimate, variance, control mean quantile, candidate mean quantile, control users,
    candidate users) over strata (exposure cohorts) of clustered histograms, combined with
    Cochran-Mantel-Haenszel weights as ``sequential.stratified_moments`` combines means.

    Stratum s gets ``w_s = u_a u_b / (u_a + u_b)`` (users); the combined quantiles are
    ``M_a = sum w Q_a / W`` and ``M_b = sum w Q_b / W``; the difference is ``M_b - M_a`` or
    ``M_b / M_a - 1``, with ``Var(sum w Q) = sum w^2 SE^2`` (cohorts hold disjoint users) and
    the delta method for the ratio.  So each cohort compares its arms' quantiles among users
    who arrived under the same split, and a latency trend over a ramp (cohorts at different
    levels, arms in different proportions) does not leak into the difference.  With one
    stratum this is ``quantile_moments``.  A stratum whose quantile or standard error is not
    defined yet in an arm (too few data) carries no weight; if none is left, ValueError."""
    if difference not in ("relative", "absolute"):
        raise ValueError(f"difference must be 'relative' or 'absolute', got {difference!r}")
    q = _check_q(q)
    sum_w = sum_a = sum_b = var_a = var_b = 0.0
    n_a = n_b = 0
    reason = "no strata"
    for control, candidate in strata:
        _check_layouts(control, candidate)
        try:
            qa, se_a = _arm("control", control, q)
            qb, se_b = _arm("candidate", candidate, q)
        except ValueError as exc:
            reason = str(exc)
            continue
        ua, ub = control.users, candidate.users
        w = ua * ub / (ua + ub)
        sum_w += w
        sum_a += w * qa
        sum_b += w * qb
        var_a += w * w * se_a * se_a
        var_b += w * w * se_b * se_b
        n_a += ua
        n_b += ub
    if sum_w == 0.0:
        raise ValueError(f"no exposure cohort has the q={q:g} quantile and its standard error in both arms ({reason})")
    mean_a, mean_b = sum_a / sum_w, sum_b / sum_w
    if difference == "absolute":
        return mean_b - mean_a, (var_a + var_b) / (sum_w * sum_w), mean_a, mean_b, n_a, n_b
    var = var_b / (sum_a * sum_a) + var_a * sum_b * sum_b / sum_a**4
    return sum_b / sum_a - 1.0, var, mean_a, mean_b, n_a, n_b


def _check_layouts(control: Any, candidate: Any) -> None:
    if not isinstance(control, LatencyHistogram) or not isinstance(candidate, LatencyHistogram):
        raise ValueError("control and candidate must be LatencyHistogram")
    if (control.lo, control.hi, control.bins_per_decade) != (candidate.lo, candidate.hi, candidate.bins_per_decade):
        raise ValueError("control and candidate must share the bin layout")


@dataclass(frozen=True, slots=True)
class QuantileResult:
    """Candidate vs control on the q-quantile; bounds hold jointly over all looks w.p. 1 - alpha.

    ``method``: ``"request_cs"`` (exact per-request sequence; per-arm bounds, counts are
    requests) or ``"user_delta"`` (users as the unit, delta method; counts are users, the
    per-arm bounds are not computed (nan) and a one-sided alternative has one open side)."""

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
    method: str = "request_cs"
    std_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "std_error": self.std_error,
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


def _pair_p_value(
    ev_a: np.ndarray, ev_b: np.ndarray, edges: np.ndarray, null: float, relative: bool, greater: bool
) -> float:
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

    When both histograms carry cluster moments, users are the unit: the delta-method
    difference (``quantile_moments``) goes through the same asymptotic confidence
    sequence as ``sequential_compare``, with ``t`` = users of both arms.  Otherwise
    the exact request-level sequence (Howard & Ramdas), valid for independent requests.
    """
    if not isinstance(control_hist, LatencyHistogram) or not isinstance(candidate_hist, LatencyHistogram):
        raise ValueError("control_hist and candidate_hist must be LatencyHistogram")
    if (control_hist.lo, control_hist.hi, control_hist.bins_per_decade) != (
        candidate_hist.lo,
        candidate_hist.hi,
        candidate_hist.bins_per_decade,
    ):
        raise ValueError("control_hist and candidate_hist must share the bin layout")
    if difference not in ("relative", "absolute"):
        raise ValueError(f"difference must be 'relative' or 'absolute', got {difference!r}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    q = _check_q(q)
    alpha = _check_alpha(alpha, one_sided=False)
    null = _finite("null", null)
    n_tune = _check_n_tune(n_tune)
    if control_hist.clusters is not None and candidate_hist.clusters is not None:
        est, var, qa, qb = quantile_moments(control_hist, candidate_hist, q, difference)
        r = _compare_moments(
            est,
            var,
            qa,
            qb,
            control_hist.users,
            candidate_hist.users,
            alpha=alpha,
            n_tune=n_tune,
            difference=difference,
            alternative=alternative,
            null=null,
        )
        nan = (math.nan, math.nan)
        return QuantileResult(
            q=q,
            estimate=est,
            ci_low=r.ci_low,
            ci_high=r.ci_high,
            p_value=r.p_value,
            control_quantile=qa,
            candidate_quantile=qb,
            control_bounds=nan,
            candidate_bounds=nan,
            n_control=r.n_control,
            n_candidate=r.n_candidate,
            difference=difference,
            alternative=alternative,
            alpha=r.alpha,
            null=null,
            method="user_delta",
            std_error=r.std_error,
        )
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
