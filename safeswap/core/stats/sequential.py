r"""Always-valid comparison of two variants: asymptotic confidence sequences.

Method
------
Waudby-Smith, Arnold, Wu, Ramdas et al., "Time-uniform central limit theory and
asymptotic confidence sequences", Annals of Statistics 2024 (arXiv:2103.06476),
in the parameterisation used by GrowthBook (``gbstats``) and Eppo:

* ``t = n_control + n_candidate`` (total units so far);
* ``V`` = variance of the estimated difference from the two arms,
  ``s2 = V * t`` its per-unit analogue;
* the mixing parameter ``rho`` is chosen so the sequence is tightest at
  ``t = n_tune`` (paper eq. 161)::

      rho = sqrt( (-2 ln a + ln(1 - 2 ln a)) / n_tune )

  with ``a = alpha`` (two-sided) or ``a = 2 alpha`` (one-sided);
* two-sided half-width (paper eq. 9)::

      hw = sqrt( s2 * 2 (t rho^2 + 1) / (t rho)^2 * ln( sqrt(t rho^2 + 1) / alpha ) )

* one-sided half-width (GrowthBook ``sequentialIntervalHalfwidthOneSided``)::

      hw = sqrt( s2 * 2 (t rho^2 + 1) / (t rho)^2 * ln( 1 + sqrt(t rho^2 + 1) / (2 alpha) ) )

Always-valid p-value: the smallest level at which the sequence (with ``rho``
held fixed) excludes the null value.  With
``A = (est - null)^2 t rho^2 / (2 V (t rho^2 + 1))`` the boundaries invert in
closed form (no bisection)::

    two-sided:  p = min(1, sqrt(t rho^2 + 1) * exp(-A))          (paper eq. 155)
    one-sided:  p = min(1, sqrt(t rho^2 + 1) / (2 (exp(A) - 1)))  if est is on the
                alternative's side of null, else 1

Differences: ``absolute`` = m_b - m_a; ``relative`` = m_b / m_a - 1 with the
delta-method variance  V = v_b / (m_a^2 n_b) + v_a m_b^2 / (m_a^4 n_a).

The hot path uses only ``math`` (no scipy frozen distributions); one call takes
a few microseconds (see ``benchmarks/bench_stats.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any, Literal

from safeswap.core.stats.sufficient import Mean, Proportion, Ratio

__all__ = [
    "SequentialResult",
    "sequential_compare",
    "sequential_rho",
    "cs_halfwidth",
    "difference_moments",
    "stratified_moments",
    "stratified_compare",
]

Difference = Literal["relative", "absolute"]
Alternative = Literal["two-sided", "greater", "less"]
_ALTERNATIVES = ("two-sided", "greater", "less")
_DIFFERENCES = ("relative", "absolute")


def _json_float(x: float) -> float | None:
    """JSON has no infinity: an unbounded side is ``None``."""
    return x if math.isfinite(x) else None


@dataclass(frozen=True, slots=True)
class SequentialResult:
    """Outcome of one look.  ``ci_low``/``ci_high`` are +-inf on the open side
    of a one-sided test; ``std_error`` is the fixed-horizon standard error of
    ``estimate`` (for reporting and for naive comparisons)."""

    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    n_control: int
    n_candidate: int
    difference: str
    alternative: str
    alpha: float
    n_tune: float
    null: float
    std_error: float
    control_estimate: float
    candidate_estimate: float

    @property
    def significant(self) -> bool:
        """True when the confidence sequence excludes ``null`` (p < alpha)."""
        return self.p_value < self.alpha

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci_low"] = _json_float(self.ci_low)
        d["ci_high"] = _json_float(self.ci_high)
        return d


def _check_alpha(alpha: float, one_sided: bool) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    upper = 0.5 if one_sided else 1.0
    if not 0.0 < alpha < upper:
        raise ValueError(f"alpha must be in (0, {upper:g}), got {alpha!r}")
    return float(alpha)


def _check_n_tune(n_tune: float) -> float:
    if isinstance(n_tune, bool) or not isinstance(n_tune, Real) or not math.isfinite(n_tune) or n_tune <= 0:
        raise ValueError(f"n_tune must be a positive finite number, got {n_tune!r}")
    return float(n_tune)


def sequential_rho(alpha: float, n_tune: float, *, one_sided: bool = False) -> float:
    """Mixing parameter making the CS tightest at ``t = n_tune`` (WSR+ eq. 161).

    One-sided sequences use ``2 alpha`` in place of ``alpha`` (as gbstats does).
    """
    a = 2.0 * _check_alpha(alpha, one_sided) if one_sided else _check_alpha(alpha, one_sided)
    n_tune = _check_n_tune(n_tune)
    log_a = math.log(a)
    return math.sqrt((-2.0 * log_a + math.log(1.0 - 2.0 * log_a)) / n_tune)


def cs_halfwidth(s2: float, t: float, alpha: float, rho: float, *, one_sided: bool = False) -> float:
    """Half-width of the asymptotic CS for per-unit variance ``s2`` at total size ``t``."""
    tr2 = t * rho * rho + 1.0
    if one_sided:
        log_term = math.log1p(math.sqrt(tr2) / (2.0 * alpha))
    else:
        log_term = math.log(math.sqrt(tr2) / alpha)
    return math.sqrt(s2 * 2.0 * tr2 / (t * rho) ** 2 * log_term)


def difference_moments(control, candidate, difference: str) -> tuple[float, float, float, float]:
    """(estimate, variance of estimate, control mean, candidate mean) of the difference.

    Relative lift uses the delta method (first-order Taylor expansion of
    m_b / m_a around the true means).
    """
    if type(control) is not type(candidate):
        raise ValueError(
            f"control and candidate must be the same statistic kind, got "
            f"{type(control).__name__} and {type(candidate).__name__}"
        )
    if not isinstance(control, (Proportion, Mean, Ratio)):
        raise ValueError(
            f"control must be a Proportion, Mean or Ratio, got {type(control).__name__}"
            " (use quantile_compare for LatencyHistogram)"
        )
    n_a, n_b = control.n, candidate.n
    if n_a < 2:
        raise ValueError(f"control needs n >= 2 units, got {n_a}")
    if n_b < 2:
        raise ValueError(f"candidate needs n >= 2 units, got {n_b}")
    m_a, m_b = control.estimate, candidate.estimate
    v_a, v_b = control.variance_of_unit, candidate.variance_of_unit
    if difference == "absolute":
        return m_b - m_a, v_a / n_a + v_b / n_b, m_a, m_b
    if difference == "relative":
        if m_a == 0.0:
            raise ValueError("control estimate is 0: the relative difference is undefined")
        m_a2 = m_a * m_a
        var = v_b / (m_a2 * n_b) + v_a * m_b * m_b / (m_a2 * m_a2 * n_a)
        return m_b / m_a - 1.0, var, m_a, m_b
    raise ValueError(f"difference must be one of {_DIFFERENCES}, got {difference!r}")


def stratified_moments(strata, difference: str) -> tuple[float, float, float, float, int, int]:
    """(estimate, variance, control mean, candidate mean, control n, candidate n) of the
    difference combined over strata (exposure cohorts) with Cochran-Mantel-Haenszel weights.

    ``strata`` is a sequence of ``(control, candidate)`` statistics. Stratum ``s`` gets
    ``w_s = n_a n_b / (n_a + n_b)`` (users); the combined means are ``M_a = sum w m_a / W``
    and ``M_b = sum w m_b / W``, so the absolute difference is ``M_b - M_a`` and the
    relative one ``M_b / M_a - 1`` (the Mantel-Haenszel risk ratio's form). Strata are
    independent (disjoint users), so ``Var(sum w m) = sum w^2 v / n`` and the relative
    variance follows by the delta method. With one stratum this is ``difference_moments``.
    Strata where an arm has fewer than 2 users or an undefined mean carry no weight.
    """
    sum_w = sum_a = sum_b = var_a = var_b = 0.0
    n_a = n_b = 0
    for control, candidate in strata:
        if type(control) is not type(candidate):
            raise ValueError(
                f"control and candidate must be the same statistic kind, got "
                f"{type(control).__name__} and {type(candidate).__name__}"
            )
        if not isinstance(control, (Proportion, Mean, Ratio)):
            raise ValueError(f"strata must hold Proportion, Mean or Ratio statistics, got {type(control).__name__}")
        na, nb = control.n, candidate.n
        if na < 2 or nb < 2 or getattr(control, "n_units", 2) < 2 or getattr(candidate, "n_units", 2) < 2:
            continue
        try:
            m_a, m_b = control.estimate, candidate.estimate
        except ValueError:  # no denominator yet in this stratum
            continue
        w = na * nb / (na + nb)
        sum_w += w
        sum_a += w * m_a
        sum_b += w * m_b
        var_a += w * w * control.variance_of_unit / na
        var_b += w * w * candidate.variance_of_unit / nb
        n_a += na
        n_b += nb
    if sum_w == 0.0:
        raise ValueError("no stratum has 2 or more users in both arms")
    mean_a, mean_b = sum_a / sum_w, sum_b / sum_w
    if difference == "absolute":
        return mean_b - mean_a, (var_a + var_b) / (sum_w * sum_w), mean_a, mean_b, n_a, n_b
    if difference == "relative":
        if sum_a == 0.0:
            raise ValueError("control estimate is 0: the relative difference is undefined")
        var = var_b / (sum_a * sum_a) + var_a * sum_b * sum_b / sum_a**4
        return sum_b / sum_a - 1.0, var, mean_a, mean_b, n_a, n_b
    raise ValueError(f"difference must be one of {_DIFFERENCES}, got {difference!r}")


def stratified_compare(
    strata,
    *,
    alpha: float = 0.05,
    n_tune: float = 5000,
    difference: Difference = "relative",
    alternative: Alternative = "two-sided",
    null: float = 0.0,
) -> SequentialResult:
    """``sequential_compare`` over strata (exposure cohorts) combined with CMH weights
    (``stratified_moments``); ``t`` is the users of both arms in the strata that count."""
    est, var, m_a, m_b, n_a, n_b = stratified_moments(strata, difference)
    return _compare_moments(
        est,
        var,
        m_a,
        m_b,
        n_a,
        n_b,
        alpha=alpha,
        n_tune=n_tune,
        difference=difference,
        alternative=alternative,
        null=null,
    )


def sequential_compare(
    control,
    candidate,
    *,
    alpha: float = 0.05,
    n_tune: float = 5000,
    difference: Difference = "relative",
    alternative: Alternative = "two-sided",
    null: float = 0.0,
) -> SequentialResult:
    """Always-valid CS and p-value for candidate vs control at this look.

    Parameters
    ----------
    control, candidate:
        ``Proportion``, ``Mean`` or ``Ratio`` (same kind) with the cumulative data.
    alpha:
        Type-I error over *all* looks (one-sided alternatives need alpha < 0.5).
    n_tune:
        Total units (both arms) at which the sequence should be tightest.
    difference:
        ``"relative"`` (m_b / m_a - 1) or ``"absolute"`` (m_b - m_a).
    alternative:
        ``"greater"``: candidate's metric larger than control's;
        ``"less"``: smaller; ``"two-sided"``.
    null:
        Value of the difference under H0 (``0`` = no change; a guardrail
        tolerance tests H0: difference <= tolerance).  Only the p-value
        depends on it.

    Returns
    -------
    SequentialResult with ``ci_low``/``ci_high`` (+-inf on the open side of a
    one-sided test) and the always-valid ``p_value``.
    """
    est, var, m_a, m_b = difference_moments(control, candidate, difference)
    return _compare_moments(
        est,
        var,
        m_a,
        m_b,
        control.n,
        candidate.n,
        alpha=alpha,
        n_tune=n_tune,
        difference=difference,
        alternative=alternative,
        null=null,
    )


def _compare_moments(
    est: float,
    var: float,
    m_a: float,
    m_b: float,
    n_a: int,
    n_b: int,
    *,
    alpha: float,
    n_tune: float,
    difference: str,
    alternative: str,
    null: float,
) -> SequentialResult:
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"alternative must be one of {_ALTERNATIVES}, got {alternative!r}")
    one_sided = alternative != "two-sided"
    alpha = _check_alpha(alpha, one_sided)
    rho = sequential_rho(alpha, n_tune, one_sided=one_sided)
    if isinstance(null, bool) or not isinstance(null, Real) or not math.isfinite(null):
        raise ValueError(f"null must be a finite number, got {null!r}")
    t = n_a + n_b
    tr2 = t * rho * rho + 1.0
    shift = est - null

    if var > 0.0:
        hw = cs_halfwidth(var * t, t, alpha, rho, one_sided=one_sided)
        big_a = shift * shift * t * rho * rho / (2.0 * var * tr2)
        # log p, so that overwhelming evidence gives p -> 0 instead of overflow.
        if one_sided:
            wrong_side = shift <= 0.0 if alternative == "greater" else shift >= 0.0
            if wrong_side or big_a == 0.0:
                p = 1.0
            else:
                log_expm1 = big_a + math.log(-math.expm1(-big_a))
                p = min(1.0, math.exp(0.5 * math.log(tr2) - math.log(2.0) - log_expm1))
        else:
            p = min(1.0, math.exp(0.5 * math.log(tr2) - big_a))
    else:
        # Both arms constant (e.g. 0 events everywhere): the data pin the difference.
        hw = 0.0
        if alternative == "greater":
            p = 0.0 if shift > 0 else 1.0
        elif alternative == "less":
            p = 0.0 if shift < 0 else 1.0
        else:
            p = 0.0 if shift != 0 else 1.0

    if alternative == "greater":
        lo, hi = est - hw, math.inf
    elif alternative == "less":
        lo, hi = -math.inf, est + hw
    else:
        lo, hi = est - hw, est + hw
    return SequentialResult(
        estimate=est,
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        n_control=n_a,
        n_candidate=n_b,
        difference=difference,
        alternative=alternative,
        alpha=alpha,
        n_tune=float(n_tune),
        null=float(null),
        std_error=math.sqrt(var),
        control_estimate=m_a,
        candidate_estimate=m_b,
    )
