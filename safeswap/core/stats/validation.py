"""Rerunnable Monte-Carlo validation of the guardrail statistics.

Every scenario simulates ``runs`` independent rollouts at once (numpy arrays of
shape (runs, looks) built from cumulative sums), looks after every batch of
``LOOK_EVERY`` users per arm up to ``HORIZON_X`` times the fixed-horizon
one-sided sample size for 5% -> 6% (6,424 per arm), and applies to the SAME
streams both

* safeswap: the always-valid confidence sequence (what ``GuardrailMonitor``
  does; the vectorised boundary below is tested against ``sequential_compare``);
* naive: a fixed-horizon one-sided z-test repeated at every look.

Reported per scenario: the rate of ever rolling back (A/A: false rollback,
with its Monte-Carlo standard error) and, for A/B, the stop size as a multiple
of the fixed-horizon n (median and p80 over all runs, ``None`` if more than
that share never stops; plus the median over detecting runs).

Run:  safeswap validate-stats --runs 2000 --seed 0 --json
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from numbers import Integral

import numpy as np
from scipy.special import betaln, ndtri

from safeswap.core.stats.planning import plan_sample_size
from safeswap.core.stats.quantiles import LatencyHistogram, _concentration
from safeswap.core.stats.sequential import sequential_rho

__all__ = ["run_validation", "cs_reject", "quantile_certified", "SCENARIOS"]

ALPHA = 0.05
LOOK_EVERY = 200
HORIZON_X = 1.8
FIXED_N = plan_sample_size(0.05, 0.2, alpha=ALPHA, power=0.8, sequential=False).fixed_horizon_per_arm
N_TUNE = 2 * FIXED_N  # plan_sample_size(...).recommended_n_tune: tightest where 5%->6% is typically detected
LOOKS = math.floor(HORIZON_X * FIXED_N / LOOK_EVERY)  # the last look is within 1.8x, never past it
STOP_GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.8)
CHUNK = 250  # runs simulated together (bounds memory to ~100 MB)

Progress = Callable[[str, int, int], None]


def cs_reject(est, var, t, *, alpha=ALPHA, n_tune=N_TUNE, null=0.0):
    """Vectorised one-sided ("greater") CS decision: lower bound > null.

    Same boundary as ``sequential_compare(..., alternative="greater")``.
    """
    rho = sequential_rho(alpha, n_tune, one_sided=True)
    tr2 = t * rho * rho + 1.0
    hw = np.sqrt(var * t * 2.0 * tr2 / (t * rho) ** 2 * np.log1p(np.sqrt(tr2) / (2.0 * alpha)))
    return (est - hw) > null


def naive_reject(est, var, *, alpha=ALPHA, null=0.0):
    """Fixed-horizon one-sided z-test at every look (what not to do)."""
    z = float(ndtri(1 - alpha))
    return (est - z * np.sqrt(var)) > null


def _relative(m_a, v_a, n_a, m_b, v_b, n_b):
    """Delta-method relative lift and its variance (as in sequential.difference_moments)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        est = m_b / m_a - 1.0
        var = v_b / (m_a**2 * n_b) + v_a * m_b**2 / (m_a**4 * n_a)
    return est, var


def _summarise(reject: np.ndarray, kind: str) -> dict:
    """Rate of ever rejecting, MC SE, and stop-size distribution (multiples of FIXED_N).

    ``ci95`` is the Wilson score interval of the rate: unlike ``mc_se`` it stays
    informative at 0 or 1 (0 of 2,000 runs: [0, 0.0019], not "0 +- 0").
    """
    runs = reject.shape[0]
    ever = reject.any(axis=1)
    hits = int(ever.sum())
    rate = hits / runs
    out = {"rate": rate, "mc_se": math.sqrt(rate * (1 - rate) / runs), "ci95": _wilson(hits, runs)}
    if kind == "ab":
        first = np.where(ever, reject.argmax(axis=1), -1)
        stop_x = np.where(ever, (first + 1) * LOOK_EVERY / FIXED_N, np.inf)
        for name, q in (("median_stop_x", 0.5), ("p80_stop_x", 0.8)):
            val = float(np.quantile(stop_x, q, method="inverted_cdf"))
            out[name] = round(val, 3) if math.isfinite(val) else None
        out["median_stop_x_detected"] = round(float(np.median(stop_x[ever])), 3) if ever.any() else None
        # The whole stop-size distribution: share of runs stopped by each multiple of FIXED_N.
        out["stopped_by_x"] = {f"{x:g}": round(float((stop_x <= x + 1e-9).mean()), 4) for x in STOP_GRID}
    return out


def _wilson(hits: int, runs: int, z: float = 1.959964) -> list[float]:
    """Wilson score 95% interval of a binomial rate."""
    rate = hits / runs
    centre = (rate + z * z / (2 * runs)) / (1 + z * z / runs)
    half = z * math.sqrt(rate * (1 - rate) / runs + z * z / (4 * runs * runs)) / (1 + z * z / runs)
    return [round(max(centre - half, 0.0), 5), round(min(centre + half, 1.0), 5)]


# ------------------------------------------------------------------ scenarios
# Each returns (safeswap_reject, naive_reject) arrays of shape (chunk, LOOKS).


def _bernoulli(rng, runs, p_a, p_b, difference="absolute", null=0.0, n_tune=N_TUNE):
    n = LOOK_EVERY * np.arange(1, LOOKS + 1, dtype=float)
    s_a = rng.binomial(LOOK_EVERY, p_a, size=(runs, LOOKS)).cumsum(1)
    s_b = rng.binomial(LOOK_EVERY, p_b, size=(runs, LOOKS)).cumsum(1)
    m_a, m_b = s_a / n, s_b / n
    v_a, v_b = m_a * (1 - m_a), m_b * (1 - m_b)
    if difference == "absolute":
        est, var = m_b - m_a, v_a / n + v_b / n
    else:
        est, var = _relative(m_a, v_a, n, m_b, v_b, n)
    ok = np.isfinite(est) & (var > 0)  # control rate 0: "insufficient data", never a decision
    est, var = np.where(ok, est, 0.0), np.where(ok, var, 1.0)
    return cs_reject(est, var, 2 * n, null=null, n_tune=n_tune) & ok, naive_reject(est, var, null=null) & ok


def gst_plan(
    looks: int, horizon_looks: int, *, alpha: float = ALPHA, share: float = 0.95, analyses: int = 50
) -> np.ndarray:
    """The product's group-sequential boundaries at ``looks`` equally spaced looks of a plan
    whose horizon is ``horizon_looks`` looks (``GroupSequentialTest`` fed the spending time
    k / horizon and information proportional to the users): +inf where a look is not an
    analysis or the plan is spent. Traffic at the planned rate makes the information
    deterministic, so one boundary sequence serves every run."""
    from safeswap.core.controller import HSD_GAMMA
    from safeswap.core.stats.gst import GroupSequentialTest

    test = GroupSequentialTest(alpha=alpha * share, spending="hsd", param=HSD_GAMMA, analyses=analyses)
    bounds = np.full(looks, np.inf)
    for k in range(1, looks + 1):
        look = test.observe(k / horizon_looks, float(k), 0.0)
        if look.analysed and look.bound is not None:
            bounds[k - 1] = look.bound
    return bounds


def _bernoulli_gst(rng, runs, p_a, p_b, overrun=1.0, share=0.95):
    """5% vs 6%, absolute, one-sided, as the controller runs a plan with a stated watch: 95% of
    alpha spent by HSD(gamma=-0.5) over the horizon (the last look within 1.8x the fixed n), 5%
    for the always-valid sequence, which alone keeps watching past the plan (``overrun``)."""
    looks = int(round(LOOKS * overrun))
    n = LOOK_EVERY * np.arange(1, looks + 1, dtype=float)
    s_a = rng.binomial(LOOK_EVERY, p_a, size=(runs, looks)).cumsum(1)
    s_b = rng.binomial(LOOK_EVERY, p_b, size=(runs, looks)).cumsum(1)
    m_a, m_b = s_a / n, s_b / n
    est, var = m_b - m_a, (m_a * (1 - m_a) + m_b * (1 - m_b)) / n
    ok = var > 0
    est, var = np.where(ok, est, 0.0), np.where(ok, var, 1.0)
    z = est / np.sqrt(var)
    ours = ((z >= gst_plan(looks, LOOKS, share=share)) | cs_reject(est, var, 2 * n, alpha=ALPHA * (1 - share))) & ok
    return ours, naive_reject(est, var) & ok


def _lognormal_mean(rng, runs, sigma, lift=0.0):
    n = LOOK_EVERY * np.arange(1, LOOKS + 1, dtype=float)
    sums = []
    for mult in (1.0, 1.0 + lift):
        x = rng.lognormal(math.log(mult), sigma, size=(runs, LOOKS, LOOK_EVERY))
        sums.append((x.sum(2).cumsum(1), (x * x).sum(2).cumsum(1)))
    (t_a, q_a), (t_b, q_b) = sums
    m_a, m_b = t_a / n, t_b / n
    v_a = np.maximum((q_a - t_a**2 / n) / (n - 1), 0)
    v_b = np.maximum((q_b - t_b**2 / n) / (n - 1), 0)
    est, var = _relative(m_a, v_a, n, m_b, v_b, n)
    return cs_reject(est, var, 2 * n), naive_reject(est, var)


def _clustered_ratio(rng, runs, lift=0.0):
    """Users send 1-20 requests; per-user thumbs-down propensity ~ Beta(0.5, 9.5) (mean 5%)."""
    n = LOOK_EVERY * np.arange(1, LOOKS + 1, dtype=float)
    arms = []
    for mult in (1.0, 1.0 + lift):
        den = rng.integers(1, 21, size=(runs, LOOKS, LOOK_EVERY)).astype(float)
        prop = np.minimum(rng.beta(0.5, 9.5, size=den.shape) * mult, 1.0)
        num = rng.binomial(den.astype(np.int64), prop).astype(float)
        arms.append([a.sum(2).cumsum(1) for a in (num, num * num, den, den * den, num * den)])
    results = []
    for y, yy, x, xx, xy in arms:
        r = y / x
        s_yy = (yy - y * y / n) / (n - 1)
        s_xx = (xx - x * x / n) / (n - 1)
        s_xy = (xy - y * x / n) / (n - 1)
        mu_x = x / n
        results.append((r, np.maximum((s_yy - 2 * r * s_xy + r * r * s_xx) / mu_x**2, 0)))
    (m_a, v_a), (m_b, v_b) = results
    est, var = _relative(m_a, v_a, n, m_b, v_b, n)
    return cs_reject(est, var, 2 * n), naive_reject(est, var)


def _p95(rng, runs, sigma, lift=0.0, null=0.0, q=0.95):
    """p95 latency guardrail on log-spaced histograms (quantile CS, alpha/2 per arm)."""
    proto = LatencyHistogram.empty(lo=1.0, hi=1e6, bins_per_decade=50)
    edges = proto.edges
    median_ms = 800.0
    cdf_edges = []
    for mult in (1.0, 1.0 + lift):
        from scipy.stats import norm  # setup only, not per look

        cdf_edges.append(norm.cdf((np.log(edges) - math.log(median_ms * mult)) / sigma))
    n = LOOK_EVERY * np.arange(1, LOOKS + 1, dtype=float)
    a_half = ALPHA / 2
    c = _concentration(q, a_half, N_TUNE / 2)
    thr = -math.log(a_half)
    z = float(ndtri(1 - a_half))
    bounds = []
    for cdf in cdf_edges:
        probs = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
        counts = rng.multinomial(LOOK_EVERY, probs, size=(runs, LOOKS))
        below = counts[..., :-1].cumsum(2).cumsum(1).astype(float)  # (runs, looks, edges): N(e)
        t = n[None, :, None]
        lower_ok, upper_ok = quantile_certified(below, t, q, c, thr)
        # naive: normal-approximation order-statistic interval at this look only
        sd = np.sqrt(t * q * (1 - q))
        naive_lower_ok = below < t * q - z * sd
        naive_upper_ok = below > t * q + z * sd
        bounds.append(
            [
                _edge_bound(m, edges, upper)
                for m, upper in ((lower_ok, False), (upper_ok, True), (naive_lower_ok, False), (naive_upper_ok, True))
            ]
        )
    (_, ua, _, nua), (lb, _, nlb, _) = bounds
    return lb >= (1 + null) * ua, nlb >= (1 + null) * nua


def quantile_certified(below: np.ndarray, t: np.ndarray, q: float, c: float, thr: float):
    """Vectorised ``quantile_bounds``: which edges are certified below / above the q-quantile.

    ``below`` holds N(e), the observations below each edge, ``t`` the total.
    Same evidence as ``quantiles._log_evidence`` (tested against ``quantile_bounds``).
    """
    log_m = (
        betaln(q * c + below, (1 - q) * c + t - below)
        - betaln(q * c, (1 - q) * c)
        - below * math.log(q)
        - (t - below) * math.log1p(-q)
    )
    sure = log_m >= thr
    return sure & (below < t * q), sure & (below > t * q)


def _edge_bound(mask: np.ndarray, edges: np.ndarray, upper: bool) -> np.ndarray:
    """Smallest certified edge (upper bound; inf if none) or largest (lower bound; 0 if none)."""
    if upper:
        idx = np.where(mask.any(2), mask.argmax(2), -1)
        return np.where(idx >= 0, edges[np.maximum(idx, 0)], np.inf)
    rev = mask[..., ::-1]
    idx = np.where(rev.any(2), mask.shape[2] - 1 - rev.argmax(2), -1)
    return np.where(idx >= 0, edges[np.maximum(idx, 0)], 0.0)


SCENARIOS: dict[str, tuple[str, str, Callable]] = {
    "bernoulli_aa": ("aa", "thumbs-down 5% vs 5%, absolute, one-sided", lambda r, k: _bernoulli(r, k, 0.05, 0.05)),
    "bernoulli_ab": ("ab", "thumbs-down 5% -> 6%, absolute, one-sided", lambda r, k: _bernoulli(r, k, 0.05, 0.06)),
    "bernoulli_aa_gst": (
        "aa",
        "5% vs 5%, group-sequential over a stated watch (HSD -0.5, 95% of alpha) + CS reserve",
        lambda r, k: _bernoulli_gst(r, k, 0.05, 0.05),
    ),
    "bernoulli_aa_gst_overrun": (
        "aa",
        "the same, watched to 1.5x the planned horizon (the reserve alone past it)",
        lambda r, k: _bernoulli_gst(r, k, 0.05, 0.05, overrun=1.5),
    ),
    "bernoulli_ab_gst": (
        "ab",
        "5% -> 6%, group-sequential over a stated watch + CS reserve",
        lambda r, k: _bernoulli_gst(r, k, 0.05, 0.06),
    ),
    "bernoulli_ab_ntune5000": (
        "ab",
        "5% -> 6% with the default n_tune=5000",
        lambda r, k: _bernoulli(r, k, 0.05, 0.06, n_tune=5000),
    ),
    "rel20_boundary": (
        "aa",
        "+20% tolerance, true lift exactly +20% (5% -> 6%): false breach",
        lambda r, k: _bernoulli(r, k, 0.05, 0.06, "relative", null=0.2),
    ),
    "rel20_ab": (
        "ab",
        "+20% tolerance, true lift +50% (5% -> 7.5%): detection",
        lambda r, k: _bernoulli(r, k, 0.05, 0.075, "relative", null=0.2),
    ),
    "harm0_ab_rel": (
        "ab",
        "tolerance 0 (any harm), 5% -> 6% relative",
        lambda r, k: _bernoulli(r, k, 0.05, 0.06, "relative"),
    ),
    "lognormal_mean_aa_s1": (
        "aa",
        "mean latency, lognormal sigma=1, A/A, relative",
        lambda r, k: _lognormal_mean(r, k, 1.0),
    ),
    "lognormal_mean_aa_s2": (
        "aa",
        "mean latency, lognormal sigma=2, A/A, relative",
        lambda r, k: _lognormal_mean(r, k, 2.0),
    ),
    "lognormal_mean_ab_s1": ("ab", "mean latency, sigma=1, +10%", lambda r, k: _lognormal_mean(r, k, 1.0, 0.10)),
    "lognormal_mean_ab_s2": ("ab", "mean latency, sigma=2, +30%", lambda r, k: _lognormal_mean(r, k, 2.0, 0.30)),
    "p95_aa_s1": ("aa", "p95 latency guardrail, lognormal sigma=1, A/A", lambda r, k: _p95(r, k, 1.0)),
    "p95_aa_s2": ("aa", "p95 latency guardrail, lognormal sigma=2, A/A", lambda r, k: _p95(r, k, 2.0)),
    "p95_ab_s1": ("ab", "p95 latency +30% (sigma=1), tolerance 0", lambda r, k: _p95(r, k, 1.0, 0.30)),
    "clustered_ratio_aa": (
        "aa",
        "thumbs-down per response, 1-20 requests/user, A/A, Ratio",
        lambda r, k: _clustered_ratio(r, k),
    ),
    "clustered_ratio_ab": ("ab", "thumbs-down per response, +20%, Ratio", lambda r, k: _clustered_ratio(r, k, 0.20)),
}


def run_validation(
    runs: int, seed: int = 0, progress: Progress | None = None, scenarios: list[str] | None = None
) -> dict:
    """Simulate every scenario with ``runs`` rollouts; return a JSON-able dict of figures."""
    if isinstance(runs, bool) or not isinstance(runs, Integral) or runs < 10:
        raise ValueError(f"runs must be an integer >= 10, got {runs!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    names = list(SCENARIOS) if scenarios is None else scenarios
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"scenarios: unknown {unknown}; choose from {list(SCENARIOS)}")
    started = time.perf_counter()
    chunks = [min(CHUNK, runs - i) for i in range(0, runs, CHUNK)]
    total, done = len(names) * len(chunks), 0
    out: dict = {
        "runs": runs,
        "seed": seed,
        "alpha": ALPHA,
        "n_tune": N_TUNE,
        "look_every_per_arm": LOOK_EVERY,
        "fixed_horizon_per_arm": FIXED_N,
        "horizon_per_arm": LOOKS * LOOK_EVERY,
        "looks": LOOKS,
        "scenarios": {},
    }
    for s_index, name in enumerate(names):
        kind, description, simulate = SCENARIOS[name]
        rng = np.random.default_rng([seed, s_index])
        seq_parts, naive_parts = [], []
        for size in chunks:
            seq, naive = simulate(rng, size)
            seq_parts.append(seq)
            naive_parts.append(naive)
            done += 1
            if progress is not None:
                progress(name, done, total)
        out["scenarios"][name] = {
            "kind": kind,
            "description": description,
            "safeswap": _summarise(np.concatenate(seq_parts), kind),
            "naive": _summarise(np.concatenate(naive_parts), kind),
        }
    out["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    return out
