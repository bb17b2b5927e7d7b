"""Sufficient statistics: validation, merging, serialisation, delta-method variance."""

import json
import math

import numpy as np
import pytest

from safeswap.core.stats import Mean, Proportion, Ratio, stat_from_dict


def test_proportion_merge_equals_concatenated_data():
    rng = np.random.default_rng(1)
    x, y = rng.random(300) < 0.1, rng.random(500) < 0.1
    merged = Proportion.from_values(x) + Proportion.from_values(y)
    assert merged == Proportion.from_values(np.concatenate([x, y]))


def test_mean_merge_equals_concatenated_data():
    rng = np.random.default_rng(2)
    x, y = rng.lognormal(0, 1, 300), rng.lognormal(0, 1, 700)
    merged = Mean.from_values(x) + Mean.from_values(y)
    whole = Mean.from_values(np.concatenate([x, y]))
    assert merged.n == whole.n
    assert merged.estimate == pytest.approx(whole.estimate, rel=1e-12)
    assert merged.variance_of_unit == pytest.approx(np.var(np.concatenate([x, y]), ddof=1), rel=1e-9)


def test_ratio_merge_equals_concatenated_data():
    rng = np.random.default_rng(3)
    den = rng.integers(1, 21, 400)
    num = rng.binomial(den, 0.05)
    merged = Ratio.from_units(num[:150], den[:150]) + Ratio.from_units(num[150:], den[150:])
    whole = Ratio.from_units(num, den)
    assert merged.n_units == whole.n_units == 400
    assert merged.estimate == pytest.approx(num.sum() / den.sum())
    assert merged.variance_of_unit == pytest.approx(whole.variance_of_unit, rel=1e-9)


def test_adding_different_kinds_is_a_type_error():
    with pytest.raises(TypeError):
        Proportion(10, 1) + Mean(10, 1.0, 1.0)


@pytest.mark.parametrize(
    "stat",
    [
        Proportion(120, 7),
        Mean(50, 12.5, 9.75),
        Ratio(40, 10.0, 12.0, 200.0, 1400.0, 60.0),
    ],
)
def test_dict_round_trip_through_json(stat):
    data = json.loads(json.dumps(stat.to_dict()))
    assert data["kind"] == stat.kind
    assert type(stat).from_dict(data) == stat
    assert stat_from_dict(data) == stat


@pytest.mark.parametrize(
    "make, argname",
    [
        (lambda: Proportion(-1, 0), "n"),
        (lambda: Proportion(10, 11), "successes"),
        (lambda: Proportion(10, -1), "successes"),
        (lambda: Proportion(10.5, 1), "n"),
        (lambda: Proportion(float("nan"), 1), "n"),
        (lambda: Mean(10, float("inf"), 1.0), "total"),
        (lambda: Mean(10, 1.0, float("nan")), "total_sq"),
        (lambda: Mean(10, 1.0, -1.0), "total_sq"),
        (lambda: Mean(2, 10.0, 1.0), "total_sq"),
        (lambda: Ratio(-3, 1, 1, 1, 1, 1), "n_units"),
        (lambda: Ratio(3, float("nan"), 1, 1, 1, 1), "num"),
        (lambda: Ratio(3, 1, 1, 1, 1, float("inf")), "num_den"),
        (lambda: Ratio(3, 1, 1, 1, -1, 1), "den_sq"),
        (lambda: Ratio(10, 1, 1, -5, 25, -1), "den"),  # a count of responses or sessions
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(make, argname):
    with pytest.raises(ValueError, match=argname):
        make()


def test_from_dict_rejects_wrong_kind_and_missing_fields():
    with pytest.raises(ValueError, match="kind"):
        Proportion.from_dict({"kind": "mean", "n": 1, "successes": 0})
    with pytest.raises(ValueError, match="successes"):
        Proportion.from_dict({"kind": "proportion", "n": 1})
    with pytest.raises(ValueError, match="kind"):
        stat_from_dict({"kind": "nope"})


def test_empty_statistics_refuse_to_estimate():
    with pytest.raises(ValueError, match="n is 0"):
        _ = Proportion(0, 0).estimate
    with pytest.raises(ValueError, match="n >= 2"):
        _ = Mean(1, 1.0, 1.0).variance_of_unit
    with pytest.raises(ValueError, match="den is 0"):
        _ = Ratio(5, 0, 0, 0, 0, 0).estimate


def test_ratio_delta_method_variance_matches_clustered_simulation():
    """Users send 1-20 requests; per-user thumbs-down propensity varies (clustering).

    The delta-method SE of num/den must match the spread of the ratio over
    replications, while the naive request-level binomial SE is too small.
    """
    rng = np.random.default_rng(7)
    users, reps = 2000, 1500
    den = rng.integers(1, 21, size=(reps, users))
    propensity = rng.beta(0.5, 9.5, size=(reps, users))  # mean 5%, strongly user-dependent
    num = rng.binomial(den, propensity)
    ratios = num.sum(1) / den.sum(1)
    empirical_sd = ratios.std(ddof=1)
    stats = [Ratio.from_units(num[i], den[i]) for i in range(50)]
    delta_sd = np.mean([math.sqrt(s.variance_of_estimate) for s in stats])
    naive_sd = np.mean([math.sqrt(s.estimate * (1 - s.estimate) / s.den) for s in stats])
    # MC error of an SD from 1500 reps is ~1.8%; allow 6%.
    assert delta_sd == pytest.approx(empirical_sd, rel=0.06)
    assert naive_sd < 0.8 * empirical_sd
