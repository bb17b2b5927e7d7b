"""Group-sequential boundaries (Lan-DeMets alpha spending) and the stateful GST."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from safeswap.core.stats import GroupSequentialTest, GSTLook, gst_bounds, spending_alpha

INF = math.inf


def _increments(fractions, **design) -> np.ndarray:
    spent = [spending_alpha(t, **design) for t in fractions]
    return np.diff([0.0, *spent])


def _gsdesign_crossing(bounds, information, theta=0.0, r=36) -> np.ndarray:
    """Per-analysis first-crossing probabilities from the independent ``gsdesign`` port.

    The upper tail is integrated on its own grid (``a = bound, b = inf``), not
    with the closed-form normal cdf that gst.py uses, and r = 36 by default.
    """
    from gsdesign import h1, hupdate

    out, gm, prev = [], None, None
    for b, info in zip(bounds, information):
        if gm is None:
            up = 0.0 if b == INF else h1(r, theta, info, b, INF)[2].sum()
            gm = h1(r, theta, info, -INF, b)
        else:
            up = 0.0 if b == INF else hupdate(r, theta, info, b, INF, theta, prev, gm)[2].sum()
            gm = hupdate(r, theta, info, -INF, b, theta, prev, gm)
        prev = info
        out.append(up)
    return np.array(out)


def _mc_crossing(bounds, information, n_paths, seed) -> float:
    """A/A crossing rate: Brownian motion S(I) observed at ``information``, Z = S / sqrt(I)."""
    rng = np.random.default_rng(seed)
    info = np.asarray(information, dtype=float)
    sd = np.sqrt(np.diff(info, prepend=0.0))
    crossed = 0
    for chunk in np.array_split(np.arange(n_paths), max(1, n_paths // 50_000)):
        s = np.cumsum(rng.standard_normal((chunk.size, info.size)) * sd, axis=1)
        crossed += int(np.any(s / np.sqrt(info) >= np.asarray(bounds), axis=1).sum())
    return crossed / n_paths


# ---------------------------------------------------------------- spending functions


def test_spending_functions_closed_forms_and_clipping():
    a = 0.05
    z = ndtri(1 - a / 2)
    assert spending_alpha(0.25, alpha=a, spending="obf") == pytest.approx(2 - 2 * ndtr(z / 0.5), rel=1e-12)
    assert spending_alpha(0.25, alpha=a, spending="pocock") == pytest.approx(a * math.log(1 + (math.e - 1) / 4))
    g = -4.0
    hsd = a * (1 - math.exp(-g * 0.25)) / (1 - math.exp(-g))
    assert spending_alpha(0.25, alpha=a, spending="hsd", param=g) == pytest.approx(hsd, rel=1e-12)
    assert spending_alpha(0.25, alpha=a, spending="hsd", param=0) == pytest.approx(a * 0.25, rel=1e-12)
    assert spending_alpha(0.25, alpha=a, spending="power", param=2) == pytest.approx(a / 16, rel=1e-12)
    # Documented defaults: gamma = -1 for hsd, rho = 3 for power.
    assert spending_alpha(0.3, alpha=a, spending="hsd") == spending_alpha(0.3, alpha=a, spending="hsd", param=-1)
    assert spending_alpha(0.3, alpha=a, spending="power") == pytest.approx(a * 0.3**3)
    for spending, param in [("obf", None), ("pocock", None), ("hsd", -1), ("hsd", 2), ("power", 0.5)]:
        d = {"alpha": a, "spending": spending, "param": param}
        assert spending_alpha(0, **d) == 0.0 and spending_alpha(-0.5, **d) == 0.0
        assert spending_alpha(1, **d) == a and spending_alpha(1.7, **d) == a  # exactly alpha
        values = [spending_alpha(t, **d) for t in np.linspace(0.01, 1, 50)]
        assert np.all(np.diff(values) > 0)


# ---------------------------------------------------------------- boundaries


def test_obf_bounds_match_published_gsdesign_values():
    # gsDesign: gsDesign(k = 5, test.type = 1, alpha = 0.025, sfu = sfLDOF)$upper$bound
    expected = [4.8769, 3.3570, 2.6803, 2.2898, 2.0310]
    assert gst_bounds([0.2, 0.4, 0.6, 0.8, 1.0], alpha=0.025, spending="obf") == pytest.approx(expected, abs=1e-3)


DESIGNS = [
    # (spending, param, fractions, information); information None = proportional to fractions
    ("obf", None, [1 / 3, 2 / 3, 1.0], None),
    ("obf", None, list(np.arange(1, 21) / 20), None),  # first looks spend < 1e-15: +inf bounds
    ("pocock", None, [0.2, 0.4, 0.6, 0.8, 1.0], None),
    ("pocock", None, [0.1, 0.3, 0.35, 0.7, 1.0], [0.2, 0.3, 0.5, 0.6, 1.1]),
    ("hsd", -1.0, list(np.arange(1, 21) / 20), list(0.7 * np.arange(1, 21) / 20)),
    ("hsd", -4.0, [0.2, 0.4, 0.6, 0.8, 1.0], [0.04, 0.16, 0.36, 0.64, 1.0]),
    ("hsd", -1.0, [0.05, 0.15, 0.4, 0.9], [10.0, 40.0, 41.0, 300.0]),  # interim only, any scale
    ("power", 3.0, [1 / 3, 2 / 3, 1.0], [0.3, 0.5, 1.3]),
    ("power", 3.0, [0.1, 0.25, 0.5, 0.8, 1.0], None),
]


@pytest.mark.parametrize("spending,param,fractions,information", DESIGNS)
def test_crossing_probabilities_equal_spent_increments_per_gsdesign(spending, param, fractions, information):
    alpha = 0.025
    b = gst_bounds(fractions, alpha=alpha, spending=spending, param=param, information=information)
    info = fractions if information is None else information
    inc = _increments(fractions, alpha=alpha, spending=spending, param=param)
    assert [math.isinf(x) for x in b] == [x < 1e-15 for x in inc]
    assert _gsdesign_crossing(b, info) == pytest.approx(inc, abs=1e-6)


def test_bounds_depend_on_information_ratios_not_scale():
    t = [0.25, 0.5, 0.75, 1.0]
    base = gst_bounds(t, alpha=0.05, spending="hsd")
    for scale in (0.7, 1.3, 1e6):
        scaled = gst_bounds(t, alpha=0.05, spending="hsd", information=[scale * x for x in t])
        assert scaled == pytest.approx(base, abs=1e-9)
    ramp = gst_bounds(t, alpha=0.05, spending="hsd", information=[x * x for x in t])
    assert abs(ramp[-1] - base[-1]) > 0.01


def test_bounds_match_spotify_confidence_power_family():
    # spotify-confidence 4.1.0 (a port of R's ldbounds, trapezoid rule with step
    # 0.05 and bisection to 1e-7 in probability), in a throwaway venv:
    #   from spotify_confidence.analysis.frequentist.sequential_bound_solver import bounds
    #   bounds(np.array(t), alpha=a, rho=rho, ztrun=8, sides=1).bounds
    # Its spending time and information are the same t.  It agrees with gsdesign
    # to ~5e-5 in z, hence the tolerance.
    cases = [
        ([0.2, 0.4, 0.6, 0.8, 1.0], 0.025, 3.0, [3.540084, 2.974302, 2.604483, 2.306318, 2.045434]),
        ([0.1, 0.25, 0.5, 0.8, 1.0], 0.05, 2.0, [3.290527, 2.776092, 2.304489, 1.942511, 1.783412]),
        (
            list(np.arange(1, 11) / 10),
            0.05,
            3.0,
            [3.890592, 3.379623, 3.058324, 2.807017, 2.593389, 2.403526, 2.229894, 2.067852, 1.914251, 1.766815],
        ),
    ]
    for t, a, rho, expected in cases:
        assert gst_bounds(t, alpha=a, spending="power", param=rho) == pytest.approx(expected, abs=1e-4)


def test_sixty_looks_are_fast():
    t = np.arange(1, 61) / 60
    gst_bounds(t, alpha=0.05, spending="hsd")  # warm-up (imports, caches)
    best = INF
    for _ in range(5):
        start = time.perf_counter()
        gst_bounds(t, alpha=0.05, spending="hsd", information=t**1.5)
        best = min(best, time.perf_counter() - start)
    assert best < 0.1


def test_monte_carlo_overall_crossing_rate_is_alpha_when_information_differs_from_plan():
    alpha, n = 0.05, 200_000
    se = math.sqrt(alpha * (1 - alpha) / n)
    t = np.arange(1, 21) / 20
    patterns = {"0.7x": 0.7 * t, "1.3x": 1.3 * t, "ramp": t**2, "front-loaded": np.sqrt(t)}
    for seed, (name, info) in enumerate(patterns.items()):
        b = gst_bounds(t, alpha=alpha, spending="hsd", information=info)
        rate = _mc_crossing(b, info, n, seed)
        assert abs(rate - alpha) <= 4 * se, (name, rate, se)
    # The check has teeth: bounds that assume information proportional to calendar
    # time overshoot alpha (~0.068) when traffic ramps up.
    naive = gst_bounds(t, alpha=alpha, spending="hsd")
    assert _mc_crossing(naive, t**2, n, 99) > alpha + 10 * se


def test_power_hsd_57_looks_at_1_8_times_fixed_information():
    # Drift giving 80% power to a one-sided fixed-horizon z test at alpha 0.05
    # with information 1; the sequential test runs to information 1.8.
    alpha = 0.05
    theta = ndtri(1 - alpha) + ndtri(0.8)
    t = np.arange(1, 58) / 57
    b = gst_bounds(t, alpha=alpha, spending="hsd", param=-1)
    power = _gsdesign_crossing(b, 1.8 * t, theta=theta).sum()
    assert power >= 0.90
    assert _gsdesign_crossing(b, 1.8 * t).sum() == pytest.approx(alpha, abs=1e-5)


# ---------------------------------------------------------------- stateful test


def _drive(test: GroupSequentialTest, fractions, information, z=0.0) -> list[GSTLook]:
    return [test.observe(f, i, z) for f, i in zip(fractions, information)]


def test_gst_class_grid_jumps_and_agreement_with_gst_bounds():
    g = GroupSequentialTest(alpha=0.05, analyses=10)
    assert not g.observe(0.05, 5.0, 0.0).analysed  # before the first grid point
    look = g.observe(0.35, 30.0, 0.0)  # jumped over 0.1, 0.2, 0.3: one analysis
    assert look.analysed and look.analyses == 1
    assert look.spent == pytest.approx(spending_alpha(0.35, alpha=0.05, spending="hsd"))
    assert not g.observe(0.38, 33.0, 0.0).analysed  # next grid point is 0.4
    assert g.observe(0.3999999999999, 35.0, 0.0).analysed  # float noise on the grid point
    assert not g.observe(0.6, 35.0, 0.0).analysed  # no new information: skipped, no alpha spent
    assert g.spent == pytest.approx(spending_alpha(0.3999999999999, alpha=0.05, spending="hsd"))
    assert not g.observe(0.605, 35.001, 0.0).analysed  # 0.003% more: below the grid's resolution, postponed
    assert g.observe(0.61, 50.0, 0.0).analysed  # pending grid point, information grew
    expected = gst_bounds([0.35, 0.3999999999999, 0.61], alpha=0.05, spending="hsd", information=[30, 35, 50])
    assert g.bounds == pytest.approx(expected, abs=1e-12)


def test_gst_class_final_analysis_spends_all_and_exhausts():
    g = GroupSequentialTest(alpha=0.025, spending="obf", analyses=4)
    looks = _drive(g, [0.25, 0.5, 0.75], [1.0, 2.0, 3.0])
    assert all(x.analysed for x in looks) and not g.exhausted
    final = g.observe(1.2, 4.8, 2.5)  # overrun: the final analysis happens late
    assert final.analysed and final.exhausted and final.spent == 0.025
    assert final.breach == (2.5 >= final.bound)
    assert list(g.bounds) == pytest.approx(
        gst_bounds([0.25, 0.5, 0.75, 1.0], alpha=0.025, spending="obf", information=[1, 2, 3, 4.8]), abs=1e-12
    )
    # Nothing after the final analysis, however extreme the statistic.
    for f in (1.25, 1.5, 3.0):
        later = g.observe(f, 10.0 * f, 50.0)
        assert not later.analysed and not later.breach and later.bound is None
        assert later.exhausted and later.analyses == 4 and later.spent == 0.025


def test_gst_class_breach_flag_and_infinite_bounds():
    g = GroupSequentialTest(alpha=0.025, spending="obf", analyses=60)
    first = g.observe(1 / 60, 1.0, 9.0)
    assert first.analysed and first.bound == INF and not first.breach  # spends ~1e-23: nothing to reject with
    # The last two boundaries are 2.188 and 2.170: z = 2.18 breaches only at the final analysis.
    looks = _drive(g, np.arange(2, 61) / 60, np.arange(2, 61), z=2.18)
    assert looks[-1].exhausted and looks[-1].breach and not any(x.breach for x in looks[:-1])


def test_gst_class_round_trip_continues_identically():
    f = np.arange(1, 201) / 100  # 200 looks, to twice the planned horizon
    info = 3.0 * f**1.3
    z = np.random.default_rng(7).standard_normal(200)
    ref = GroupSequentialTest(alpha=0.05, spending="power", param=2, analyses=25)
    ref_looks = [ref.observe(*x) for x in zip(f, info, z)]
    g = GroupSequentialTest(alpha=0.05, spending="power", param=2, analyses=25)
    looks = []
    for x in zip(f, info, z):
        g = GroupSequentialTest.from_dict(json.loads(json.dumps(g.to_dict(), allow_nan=False)))
        looks.append(g.observe(*x))
    assert looks == ref_looks and g.bounds == ref.bounds
    assert g.exhausted and sum(x.analysed for x in looks) == 25
    # +inf boundaries survive strict JSON.
    o = GroupSequentialTest(alpha=0.025, spending="obf", analyses=60)
    o.observe(1 / 60, 1.0, 0.0)
    restored = GroupSequentialTest.from_dict(json.loads(json.dumps(o.to_dict(), allow_nan=False)))
    assert restored.bounds == (INF,) and restored.spent == o.spent


@pytest.mark.parametrize(
    "pattern",
    ["0.7x", "1.3x", "ramp", "stall"],
)
def test_gst_class_monte_carlo_many_looks_and_overrun_keep_alpha(pattern):
    # 500 controller looks to 1.5x the planned horizon, 50 planned analyses.
    # Under fixed traffic the class's boundaries are deterministic, so they are
    # computed once and the A/A paths are simulated in bulk.
    alpha, n = 0.05, 200_000
    f = 1.5 * np.arange(1, 501) / 500
    info = {
        "0.7x": 0.7 * f,
        "1.3x": 1.3 * f,
        "ramp": f**2,
        "stall": np.where(f < 0.3, f, np.where(f < 0.5, 0.3, f - 0.2)),  # no traffic for a while
    }[pattern]
    g = GroupSequentialTest(alpha=alpha)
    looks = _drive(g, f, info)
    analysed = np.array([x.analysed for x in looks])
    # The final analysis is the first look at or past the horizon, and the last one.
    assert g.exhausted and g.spent == alpha and f[analysed][-1] == f[f >= 1.0][0]
    # While traffic stalls the grid points 0.32 .. 0.48 pass without new information.
    assert analysed.sum() == (41 if pattern == "stall" else 50)
    bounds = [x.bound for x in looks if x.analysed]
    rate = _mc_crossing(bounds, info[analysed], n, seed={"0.7x": 11, "1.3x": 12, "ramp": 13, "stall": 14}[pattern])
    se = math.sqrt(alpha * (1 - alpha) / n)
    assert rate <= alpha + 4 * se and rate >= alpha - 4 * se, (rate, se)


# ---------------------------------------------------------------- argument checking


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: spending_alpha(0.5, alpha=0.05, spending="linear"), "spending"),
        (lambda: spending_alpha(0.5, alpha=0.7, spending="obf"), "alpha"),
        (lambda: spending_alpha(0.5, alpha=0, spending="obf"), "alpha"),
        (lambda: spending_alpha(0.5, alpha=0.05, spending="obf", param=2), "param"),
        (lambda: spending_alpha(0.5, alpha=0.05, spending="power", param=0), "param"),
        (lambda: spending_alpha(0.5, alpha=0.05, spending="hsd", param=math.nan), "param"),
        (lambda: spending_alpha(math.nan, alpha=0.05, spending="hsd"), "fraction"),
        (lambda: gst_bounds([0.5, 0.5, 1.0], alpha=0.05, spending="hsd"), "fractions"),
        (lambda: gst_bounds([0.5, 1.2], alpha=0.05, spending="hsd"), "fractions"),
        (lambda: gst_bounds([], alpha=0.05, spending="hsd"), "fractions"),
        (lambda: gst_bounds([0.5, 1.0], alpha=0.05, spending="hsd", information=[2, 1]), "information"),
        (lambda: gst_bounds([0.5, 1.0], alpha=0.05, spending="hsd", information=[1, 2, 3]), "information"),
        (lambda: GroupSequentialTest(alpha=0.05, analyses=0), "analyses"),
        (lambda: GroupSequentialTest(alpha=0.05, spending="pocok"), "spending"),
        (lambda: GroupSequentialTest(alpha=0.05).observe(0.1, 1.0, math.nan), "z"),
        (lambda: GroupSequentialTest(alpha=0.05).observe(-0.1, 1.0, 0.0), "fraction"),
        (lambda: GroupSequentialTest.from_dict({"alpha": 0.05}), "data"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
