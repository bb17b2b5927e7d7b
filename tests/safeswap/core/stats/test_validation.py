"""Smoke of the validation simulation (CI-sized) and the CLI commands."""

import json
import math

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from safeswap.cli.stats import register
from safeswap.core.stats import Proportion, sequential_compare
from safeswap.core.stats.quantiles import LatencyHistogram, _concentration, quantile_bounds
from safeswap.core.stats.validation import N_TUNE, cs_reject, quantile_certified, run_validation


def test_vectorised_boundary_agrees_with_sequential_compare():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(200, 12000))
        a, b = Proportion(n, int(rng.binomial(n, 0.05))), Proportion(n, int(rng.binomial(n, 0.06)))
        if a.successes in (0, n) or b.successes in (0, n):
            continue
        r = sequential_compare(a, b, difference="absolute", alternative="greater", n_tune=N_TUNE)
        assert bool(cs_reject(np.array(r.estimate), np.array(r.std_error**2), 2 * n)) == (r.ci_low > 0)


def test_vectorised_quantile_bounds_agree_with_quantile_bounds():
    """The validation's p95 scenarios re-implement the per-arm bounds on arrays; same answers."""
    rng = np.random.default_rng(3)
    q, alpha, n_tune = 0.95, 0.025, N_TUNE / 2
    c = _concentration(q, alpha, n_tune)
    for _ in range(40):
        n = int(rng.integers(50, 5000))
        hist = LatencyHistogram.from_values(rng.lognormal(math.log(800), 1.0, size=n))
        below = hist.counts_below_edges()
        lower_ok, upper_ok = quantile_certified(below, float(hist.n), q, c, -math.log(alpha))
        edges = hist.edges
        lower = float(edges[lower_ok].max()) if lower_ok.any() else 0.0
        upper = float(edges[upper_ok].min()) if upper_ok.any() else math.inf
        assert (lower, upper) == quantile_bounds(hist, q, alpha, n_tune)


# The tests sharing this module fixture run in one xdist process, so it is computed once.
@pytest.fixture(scope="module")
def smoke():
    return run_validation(300, seed=1)


@pytest.mark.xdist_group("validation_smoke")
def test_validation_smoke_false_rollback_below_alpha(smoke):
    """300 runs per scenario: every A/A false-rollback rate below alpha + 3 MC SE."""
    se = math.sqrt(0.05 * 0.95 / 300)
    for name, s in smoke["scenarios"].items():
        if s["kind"] == "aa":
            assert s["safeswap"]["rate"] <= 0.05 + 3 * se, name


@pytest.mark.xdist_group("validation_smoke")
def test_validation_smoke_shows_naive_peeking_inflates_errors_and_we_detect(smoke):
    se = math.sqrt(0.05 * 0.95 / 300)
    assert smoke["scenarios"]["bernoulli_aa"]["naive"]["rate"] > 0.05 + 3 * se
    ab = smoke["scenarios"]["bernoulli_ab"]["safeswap"]
    assert ab["rate"] > 0.6 and ab["median_stop_x_detected"] < 1.5
    # The stop-size distribution is cumulative and ends at the detection rate.
    stopped = list(ab["stopped_by_x"].values())
    assert stopped == sorted(stopped) and stopped[-1] == pytest.approx(ab["rate"], abs=1e-4)
    lo, hi = ab["ci95"]
    assert lo < ab["rate"] < hi


def test_validation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="runs"):
        run_validation(0)
    with pytest.raises(ValueError, match="scenarios"):
        run_validation(20, scenarios=["nope"])


def _app():
    app, plan_app = typer.Typer(), typer.Typer()
    app.add_typer(plan_app, name="plan")
    register(app, plan_app)
    return app


def test_cli_plan_size_json():
    result = CliRunner().invoke(
        _app(),
        ["plan", "size", "--baseline", "0.05", "--mde", "0.2", "--users-per-hour", "1000", "--percent", "10", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["fixed_horizon_per_arm"] == 6424
    assert data["watch_hours"]["fixed_horizon"] == pytest.approx(64.24)


def test_cli_errors_are_one_line_and_non_zero():
    result = CliRunner().invoke(_app(), ["plan", "size", "--baseline", "1.5", "--mde", "0.2"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output and "baseline" in result.output


def test_cli_validate_stats_json_last_line():
    result = CliRunner().invoke(_app(), ["validate-stats", "--runs", "20", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["runs"] == 20 and "bernoulli_aa" in data["scenarios"]
