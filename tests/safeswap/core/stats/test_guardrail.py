"""GuardrailMonitor and split_alpha."""

import json

import pytest

from safeswap.core.stats import GuardrailMonitor, Proportion, split_alpha


def test_insufficient_data_below_min_units():
    m = GuardrailMonitor("thumbs_down_rate", max_relative_harm=0.2, min_units_per_arm=100)
    v = m.update(Proportion(99, 5), Proportion(500, 50))
    assert v.status == "insufficient_data" and v.ci_low is None and v.looks == 0
    assert "need 100 per arm" in v.reason


def test_zero_control_rate_is_tested_as_an_absolute_difference_not_held_forever():
    """+X% of a zero control rate is 0: the absolute difference is tested against 0."""
    both_zero = GuardrailMonitor("error_rate", max_relative_harm=0.1).update(Proportion(200, 0), Proportion(200, 0))
    assert both_zero.status == "ok" and "0 in both arms" in both_zero.reason and both_zero.estimate is None
    few = GuardrailMonitor("error_rate", max_relative_harm=0.1).update(Proportion(200, 0), Proportion(200, 3))
    assert few.status == "ok" and "control 0" in few.reason and "none shown yet" in few.reason
    many = GuardrailMonitor("error_rate", max_relative_harm=0.1).update(Proportion(2000, 0), Proportion(2000, 60))
    assert many.status == "breach" and "absolute difference" in many.reason
    assert many.to_dict()["estimate"] is None  # no NaN or infinity reaches a decision


def test_breach_only_when_lower_bound_exceeds_tolerance():
    big_harm = (Proportion(20000, 1000), Proportion(20000, 1500))  # +50%
    small_harm = (Proportion(20000, 1000), Proportion(20000, 1200))  # +20%: clearly > 0, not > 20%
    strict = GuardrailMonitor("thumbs_down_rate")  # tolerance 0: any harm
    tolerant = GuardrailMonitor("thumbs_down_rate", max_relative_harm=0.2)
    assert tolerant.update(*big_harm).status == "breach"
    v = tolerant.update(*small_harm)  # intervals intersect: breach is sticky
    assert v.status == "breach" and v.ci_low > 0.2
    fresh = GuardrailMonitor("thumbs_down_rate", max_relative_harm=0.2)
    v = fresh.update(*small_harm)
    assert v.status == "ok" and v.ci_low < 0.2
    assert strict.update(*small_harm).status == "breach"


def test_reason_is_one_readable_line():
    m = GuardrailMonitor("thumbs_down_rate", max_relative_harm=0.2)
    v = m.update(Proportion(20000, 1000), Proportion(20000, 1500))
    assert "\n" not in v.reason
    assert v.reason.startswith("thumbs_down_rate +50.0% vs control (always-valid 90% CI +")
    assert v.reason.endswith("exceeds the +20.0% limit")


def test_running_intersection_and_min_p_value():
    m = GuardrailMonitor("x", max_absolute_harm=0.0)
    v1 = m.update(Proportion(1000, 50), Proportion(1000, 60))
    v2 = m.update(Proportion(2000, 100), Proportion(2000, 100))
    assert v2.ci_low >= v1.ci_low and v2.ci_high <= v1.ci_high
    assert v2.p_value <= v1.p_value and v2.looks == 2


def test_harm_ruled_out_for_promotion():
    m = GuardrailMonitor("thumbs_down_rate", max_relative_harm=0.2)
    v = m.update(Proportion(50000, 2500), Proportion(50000, 2510))
    assert v.status == "ok" and v.harm_ruled_out and v.ci_high <= 0.2
    m2 = GuardrailMonitor("thumbs_down_rate", max_relative_harm=0.2)
    assert not m2.update(Proportion(500, 25), Proportion(500, 25)).harm_ruled_out


def test_decrease_direction():
    m = GuardrailMonitor("thumbs_up_rate", max_relative_harm=0.1, direction="decrease")
    v = m.update(Proportion(5000, 2500), Proportion(5000, 2000))
    assert v.status == "breach" and v.threshold == -0.1 and v.ci_high < -0.1
    m = GuardrailMonitor("thumbs_up_rate", max_relative_harm=0.1, direction="decrease")
    assert m.update(Proportion(5000, 2000), Proportion(5000, 2500)).status == "ok"


def test_verdict_and_state_serialise():
    m = GuardrailMonitor("thumbs_down_rate", max_relative_harm=0.2)
    v = m.update(Proportion(3000, 150), Proportion(3000, 170))
    json.dumps(v.to_dict(), allow_nan=False)
    restored = GuardrailMonitor.from_dict(json.loads(json.dumps(m.to_dict())))
    assert restored.update(Proportion(4000, 200), Proportion(4000, 230)) == m.update(
        Proportion(4000, 200), Proportion(4000, 230)
    )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_relative_harm=0.1, max_absolute_harm=0.1), "at most one"),
        (dict(max_relative_harm=-0.1), "max_relative_harm"),
        (dict(max_absolute_harm=float("nan")), "max_absolute_harm"),
        (dict(direction="up"), "direction"),
        (dict(alpha=0.5), "alpha"),
        (dict(min_units_per_arm=1), "min_units_per_arm"),
        (dict(n_tune=-5), "n_tune"),
    ],
)
def test_bad_configuration(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GuardrailMonitor("m", **kwargs)


def test_wrong_statistic_kind():
    with pytest.raises(ValueError, match="control"):
        GuardrailMonitor("m").update({"n": 3}, Proportion(100, 1))


def test_split_alpha():
    assert split_alpha(0.05, 4) == pytest.approx(0.0125)
    assert split_alpha(0.05, 4, rule="sidak") == pytest.approx(1 - 0.95**0.25)
    assert split_alpha(0.05, 4, rule="sidak") > split_alpha(0.05, 4)
    for bad in (dict(n_guardrails=0), dict(n_guardrails=2.0), dict(n_guardrails=2, rule="holm")):
        with pytest.raises(ValueError):
            split_alpha(0.05, **bad)


def test_from_dict_without_a_metric_is_a_value_error():
    with pytest.raises(ValueError, match="metric"):
        GuardrailMonitor.from_dict({"tolerance": 0.2})
