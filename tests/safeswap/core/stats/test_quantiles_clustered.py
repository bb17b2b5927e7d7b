"""p95 latency with users as the unit: the delta method for quantiles over hash buckets of
users (Deng, Knoblich & Lu, KDD 2018, "outer" interval), tested by the asymptotic
confidence sequence of safeswap.core.stats.sequential."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from safeswap.core.metrics import HIST_BINS, LATENCY_BUCKETS, VariantSums
from safeswap.core.stats import GuardrailMonitor, Ratio, stat_from_dict
from safeswap.core.stats.quantiles import (
    OUTER_Z,
    LatencyHistogram,
    _concentration,
    quantile_compare,
    quantile_moments,
    quantile_std_error,
    quantile_strata_moments,
)
from safeswap.core.stats.validation import cs_reject, quantile_certified

Q = 0.95
MU = math.log(400.0)  # median latency 400 ms


def _traffic(rng, users, *, corr=0.5, sigma=1.0, shift=0.0):
    """Users send 1-20 requests; log latency = user effect + request noise (intra-user
    correlation ``corr``). Returns (latency per request, user per request, user hash per user)."""
    m = rng.integers(1, 21, users)
    effect = rng.normal(0.0, sigma * math.sqrt(corr), users)
    user = np.repeat(np.arange(users), m)
    latency = np.exp(MU + shift + effect[user] + rng.normal(0.0, sigma * math.sqrt(1 - corr), user.size))
    uid = rng.integers(0, 2**63, users, dtype=np.int64)
    return latency, user, uid


def _hist(rng, users, shift=0.0, offset=0):
    latency, user, uid = _traffic(rng, users, shift=shift)
    return LatencyHistogram.from_values(latency, clusters=uid[user] % LATENCY_BUCKETS + offset, users=users)


# ------------------------------------------------------------------ the statistic
def test_cdf_variance_equals_the_cluster_level_delta_method_from_raw_data():
    rng = np.random.default_rng(1)
    latency, user, uid = _traffic(rng, 600)
    bucket = uid[user] % LATENCY_BUCKETS
    hist = LatencyHistogram.from_values(latency, clusters=bucket, users=600)
    var = hist.cdf_variance()
    labels = np.unique(bucket)
    n_b = np.array([(bucket == b).sum() for b in labels], dtype=float)
    k, n = labels.size, latency.size
    assert hist.clusters["units"] == k and hist.users == 600 and hist.n == n
    for j in range(0, len(hist.edges), 7):
        c_b = np.array([(latency[bucket == b] < hist.edges[j]).sum() for b in labels], dtype=float)
        f = c_b.sum() / n
        direct = ((c_b - f * n_b) ** 2).sum() / (k - 1) / (k * (n / k) ** 2)
        assert var[j] == pytest.approx(direct, rel=1e-9, abs=1e-18)
        if 0 < f < 1:  # the same as the Ratio statistic's delta method (F is a ratio of cluster sums)
            assert var[j] == pytest.approx(Ratio.from_units(c_b, n_b).variance_of_estimate, rel=1e-9)


def test_std_error_is_the_outer_interval_and_scales_with_clustering():
    rng = np.random.default_rng(2)
    hist = _hist(rng, 1500)
    q_hat, se = quantile_std_error(hist, Q)
    i = int(np.searchsorted(np.cumsum(hist.counts), Q * hist.n))
    frac = (Q * hist.n - sum(hist.counts[:i])) / hist.counts[i]
    var = hist.cdf_variance()
    sigma = math.sqrt((1 - frac) * var[i - 1] + frac * var[i])
    assert q_hat == hist.quantile(Q)
    assert se == pytest.approx(
        (hist.quantile(Q + OUTER_Z * sigma) - hist.quantile(Q - OUTER_Z * sigma)) / (2 * OUTER_Z)
    )
    # Requests as their own clusters give the binomial variance, and a much smaller SE:
    # that gap is the clustering a per-request test ignores.
    latency, _, _ = _traffic(np.random.default_rng(2), 1500)
    per_request = LatencyHistogram.from_values(latency, clusters=np.arange(latency.size))
    f = per_request.counts_below_edges() / per_request.n
    assert per_request.cdf_variance() == pytest.approx(f * (1 - f) / (per_request.n - 1), rel=1e-9, abs=1e-18)
    assert quantile_std_error(per_request, Q)[1] < 0.7 * se


def test_quantile_moments_relative_and_absolute_by_the_delta_method():
    rng = np.random.default_rng(3)
    a, b = _hist(rng, 2000), _hist(rng, 2000, shift=math.log(1.1))
    (qa, se_a), (qb, se_b) = quantile_std_error(a, Q), quantile_std_error(b, Q)
    est, var, m_a, m_b = quantile_moments(a, b, Q, "relative")
    assert (m_a, m_b) == (qa, qb) and est == pytest.approx(qb / qa - 1)
    assert var == pytest.approx(se_b**2 / qa**2 + qb**2 * se_a**2 / qa**4)
    est, var, _, _ = quantile_moments(a, b, Q, "absolute")
    assert est == pytest.approx(qb - qa) and var == pytest.approx(se_a**2 + se_b**2)
    # One stratum of the CMH combination is the same comparison.
    assert quantile_strata_moments([(a, b)], Q, "relative")[:4] == pytest.approx(quantile_moments(a, b, Q))
    r = quantile_compare(a, b, alternative="greater")
    assert r.method == "user_delta" and (r.n_control, r.n_candidate) == (2000, 2000)
    assert r.std_error == pytest.approx(math.sqrt(quantile_moments(a, b, Q)[1]))


def test_merging_adds_cluster_moments_of_disjoint_clusters():
    rng = np.random.default_rng(4)
    latency, user, uid = _traffic(rng, 800)
    bucket = uid[user] % LATENCY_BUCKETS
    first = user < 500  # two partitions (or cohorts): their buckets are different clusters
    labels = np.where(first, bucket, bucket + LATENCY_BUCKETS)
    a = LatencyHistogram.from_values(latency[first], clusters=labels[first], users=500)
    b = LatencyHistogram.from_values(latency[~first], clusters=labels[~first], users=300)
    whole = LatencyHistogram.from_values(latency, clusters=labels, users=800)
    merged = a + b
    assert merged == whole and merged.users == 800
    assert merged.clusters["units"] == a.clusters["units"] + b.clusters["units"]
    np.testing.assert_allclose(merged.cdf_variance(), whole.cdf_variance(), rtol=1e-12, atol=1e-20)
    # An empty histogram without moments is neutral; a non-empty one drops them.
    assert (LatencyHistogram.empty() + a) == a and (a + LatencyHistogram.empty()) == a
    plain = LatencyHistogram.from_values(latency[~first])
    assert (a + plain).clusters is None and (a + plain).counts == merged.counts


def test_dict_round_trip_and_old_dicts():
    rng = np.random.default_rng(5)
    a, b = _hist(rng, 1000), _hist(rng, 1000)
    data = json.loads(json.dumps(a.to_dict()))
    assert LatencyHistogram.from_dict(data) == a and stat_from_dict(data) == a
    assert set(data["clusters"]) == {"n", "units", "users", "n_sq", "c_sq", "c_n"}
    interior = np.flatnonzero((a.counts_below_edges() > 0) & (a.counts_below_edges() < a.n))
    assert [j for j, _ in data["clusters"]["c_sq"]] == interior.tolist()  # sparse: only where 0 < N(e) < n
    # A snapshot written before cluster moments: loads, and is compared request by request.
    old_a, old_b = dict(a.to_dict()), dict(b.to_dict())
    del old_a["clusters"], old_b["clusters"]
    old_a, old_b = LatencyHistogram.from_dict(old_a), LatencyHistogram.from_dict(old_b)
    assert old_a.clusters is None and old_a.counts == a.counts and old_a.users is None
    assert quantile_compare(old_a, old_b).method == "request_cs"
    assert quantile_compare(old_a, b).method == "request_cs"  # both arms need the moments
    monitor = GuardrailMonitor("latency_ms_p95", max_relative_harm=0.1)
    verdict = monitor.update(old_a, old_b)
    assert verdict.status == "ok" and verdict.n_control == a.n  # requests, the old path's units
    # Counts added up without their moments (a raw merge of partitions' dicts that carried
    # one partition's moments along): the counts load, the moments do not.
    raw = a.to_dict()
    raw["counts"] = [[i, c + dict(b.to_dict()["counts"]).get(i, 0)] for i, c in raw["counts"]]
    raw["counts"] += [[i, c] for i, c in b.to_dict()["counts"] if not a.counts[i]]
    assert LatencyHistogram.from_dict(raw).clusters is None and LatencyHistogram.from_dict(raw).n == a.n + b.n


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: quantile_std_error(LatencyHistogram.from_cluster_counts(np.zeros((3, HIST_BINS), int)), Q), "empty"),
        (
            lambda: quantile_std_error(LatencyHistogram.from_values([100.0, 200.0, 300.0], clusters=[1, 1, 1]), Q),
            "at least 2 clusters",
        ),
        (
            lambda: quantile_std_error(LatencyHistogram.from_values([5e6] * 50 + [10.0], clusters=np.arange(51)), Q),
            "overflow",
        ),
        (lambda: quantile_std_error(LatencyHistogram.from_values([100.0, 200.0], clusters=[1, 2]), Q), "too few data"),
        (lambda: quantile_std_error(LatencyHistogram.from_values([100.0, 200.0]), Q), "no cluster moments"),
        (
            lambda: quantile_moments(
                LatencyHistogram.from_values([1.0] * 3, clusters=[1, 1, 1]), _hist(np.random.default_rng(0), 300), Q
            ),
            "control: needs data from at least 2",
        ),
        (lambda: LatencyHistogram((0,) * (HIST_BINS - 1) + (3,), clusters={"units": 1, "n_sq": 4}), "n_sq"),
        (lambda: LatencyHistogram((0,) * (HIST_BINS - 1) + (3,), clusters={"units": 5, "n_sq": 9}), "units"),
        (
            lambda: LatencyHistogram(
                _hist(np.random.default_rng(0), 300).counts, clusters={"n": 0, "units": 0, "n_sq": 0}
            ),
            "clusters describe 0 observations",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_guardrail_turns_bad_input_into_insufficient_data_and_feeds_group_sequential():
    rng = np.random.default_rng(6)
    slow = LatencyHistogram.from_values(np.full(400, 5e6), clusters=np.arange(400) % 128, users=400)
    fine = _hist(rng, 400)
    verdict = GuardrailMonitor("latency_ms_p95").update(slow, fine)
    assert verdict.status == "insufficient_data" and "overflow" in verdict.reason
    verdict = GuardrailMonitor("latency_ms_p95", min_units_per_arm=500).update(fine, fine)
    assert verdict.status == "insufficient_data" and "400 control / 400 candidate users" in verdict.reason
    monitor = GuardrailMonitor("latency_ms_p95", group_sequential={"analyses": 10})
    a, b = _hist(rng, 3000), _hist(rng, 3000, shift=math.log(1.3))
    verdict = monitor.update(a, b, fraction=0.5)
    est, var, _, _ = quantile_moments(a, b, Q)
    assert verdict.gst_z == pytest.approx(est / math.sqrt(var)) and verdict.status == "breach"


def test_cohorts_combine_with_cmh_weights_so_a_ramp_trend_does_not_leak():
    """Latency 30% higher in the second split period, while the candidate's share goes from
    10% to 50%: pooled, the candidate looks slower (it is served mostly later); per cohort,
    combined with CMH weights, it does not."""
    rng = np.random.default_rng(7)
    strata, offset = [], 0
    for users_a, users_b, shift in ((9000, 1000, 0.0), (3000, 3000, math.log(1.3))):
        strata.append((_hist(rng, users_a, shift, offset), _hist(rng, users_b, shift, offset + LATENCY_BUCKETS)))
        offset += 2 * LATENCY_BUCKETS
    est, var, _, _, n_a, n_b = quantile_strata_moments(strata, Q)
    assert (n_a, n_b) == (12000, 4000) and abs(est) < 3 * math.sqrt(var)
    pooled = (strata[0][0] + strata[1][0], strata[0][1] + strata[1][1])
    est_pooled, var_pooled, _, _ = quantile_moments(*pooled, Q)
    assert est_pooled > 0.08 and est_pooled > 4 * math.sqrt(var_pooled)
    assert GuardrailMonitor("latency_ms_p95").update(*zip(*strata)).status == "ok"


def test_variant_sums_keep_a_histogram_per_latency_bucket():
    rng = np.random.default_rng(8)
    latency, user, uid = _traffic(rng, 700)
    hit = rng.random(latency.size) < 0.3
    cells = [VariantSums(), VariantSums()]
    for i in range(latency.size):
        cells[user[i] % 2].add_latency(float(latency[i]), bool(hit[i]), int(uid[user[i]]))
    cells[0].users, cells[1].users = 350, 350
    bucket = uid[user] % LATENCY_BUCKETS
    for cell, mine in zip(cells, (user % 2 == 0, user % 2 == 1)):
        hists = cell.histograms()
        for stratum, keep in (("all", mine), ("cache_hit", mine & hit), ("cache_miss", mine & ~hit)):
            assert hists[stratum] == LatencyHistogram.from_values(latency[keep], clusters=bucket[keep], users=350)
        assert LatencyHistogram.from_dict(cell.stats()["latency_ms_p95"]) == hists["all"]
    pooled = VariantSums()
    for cell in cells:
        pooled.absorb(cell)
    # The arm's pooled view holds the counts (its p95); the cohorts' cluster moments stay theirs.
    assert pooled.histograms()["all"].counts == (cells[0].histograms()["all"] + cells[1].histograms()["all"]).counts
    assert pooled.histograms()["all"].clusters is None
    assert pooled.stats()["latency_ms_p95"]["counts"] and "clusters" not in pooled.stats()["latency_ms_p95"]
    assert len(cells[0].latency) <= LATENCY_BUCKETS and all(len(c) == 2 * HIST_BINS for c in cells[0].latency.values())


# ------------------------------------------------------------------ Monte-Carlo
# A/A and A/B rollouts: users send 1-20 requests with intra-user correlation 0.5 on the
# log scale (lognormal sigma 1), are hashed into LATENCY_BUCKETS buckets, and the arms are
# compared every 200 users per arm up to 6,000. Vectorised over runs, on bin counts inside a
# window of edges around the p95 (every quantile the tests use is asserted to lie in it);
# test_vectorised_looks_equal_the_modules_decisions checks it against the module.
LOOK, LOOKS, ALPHA, N_TUNE = 200, 30, 0.05, 6000
H = math.log(10) / LatencyHistogram.empty().bins_per_decade  # one bin, in log units
EDGES = LatencyHistogram.empty().edges
J0 = int(np.searchsorted(EDGES, math.exp(MU + 0.4)))  # first window edge
W = int(np.searchsorted(EDGES, math.exp(MU + 3.3))) - J0  # window bins


def _requests(rng, runs, shift):
    """Per request, ``(run * B + bucket) * (W + 2) + column`` (column 0: below the window,
    W + 1: above it), in look order; and where each look's requests end."""
    m = rng.integers(1, 21, size=(LOOKS, runs, LOOK), dtype=np.int32)
    centre = (MU + shift - math.log(EDGES[J0])) / H + rng.standard_normal(m.shape, dtype=np.float32) * np.float32(
        math.sqrt(0.5) / H
    )
    bucket = (rng.integers(0, 2**63, size=m.shape, dtype=np.int64) % LATENCY_BUCKETS).astype(np.int32)
    base = (np.arange(runs, dtype=np.int32)[None, :, None] * LATENCY_BUCKETS + bucket) * (W + 2)
    ends = np.cumsum(m.reshape(LOOKS, -1).sum(1))
    y = rng.standard_normal(int(ends[-1]), dtype=np.float32)
    y *= np.float32(math.sqrt(0.5) / H)
    y += np.repeat(centre.ravel(), m.ravel())
    col = np.floor(y, out=y).astype(np.int32)
    col += 1
    np.clip(col, 0, W + 1, out=col)
    col += np.repeat(base.ravel(), m.ravel())
    return col, np.concatenate([[0], ends])


def _quantile(cum, n, p, edges):
    """The histogram's interpolated quantile function, vectorised over runs."""
    target = p * n
    k = (cum < target[:, None]).sum(1)
    assert np.all((k >= 1) & (k < cum.shape[1])), "a quantile left the simulation's window"
    r = np.arange(n.size)
    frac = (target - cum[r, k - 1]) / (cum[r, k] - cum[r, k - 1])
    return edges[k - 1] * (edges[k] / edges[k - 1]) ** frac, k, frac


def _arm(counts, edges):
    """One arm at one look from its per-(run, bucket, column) counts: (requests, counts below
    the window's edges, p95, its SE with users as the unit, its SE with requests as the unit)."""
    runs = counts.shape[0]
    n_b = counts.sum(2)
    n, k_units, n_sq = n_b.sum(1), np.count_nonzero(n_b, 1), (n_b * n_b).sum(1)
    cum = np.cumsum(counts.sum(1)[:, : W + 1], 1)
    q_hat, k, frac = _quantile(cum, n, np.full(runs, Q), edges)
    # C_b at the two edges around the p95: columns 0..k-1 and 0..k.
    masks = (np.arange(W + 2)[None, None, :] <= np.stack([k - 1, k], 1)[:, :, None]).astype(float)
    c_b = np.matmul(counts, masks.transpose(0, 2, 1))  # (runs, buckets, 2)
    f = cum[np.arange(runs)[:, None], np.stack([k - 1, k], 1)] / n[:, None]
    s2, s1 = (c_b * c_b).sum(1), (c_b * n_b[:, :, None]).sum(1)
    resid = np.maximum(s2 - 2 * f * s1 + f * f * n_sq[:, None], 0.0)
    var_f = resid / (k_units - 1)[:, None] / (k_units * (n / k_units) ** 2)[:, None]
    var_req = f * (1 - f) / (n - 1)[:, None]
    ses = []
    for v in (var_f, var_req):
        sigma = np.sqrt((1 - frac) * v[:, 0] + frac * v[:, 1])
        hi = _quantile(cum, n, Q + OUTER_Z * sigma, edges)[0]
        lo = _quantile(cum, n, Q - OUTER_Z * sigma, edges)[0]
        ses.append((hi - lo) / (2 * OUTER_Z))
    return n, cum, q_hat, ses[0], ses[1]


def _simulate(rng, runs, lift, batch=100):
    """Per run and look: breach by (users as the unit, the request-level exact CS, the delta
    method with requests as the unit); and the per-look estimates of the first batch."""
    edges = EDGES[J0 : J0 + W + 1]
    c = _concentration(Q, ALPHA / 2, N_TUNE / 2)
    thr = -math.log(ALPHA / 2)
    out, first = [], None
    for start in range(0, runs, batch):
        size = min(batch, runs - start)
        arms = [_requests(rng, size, 0.0), _requests(rng, size, math.log1p(lift))]
        counts = [np.zeros((size, LATENCY_BUCKETS, W + 2)) for _ in arms]
        breach = np.zeros((3, size, LOOKS), bool)
        looks = []
        for look in range(LOOKS):
            for arm, (keys, ends) in enumerate(arms):
                counts[arm] += np.bincount(keys[ends[look] : ends[look + 1]], minlength=counts[arm].size).reshape(
                    counts[arm].shape
                )
            (n_a, cum_a, q_a, se_a, ser_a), (n_b, cum_b, q_b, se_b, ser_b) = (_arm(x, edges) for x in counts)
            est = q_b / q_a - 1
            var = se_b**2 / q_a**2 + q_b**2 * se_a**2 / q_a**4
            breach[0, :, look] = cs_reject(est, var, 2 * LOOK * (look + 1), alpha=ALPHA, n_tune=N_TUNE)
            var_req = ser_b**2 / q_a**2 + q_b**2 * ser_a**2 / q_a**4
            breach[2, :, look] = cs_reject(est, var_req, n_a + n_b, alpha=ALPHA, n_tune=N_TUNE)
            # Exact request-level CS (Howard & Ramdas), as quantile_compare: L_b > U_a.
            above_a = quantile_certified(cum_a, n_a[:, None], Q, c, thr)[1]
            below_b = quantile_certified(cum_b, n_b[:, None], Q, c, thr)[0]
            upper_a = np.where(above_a.any(1), edges[above_a.argmax(1)], np.inf)
            lower_b = np.where(below_b.any(1), edges[W - below_b[:, ::-1].argmax(1)], 0.0)
            breach[1, :, look] = lower_b > upper_a
            looks.append((est, var, var_req))
        out.append(breach)
        if first is None:
            first = (arms, looks)
    return np.concatenate(out, axis=1), first


def _module_histograms(keys, look_end, run, users, clusters=True):
    """The module's histogram of one run's requests up to a look, from the simulation's keys
    (each request at its bin's centre: the statistics only see bins)."""
    keys = keys[:look_end]
    keys = keys[keys // ((W + 2) * LATENCY_BUCKETS) == run]
    col, bucket = keys % (W + 2), keys // (W + 2) % LATENCY_BUCKETS
    latency = 10.0 ** ((J0 + col - 0.5) / LatencyHistogram.empty().bins_per_decade)
    if clusters is None:
        return LatencyHistogram.from_values(latency)
    labels = bucket if clusters else np.arange(latency.size)
    return LatencyHistogram.from_values(latency, clusters=labels, users=users if clusters else latency.size)


def test_vectorised_looks_equal_the_modules_decisions():
    """The Monte-Carlo's vectorised statistics and boundaries against quantile_moments and
    GuardrailMonitor (both paths) on the same requests, look by look."""
    rng = np.random.default_rng(11)
    breach, (arms, looks) = _simulate(rng, 4, 0.10, batch=4)
    for run in range(4):
        new = GuardrailMonitor("latency_ms_p95", n_tune=N_TUNE, alpha=ALPHA, min_units_per_arm=2)
        old = GuardrailMonitor("latency_ms_p95", n_tune=N_TUNE, alpha=ALPHA, min_units_per_arm=2)
        for look in range(LOOKS):
            users = LOOK * (look + 1)
            a, b = (_module_histograms(keys, ends[look + 1], run, users) for keys, ends in arms)
            est, var, _, _ = quantile_moments(a, b, Q)
            assert (est, var) == pytest.approx((looks[look][0][run], looks[look][1][run]), rel=1e-9)
            assert new.update(a, b).breach == breach[0, run, : look + 1].any()
            plain = [LatencyHistogram(h.counts) for h in (a, b)]
            assert old.update(*plain).breach == breach[1, run, : look + 1].any()
            if look < 3:  # requests as their own clusters (a matrix of requests x bins: small looks only)
                a, b = (_module_histograms(keys, ends[look + 1], run, users, clusters=False) for keys, ends in arms)
                assert quantile_moments(a, b, Q)[1] == pytest.approx(looks[look][2][run], rel=1e-9)
    assert breach[0].any() and not breach[0].all()  # both outcomes were compared


def test_monte_carlo_false_rollbacks_and_detection():
    _monte_carlo(1500, 400, seed=2024)


@pytest.mark.slow
def test_monte_carlo_false_rollbacks_and_detection_long():
    _monte_carlo(10_000, 2000, seed=7)


def _monte_carlo(runs, runs_ab, seed):
    aa, _ = _simulate(np.random.default_rng(seed), runs, 0.0)
    rate = aa.any(2).mean(1)
    se = np.sqrt(rate * (1 - rate) / runs)
    figures = (
        f"A/A over {runs} runs: users as the unit {rate[0]:.3f} +- {se[0]:.3f}, request-level exact CS "
        f"{rate[1]:.3f} +- {se[1]:.3f}, delta method with requests as the unit {rate[2]:.3f} +- {se[2]:.3f}"
    )
    # Valid: at most alpha (up to 3 Monte-Carlo SEs at alpha).
    assert rate[0] <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / runs), figures
    # The same test with requests as the unit is far above alpha on the same streams: the
    # clustering is real and the harness catches a test that ignores it.
    assert rate[2] > 2 * ALPHA, figures
    ab, _ = _simulate(np.random.default_rng(seed + 1), runs_ab, 0.10)
    detected = ab.any(2).mean(1)
    stop = np.where(ab[0].any(1), (ab[0].argmax(1) + 1) * LOOK, np.inf)
    median_stop = float(np.median(stop))  # over all runs: a run that never stops counts as infinity
    figures += (
        f"; A/B +10% p95 over {runs_ab} runs: detected {detected[0]:.3f} +- "
        f"{math.sqrt(detected[0] * (1 - detected[0]) / runs_ab):.3f} (request-level exact CS "
        f"{detected[1]:.3f}), median stop {median_stop:.0f} users per arm"
    )
    print(figures)
    assert detected[0] >= 0.8 and median_stop <= 4000, figures
    assert detected[0] > detected[1] + 0.4, figures  # the exact CS's bin-edge bounds barely see +10%
