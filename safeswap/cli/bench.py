"""``safeswap bench``: the pipeline's benchmarks (benchmarks.pipeline), a thin entry point."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from benchmarks.pipeline import BenchConfig, Reporter, run_bench, table_lines


def register(app) -> None:
    @app.command()
    def bench(
        broker: Annotated[
            str | None, typer.Option("--broker", help="Kafka bootstrap host:port; default: the embedded broker.")
        ] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on the last line.")] = False,
        events: Annotated[
            int,
            typer.Option(
                help="Events for the throughput runs (the default spans ~105 min of event time, so sessions close and outcome records flow while it is measured).",
                min=100,
            ),
        ] = 400_000,
        users: Annotated[int, typer.Option(help="Distinct users in the events.", min=10)] = 100_000,
        trials: Annotated[int, typer.Option(help="Decision-latency trials (0: skip).", min=0)] = 30,
        background_eps: Annotated[
            float, typer.Option("--background-eps", help="Background events/s during the latency trials.", min=0)
        ] = 5000.0,
        rss_events: Annotated[
            int,
            typer.Option(
                "--rss-events",
                help="Also stream this many events through the worker and print its RSS curve (e.g. 10000000).",
                min=0,
            ),
        ] = 0,
        latency_workers: Annotated[
            int, typer.Option("--latency-workers", help="Workers serving the latency trials.", min=1, max=2)
        ] = 1,
        details: Annotated[
            bool, typer.Option("--details", help="Put every measurement in the JSON, not only the contract keys.")
        ] = False,
    ) -> None:
        """Throughput, scaling, decision latency and memory of the pipeline, with same-run baselines (docs/performance.md)."""
        from safeswap.cli.common import settings_from

        cfg = BenchConfig(
            events=events,
            users=users,
            trials=trials,
            background_eps=background_eps,
            rss_events=rss_events,
            latency_workers=latency_workers,
        )
        settings = settings_from(broker)
        out = run_bench(cfg, broker=settings.broker or None, say=Reporter(), base_settings=settings)
        for line in table_lines(out):
            print(line)
        curve = out["details"]["long_rss_curve"]
        if curve:
            print("long RSS curve (events covered, worker MB):")
            for done, mb in curve["curve"][:: max(1, len(curve["curve"]) // 25)] + curve["curve"][-1:]:
                print(f"  {done:>12,} {mb:>8,.0f}")
        if json_out:
            print(json.dumps({**out["result"], "details": out["details"]} if details else out["result"]))
