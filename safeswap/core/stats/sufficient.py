"""Mergeable sufficient statistics for one variant (control or candidate).

Each class holds the few sums from which the estimate and its variance follow,
so the stream processor can keep one per (partition, variant, metric) and merge
partitions with ``a + b``.  All classes are frozen, validated on construction
and round-trip through ``to_dict()`` / ``from_dict()`` (plain JSON with a
``"kind"`` key) because they travel in Kafka snapshots.

Variances use the unbiased ``n - 1`` denominator for means and ratios (as in
GrowthBook's ``gbstats``) and ``p (1 - p)`` for proportions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "Proportion",
    "Mean",
    "Ratio",
    "SufficientStatistic",
]


def _finite(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming ``name``."""
    kind = type(value)
    if kind is not float and kind is not int and (isinstance(value, bool) or not isinstance(value, Real)):
        raise ValueError(f"{name} must be a real number, got {value!r}")  # (exact types skip the ABC check)
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _count(name: str, value: Any) -> int:
    """Return ``value`` as a non-negative int (integer-valued floats accepted: JSON)."""
    if type(value) is int:  # the common case, without the ABC checks
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a count, got {value!r}")
    if isinstance(value, Integral):
        out = int(value)
    else:
        as_float = _finite(name, value)
        if as_float != math.floor(as_float):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        out = int(as_float)
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return out


def _nonneg(name: str, value: Any) -> float:
    out = _finite(name, value)
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return out


def _sample_variance(n: int, total: float, total_sq: float) -> float:
    """Unbiased variance from sums: (sum x^2 - (sum x)^2 / n) / (n - 1), clamped at 0.

    The clamp absorbs floating-point cancellation when all values are equal.
    """
    if n < 2:
        raise ValueError(f"variance needs n >= 2 units, got n={n}")
    return max((total_sq - total * total / n) / (n - 1), 0.0)


def _check_kind(cls_kind: str, data: Mapping[str, Any]) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"data must be a mapping, got {type(data).__name__}")
    kind = data.get("kind")
    if kind != cls_kind:
        raise ValueError(f"kind must be {cls_kind!r}, got {kind!r}")


@dataclass(frozen=True, slots=True)
class Proportion:
    """Binary outcome per unit: ``successes`` out of ``n`` (e.g. thumbs-down users).

    estimate          p = successes / n
    variance_of_unit  p (1 - p)            (Bernoulli variance)
    """

    n: int
    successes: int
    kind: ClassVar[str] = "proportion"

    def __post_init__(self) -> None:
        n = _count("n", self.n)
        successes = _count("successes", self.successes)
        if successes > n:
            raise ValueError(f"successes must be <= n, got successes={successes} > n={n}")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "successes", successes)

    @classmethod
    def from_values(cls, values: Iterable[Any]) -> Proportion:
        """Build from raw 0/1 outcomes (one per unit)."""
        x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
        if x.size and not np.all((x == 0) | (x == 1)):
            raise ValueError("values must be 0/1 outcomes")
        return cls(n=int(x.size), successes=int(x.sum()))

    def __add__(self, other: object) -> Proportion:
        if not isinstance(other, Proportion):
            return NotImplemented
        return Proportion(self.n + other.n, self.successes + other.successes)

    @property
    def estimate(self) -> float:
        if self.n == 0:
            raise ValueError("n is 0: the proportion is undefined")
        return self.successes / self.n

    @property
    def variance_of_unit(self) -> float:
        p = self.estimate
        return p * (1.0 - p)

    @property
    def variance_of_estimate(self) -> float:
        return self.variance_of_unit / self.n

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "n": self.n, "successes": self.successes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Proportion:
        _check_kind(cls.kind, data)
        return cls(n=data.get("n"), successes=data.get("successes"))


@dataclass(frozen=True, slots=True)
class Mean:
    """Continuous outcome per unit from ``n``, ``total`` = sum x, ``total_sq`` = sum x^2.

    estimate          xbar = total / n
    variance_of_unit  s^2 = (total_sq - total^2 / n) / (n - 1)
    """

    n: int
    total: float
    total_sq: float
    kind: ClassVar[str] = "mean"

    def __post_init__(self) -> None:
        n = _count("n", self.n)
        total = _finite("total", self.total)
        total_sq = _nonneg("total_sq", self.total_sq)
        # Cauchy-Schwarz: total^2 <= n * total_sq; relative slack for rounding.
        if total * total > n * total_sq * (1 + 1e-9) + 1e-9:
            raise ValueError(
                f"total_sq is inconsistent with total and n (total^2 > n * total_sq): "
                f"n={n}, total={total}, total_sq={total_sq}"
            )
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "total", total)
        object.__setattr__(self, "total_sq", total_sq)

    @classmethod
    def from_values(cls, values: Iterable[Any]) -> Mean:
        """Build from raw per-unit values."""
        x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
        if not np.all(np.isfinite(x)):
            raise ValueError("values must be finite")
        return cls(n=int(x.size), total=float(x.sum()), total_sq=float(np.dot(x, x)))

    def __add__(self, other: object) -> Mean:
        if not isinstance(other, Mean):
            return NotImplemented
        return Mean(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def estimate(self) -> float:
        if self.n == 0:
            raise ValueError("n is 0: the mean is undefined")
        return self.total / self.n

    @property
    def variance_of_unit(self) -> float:
        return _sample_variance(self.n, self.total, self.total_sq)

    @property
    def variance_of_estimate(self) -> float:
        return self.variance_of_unit / self.n

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "n": self.n, "total": self.total, "total_sq": self.total_sq}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Mean:
        _check_kind(cls.kind, data)
        return cls(n=data.get("n"), total=data.get("total"), total_sq=data.get("total_sq"))


@dataclass(frozen=True, slots=True)
class Ratio:
    """Ratio of sums with users as the randomisation unit (e.g. thumbs-down per response).

    Per user i: numerator y_i (thumbs-downs) and denominator x_i (responses).
    Sufficient sums over users: ``num`` = sum y, ``num_sq`` = sum y^2,
    ``den`` = sum x, ``den_sq`` = sum x^2, ``num_den`` = sum x*y.

    estimate  r = num / den

    The delta method (Deng, Knoblich, Lu 2018, "Applying the delta method in
    metric analytics", KDD) gives, with per-user means mu_y, mu_x, variances
    s_yy, s_xx and covariance s_xy (``n - 1`` denominators)::

        variance_of_unit = (s_yy - 2 r s_xy + r^2 s_xx) / mu_x^2
        Var(r_hat)       = variance_of_unit / n_units

    which stays right when one user sends many requests (a naive request-level
    binomial variance would be too small).  Same formula as gbstats'
    ``RatioStatistic``.

    Clustered units (``users`` given): the sums are over *clusters* of users
    (safeswap sums users into hash buckets, so memory stays constant however
    many users come back), ``n_units`` counts the clusters and ``users`` the
    distinct users in them.  The delta method over clusters gives ``Var(r_hat)``
    directly (a user never changes cluster, so the clusters are independent and
    the variance is the user-level one); ``n`` is then ``users`` and
    ``variance_of_unit`` the per-user equivalent ``Var(r_hat) * users``, which is
    what the sequential tests take.
    """

    n_units: int
    num: float
    num_sq: float
    den: float
    den_sq: float
    num_den: float
    users: int | None = None
    kind: ClassVar[str] = "ratio"

    def __post_init__(self) -> None:
        n = _count("n_units", self.n_units)
        num = _finite("num", self.num)
        num_sq = _nonneg("num_sq", self.num_sq)
        den = _nonneg("den", self.den)  # a count (responses, sessions)
        den_sq = _nonneg("den_sq", self.den_sq)
        num_den = _finite("num_den", self.num_den)
        slack = 1 + 1e-9
        if num * num > n * num_sq * slack + 1e-9:
            raise ValueError("num_sq is inconsistent with num and n_units: num^2 > n_units * num_sq")
        if den * den > n * den_sq * slack + 1e-9:
            raise ValueError("den_sq is inconsistent with den and n_units: den^2 > n_units * den_sq")
        if num_den * num_den > num_sq * den_sq * slack + 1e-9:
            raise ValueError("num_den is inconsistent: num_den^2 > num_sq * den_sq")
        if self.users is not None:
            users = _count("users", self.users)
            if users < n:
                raise ValueError(f"users must be >= n_units (a unit holds at least one user), got {users} < {n}")
            object.__setattr__(self, "users", users)
        object.__setattr__(self, "n_units", n)
        object.__setattr__(self, "num", num)
        object.__setattr__(self, "num_sq", num_sq)
        object.__setattr__(self, "den", den)
        object.__setattr__(self, "den_sq", den_sq)
        object.__setattr__(self, "num_den", num_den)

    @classmethod
    def from_units(cls, num: Iterable[Any], den: Iterable[Any]) -> Ratio:
        """Build from per-user numerators and denominators (same length)."""
        y = np.asarray(num, dtype=float)
        x = np.asarray(den, dtype=float)
        if y.shape != x.shape:
            raise ValueError(f"num and den must have the same length, got {y.size} and {x.size}")
        if not (np.all(np.isfinite(y)) and np.all(np.isfinite(x))):
            raise ValueError("num and den must be finite")
        return cls(
            n_units=int(y.size),
            num=float(y.sum()),
            num_sq=float(np.dot(y, y)),
            den=float(x.sum()),
            den_sq=float(np.dot(x, x)),
            num_den=float(np.dot(x, y)),
        )

    def __add__(self, other: object) -> Ratio:
        if not isinstance(other, Ratio):
            return NotImplemented
        return Ratio(
            self.n_units + other.n_units,
            self.num + other.num,
            self.num_sq + other.num_sq,
            self.den + other.den,
            self.den_sq + other.den_sq,
            self.num_den + other.num_den,
            None if self.users is None and other.users is None else self.n + other.n,
        )

    @property
    def n(self) -> int:
        """Number of users (the randomisation units); what the tests count as n."""
        return self.n_units if self.users is None else self.users

    @property
    def estimate(self) -> float:
        if self.den == 0:
            raise ValueError("den is 0: the ratio is undefined")
        return self.num / self.den

    @property
    def variance_of_unit(self) -> float:
        n = self.n_units
        if n < 2:
            raise ValueError(f"variance needs n_units >= 2, got n_units={n}")
        mu_x = self.den / n
        r = self.estimate
        s_yy = _sample_variance(n, self.num, self.num_sq)
        s_xx = _sample_variance(n, self.den, self.den_sq)
        s_xy = (self.num_den - self.num * self.den / n) / (n - 1)
        per_cluster = max((s_yy - 2.0 * r * s_xy + r * r * s_xx) / (mu_x * mu_x), 0.0)
        return per_cluster * self.n / n  # per user: Var(r_hat) * users

    @property
    def variance_of_estimate(self) -> float:
        return self.variance_of_unit / self.n

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n_units": self.n_units,
            "num": self.num,
            "num_sq": self.num_sq,
            "den": self.den,
            "den_sq": self.den_sq,
            "num_den": self.num_den,
            **({} if self.users is None else {"users": self.users}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ratio:
        _check_kind(cls.kind, data)
        return cls(
            n_units=data.get("n_units"),
            num=data.get("num"),
            num_sq=data.get("num_sq"),
            den=data.get("den"),
            den_sq=data.get("den_sq"),
            num_den=data.get("num_den"),
            users=data.get("users"),
        )


SufficientStatistic = Proportion | Mean | Ratio
