"""Micro-benchmark of the decide-agent hot path.

Prints, in the same run, the time of one ``scipy.stats.norm.ppf`` call (baseline)
and of one ``sequential_compare`` / ``GuardrailMonitor.update`` / ``srm_test`` /
``quantile_compare`` call on sufficient statistics, with the ratio to the baseline.

Run:  python benchmarks/bench_stats.py
"""

from __future__ import annotations

import timeit

import numpy as np
from scipy.stats import norm

from safeswap.core.stats import (
    GuardrailMonitor,
    LatencyHistogram,
    Mean,
    Proportion,
    Ratio,
    quantile_compare,
    sequential_compare,
    srm_test,
)


def per_call_us(fn, number: int) -> float:
    """Best of 5 repeats, in microseconds per call (best = least disturbed by other load)."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    a_p, b_p = Proportion(6000, 300), Proportion(6100, 366)
    a_m, b_m = Mean(3000, 1396.87, 52377.9767), Mean(3461, 2422.7, 134698.29)
    a_r = Ratio(2000, 950.0, 2900.0, 21000.0, 290000.0, 13500.0)
    b_r = Ratio(2100, 1100.0, 3400.0, 22000.0, 305000.0, 15500.0)
    monitor = GuardrailMonitor("thumbs_down_rate", max_relative_harm=0.2)
    rng = np.random.default_rng(0)
    h_a = LatencyHistogram.from_values(rng.lognormal(6.7, 1, 20_000))
    h_b = LatencyHistogram.from_values(rng.lognormal(6.8, 1, 20_000))

    baseline = per_call_us(lambda: norm.ppf(0.975), 2000)
    rows = [
        ("scipy.stats.norm.ppf (baseline)", baseline),
        (
            "sequential_compare Proportion, relative, two-sided",
            per_call_us(lambda: sequential_compare(a_p, b_p), 20000),
        ),
        (
            "sequential_compare Mean, absolute, greater",
            per_call_us(lambda: sequential_compare(a_m, b_m, difference="absolute", alternative="greater"), 20000),
        ),
        (
            "sequential_compare Ratio, relative, greater",
            per_call_us(lambda: sequential_compare(a_r, b_r, alternative="greater"), 20000),
        ),
        ("GuardrailMonitor.update Proportion", per_call_us(lambda: monitor.update(a_p, b_p), 20000)),
        ("srm_test 2 arms", per_call_us(lambda: srm_test([505_000, 495_000], [0.5, 0.5]), 2000)),
        ("quantile_compare p95, 302-bin histograms", per_call_us(lambda: quantile_compare(h_a, h_b), 500)),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'call':<{width}}  {'us/call':>9}  {'x norm.ppf':>10}")
    for name, us in rows:
        print(f"{name:<{width}}  {us:9.2f}  {us / baseline:10.3f}")


if __name__ == "__main__":
    main()
