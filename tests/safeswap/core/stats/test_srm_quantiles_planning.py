"""SRM test, quantile guardrail and planning."""

import json
import math

import numpy as np
import pytest
from scipy.special import gammaln

from safeswap.core.stats import (
    GuardrailMonitor,
    LatencyHistogram,
    SRMMonitor,
    plan_sample_size,
    quantile_bounds,
    quantile_compare,
    srm_test,
    stat_from_dict,
    watch_hours,
)

# ---------------------------------------------------------------- SRM


def test_srm_balanced_counts_do_not_trigger_and_imbalance_at_1m_does():
    assert srm_test([500_000, 500_000], [0.5, 0.5]).p_value == 1.0
    r = srm_test([505_000, 495_000], [0.5, 0.5])
    assert r.p_value < 1e-10 and r.observed_shares == (0.505, 0.495)


def test_srm_bayes_factor_matches_beta_binomial_closed_form():
    # Independent check, two arms: BF = B(c/2 + x1, c/2 + x2) / B(c/2, c/2) / 0.5^n.
    x1, x2, c = 5300, 4700, 10_000.0

    def log_beta(a, b):
        return gammaln(a) + gammaln(b) - gammaln(a + b)

    expected = log_beta(c / 2 + x1, c / 2 + x2) - log_beta(c / 2, c / 2) - (x1 + x2) * math.log(0.5)
    assert srm_test([x1, x2], [0.5, 0.5], concentration=c).log_bayes_factor == pytest.approx(expected, rel=1e-10)


def test_srm_bayes_factor_matches_scipy_dirichlet_multinomial_for_three_arms():
    # Independent implementation: the Bayes factor is the ratio of the
    # Dirichlet-multinomial and multinomial pmfs of the counts (the multinomial
    # coefficient cancels), here from scipy.stats.
    from scipy.stats import dirichlet_multinomial, multinomial

    counts, shares, c = [130, 290, 580], [0.1, 0.3, 0.6], 100.0
    expected = dirichlet_multinomial.logpmf(counts, [c * s for s in shares], sum(counts)) - multinomial.logpmf(
        counts, sum(counts), shares
    )
    result = srm_test(counts, shares, concentration=c)
    assert result.log_bayes_factor == pytest.approx(expected, rel=1e-9)
    assert result.p_value == pytest.approx(min(1.0, math.exp(-expected)), rel=1e-9)


def test_srm_is_stable_for_huge_counts():
    r = srm_test([50_000_000, 50_100_000], [0.5, 0.5])
    assert math.isfinite(r.log_bayes_factor) and 0 <= r.p_value <= 1


def test_srm_aa_simulation_false_alarm_rate_below_alpha():
    rng = np.random.default_rng(5)
    runs, looks, batch = 500, 50, 2000
    counts = rng.binomial(batch, 0.5, size=(runs, looks)).cumsum(1)
    flagged = 0
    for i in range(runs):
        mon = SRMMonitor([0.5, 0.5], alpha=0.05)
        for k in range(looks):
            n = batch * (k + 1)
            mon.update([int(counts[i, k]), n - int(counts[i, k])])
        flagged += mon.mismatch
    assert flagged / runs <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)


def test_srm_monitor_running_minimum_is_sticky():
    mon = SRMMonitor([0.5, 0.5], alpha=0.001)
    mon.update([60_000, 40_000])
    assert mon.mismatch
    mon.update([100_000, 100_000])
    assert mon.mismatch and mon.p_value < 0.001


@pytest.mark.parametrize(
    "counts, shares, name",
    [
        ([10, -1], [0.5, 0.5], "counts"),
        ([10, float("nan")], [0.5, 0.5], "counts"),
        ([10, 10], [0.6, 0.6], "sum to 1"),
        ([10, 10], [1.0, 0.0], "expected_shares"),
        ([10, 10, 10], [0.5, 0.5], "expected_shares"),
    ],
)
def test_srm_bad_input(counts, shares, name):
    with pytest.raises(ValueError, match=name):
        srm_test(counts, shares)


# ---------------------------------------------------------------- quantiles


def test_histogram_merge_equals_concatenated_data_and_round_trips():
    rng = np.random.default_rng(1)
    x, y = rng.lognormal(6, 1, 1000), rng.lognormal(6, 1, 500)
    merged = LatencyHistogram.from_values(x) + LatencyHistogram.from_values(y)
    assert merged == LatencyHistogram.from_values(np.concatenate([x, y]))
    assert stat_from_dict(json.loads(json.dumps(merged.to_dict()))) == merged
    with pytest.raises(ValueError, match="layout"):
        merged + LatencyHistogram.empty(bins_per_decade=20)


def test_histogram_quantile_within_one_bin_of_exact():
    x = np.random.default_rng(2).lognormal(6, 1, 20_000)
    h = LatencyHistogram.from_values(x)
    assert h.quantile(0.95) == pytest.approx(np.quantile(x, 0.95), rel=10 ** (1 / 50) - 1)


@pytest.mark.parametrize(
    "bad, name",
    [
        (lambda: LatencyHistogram.from_values([1.0, -2.0]), "values"),
        (lambda: LatencyHistogram.from_values([1.0, float("nan")]), "values"),
        (lambda: LatencyHistogram((1, 2, 3)), "counts"),
        (lambda: LatencyHistogram.empty(lo=0.0), "lo"),
        (lambda: LatencyHistogram.empty().quantile(0.95), "empty"),
    ],
)
def test_histogram_bad_input(bad, name):
    with pytest.raises(ValueError, match=name):
        bad()


def test_quantile_cs_covers_true_quantile_over_all_looks():
    """Time-uniform coverage of the true p95 (lognormal sigma=1), 300 runs x 40 looks."""
    rng = np.random.default_rng(3)
    true_q = math.exp(6 + 1.6448536 * 1.0)
    runs, looks, batch, misses = 300, 40, 100, 0
    for _ in range(runs):
        data = rng.lognormal(6, 1, looks * batch)
        bins = np.searchsorted(LatencyHistogram.empty().edges, data, side="right")
        for k in range(1, looks + 1):
            counts = np.bincount(bins[: k * batch], minlength=302)
            lo, hi = quantile_bounds(LatencyHistogram(tuple(counts.tolist())), 0.95, alpha=0.05, n_tune=2000)
            if not lo < true_q <= hi:
                misses += 1
                break
    assert misses / runs <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)


def test_quantile_compare_detects_a_slower_candidate_and_not_an_equal_one():
    rng = np.random.default_rng(4)
    a = LatencyHistogram.from_values(rng.lognormal(6, 1, 20_000))
    slow = LatencyHistogram.from_values(rng.lognormal(6 + math.log(1.5), 1, 20_000))
    same = LatencyHistogram.from_values(rng.lognormal(6, 1, 20_000))
    r = quantile_compare(a, slow, null=0.2)
    assert r.ci_low > 0.2 and r.p_value < 0.05 and r.estimate == pytest.approx(0.5, abs=0.1)
    r = quantile_compare(a, same, null=0.2)
    assert r.p_value == 1.0 and r.ci_low < 0 < r.ci_high < 0.2  # harm > 20% ruled out
    json.dumps(r.to_dict(), allow_nan=False)


def test_guardrail_monitor_accepts_histograms_for_p95_metrics():
    rng = np.random.default_rng(6)
    a = LatencyHistogram.from_values(rng.lognormal(6, 1, 20_000))
    b = LatencyHistogram.from_values(rng.lognormal(6 + math.log(1.5), 1, 20_000))
    m = GuardrailMonitor("latency_ms_p95", max_relative_harm=0.2)
    v = m.update(a, b)
    assert v.status == "breach" and "latency_ms_p95" in v.reason
    with pytest.raises(ValueError, match="LatencyHistogram"):
        GuardrailMonitor("latency_ms_p95").update(object(), b)


# ---------------------------------------------------------------- planning


def test_fixed_horizon_matches_textbook_formula():
    # Independent: (z_.95 + z_.8)^2 (p1 q1 + p2 q2) / delta^2 with p1=.05, p2=.06.
    expected = (1.6448536 + 0.8416212) ** 2 * (0.05 * 0.95 + 0.06 * 0.94) / 0.01**2
    plan = plan_sample_size(0.05, 0.2)
    assert plan.fixed_horizon_per_arm == math.ceil(expected) == 6424
    assert plan.sequential_per_arm > plan.fixed_horizon_per_arm
    assert plan.users_per_arm == plan.sequential_per_arm
    assert plan_sample_size(0.05, 0.2, sequential=False).users_per_arm == 6424


def test_planning_scales_with_variance_inflation_and_sidedness():
    base = plan_sample_size(0.05, 0.2)
    assert plan_sample_size(0.05, 0.2, variance_inflation=2.0).fixed_horizon_per_arm == pytest.approx(
        2 * base.fixed_horizon_per_arm, abs=1
    )
    assert plan_sample_size(0.05, 0.2, alternative="two-sided").fixed_horizon_per_arm > base.fixed_horizon_per_arm
    mean_plan = plan_sample_size(100.0, 0.1, kind="mean", std=50.0)
    assert mean_plan.fixed_horizon_per_arm == math.ceil((1.6448536 + 0.8416212) ** 2 * 2 * 2500 / 100)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(baseline=1.5, relative_mde=0.2), "baseline"),
        (dict(baseline=0.05, relative_mde=0.0), "relative_mde"),
        (dict(baseline=0.05, relative_mde=0.2, power=1.2), "power"),
        (dict(baseline=0.05, relative_mde=0.2, kind="mean"), "std"),
        (dict(baseline=0.05, relative_mde=0.2, variance_inflation=-1), "variance_inflation"),
        (dict(baseline=0.9, relative_mde=0.2), "in \\(0, 1\\)"),
        (dict(baseline=0.05, relative_mde=0.2, sequential="no"), "sequential"),
    ],
)
def test_planning_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        plan_sample_size(**kwargs)


def test_watch_hours():
    assert watch_hours(6424, 10_000, 10) == pytest.approx(6424 / 1000)
    assert watch_hours(6424, 10_000, 90) == pytest.approx(6424 / 1000)  # control is the 10% rest
    with pytest.raises(ValueError, match="percent"):
        watch_hours(100, 100, 0)


def test_planning_recommends_n_tune_at_twice_the_fixed_horizon():
    plan = plan_sample_size(0.05, 0.2, sequential=False)
    assert plan.recommended_n_tune == 2 * plan.fixed_horizon_per_arm == 12_848
