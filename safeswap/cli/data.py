"""``safeswap query`` and ``safeswap compact``: the Parquet datasets from the command line.

Errors are one line naming the folder, dataset or query and the fix; exit code 2.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from safeswap.cli.common import UserError, report_user_errors

err = Console(stderr=True, soft_wrap=True)

DataOption = Annotated[
    str | None,
    typer.Option("--data", help="Dataset folder (env SAFESWAP_DATA_DIR, default ./safeswap-data)."),
]


def _data_dir(data: str | None) -> Path:
    from streams.settings import Settings

    if data is None:
        try:
            data = Settings.from_env().data_dir
        except ValueError as exc:
            raise UserError(str(exc)) from None
    path = Path(data)
    if not path.is_dir():
        raise UserError(
            f"{path}: no dataset folder here (fix: pass --data DIR where a worker or `safeswap demo --data DIR` "
            f"wrote, or set SAFESWAP_DATA_DIR)"
        )
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _print(frame, fmt: str, title: str) -> None:
    if fmt == "csv":
        sys.stdout.write(frame.write_csv())
    elif fmt == "json":
        sys.stdout.write(json.dumps(frame.to_dicts(), default=str) + "\n")
    else:
        from rich.table import Table

        console = Console(soft_wrap=False)
        cell = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        # A wide result (the per-variant summary) reads better turned on its side:
        # one row per column, one column per result row.
        if frame.width * 12 > console.width and frame.height <= 12:
            table = Table(title=title)
            table.add_column("", style="bold")
            for index in range(frame.height):
                table.add_column(f"#{index + 1}", overflow="fold")
            for name in frame.columns:
                table.add_row(name, *(cell(v) for v in frame.get_column(name).to_list()))
        else:
            table = Table(title=title)
            for name in frame.columns:
                table.add_column(name, overflow="fold")
            for row in frame.iter_rows():
                table.add_row(*(cell(v) for v in row))
        console.print(table)


def register(app: typer.Typer) -> None:
    from sinks.queries import QUERIES

    names = "|".join(QUERIES)

    @app.command()
    def query(
        name: Annotated[str | None, typer.Argument(help="Named query: summary|timeline|both-arms.")] = None,
        sql: Annotated[
            str | None,
            typer.Option(
                "--sql",
                help="Polars SQL; tables: traces, feedback, outcomes, stats, decisions, plans, shadow, judgments, "
                "live_scores, dlq.",
            ),
        ] = None,
        data: DataOption = None,
        rollout: Annotated[str | None, typer.Option("--rollout", help="Only this rollout_id.")] = None,
        fmt: Annotated[str, typer.Option("--format", help="table|csv|json")] = "table",
        limit: Annotated[int, typer.Option(help="At most this many rows (0: all).", min=0)] = 200,
        exact: Annotated[
            bool | None,
            typer.Option(
                "--exact/--approx",
                help="summary: exact distinct users/"
                "sessions and p95 latency (default, any size), or HyperLogLog "
                "estimates without p95.",
            ),
        ] = None,
    ) -> None:
        """Ask the Parquet datasets: per-variant summary, decision timeline, users in both arms, or SQL."""
        import polars as pl

        from sinks.queries import READS
        from sinks.queries import sql as run_sql
        from sinks.read import UnreadableFile, find_unreadable

        if fmt not in ("table", "csv", "json"):
            raise UserError(f"--format {fmt!r}: use table, csv or json")
        if (name is None) == (sql is None):
            raise UserError(f"give a query name ({names}) or --sql 'SELECT ...', not both or neither")
        if name is not None and name not in QUERIES:
            raise UserError(f"unknown query {name!r} (fix: use one of {names}, or --sql)")
        folder = _data_dir(data)
        try:
            frame = (
                run_sql(folder, sql)
                if sql is not None
                else (
                    QUERIES[name](folder, rollout_id=rollout, exact=exact)
                    if name == "summary"
                    else QUERIES[name](folder, rollout_id=rollout)
                )
            )
            if limit:
                frame = frame.limit(limit)
            result = frame.collect(engine="streaming")
        except UnreadableFile as exc:
            raise UserError(str(exc)) from None
        except (pl.exceptions.PolarsError, OSError) as exc:
            # Polars does not say which file it could not read: find it, so the fix is clear.
            bad = find_unreadable(folder, READS.get(name or ""))
            if bad is not None:
                raise UserError(str(bad)) from None
            what = "--sql" if sql is not None else f"query {name}"
            raise UserError(
                f"{what} over {folder}: {_first_line(exc)} (fix: tables and columns are listed in docs/data.md)"
            ) from None
        _print(result, fmt, title=name or "sql")

    @app.command()
    def compact(
        data: DataOption = None,
        dataset: Annotated[list[str] | None, typer.Option("--dataset", help="Only this dataset (repeatable).")] = None,
        before: Annotated[
            str | None,
            typer.Option(help="Compact dates before this YYYY-MM-DD (default: today, UTC: every closed date)."),
        ] = None,
        grace: Annotated[
            float, typer.Option(help="Seconds a merged file's inputs stay for readers already listing them.", min=0)
        ] = 10.0,
        json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    ) -> None:
        """Merge the small files of closed date partitions (safe beside running workers and readers)."""
        from sinks.compact import compact as run_compact
        from sinks.datasets import DATASETS

        folder = _data_dir(data)
        for name in dataset or []:
            if name not in DATASETS:
                raise UserError(f"--dataset {name!r}: unknown (fix: use one of {', '.join(DATASETS)})")
        cutoff = None
        if before is not None:
            try:
                cutoff = dt.date.fromisoformat(before)
            except ValueError:
                raise UserError(f"--before {before!r}: not a date (fix: YYYY-MM-DD)") from None
        report = run_compact(folder, dataset or None, before=cutoff, grace_s=grace)
        if json_out:
            print(json.dumps(report.as_dict()))
        else:
            err.print(
                f"compacted {report.merged_files} files into {report.written_files} in {report.folders} "
                f"closed folders ({report.rows:,} rows); removed {report.removed_files} superseded files"
            )
        for line in report.errors:
            err.print(f"[yellow]skipped:[/yellow] {line}", highlight=False)

    report_user_errors(app)
