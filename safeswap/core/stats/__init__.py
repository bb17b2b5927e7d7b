"""safeswap.core.stats: pure statistics for guarded rollouts (numpy + scipy only).

Public API (names are a contract used by the decide agent and the stream processor):

* sufficient statistics: ``Proportion``, ``Mean``, ``Ratio``, ``LatencyHistogram``,
  ``stat_from_dict``
* ``sequential_compare`` -> ``SequentialResult`` (asymptotic confidence sequences)
* ``GuardrailMonitor`` -> ``GuardrailVerdict``; ``split_alpha``
* ``srm_test`` -> ``SRMResult``; ``SRMMonitor``
* ``quantile_compare`` -> ``QuantileResult``
* ``plan_sample_size`` -> ``SamplePlan``; ``watch_hours``

See docs/statistics.md for the methods, references and validation figures.
"""

from collections.abc import Mapping
from typing import Any

from safeswap.core.stats.gst import GroupSequentialTest, GSTLook, gst_bounds, spending_alpha
from safeswap.core.stats.guardrail import GuardrailMonitor, GuardrailVerdict, split_alpha
from safeswap.core.stats.planning import SamplePlan, plan_sample_size, watch_hours
from safeswap.core.stats.quantiles import LatencyHistogram, QuantileResult, quantile_bounds, quantile_compare
from safeswap.core.stats.sequential import SequentialResult, sequential_compare
from safeswap.core.stats.srm import SRMMonitor, SRMResult, srm_test
from safeswap.core.stats.sufficient import Mean, Proportion, Ratio

__all__ = [
    "GSTLook",
    "GroupSequentialTest",
    "GuardrailMonitor",
    "GuardrailVerdict",
    "LatencyHistogram",
    "Mean",
    "Proportion",
    "QuantileResult",
    "Ratio",
    "SRMMonitor",
    "SRMResult",
    "SamplePlan",
    "SequentialResult",
    "gst_bounds",
    "plan_sample_size",
    "quantile_bounds",
    "quantile_compare",
    "sequential_compare",
    "spending_alpha",
    "split_alpha",
    "srm_test",
    "stat_from_dict",
    "watch_hours",
]


def stat_from_dict(data: Mapping[str, Any]):
    """Rebuild any statistic (including ``LatencyHistogram``) from its ``to_dict()``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"data must be a mapping, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in STATISTIC_KINDS:
        raise ValueError(f"kind must be one of {sorted(STATISTIC_KINDS)}, got {kind!r}")
    return STATISTIC_KINDS[kind].from_dict(data)


STATISTIC_KINDS = {c.kind: c for c in (Proportion, Mean, Ratio, LatencyHistogram)}
