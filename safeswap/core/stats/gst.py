r"""Group-sequential boundaries with Lan-DeMets alpha spending.

A one-sided group-sequential test looks at a z statistic ``Z_k`` at analyses
k = 1..K and rejects H0 ("no harm") the first time ``Z_k >= b_k``.  Under H0
the statistics behave like Brownian motion observed at information levels
I_1 < ... < I_K: ``corr(Z_j, Z_k) = sqrt(I_j / I_k)``.  The boundaries are chosen
so that the probability of *first* crossing at analysis k equals the alpha
spent between the previous and the current spending time (Lan & DeMets 1983).
The spending time is the product's calendar fraction of the planned watch time,
while the joint distribution uses the information actually gathered, so the
overall crossing probability is exactly the alpha spent even when traffic runs
at 0.7x or 1.3x of plan, and the test stays valid when the number and timing of
analyses were not fixed in advance.

Crossing probabilities come from the recursive numerical integration of
Jennison & Turnbull (2000), ch. 19 (the algorithm of R's gsDesign): the
sub-density of Z_k on the continuation region is carried on a Simpson grid of
about 12 r points (r = 18 per unit of the canonical scale) and each boundary
is solved with Brent's method.

Spending functions (t = spending time in [0, 1], cumulative one-sided alpha):

* ``"obf"``: Lan-DeMets O'Brien-Fleming type, ``2 - 2 Phi(z_{1-alpha/2} / sqrt(t))``
* ``"pocock"``: Lan-DeMets Pocock type, ``alpha ln(1 + (e - 1) t)``
* ``"hsd"``: Hwang, Shih & DeCani (1990), ``alpha (1 - e^{-gamma t}) / (1 - e^{-gamma})``;
  ``param`` = gamma, default -1 (gamma = 0 is linear spending ``alpha t``)
* ``"power"``: Kim & DeMets (1987), ``alpha t^rho``; ``param`` = rho > 0, default 3

References: Lan, K.K.G. & DeMets, D.L. (1983), Biometrika 70, 659-663.
Jennison, C. & Turnbull, B.W. (2000), Group Sequential Methods with
Applications to Clinical Trials, ch. 19.  Hwang, I.K., Shih, W.J. & DeCani,
J.S. (1990), Statistics in Medicine 9, 1439-1445.  Kim, K. & DeMets, D.L.
(1987), Biometrika 74, 149-154.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtr, ndtri

__all__ = ["SPENDING_FUNCTIONS", "GSTLook", "GroupSequentialTest", "gst_bounds", "spending_alpha"]

SPENDING_FUNCTIONS = ("obf", "pocock", "hsd", "power")
_DEFAULT_PARAM = {"hsd": -1.0, "power": 3.0}

# Grid points per unit of the canonical scale (gsDesign's default): crossing
# probabilities agree with an r = 36 evaluation to ~1e-7, at ~0.5 ms per analysis.
_R = 18
# An analysis that spends less than this gets an infinite boundary: a finite
# boundary for it would sit beyond z ~ 8 and could not be solved reliably.
_MIN_INCREMENT = 1e-15
# Tolerance on grid-point arrival: a controller computing elapsed / horizon
# may land on 0.019999999999 for the grid point 0.02.
_GRID_EPS = 1e-9
# Relative information growth below which an analysis is postponed.  The
# transition kernel between analyses has sd sqrt(delta / I); when that is much
# narrower than the grid spacing the quadrature loses accuracy (conservative in
# our checks: down to 0.044 instead of 0.05 at 3e-4 relative growth, exact to Monte-
# Carlo precision from 1e-3 up).  At planned traffic consecutive analyses of a
# 50-point grid differ by >= 2%, so only a near-stall of traffic hits this.
_MIN_GROWTH = 1e-3
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------- spending


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 < float(alpha) < 0.5:
        raise ValueError(f"alpha must be a number in (0, 0.5) (one-sided), got {alpha!r}")
    return float(alpha)


def _check_spending(spending: Any, param: Any) -> tuple[str, float | None]:
    if spending not in SPENDING_FUNCTIONS:
        raise ValueError(f"spending must be one of {', '.join(map(repr, SPENDING_FUNCTIONS))}, got {spending!r}")
    if spending in ("obf", "pocock"):
        if param is not None:
            raise ValueError(f"param must be None for spending={spending!r} (only 'hsd' and 'power' take one)")
        return spending, None
    if param is None:
        return spending, _DEFAULT_PARAM[spending]
    if isinstance(param, bool) or not isinstance(param, Real) or not math.isfinite(float(param)):
        raise ValueError(f"param must be a finite number for spending={spending!r}, got {param!r}")
    if spending == "power" and float(param) <= 0.0:
        raise ValueError(f"param (rho) must be > 0 for spending='power', got {param!r}")
    return spending, float(param)


def _spend(t: float, alpha: float, spending: str, param: float | None) -> float:
    """Spending function on already-validated arguments."""
    if t <= 0.0:
        return 0.0
    if t >= 1.0:
        return alpha
    if spending == "obf":
        # 2 - 2 Phi(x) written as 2 Phi(-x) to keep the tiny early values accurate.
        return float(2.0 * ndtr(ndtri(1.0 - alpha / 2.0) / -math.sqrt(t)))
    if spending == "pocock":
        return alpha * math.log1p((math.e - 1.0) * t)
    if spending == "hsd":
        if param == 0.0:
            return alpha * t
        return alpha * math.expm1(-param * t) / math.expm1(-param)
    return alpha * t**param


def spending_alpha(fraction: float, *, alpha: float, spending: str, param: float | None = None) -> float:
    """Cumulative one-sided alpha spent by spending time ``fraction``.

    ``fraction`` is clipped to [0, 1]: 0 at 0, exactly ``alpha`` at or beyond 1.
    ``param`` is gamma for ``"hsd"`` (default -1) and rho for ``"power"``
    (default 3); it must be None for ``"obf"`` and ``"pocock"``.
    """
    alpha = _check_alpha(alpha)
    spending, param = _check_spending(spending, param)
    if isinstance(fraction, bool) or not isinstance(fraction, Real) or math.isnan(float(fraction)):
        raise ValueError(f"fraction must be a number, got {fraction!r}")
    return _spend(float(fraction), alpha, spending, param)


# ---------------------------------------------------------------- numerical integration


def _grid(b: float) -> tuple[np.ndarray, np.ndarray]:
    """J&T's grid for N(0, 1) truncated to (-inf, b]: points and Simpson weights.

    The odd points are dense (spacing 3 / (2 r)) on [-3, 3] and spread
    logarithmically out to +-(3 + 4 ln r); even points are the midpoints.
    """
    i = np.arange(1, 6 * _R, dtype=np.float64)
    x = np.where(
        i < _R,
        -3.0 - 4.0 * np.log(_R / i),
        np.where(i <= 5 * _R, -3.0 + 3.0 * (i - _R) / (2.0 * _R), 3.0 + 4.0 * np.log(_R / (6.0 * _R - i))),
    )
    if b < x[-1]:
        x = np.append(x[x < b], b)
    m = x.size
    z = np.empty(2 * m - 1)
    w = np.empty(2 * m - 1)
    z[0::2] = x
    z[1::2] = 0.5 * (x[:-1] + x[1:])
    w[0] = x[1] - x[0]
    w[2:-1:2] = x[2:] - x[:-2]
    w[-1] = x[-1] - x[-2]
    w[1::2] = 4.0 * (x[1:] - x[:-1])
    return z, w / 6.0


class _Recursion:
    """Sub-density of Z_k on the continuation region {no crossing so far}, under H0.

    ``h`` holds density x Simpson weight at the grid points ``z``, so a sum over
    the grid is an integral over the continuation region.
    """

    def __init__(self) -> None:
        self.z: np.ndarray | None = None
        self.h: np.ndarray | None = None
        self.info = 0.0

    def crossing(self, b: float, info: float) -> float:
        """P(no crossing before, Z >= b at the next analysis with information ``info``)."""
        if self.z is None:
            return float(ndtr(-b))
        delta = info - self.info
        # S = Z sqrt(I) has independent N(0, delta) increments under H0.
        x = (self.z * math.sqrt(self.info) - b * math.sqrt(info)) / math.sqrt(delta)
        return float(np.dot(self.h, ndtr(x)))

    def advance(self, b: float, info: float) -> None:
        """Move the sub-density to the next analysis, truncated at its boundary ``b``."""
        z, w = _grid(b)
        if self.z is None:
            h = w * np.exp(-0.5 * z * z) * _INV_SQRT_2PI
        else:
            delta = info - self.info
            scale = math.sqrt(info / delta)
            t = self.z * math.sqrt(self.info / delta)
            u = z[:, None] * scale - t[None, :]
            h = (np.exp(-0.5 * u * u) @ self.h) * (w * scale * _INV_SQRT_2PI)
        self.z, self.h, self.info = z, h, info


def _solve_bound(rec: _Recursion, increment: float, info: float) -> float:
    """The boundary whose first-crossing probability is ``increment``."""

    def excess(b: float) -> float:
        return rec.crossing(b, info) / increment - 1.0

    # First crossing at k implies Z_k >= b, so P(first crossing) <= 1 - Phi(b)
    # and the root lies at or below the fixed-sample critical value.
    hi = float(-ndtri(increment))
    while excess(hi) > 0.0:
        hi += 0.25
    lo = hi - 1.0
    while excess(lo) < 0.0:
        lo -= 1.0
        if lo < -40.0:  # cannot happen for alpha < 0.5: the remaining mass is > 0.5
            raise RuntimeError("no boundary spends the requested alpha")
    return float(brentq(excess, lo, hi, xtol=1e-12, rtol=4 * np.finfo(float).eps, maxiter=200))


def _check_increasing(name: str, values: Any) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d sequence of numbers, got {values!r}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0.0) or np.any(np.diff(arr) <= 0.0):
        raise ValueError(f"{name} must be finite, positive and strictly increasing, got {values!r}")
    return arr


def _bounds(
    times: np.ndarray,
    info: np.ndarray,
    alpha: float,
    spending: str,
    param: float | None,
    fixed: Sequence[float] = (),
) -> list[float]:
    """Boundaries for all analyses; the first ``len(fixed)`` are taken as given.

    Keeping the boundaries that were actually applied (rather than re-solving
    them) makes the new boundary spend exactly its own increment given the
    real history.
    """
    info = info / info[-1]  # only ratios matter under H0
    rec = _Recursion()
    out: list[float] = []
    spent_before = 0.0
    for k, (t, i_k) in enumerate(zip(times, info)):
        spent = _spend(float(t), alpha, spending, param)
        increment = spent - spent_before
        spent_before = spent
        if k < len(fixed):
            b = float(fixed[k])
        elif increment < _MIN_INCREMENT:
            b = math.inf
        else:
            b = _solve_bound(rec, increment, float(i_k))
        out.append(b)
        if k + 1 < len(times):
            rec.advance(b, float(i_k))
    return out


def gst_bounds(
    fractions: Sequence[float],
    *,
    alpha: float,
    spending: str,
    param: float | None = None,
    information: Sequence[float] | None = None,
) -> list[float]:
    """One-sided upper z boundaries for analyses at spending times ``fractions``.

    ``fractions``: strictly increasing, in (0, 1].  ``information``: the
    statistical information at each analysis (strictly increasing, positive,
    any scale; default proportional to ``fractions``); the z statistics at
    analyses j < k have correlation sqrt(I_j / I_k).  The probability under H0
    of first crossing at analysis k is ``spending_alpha(t_k) - spending_alpha(t_{k-1})``;
    an analysis that spends less than 1e-15 gets ``+inf``.

    Consecutive information levels less than ~0.1% apart (relative) are below
    the resolution of the integration grid and make the later boundaries
    inaccurate (conservative in our checks); :class:`GroupSequentialTest`
    postpones such analyses.
    """
    alpha = _check_alpha(alpha)
    spending, param = _check_spending(spending, param)
    times = _check_increasing("fractions", fractions)
    if times[-1] > 1.0:
        raise ValueError(f"fractions must lie in (0, 1], got {fractions!r}")
    info = times if information is None else _check_increasing("information", information)
    if info.size != times.size:
        raise ValueError(f"information must have the same length as fractions ({times.size}), got {info.size}")
    return _bounds(times, info, alpha, spending, param)


# ---------------------------------------------------------------- stateful test


@dataclass(frozen=True, slots=True)
class GSTLook:
    """Outcome of one controller look.  ``bound``/``breach`` refer to this look's
    analysis; at a look that is not an analysis ``bound`` is None and ``breach`` False."""

    analysed: bool
    bound: float | None
    breach: bool
    analyses: int
    spent: float
    exhausted: bool


class GroupSequentialTest:
    """Per-guardrail group-sequential test over a planned grid of ``analyses`` analyses.

    The controller calls :meth:`observe` at every look with the calendar
    fraction of the planned horizon, the current information and z statistic.
    An analysis happens when the fraction reaches the next grid point
    k / analyses (one analysis at the current fraction if several were skipped),
    and only if the information grew (by more than 0.1%) since the previous
    analysis; a postponed analysis spends nothing and happens at the first look
    with enough new information.  The analysis
    at fraction >= 1 spends all remaining alpha and is the last one: later
    looks are never analysed, so an overrun cannot inflate the error rate.
    """

    def __init__(self, *, alpha: float, spending: str = "hsd", param: float | None = None, analyses: int = 50):
        self._alpha = _check_alpha(alpha)
        self._spending, self._param = _check_spending(spending, param)
        self._param_arg = None if param is None else float(param)
        if isinstance(analyses, bool) or not isinstance(analyses, Integral) or analyses < 1:
            raise ValueError(f"analyses must be an integer >= 1, got {analyses!r}")
        self._analyses = int(analyses)
        self._times: list[float] = []
        self._info: list[float] = []
        self._bounds: list[float] = []
        self._grid_done = 0  # grid points k / analyses already used up
        self._exhausted = False

    @property
    def exhausted(self) -> bool:
        return self._exhausted

    @property
    def spent(self) -> float:
        if not self._times:
            return 0.0
        return _spend(self._times[-1], self._alpha, self._spending, self._param)

    @property
    def bounds(self) -> tuple[float, ...]:
        """Boundaries of the analyses so far (``inf`` where no alpha was spent)."""
        return tuple(self._bounds)

    def observe(self, fraction: float, information: float, z: float) -> GSTLook:
        for name, value in (("fraction", fraction), ("information", information), ("z", z)):
            if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        fraction, information, z = float(fraction), float(information), float(z)
        if fraction < 0.0 or math.isinf(fraction):
            raise ValueError(f"fraction must be finite and >= 0, got {fraction!r}")
        reached = min(math.floor(fraction * self._analyses + _GRID_EPS), self._analyses)
        due = not self._exhausted and reached > self._grid_done
        # No new information, no analysis: spending alpha on a repeat of the
        # previous look would only waste it (and the recursion needs I_k > I_{k-1}).
        grew = math.isfinite(information) and information > (
            self._info[-1] * (1.0 + _MIN_GROWTH) if self._info else 0.0
        )
        if not (due and grew):
            return GSTLook(False, None, False, len(self._bounds), self.spent, self._exhausted)
        final = reached >= self._analyses
        t = 1.0 if final else fraction
        times = np.array([*self._times, t])
        info = np.array([*self._info, information])
        bound = _bounds(times, info, self._alpha, self._spending, self._param, fixed=self._bounds)[-1]
        self._times.append(t)
        self._info.append(information)
        self._bounds.append(bound)
        self._grid_done = reached
        self._exhausted = final
        return GSTLook(True, bound, z >= bound, len(self._bounds), self.spent, self._exhausted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self._alpha,
            "spending": self._spending,
            "param": self._param_arg,
            "analyses": self._analyses,
            "fractions": list(self._times),
            "information": list(self._info),
            # JSON has no infinity: None stands for a boundary that spent nothing.
            "bounds": [b if math.isfinite(b) else None for b in self._bounds],
            "grid_done": self._grid_done,
            "exhausted": self._exhausted,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupSequentialTest:
        try:
            test = cls(alpha=data["alpha"], spending=data["spending"], param=data["param"], analyses=data["analyses"])
            times = [float(t) for t in data["fractions"]]
            info = [float(i) for i in data["information"]]
            bounds = [math.inf if b is None else float(b) for b in data["bounds"]]
            grid_done, exhausted = int(data["grid_done"]), bool(data["exhausted"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"data is not a GroupSequentialTest dict: {exc!r}") from None
        if not len(times) == len(info) == len(bounds):
            raise ValueError("data: fractions, information and bounds must have the same length")
        if times:
            _check_increasing("data['fractions']", times)
            _check_increasing("data['information']", info)
        test._times, test._info, test._bounds = times, info, bounds
        test._grid_done, test._exhausted = grid_done, exhausted
        return test
