"""Guardrail monitoring over repeated looks, in the rollout plan's terms.

Threshold semantics (the decision rule)
---------------------------------------
A guardrail ``max_relative_increase=0.20`` means "the candidate may be up to
20% worse than control".  We roll back only when we are *confident the harm is
larger than the tolerance*: a one-sided always-valid test of

    H0: harm <= tolerance   vs   H1: harm > tolerance

``breach`` <=> the always-valid one-sided (1 - alpha) lower bound of the harm
exceeds the tolerance (equivalently the running-minimum p-value of that test
is below alpha).  Under H0 the probability of *ever* breaching, over all looks,
is at most alpha (asymptotically).  With no threshold given the tolerance is
0, i.e. "any harm detected".  ``harm_ruled_out`` is the mirror statement: the
one-sided upper bound of the harm is at or below the tolerance; the controller
can use it for promotion.

The reported interval ``[ci_low, ci_high]`` is made of those two one-sided
(1 - alpha) bounds, each intersected over looks (running max of the lower,
running min of the upper) so it only shrinks and stays always-valid; together
they cover with probability 1 - 2 alpha, and reasons label it so (90% at
alpha 0.05).  The decision uses only the one-sided bound on the harm side.

``direction="increase"``: harm = candidate's metric goes up (thumbs-down
rate, latency).  ``direction="decrease"``: harm = it goes down (e.g. thumbs-up
rate); the tolerance is then the allowed drop, and the threshold is reported
as a negative difference.

Metrics whose name ends in ``_pNN`` (``latency_ms_p95``) are compared as
quantiles from ``LatencyHistogram`` statistics with ``quantile_compare``.

Several guardrails in one rollout share the false-rollback budget: pass
``alpha=split_alpha(0.05, k)`` to each monitor.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from safeswap.stats.sequential import _check_alpha, _check_n_tune, sequential_compare
from safeswap.stats.sufficient import Mean, Proportion, Ratio

__all__ = ["GuardrailMonitor", "GuardrailVerdict", "split_alpha"]

# "latency_ms_p95", also per stratum: "latency_ms_p95_cache_hit".
_QUANTILE_METRIC = re.compile(r"_p(\d{1,2})(?:_|$)")


def split_alpha(alpha: float, n_guardrails: int, rule: Literal["bonferroni", "sidak"] = "bonferroni") -> float:
    """Per-guardrail alpha so that k guardrails together roll back falsely w.p. <= alpha.

    ``bonferroni``: alpha / k (union bound; valid under any dependence between
    guardrails, which are correlated because they share users).
    ``sidak``: 1 - (1 - alpha)^(1/k) (exact for independent tests, slightly
    larger; valid under positive dependence only).
    """
    alpha = _check_alpha(alpha, one_sided=False)
    if isinstance(n_guardrails, bool) or not isinstance(n_guardrails, Integral) or n_guardrails < 1:
        raise ValueError(f"n_guardrails must be an integer >= 1, got {n_guardrails!r}")
    if rule == "bonferroni":
        return alpha / n_guardrails
    if rule == "sidak":
        return -math.expm1(math.log1p(-alpha) / n_guardrails)
    raise ValueError(f"rule must be 'bonferroni' or 'sidak', got {rule!r}")


@dataclass(frozen=True, slots=True)
class GuardrailVerdict:
    """Decision at one look.  Differences are candidate vs control on the
    metric's scale (relative: m_b / m_a - 1; absolute: m_b - m_a)."""

    metric: str
    status: Literal["insufficient_data", "ok", "breach"]
    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float
    n_control: int
    n_candidate: int
    threshold: float
    difference: Literal["relative", "absolute"]
    direction: Literal["increase", "decrease"]
    alpha: float
    harm_ruled_out: bool
    looks: int
    reason: str

    @property
    def breach(self) -> bool:
        return self.status == "breach"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("estimate", "ci_low", "ci_high"):
            if d[key] is not None and not math.isfinite(d[key]):
                d[key] = None
        return d


def _fmt(x: float, relative: bool) -> str:
    if not math.isfinite(x):
        return "+inf" if x > 0 else "-inf"
    if relative:
        return f"{x * 100:+.1f}%"
    return f"{x:+.4g}"


class GuardrailMonitor:
    """Stateful always-valid guardrail for one metric over the looks of a rollout.

    Parameters
    ----------
    metric:
        Metric name, used in reasons; ``*_pNN`` names are quantile guardrails.
    max_relative_increase / max_absolute_increase:
        Tolerated harm (>= 0), relative (0.20 = 20%) or absolute.  At most one;
        neither means tolerance 0 on the relative scale.
    direction:
        ``"increase"`` if a higher candidate value is harm, ``"decrease"`` if lower.
    alpha:
        False-rollback probability over all looks for this guardrail.
    min_units_per_arm:
        Below this, ``update`` returns ``insufficient_data`` (the CLT the CS
        relies on needs some data).
    n_tune:
        Total units (both arms) at which the confidence sequence is tightest.
    """

    def __init__(
        self,
        metric: str,
        *,
        max_relative_increase: float | None = None,
        max_absolute_increase: float | None = None,
        direction: Literal["increase", "decrease"] = "increase",
        alpha: float = 0.05,
        min_units_per_arm: int = 100,
        n_tune: float = 5000,
    ) -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must be a non-empty string, got {metric!r}")
        if max_relative_increase is not None and max_absolute_increase is not None:
            raise ValueError("give at most one of max_relative_increase and max_absolute_increase")
        if direction not in ("increase", "decrease"):
            raise ValueError(f"direction must be 'increase' or 'decrease', got {direction!r}")
        for name, value in (
            ("max_relative_increase", max_relative_increase),
            ("max_absolute_increase", max_absolute_increase),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(min_units_per_arm, bool) or not isinstance(min_units_per_arm, Integral) or min_units_per_arm < 2:
            raise ValueError(f"min_units_per_arm must be an integer >= 2, got {min_units_per_arm!r}")
        self.metric = metric
        self.direction = direction
        self.alpha = _check_alpha(alpha, one_sided=True)
        self.n_tune = _check_n_tune(n_tune)
        self.min_units_per_arm = min_units_per_arm
        self.difference: Literal["relative", "absolute"] = (
            "absolute" if max_absolute_increase is not None else "relative"
        )
        self.tolerance = float(max_absolute_increase if max_absolute_increase is not None else (max_relative_increase or 0.0))
        if self.difference == "relative" and direction == "decrease" and self.tolerance >= 1:
            raise ValueError("max_relative_increase must be < 1 for direction='decrease' (a drop cannot exceed 100%)")
        match = _QUANTILE_METRIC.search(metric)
        self.quantile: float | None = int(match.group(1)) / 100 if match else None
        if self.quantile is not None and not 0 < self.quantile < 1:
            raise ValueError(f"metric {metric!r}: quantile suffix must be between _p1 and _p99")
        # Running state (always-valid: intersect over looks, minimum p-value).
        self.ci_low = -math.inf
        self.ci_high = math.inf
        self.p_value = 1.0
        self.looks = 0

    @property
    def threshold(self) -> float:
        """Tolerance as a signed difference on the metric's scale."""
        return self.tolerance if self.direction == "increase" else -self.tolerance

    def _compare(self, control, candidate):
        """(estimate, lower bound, upper bound, p-value of H0: harm <= tolerance)."""
        harm_alt = "greater" if self.direction == "increase" else "less"
        if self.quantile is not None:
            from safeswap.stats.quantiles import quantile_compare

            r = quantile_compare(
                control, candidate, q=self.quantile, alpha=self.alpha, n_tune=self.n_tune,
                difference=self.difference, alternative=harm_alt, null=self.threshold,
            )
            return r.estimate, r.ci_low, r.ci_high, r.p_value
        kw = dict(alpha=self.alpha, n_tune=self.n_tune, difference=self.difference)
        lower = sequential_compare(control, candidate, alternative="greater",
                                   null=self.threshold, **kw)
        upper = sequential_compare(control, candidate, alternative="less",
                                   null=self.threshold, **kw)
        p = lower.p_value if self.direction == "increase" else upper.p_value
        return lower.estimate, lower.ci_low, upper.ci_high, p

    def _check_inputs(self, control, candidate) -> str | None:
        """Raise on wrong types; return a reason string when data are insufficient."""
        if self.quantile is not None:
            from safeswap.stats.quantiles import LatencyHistogram

            expected: tuple[type, ...] = (LatencyHistogram,)
        else:
            expected = (Proportion, Mean, Ratio)
        for name, stat in (("control", control), ("candidate", candidate)):
            if not isinstance(stat, expected):
                raise ValueError(
                    f"{name} for metric {self.metric!r} must be "
                    f"{' or '.join(c.__name__ for c in expected)}, got {type(stat).__name__}"
                )
        if type(control) is not type(candidate):
            raise ValueError(
                f"control and candidate must be the same kind, got {type(control).__name__} and {type(candidate).__name__}"
            )
        if min(control.n, candidate.n) < self.min_units_per_arm:
            return (
                f"{self.metric}: {control.n} control / {candidate.n} candidate units, "
                f"need {self.min_units_per_arm} per arm"
            )
        if self.difference == "relative":
            try:
                base = control.quantile(self.quantile) if self.quantile is not None else control.estimate
            except ValueError as exc:
                return f"{self.metric}: {exc}"
            if base == 0:
                return f"{self.metric}: control value is 0, relative change undefined yet"
        return None

    def update(self, control, candidate) -> GuardrailVerdict:
        """Fold in the cumulative statistics of a new look and return the verdict."""
        insufficient = self._check_inputs(control, candidate)
        relative = self.difference == "relative"
        if insufficient is not None:
            return self._verdict("insufficient_data", None, control, candidate, insufficient)
        estimate, lo, hi, p = self._compare(control, candidate)
        self.looks += 1
        self.ci_low = max(self.ci_low, lo)
        self.ci_high = min(self.ci_high, hi)
        self.p_value = min(self.p_value, p)
        if self.direction == "increase":
            breach = self.ci_low > self.threshold
        else:
            breach = self.ci_high < self.threshold
        # Two one-sided (1 - alpha) bounds make a (1 - 2 alpha) two-sided interval.
        level = f"{(1 - 2 * self.alpha) * 100:.3g}%"  # 96.7%, not 96.6667%
        ci = f"always-valid {level} CI {_fmt(self.ci_low, relative)}..{_fmt(self.ci_high, relative)}"
        head = f"{self.metric} {_fmt(estimate, relative)} vs control ({ci})"
        limit = f"the {_fmt(self.threshold, relative)} limit"
        if breach:
            reason = f"{head} exceeds {limit}"
        elif self._harm_ruled_out():
            reason = f"{head} within {limit}; harm beyond it ruled out"
        else:
            reason = f"{head} not shown to exceed {limit}"
        return self._verdict("breach" if breach else "ok", estimate, control, candidate, reason)

    def _harm_ruled_out(self) -> bool:
        if self.looks == 0:
            return False
        if self.direction == "increase":
            return self.ci_high <= self.threshold
        return self.ci_low >= self.threshold

    def _verdict(self, status, estimate, control, candidate, reason) -> GuardrailVerdict:
        has_ci = self.looks > 0
        return GuardrailVerdict(
            metric=self.metric,
            status=status,
            estimate=estimate,
            ci_low=self.ci_low if has_ci else None,
            ci_high=self.ci_high if has_ci else None,
            p_value=self.p_value,
            n_control=int(control.n),
            n_candidate=int(candidate.n),
            threshold=self.threshold,
            difference=self.difference,
            direction=self.direction,
            alpha=self.alpha,
            harm_ruled_out=self._harm_ruled_out(),
            looks=self.looks,
            reason=reason,
        )

    def to_dict(self) -> dict[str, Any]:
        """Configuration and running state, JSON-able, so a restarted agent keeps its intervals."""
        return {
            "metric": self.metric,
            "difference": self.difference,
            "tolerance": self.tolerance,
            "direction": self.direction,
            "alpha": self.alpha,
            "min_units_per_arm": self.min_units_per_arm,
            "n_tune": self.n_tune,
            "ci_low": self.ci_low if math.isfinite(self.ci_low) else None,
            "ci_high": self.ci_high if math.isfinite(self.ci_high) else None,
            "p_value": self.p_value,
            "looks": self.looks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GuardrailMonitor":
        if not isinstance(data, dict) or "metric" not in data:
            raise ValueError(f"a guardrail monitor needs a 'metric', got {data!r}")
        key = "max_absolute_increase" if data.get("difference") == "absolute" else "max_relative_increase"
        monitor = cls(
            data["metric"],
            **{key: data.get("tolerance", 0.0)},
            direction=data.get("direction", "increase"),
            alpha=data.get("alpha", 0.05),
            min_units_per_arm=data.get("min_units_per_arm", 100),
            n_tune=data.get("n_tune", 5000),
        )
        monitor.ci_low = -math.inf if data.get("ci_low") is None else float(data["ci_low"])
        monitor.ci_high = math.inf if data.get("ci_high") is None else float(data["ci_high"])
        monitor.p_value = float(data.get("p_value", 1.0))
        monitor.looks = int(data.get("looks", 0))
        return monitor
