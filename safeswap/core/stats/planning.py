r"""Sample-size planning for fixed-horizon and sequential (always-valid) tests.

Fixed horizon (Wald z-test on the absolute difference delta = baseline * relative_mde,
unpooled variance)::

    n_per_arm = (z_{1-a} + z_{power})^2 * (v_control + v_candidate) * variance_inflation / delta^2

with a = alpha (one-sided) or alpha/2 (two-sided); for proportions
v = p (1 - p) at p_control = baseline and p_candidate = baseline (1 + mde); for
means v = std^2 in both arms.

Sequential (approximation): the smallest n per arm at which an effect of size
delta is detected by the confidence sequence with probability ``power`` *at
that look*::

    delta >= hw(n) + z_{power} * SE(n),   SE(n) = sqrt((v_a + v_b) * inflation / n)

where hw is the CS half-width of ``safeswap.core.stats.sequential`` at t = 2 n
(one- or two-sided, rho tuned at ``n_tune`` total units).  Because the test
may also stop at any earlier look, the true power at n is a little higher:
the figure is conservative (see docs/statistics.md for simulated stop times).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any, Literal

from scipy.special import ndtri

from safeswap.core.stats.sequential import _check_alpha, _check_n_tune, cs_halfwidth, sequential_rho

__all__ = ["SamplePlan", "plan_sample_size", "watch_hours"]


@dataclass(frozen=True, slots=True)
class SamplePlan:
    fixed_horizon_per_arm: int
    sequential_per_arm: int
    users_per_arm: int  # the one matching ``sequential``
    baseline: float
    relative_mde: float
    absolute_mde: float
    alpha: float
    power: float
    kind: str
    alternative: str
    sequential: bool
    variance_inflation: float
    n_tune: float
    # 2x the fixed-horizon n per arm: where a sequential test of this effect
    # typically decides, so where its confidence sequence should be tightest.
    recommended_n_tune: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive(name: str, value: Any, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if upper is not None and value >= upper:
        raise ValueError(f"{name} must be < {upper:g}, got {value!r}")
    return float(value)


def plan_sample_size(
    baseline: float,
    relative_mde: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    kind: Literal["proportion", "mean"] = "proportion",
    sequential: bool = True,
    alternative: Literal["greater", "less", "two-sided"] = "greater",
    variance_inflation: float = 1.0,
    std: float | None = None,
    n_tune: float = 5000,
) -> SamplePlan:
    """Users per arm to detect ``baseline -> baseline * (1 + relative_mde)``.

    ``variance_inflation`` multiplies the per-unit variance (design effect,
    e.g. for ratio metrics with clustered requests).  ``std`` is required for
    ``kind="mean"``.
    """
    if kind not in ("proportion", "mean"):
        raise ValueError(f"kind must be 'proportion' or 'mean', got {kind!r}")
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    if not isinstance(sequential, bool):
        raise ValueError(f"sequential must be True or False, got {sequential!r}")
    one_sided = alternative != "two-sided"
    alpha = _check_alpha(alpha, one_sided)
    power = _positive("power", power, upper=1.0)
    if power <= 0.5:
        raise ValueError(f"power must be in (0.5, 1), got {power!r}")
    variance_inflation = _positive("variance_inflation", variance_inflation)
    n_tune = _check_n_tune(n_tune)
    if (
        isinstance(relative_mde, bool)
        or not isinstance(relative_mde, Real)
        or not math.isfinite(relative_mde)
        or relative_mde == 0
    ):
        raise ValueError(f"relative_mde must be a non-zero finite number, got {relative_mde!r}")
    if kind == "proportion":
        p_a = _positive("baseline", baseline, upper=1.0)
        p_b = p_a * (1 + relative_mde)
        if not 0 < p_b < 1:
            raise ValueError(f"baseline * (1 + relative_mde) must be in (0, 1), got {p_b:g}")
        var_sum = p_a * (1 - p_a) + p_b * (1 - p_b)
    else:
        if isinstance(baseline, bool) or not isinstance(baseline, Real) or not math.isfinite(baseline) or baseline == 0:
            raise ValueError(f"baseline must be a non-zero finite number, got {baseline!r}")
        if std is None:
            raise ValueError("std is required for kind='mean'")
        std = _positive("std", std)
        var_sum = 2 * std * std
    var_sum *= variance_inflation
    delta = abs(baseline * relative_mde)
    z_alpha = float(ndtri(1 - (alpha if one_sided else alpha / 2)))
    z_power = float(ndtri(power))
    fixed = math.ceil((z_alpha + z_power) ** 2 * var_sum / delta**2)

    rho = sequential_rho(alpha, n_tune, one_sided=one_sided)

    def margin(n: float) -> float:
        t = 2 * n
        se2 = var_sum / n
        return delta - cs_halfwidth(se2 * t, t, alpha, rho, one_sided=one_sided) - z_power * math.sqrt(se2)

    # margin < 0 at small n and > 0 for large n (hw ~ sqrt(log n / n)).
    hi = float(fixed)
    while margin(hi) < 0:
        hi *= 2
        if hi > 1e13:
            raise ValueError("sequential sample size exceeds 1e13 per arm; check the inputs")
    from scipy.optimize import brentq  # here, not at the top: importing scipy.optimize takes ~0.5 s

    seq = math.ceil(brentq(margin, 2.0, hi, xtol=0.5))
    return SamplePlan(
        fixed_horizon_per_arm=fixed,
        sequential_per_arm=seq,
        users_per_arm=seq if sequential else fixed,
        baseline=float(baseline),
        relative_mde=float(relative_mde),
        absolute_mde=delta,
        alpha=alpha,
        power=power,
        kind=kind,
        alternative=alternative,
        sequential=bool(sequential),
        variance_inflation=variance_inflation,
        n_tune=n_tune,
        recommended_n_tune=2 * fixed,
    )


def watch_hours(users_per_arm: float, users_per_hour: float, percent: float) -> float:
    """Hours of traffic until each arm has ``users_per_arm`` users.

    The candidate gets ``percent`` % of ``users_per_hour``; control gets an
    equal slice or the rest, so the smaller arm, min(percent, 100 - percent) %,
    sets the pace.
    """
    users_per_arm = _positive("users_per_arm", users_per_arm)
    users_per_hour = _positive("users_per_hour", users_per_hour)
    percent = _positive("percent", percent)
    if percent >= 100:
        raise ValueError(f"percent must be in (0, 100), got {percent!r}")
    return users_per_arm / (users_per_hour * min(percent, 100 - percent) / 100)
