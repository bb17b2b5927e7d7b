"""sequential_compare: published test vectors, invariants and input validation."""

import math

import numpy as np
import pytest

from safeswap.core.stats import Mean, Proportion, Ratio, sequential_compare
from safeswap.core.stats.sequential import cs_halfwidth, sequential_rho

# Test vectors from GrowthBook gbstats, packages/stats/tests/frequentist/test_tests.py
# (TestSequentialTTest, TestSequentialOneSided{Greater,Lesser}TTest).  gbstats'
# SampleMeanStatistic(sum, sum_squares, n) == our Mean(n, total, total_sq).
GB_A = Mean(n=3000, total=1396.87, total_sq=52377.9767)
GB_B = Mean(n=3461, total=2422.7, total_sq=134698.29)


def test_gbstats_two_sided_mean_tuning_1000():
    r = sequential_compare(GB_A, GB_B, n_tune=1000)
    assert r.estimate == pytest.approx(0.50336, abs=1e-5)
    assert r.ci_low == pytest.approx(-0.55844, abs=1e-5)
    assert r.ci_high == pytest.approx(1.56516, abs=1e-5)
    assert r.std_error == pytest.approx(0.33341, abs=1e-5)
    assert r.p_value == 1.0


def test_gbstats_two_sided_proportion():
    r = sequential_compare(Proportion(3000, 1396), Proportion(3461, 2422))
    assert r.estimate == pytest.approx(0.50386, abs=1e-5)
    assert (r.ci_low, r.ci_high) == pytest.approx((0.40098, 0.60675), abs=1e-5)
    assert r.std_error == pytest.approx(0.03386, abs=1e-5)
    assert r.p_value < 1e-5  # gbstats rounds it to 0.0


@pytest.mark.parametrize(
    "difference, alternative, bound",
    [
        ("relative", "greater", -0.42356454602790883),
        ("absolute", "greater", -0.12656844172804982),
        ("relative", "less", 1.4302867177403806),
        ("absolute", "less", 0.5953217750613832),
    ],
)
def test_gbstats_one_sided_bounds(difference, alternative, bound):
    r = sequential_compare(GB_A, GB_B, difference=difference, alternative=alternative)
    if alternative == "greater":
        assert r.ci_low == pytest.approx(bound, abs=1e-9) and r.ci_high == math.inf
    else:
        assert r.ci_high == pytest.approx(bound, abs=1e-9) and r.ci_low == -math.inf


def test_gbstats_one_sided_p_value_matches_their_bisection():
    # gbstats finds 0.46316491943359384 by bisection on the CI bound (tolerance 1e-6 on
    # the bound); our closed-form inversion must agree to that precision.
    r = sequential_compare(GB_A, GB_B, difference="absolute", alternative="greater")
    assert r.p_value == pytest.approx(0.463165, abs=5e-4)
    # gbstats caps its search at 0.4999 and reports 0.4999 when the bound never crosses 0.
    for alt in ("less",):
        assert sequential_compare(GB_A, GB_B, difference="absolute", alternative=alt).p_value >= 0.4999


def test_rho_formula_eq161():
    # PostHog products/experiments/stats tests the same closed form.
    a, n = 0.05, 5000.0
    expected = math.sqrt((-2 * math.log(a) + math.log(-2 * math.log(a) + 1)) / n)
    assert sequential_rho(a, n) == pytest.approx(expected, rel=1e-12)
    assert sequential_rho(a, n, one_sided=True) == pytest.approx(
        math.sqrt((-2 * math.log(2 * a) + math.log(-2 * math.log(2 * a) + 1)) / n), rel=1e-12
    )


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
@pytest.mark.parametrize("difference", ["relative", "absolute"])
def test_p_value_is_the_level_where_the_cs_touches_zero(alternative, difference):
    """Closed-form p-value inverts the boundary: recomputing the CS at alpha=p puts 0 on it."""
    a, b = Proportion(4000, 200), Proportion(4100, 262)
    if alternative == "less":
        a, b = b, a
    r = sequential_compare(a, b, difference=difference, alternative=alternative)
    assert 0 < r.p_value < 0.4
    one_sided = alternative != "two-sided"
    rho = sequential_rho(r.alpha, r.n_tune, one_sided=one_sided)
    t = r.n_control + r.n_candidate
    hw = cs_halfwidth(r.std_error**2 * t, t, r.p_value, rho, one_sided=one_sided)
    assert abs(r.estimate) == pytest.approx(hw, rel=1e-9)
    assert r.significant == (r.p_value < r.alpha)


def test_cs_is_wider_than_fixed_horizon_and_tightest_near_n_tune():
    a, b = Proportion(5000, 250), Proportion(5000, 275)
    widths = {
        nt: sequential_compare(a, b, n_tune=nt).ci_high - sequential_compare(a, b, n_tune=nt).ci_low
        for nt in (100, 10_000, 1_000_000)
    }
    r = sequential_compare(a, b, n_tune=10_000)
    assert (r.ci_high - r.ci_low) / 2 > 1.96 * r.std_error
    assert widths[10_000] < widths[100] and widths[10_000] < widths[1_000_000]


def test_null_shifts_only_the_p_value():
    a, b = Proportion(20000, 1000), Proportion(20000, 1300)
    r0 = sequential_compare(a, b, alternative="greater")
    r20 = sequential_compare(a, b, alternative="greater", null=0.2)
    r40 = sequential_compare(a, b, alternative="greater", null=0.4)
    assert r0.ci_low == r20.ci_low
    assert r0.p_value < r20.p_value < 1.0 == r40.p_value
    assert (r20.p_value < 0.05) == (r20.ci_low > 0.2)


def test_extreme_evidence_gives_p_zero_not_nan():
    r = sequential_compare(Proportion(10**6, 10**5), Proportion(10**6, 2 * 10**5), alternative="greater")
    assert r.p_value == 0.0 or r.p_value < 1e-300


def test_degenerate_zero_variance_arms():
    r = sequential_compare(Proportion(100, 0), Proportion(100, 0), difference="absolute")
    assert (r.estimate, r.ci_low, r.ci_high, r.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_ratio_and_mean_inputs_work_and_kinds_must_match():
    r = sequential_compare(Ratio.from_units([1, 0, 2], [3, 1, 4]), Ratio.from_units([0, 1, 1], [2, 2, 5]))
    assert math.isfinite(r.ci_low)
    with pytest.raises(ValueError, match="same statistic kind"):
        sequential_compare(Proportion(10, 1), Mean(10, 1.0, 1.0))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(alpha=0.6, alternative="greater"), "alpha"),
        (dict(n_tune=0), "n_tune"),
        (dict(n_tune=float("inf")), "n_tune"),
        (dict(difference="ratio"), "difference"),
        (dict(alternative="bigger"), "alternative"),
        (dict(null=float("nan")), "null"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sequential_compare(Proportion(100, 5), Proportion(100, 6), **kwargs)


def test_numpy_scalars_are_accepted_like_python_numbers():
    a, b = Proportion(1000, 50), Proportion(1000, 70)
    plain = sequential_compare(a, b, alpha=0.05, n_tune=5000)
    assert sequential_compare(a, b, alpha=np.float32(0.05), n_tune=np.int64(5000)).ci_low == pytest.approx(plain.ci_low)


def test_too_few_units_or_zero_control_raise():
    with pytest.raises(ValueError, match="control needs n >= 2"):
        sequential_compare(Proportion(1, 0), Proportion(100, 6))
    with pytest.raises(ValueError, match="relative difference is undefined"):
        sequential_compare(Proportion(100, 0), Proportion(100, 6))


def test_to_dict_is_json_safe():
    import json

    d = sequential_compare(Proportion(100, 5), Proportion(100, 9), alternative="greater").to_dict()
    assert d["ci_high"] is None and d["alternative"] == "greater"
    json.dumps(d, allow_nan=False)


def test_always_valid_under_continuous_monitoring_simulation():
    """A/A, 400 runs x 60 looks: the rate of ever rejecting stays below alpha,
    whereas naive repeated z-tests at the same looks exceed it."""
    rng = np.random.default_rng(11)
    runs, looks, batch, p = 400, 60, 100, 0.1
    a = rng.binomial(batch, p, size=(runs, looks)).cumsum(1)
    b = rng.binomial(batch, p, size=(runs, looks)).cumsum(1)
    seq_reject = np.zeros(runs, bool)
    naive_reject = np.zeros(runs, bool)
    for k in range(looks):
        n = batch * (k + 1)
        for i in range(runs):
            r = sequential_compare(Proportion(n, int(a[i, k])), Proportion(n, int(b[i, k])), difference="absolute")
            seq_reject[i] |= r.p_value < 0.05
            naive_reject[i] |= abs(r.estimate / r.std_error) > 1.959964 if r.std_error > 0 else False
    se = math.sqrt(0.05 * 0.95 / runs)
    assert seq_reject.mean() <= 0.05 + 3 * se
    assert naive_reject.mean() > 0.05 + 3 * se
