"""``safeswap dashboard``: the web page (safeswap.dashboard)."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def dashboard(
        broker: Annotated[
            str | None, typer.Option("--broker", help="Kafka bootstrap host:port (env SAFESWAP_BROKER).")
        ] = None,
        data: Annotated[
            str | None,
            typer.Option("--data", help="Show a recorded dataset folder (the Parquet sinks) instead of live topics."),
        ] = None,
        port: Annotated[
            int | None,
            typer.Option(
                "--port", help="Port (env SAFESWAP_DASHBOARD_PORT, default 8050; 0: any free one).", min=0, max=65535
            ),
        ] = None,
        host: Annotated[
            str | None,
            typer.Option("--host", help="Address to bind (env SAFESWAP_DASHBOARD_HOST, default 127.0.0.1)."),
        ] = None,
    ) -> None:
        """Web dashboard: rollouts, stage timeline, guardrail intervals, per-variant metrics.

        Live from the decisions, status and statistics topics (updates without a
        reload), or from a recorded dataset with --data DIR. Set
        SAFESWAP_DASHBOARD_TOKEN to require a bearer token."""
        import asyncio
        import os

        from safeswap.cli.common import UserError, err, settings_from
        from safeswap.dashboard.server import Dashboard, is_loopback, serve_forever

        settings = settings_from(broker, dashboard_port=port, dashboard_host=host)
        if data is not None and not os.path.isdir(data):
            raise UserError(f"--data {data}: no such folder (give the dataset folder of `safeswap simulate --data`)")
        if data is None and not settings.broker:
            raise UserError(
                "no broker: set SAFESWAP_BROKER=host:port or pass --broker, or show a recorded dataset with --data DIR"
            )
        if not is_loopback(settings.dashboard_host) and not settings.dashboard_token:
            err.print(
                f"[yellow]warning:[/yellow] serving on {settings.dashboard_host} without a token: "
                "anyone who can reach it sees your rollouts (set SAFESWAP_DASHBOARD_TOKEN)"
            )
        board = Dashboard(settings, data_dir=data)

        async def main() -> None:
            task = asyncio.create_task(serve_forever(board))
            while board.state is None or board._runner is None:
                if task.done():
                    await task
                await asyncio.sleep(0.05)
            err.print(f"safeswap dashboard on {board.url} ({board.state.model.source}); Ctrl-C stops it")
            await task

        try:
            asyncio.run(main())
        except OSError as exc:
            raise UserError(
                f"cannot serve on {settings.dashboard_host}:{settings.dashboard_port}: {exc.strerror or exc}"
            ) from None
