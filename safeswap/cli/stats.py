"""CLI commands for the statistics library: ``validate-stats`` and ``plan size``.

``register(app, plan_app)`` is called from ``safeswap/cli/__init__.py``.  Errors print
one line on stderr and exit non-zero (no traceback).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safeswap.cli.common import UserError, report_user_errors

__all__ = ["register"]


def _fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def validate_stats(
    runs: Annotated[
        int | None, typer.Option("--runs", help="Simulated rollouts per scenario (default 2000; 200 with --realistic).")
    ] = None,
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object on the last line."),
    realistic: Annotated[
        bool,
        typer.Option(
            "--realistic",
            help="Closed-loop rollouts of realistic traffic through the worker's own code "
            "(safeswap.core.stats.scenarios) instead of the idealised streams.",
        ),
    ] = False,
    scenario: Annotated[
        list[str] | None, typer.Option("--scenario", help="Only this scenario (repeatable; default all).")
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            help="Worker processes for --realistic (the idealised streams are vectorised and ignore it); "
            "results do not depend on it.",
        ),
    ] = 1,
    look_minutes: Annotated[
        float,
        typer.Option("--look-minutes", help="With --realistic: simulated minutes between the controller's looks."),
    ] = 60.0,
) -> None:
    """Monte-Carlo validation: false-rollback and detection rates, safeswap vs naive z-tests."""
    from safeswap.core.stats.validation import run_validation

    err = Console(stderr=True)
    if runs is None:
        runs = 200 if realistic else 2000
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as progress:
            task = progress.add_task("simulating", total=None)

            def report(name: str, done: int, total: int) -> None:
                progress.update(task, description=name, completed=done, total=total)

            if realistic:
                from safeswap.core.stats.scenarios import run_realistic

                result = run_realistic(
                    scenario or None, runs, seed, jobs=jobs, progress=report, look_minutes=look_minutes
                )
            else:
                result = run_validation(runs, seed, progress=report, scenarios=scenario or None)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if realistic:
        console = Console(stderr=as_json)
        if not console.is_terminal:  # a log file: whole scenario names rather than 80 columns
            console = Console(stderr=as_json, width=160)
        console.print(_realistic_table(result))
        if as_json:
            print(json.dumps(result))
        return
    table = Table(
        title=f"safeswap.core.stats validation: {runs} runs, seed {seed}, alpha {result['alpha']}, "
        f"n_tune {result['n_tune']}, fixed-horizon n {result['fixed_horizon_per_arm']}/arm, "
        f"looks every {result['look_every_per_arm']} to {result['horizon_per_arm']}/arm"
    )
    for column in (
        "scenario",
        "type",
        "safeswap rate (±MC SE)",
        "naive rate (±MC SE)",
        "median stop",
        "p80 stop",
        "median stop | detected",
        "naive median stop",
    ):
        table.add_column(column)
    for name, s in result["scenarios"].items():
        ours, naive = s["safeswap"], s["naive"]
        label = "false rollback" if s["kind"] == "aa" else "detection"
        table.add_row(
            name,
            label,
            f"{ours['rate']:.3f} ± {ours['mc_se']:.3f}",
            f"{naive['rate']:.3f} ± {naive['mc_se']:.3f}",
            _fmt_x(ours.get("median_stop_x")),
            _fmt_x(ours.get("p80_stop_x")),
            _fmt_x(ours.get("median_stop_x_detected")),
            _fmt_x(naive.get("median_stop_x")),
        )
    # With --json, stdout is the JSON alone (the table goes to stderr), so `| jq` works.
    Console(stderr=as_json).print(table)
    if as_json:
        print(json.dumps(result))


def _rate_cell(figures: dict) -> str:
    lo, hi = figures["ci95"]
    return f"{figures['rate']:.3f} ± {figures['mc_se']:.3f} ({lo:.3f}-{hi:.3f})"


def _realistic_table(result: dict) -> Table:
    stages = " -> ".join(
        f"{s['percent']:g}%" + (f" {s['min_duration']}" if s.get("min_duration") else "")
        for s in result["plan"]["stages"]
    )
    table = Table(
        title=f"safeswap realistic rollouts: {result['runs']} runs, seed {result['seed']}, "
        f"alpha {result['alpha']}, a look every {result['look_minutes']:g} min; "
        f"plan {stages}, traffic for {result['traffic_days']:g} days"
    )
    for column in (
        "scenario",
        "kind",
        "safeswap rate ± MC SE (Wilson 95%)",
        "previous method rate ± SE",
        "pauses",
        "users/run",
        "runs",
    ):
        table.add_column(column, justify="right" if column in ("pauses", "users/run", "runs") else "left")
    for name, s in result["scenarios"].items():
        previous = s["previous"]
        table.add_row(
            name,
            "A/A false rollback" if s["kind"] == "aa" else "A/B detection",
            _rate_cell(s["safeswap"]),
            f"{previous['rate']:.3f} ± {previous['mc_se']:.3f}",
            f"{s['pause_rate']:.3f}",
            f"{s['users_per_run']:,.0f}",
            str(s["runs"]),
        )
    return table


def plan_size(
    baseline: float = typer.Option(..., "--baseline", help="Control value (rate for proportions)."),
    mde: float = typer.Option(..., "--mde", help="Relative minimum detectable effect, e.g. 0.2 = +20%."),
    alpha: float = typer.Option(0.05, "--alpha"),
    power: float = typer.Option(0.8, "--power"),
    kind: str = typer.Option("proportion", "--kind", help="proportion | mean"),
    std: float | None = typer.Option(None, "--std", help="Per-unit standard deviation (kind=mean)."),
    alternative: str = typer.Option("greater", "--alternative", help="greater | less | two-sided"),
    variance_inflation: float = typer.Option(1.0, "--variance-inflation", help="Design effect for clustered metrics."),
    n_tune: float = typer.Option(5000, "--n-tune", help="Total units where the sequential test is tightest."),
    users_per_hour: float | None = typer.Option(None, "--users-per-hour"),
    percent: float | None = typer.Option(None, "--percent", help="Candidate traffic share in percent."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Users per arm for the fixed-horizon and the sequential test, and how long to watch."""
    from safeswap.core.stats.planning import plan_sample_size, watch_hours

    try:
        plan = plan_sample_size(
            baseline,
            mde,
            alpha=alpha,
            power=power,
            kind=kind,
            std=std,
            alternative=alternative,
            variance_inflation=variance_inflation,
            n_tune=n_tune,
        )
        hours = None
        if (users_per_hour is None) != (percent is None):
            raise ValueError("--users-per-hour and --percent go together")
        if users_per_hour is not None:
            hours = {
                "fixed_horizon": watch_hours(plan.fixed_horizon_per_arm, users_per_hour, percent),
                "sequential": watch_hours(plan.sequential_per_arm, users_per_hour, percent),
            }
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        print(json.dumps({**plan.to_dict(), "watch_hours": hours}))
        return
    table = Table(
        title=f"{kind} {baseline:g} -> {baseline * (1 + mde):g} ({mde:+.0%}), alpha {alpha:g}, "
        f"power {power:g}, {alternative}"
    )
    table.add_column("test")
    table.add_column("users per arm", justify="right")
    if hours:
        table.add_column(f"watch hours at {percent:g}% of {users_per_hour:g}/h", justify="right")
    for label, n, key in (
        ("fixed horizon", plan.fixed_horizon_per_arm, "fixed_horizon"),
        ("sequential (always-valid)", plan.sequential_per_arm, "sequential"),
    ):
        row = [label, f"{n:,}"]
        if hours:
            row.append(f"{hours[key]:.1f}")
        table.add_row(*row)
    Console().print(table)
    Console().print(
        f"Set the plan's n_tune to about {plan.recommended_n_tune:,} (2x the fixed-horizon n per arm): "
        f"the sequential test is then tightest where it typically decides (n_tune used above: {n_tune:g})."
    )


def register(app: typer.Typer, plan_app: typer.Typer) -> None:
    """Add ``validate-stats`` to ``app`` and ``size`` to the ``plan`` sub-app."""
    app.command("validate-stats")(validate_stats)
    plan_app.command("size")(plan_size)
    report_user_errors(app)
    report_user_errors(plan_app)
