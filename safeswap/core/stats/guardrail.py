"""Guardrail monitoring over repeated looks, in the rollout plan's terms.

Threshold semantics (the decision rule)
---------------------------------------
A guardrail ``max_relative_harm=0.20`` means "the candidate may be up to
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
quantiles from ``LatencyHistogram`` statistics.  Histograms with cluster moments
(users' hash buckets, what the outcomes processor publishes) take users as the
unit: per cohort, the delta method for quantiles (``quantile_strata_moments``),
cohorts combined with CMH weights like the ratio metrics, then the same
confidence sequences (and group-sequential z); older histograms without them are
pooled over cohorts and compared by the request-level ``quantile_compare``.

Strata: ``update`` also takes equal-length sequences of statistics, one pair per
exposure cohort; they are combined with Cochran-Mantel-Haenszel weights
(``stratified_compare``), so a ramp whose split changed while the baseline moved
compares like with like.

Group-sequential mode (``group_sequential={...}``, used when the plan states its
watch time): a share of alpha (default 95%) is spent by Lan-DeMets alpha spending
over the planned watch (``GroupSequentialTest``: analyses at calendar fractions of
the horizon, boundaries from the information actually gathered); the rest keeps an
always-valid confidence sequence running, which also watches past the plan. Either
breaching rolls back; both together hold alpha (union bound). The reported interval
is the confidence sequence's, at its share of alpha.

A relative guardrail on a zero control rate (no errors yet in control) is tested as
an absolute difference against 0, since +X% of 0 is 0: both arms at 0 are ``ok``
(nothing to hold the stage for), candidate-only events breach once the absolute
confidence sequence excludes 0.

Several guardrails in one rollout share the false-rollback budget: pass
``alpha=split_alpha(0.05, k)`` to each monitor.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from typing import Any, Literal

from safeswap.core.stats.gst import GroupSequentialTest
from safeswap.core.stats.sequential import (
    _check_alpha,
    _check_n_tune,
    _compare_moments,
    stratified_compare,
    stratified_moments,
)
from safeswap.core.stats.sufficient import Mean, Proportion, Ratio

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
    # Group-sequential mode: the last analysis's z statistic and boundary, alpha spent so far.
    gst_z: float | None = None
    gst_bound: float | None = None
    gst_spent: float | None = None

    @property
    def breach(self) -> bool:
        return self.status == "breach"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("estimate", "ci_low", "ci_high"):
            if d[key] is not None and not math.isfinite(d[key]):
                d[key] = None
        return d


def _level(confidence: float) -> str:
    """96.7%, not 96.6667%; 99.97%, not 100%."""
    for digits in range(3, 8):
        text = f"{confidence * 100:.{digits}g}"
        if text != "100":
            return f"{text}%"
    return f"{confidence * 100}%"


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
    max_relative_harm / max_absolute_harm:
        Tolerated harm (>= 0) in the harmful ``direction``, relative (0.20 = 20%) or
        absolute: an increase for ``"increase"``, a decrease for ``"decrease"`` (a plan's
        ``max_relative_increase`` or ``max_relative_decrease``). At most one; neither
        means tolerance 0 on the relative scale.
    direction:
        ``"increase"`` if a higher candidate value is harm, ``"decrease"`` if lower.
    alpha:
        False-rollback probability over all looks for this guardrail.
    min_units_per_arm:
        Below this, ``update`` returns ``insufficient_data`` (the CLT the CS
        relies on needs some data).
    n_tune:
        Total units (both arms) at which the confidence sequence is tightest.
    scope:
        The users compared when not all of them (a segment, ``"locale=ja"``), named in reasons.
    """

    def __init__(
        self,
        metric: str,
        *,
        max_relative_harm: float | None = None,
        max_absolute_harm: float | None = None,
        direction: Literal["increase", "decrease"] = "increase",
        alpha: float = 0.05,
        min_units_per_arm: int = 100,
        n_tune: float = 5000,
        group_sequential: dict[str, Any] | None = None,
        scope: str = "",
    ) -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must be a non-empty string, got {metric!r}")
        if max_relative_harm is not None and max_absolute_harm is not None:
            raise ValueError("give at most one of max_relative_harm and max_absolute_harm")
        if direction not in ("increase", "decrease"):
            raise ValueError(f"direction must be 'increase' or 'decrease', got {direction!r}")
        for name, value in (
            ("max_relative_harm", max_relative_harm),
            ("max_absolute_harm", max_absolute_harm),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(min_units_per_arm, bool) or not isinstance(min_units_per_arm, Integral) or min_units_per_arm < 2:
            raise ValueError(f"min_units_per_arm must be an integer >= 2, got {min_units_per_arm!r}")
        self.metric = metric
        self.scope = scope
        self.direction = direction
        self.alpha = _check_alpha(alpha, one_sided=True)
        self.n_tune = _check_n_tune(n_tune)
        self.min_units_per_arm = min_units_per_arm
        self.difference: Literal["relative", "absolute"] = "absolute" if max_absolute_harm is not None else "relative"
        self.tolerance = float(max_absolute_harm if max_absolute_harm is not None else (max_relative_harm or 0.0))
        if self.difference == "relative" and direction == "decrease" and self.tolerance >= 1:
            raise ValueError("max_relative_harm must be < 1 for direction='decrease' (a drop cannot exceed 100%)")
        match = _QUANTILE_METRIC.search(metric)
        self.quantile: float | None = int(match.group(1)) / 100 if match else None
        if self.quantile is not None and not 0 < self.quantile < 1:
            raise ValueError(f"metric {metric!r}: quantile suffix must be between _p1 and _p99")
        # Group-sequential mode: its share of alpha for the spending plan, the rest for the CS.
        self.group_sequential = dict(group_sequential) if group_sequential else None
        self.gst: GroupSequentialTest | None = None
        self.cs_alpha = self.alpha
        if self.group_sequential is not None:
            share = float(self.group_sequential.get("share", 0.95))
            if not 0 < share < 1:
                raise ValueError(f"group_sequential share must be in (0, 1), got {share!r}")
            self.cs_alpha = self.alpha * (1 - share)
            self.gst = GroupSequentialTest(
                alpha=self.alpha * share,
                spending=self.group_sequential.get("spending", "hsd"),
                param=self.group_sequential.get("param"),
                analyses=int(self.group_sequential.get("analyses", 50)),
            )
        self.gst_z: float | None = None
        self.gst_bound: float | None = None
        # Running state (always-valid: intersect over looks, minimum p-value).
        self.ci_low = -math.inf
        self.ci_high = math.inf
        self.p_value = 1.0
        self.looks = 0

    @property
    def threshold(self) -> float:
        """Tolerance as a signed difference on the metric's scale."""
        return self.tolerance if self.direction == "increase" else -self.tolerance

    def _compare(self, strata):
        """(estimate, lower bound, upper bound, p-value of H0: harm <= tolerance, z, information)."""
        harm_alt = "greater" if self.direction == "increase" else "less"
        if self.quantile is not None:
            from safeswap.core.stats.quantiles import quantile_compare, quantile_strata_moments

            if _clustered(strata):
                # Users as the unit (delta method over users' hash buckets), cohorts combined
                # with CMH weights, then the same confidence sequences as the ratio metrics.
                est, var, m_a, m_b, n_a, n_b = quantile_strata_moments(strata, self.quantile, self.difference)
                kw = {
                    "alpha": self.cs_alpha,
                    "n_tune": self.n_tune,
                    "difference": self.difference,
                    "null": self.threshold,
                }
                lower = _compare_moments(est, var, m_a, m_b, n_a, n_b, alternative="greater", **kw)
                upper = _compare_moments(est, var, m_a, m_b, n_a, n_b, alternative="less", **kw)
                p = lower.p_value if self.direction == "increase" else upper.p_value
                z = information = None
                if lower.std_error > 0:
                    harm = est - self.threshold if self.direction == "increase" else self.threshold - est
                    z, information = harm / lower.std_error, 1.0 / lower.std_error**2
                return est, lower.ci_low, upper.ci_high, p, z, information
            # Histograms without cluster moments (snapshots written before them): the exact
            # request-level sequence on the histograms pooled over cohorts.
            control, candidate = _pooled(strata)
            r = quantile_compare(
                control,
                candidate,
                q=self.quantile,
                alpha=self.cs_alpha,
                n_tune=self.n_tune,
                difference=self.difference,
                alternative=harm_alt,
                null=self.threshold,
            )
            return r.estimate, r.ci_low, r.ci_high, r.p_value, None, None
        # one set of combined moments for both one-sided bounds (the decide agent's hot path)
        moments = stratified_moments(strata, self.difference)
        kw = dict(alpha=self.cs_alpha, n_tune=self.n_tune, difference=self.difference, null=self.threshold)
        lower = _compare_moments(*moments, alternative="greater", **kw)
        upper = _compare_moments(*moments, alternative="less", **kw)
        p = lower.p_value if self.direction == "increase" else upper.p_value
        z = information = None
        if lower.std_error > 0:
            harm = lower.estimate - self.threshold if self.direction == "increase" else self.threshold - lower.estimate
            z, information = harm / lower.std_error, 1.0 / lower.std_error**2
        return lower.estimate, lower.ci_low, upper.ci_high, p, z, information

    def _check_inputs(self, strata) -> str | None:
        """Raise on wrong types; return a reason string when data are insufficient."""
        if self.quantile is not None:
            from safeswap.core.stats.quantiles import LatencyHistogram

            expected: tuple[type, ...] = (LatencyHistogram,)
        else:
            expected = (Proportion, Mean, Ratio)
        if not strata:
            raise ValueError(f"metric {self.metric!r}: no statistics to compare")
        for control, candidate in strata:
            for name, stat in (("control", control), ("candidate", candidate)):
                if not isinstance(stat, expected):
                    raise ValueError(
                        f"{name} for metric {self.metric!r} must be "
                        f"{' or '.join(c.__name__ for c in expected)}, got {type(stat).__name__}"
                    )
            if type(control) is not type(candidate):
                raise ValueError(
                    f"control and candidate must be the same kind, got {type(control).__name__} and "
                    f"{type(candidate).__name__}"
                )
        if self.quantile is not None and _clustered(strata):
            # Clustered histograms: the units are users, and every estimability problem (no
            # data, < 2 buckets, a quantile outside the histogram's range) is insufficient data.
            from safeswap.core.stats.quantiles import quantile_strata_moments

            users_control, users_candidate = (sum(pair[i].users for pair in strata) for i in (0, 1))
            if min(users_control, users_candidate) < self.min_units_per_arm:
                return (
                    f"{self._named}: {users_control} control / {users_candidate} candidate users, "
                    f"need {self.min_units_per_arm} per arm"
                )
            try:
                quantile_strata_moments(strata, self.quantile, self.difference)
            except ValueError as exc:
                return f"{self._named}: {exc}"
            return None
        n_control, n_candidate = (sum(pair[i].n for pair in strata) for i in (0, 1))
        if min(n_control, n_candidate) < self.min_units_per_arm:
            return (
                f"{self._named}: {n_control} control / {n_candidate} candidate units, "
                f"need {self.min_units_per_arm} per arm"
            )
        if self.quantile is not None and self.difference == "relative":
            try:
                base = _pooled(strata)[0].quantile(self.quantile)
            except ValueError as exc:
                return f"{self._named}: {exc}"
            if base == 0:
                return f"{self._named}: control value is 0, relative change undefined yet"
        elif self.quantile is None:
            try:
                stratified_moments(strata, "absolute")
            except ValueError as exc:
                return f"{self._named}: {exc}"
        return None

    def update(self, control, candidate, *, fraction: float | None = None) -> GuardrailVerdict:
        """Fold in the cumulative statistics of a new look and return the verdict.

        ``control`` and ``candidate`` are statistics, or equal-length sequences of them
        (one per exposure cohort). ``fraction``: the share of the plan's watch time
        elapsed (event time), for the group-sequential analyses; None without a plan horizon.
        """
        strata = _strata(control, candidate)
        insufficient = self._check_inputs(strata)  # raises on wrong kinds first
        n_control, n_candidate = (sum(_users(pair[i]) for pair in strata) for i in (0, 1))
        relative = self.difference == "relative"
        if insufficient is not None:
            return self._verdict("insufficient_data", None, n_control, n_candidate, insufficient)
        if relative and self.quantile is None and stratified_moments(strata, "absolute")[2] == 0.0:
            return self._zero_control(strata, n_control, n_candidate)
        estimate, lo, hi, p, z, information = self._compare(strata)
        self.looks += 1
        self.ci_low = max(self.ci_low, lo)
        self.ci_high = min(self.ci_high, hi)
        self.p_value = min(self.p_value, p)
        if self.direction == "increase":
            breach = self.ci_low > self.threshold
        else:
            breach = self.ci_high < self.threshold
        gst_breach = False
        if self.gst is not None and fraction is not None and z is not None and information is not None:
            look = self.gst.observe(fraction, information, z)
            if look.analysed:
                self.gst_z, self.gst_bound = z, look.bound
                gst_breach = look.breach
        # Two one-sided (1 - alpha) bounds make a (1 - 2 alpha) two-sided interval.
        level = _level(1 - 2 * self.cs_alpha)
        ci = f"always-valid {level} CI {_fmt(self.ci_low, relative)}..{_fmt(self.ci_high, relative)}"
        head = f"{self.metric} {_fmt(estimate, relative)} vs control{self._in_scope} ({ci})"
        limit = f"the {_fmt(self.threshold, relative)} limit"
        if gst_breach and not breach:
            reason = (
                f"{head} exceeds {limit}: group-sequential z {self.gst_z:.2f} >= bound {self.gst_bound:.2f} "
                f"at {min(fraction, 1.0):.0%} of the planned watch"
            )
        elif breach:
            reason = f"{head} exceeds {limit}"
        elif self._harm_ruled_out():
            reason = f"{head} within {limit}; harm beyond it ruled out"
        else:
            reason = f"{head} not shown to exceed {limit}"
        status = "breach" if breach or gst_breach else "ok"
        return self._verdict(status, estimate, n_control, n_candidate, reason)

    def _zero_control(self, strata, n_control: int, n_candidate: int) -> GuardrailVerdict:
        """Relative tolerance on a zero control rate: +X% of 0 is 0, so the absolute
        difference is tested against 0 (not folded into the relative intervals)."""
        harm_alt = "greater" if self.direction == "increase" else "less"
        result = stratified_compare(
            strata, alpha=self.cs_alpha, n_tune=self.n_tune, difference="absolute", alternative=harm_alt, null=0.0
        )
        candidate_rate = result.candidate_estimate
        if candidate_rate == 0.0:
            return self._verdict(
                "ok",
                None,
                n_control,
                n_candidate,
                (
                    f"{self._named}: 0 in both arms so far ({n_control:,} control / {n_candidate:,} candidate users); "
                    "a relative change from 0 is undefined, so it counts as ok until control has events"
                ),
            )
        bound = result.ci_low if harm_alt == "greater" else result.ci_high
        what = (
            f"{self._named}: control 0, candidate {candidate_rate:.4g} (tested as an absolute difference, "
            f"always-valid bound {_fmt(bound, False)}); with control at 0, any harm shown breaches a relative limit"
        )
        if result.significant:
            return self._verdict("breach", None, n_control, n_candidate, what)
        return self._verdict("ok", None, n_control, n_candidate, f"{what}: none shown yet")

    @property
    def _in_scope(self) -> str:
        return f" in {self.scope}" if self.scope else ""

    @property
    def _named(self) -> str:
        return f"{self.metric}{self._in_scope}"

    def _harm_ruled_out(self) -> bool:
        if self.looks == 0:
            return False
        if self.direction == "increase":
            return self.ci_high <= self.threshold
        return self.ci_low >= self.threshold

    def _verdict(self, status, estimate, n_control, n_candidate, reason) -> GuardrailVerdict:
        has_ci = self.looks > 0
        return GuardrailVerdict(
            metric=self.metric,
            status=status,
            estimate=estimate,
            ci_low=self.ci_low if has_ci else None,
            ci_high=self.ci_high if has_ci else None,
            p_value=self.p_value,
            n_control=int(n_control),
            n_candidate=int(n_candidate),
            threshold=self.threshold,
            difference=self.difference,
            direction=self.direction,
            alpha=self.alpha,
            harm_ruled_out=self._harm_ruled_out(),
            looks=self.looks,
            reason=reason,
            gst_z=self.gst_z,
            gst_bound=self.gst_bound,
            gst_spent=self.gst.spent if self.gst is not None else None,
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
            "group_sequential": self.group_sequential,
            "gst": self.gst.to_dict() if self.gst is not None else None,
            "gst_z": self.gst_z,
            "gst_bound": self.gst_bound,
            "scope": self.scope,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuardrailMonitor:
        if not isinstance(data, dict) or "metric" not in data:
            raise ValueError(f"a guardrail monitor needs a 'metric', got {data!r}")
        key = "max_absolute_harm" if data.get("difference") == "absolute" else "max_relative_harm"
        monitor = cls(
            data["metric"],
            **{key: data.get("tolerance", 0.0)},
            direction=data.get("direction", "increase"),
            alpha=data.get("alpha", 0.05),
            min_units_per_arm=data.get("min_units_per_arm", 100),
            n_tune=data.get("n_tune", 5000),
            group_sequential=data.get("group_sequential"),
            scope=data.get("scope", ""),
        )
        if data.get("gst") is not None:
            monitor.gst = GroupSequentialTest.from_dict(data["gst"])
        monitor.gst_z, monitor.gst_bound = data.get("gst_z"), data.get("gst_bound")
        monitor.ci_low = -math.inf if data.get("ci_low") is None else float(data["ci_low"])
        monitor.ci_high = math.inf if data.get("ci_high") is None else float(data["ci_high"])
        monitor.p_value = float(data.get("p_value", 1.0))
        monitor.looks = int(data.get("looks", 0))
        return monitor


def _strata(control, candidate) -> list[tuple[Any, Any]]:
    """One (control, candidate) pair per stratum, from single statistics or sequences."""
    if isinstance(control, (list, tuple)) or isinstance(candidate, (list, tuple)):
        if (
            not isinstance(control, (list, tuple))
            or not isinstance(candidate, (list, tuple))
            or len(control) != len(candidate)
        ):
            raise ValueError("control and candidate strata must be sequences of the same length")
        return list(zip(control, candidate))
    return [(control, candidate)]


def _clustered(strata) -> bool:
    """Every histogram carries cluster moments (users as the unit); otherwise (snapshots written
    before them, in any stratum) the request-level path is the only one that applies to all."""
    return all(getattr(stat, "clusters", None) is not None for pair in strata for stat in pair)


def _users(stat) -> int:
    """Distinct users behind a statistic (a histogram with cluster moments knows them; one
    without counts requests, its only unit)."""
    users = getattr(stat, "users", None)
    return stat.n if users is None else users


def _pooled(strata):
    """Histograms without cluster moments are compared pooled over strata (histograms add):
    the request-level sequence has no per-cohort combination."""
    control, candidate = strata[0]
    for a, b in strata[1:]:
        control, candidate = control + a, candidate + b
    return control, candidate
