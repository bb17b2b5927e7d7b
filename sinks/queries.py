"""Named queries over the datasets (``safeswap query NAME``), each a polars LazyFrame.

* ``summary``: per rollout, variant, prompt_version and model_version: responses,
  users, sessions, latency (mean, p95), cost per response and per session, error
  and cache-hit rates, tokens; thumbs-down/up per response where feedback exists.
* ``timeline``: every decision in order: what the controller did and what the
  guardrails showed at that moment.
* ``both-arms``: users who were served both variants of a rollout (assignment
  leaks, or users moved by a ramp), with their responses per variant.
"""

from __future__ import annotations

import os
from typing import Callable

import polars as pl

from sinks.datasets import DATASETS
from sinks.read import list_files, scan


def _rollout(frame: pl.LazyFrame, rollout_id: str | None) -> pl.LazyFrame:
    return frame if rollout_id is None else frame.filter(pl.col("rollout_id") == rollout_id)


def distinct_ids(column: str) -> pl.Expr:
    """Distinct ids per group, counted on their 64-bit hashes: an id column's strings cost
    several times more to compare per group than integers (10M rows: ~2.7 s a column
    against ~0.3 s, docs/data.md). Exact but for a hash collision between two ids of one
    group: odds about n**2 / 2**65, 3e-8 for a million sessions."""
    return pl.col(column).hash().n_unique()


def variant_summary(data_dir: str | os.PathLike, rollout_id: str | None = None, *,
                    exact: bool | None = None) -> pl.LazyFrame:
    """Per rollout, variant, prompt_version and model_version.

    Default (``exact`` True or None): distinct users and sessions (:func:`distinct_ids`)
    and ``latency_ms_p95``, at any size. ``exact=False``: HyperLogLog estimates
    (``approx_n_unique``, about 1% error) and no p95, for ``--approx``: about 3x faster
    over 10M rows (docs/data.md)."""
    exact = exact is not False
    keys = ["rollout_id", "variant", "prompt_version", "model_version"]
    traces = _rollout(scan("traces", data_dir), rollout_id)
    distinct = distinct_ids if exact else (lambda c: pl.col(c).approx_n_unique())  # noqa: E731
    extra = [pl.col("latency_ms").quantile(0.95).alias("latency_ms_p95")] if exact else []
    # Grouped on one 64-bit hash of the four keys (their values taken from the group's
    # first row): ~20% less work than hashing and comparing four strings per row.
    summary = traces.group_by(pl.struct(keys).hash().alias("_group")).agg(
        *[pl.col(key).first() for key in keys],
        pl.len().alias("responses"),
        distinct("user_id").alias("users"),
        distinct("session_id").alias("sessions"),
        pl.col("latency_ms").mean().alias("latency_ms_mean"),
        *extra,
        pl.col("cost_usd").sum().alias("cost_usd_total"),
        (pl.col("error") != "none").mean().alias("error_rate"),
        pl.col("cache_hit").mean().alias("cache_hit_rate"),
        pl.col("output_tokens").mean().alias("output_tokens_mean"),
    ).drop("_group").with_columns(
        cost_per_response=pl.col("cost_usd_total") / pl.col("responses"),
        cost_per_session=pl.col("cost_usd_total") / pl.col("sessions"),
    )
    if list_files(os.path.join(data_dir, "feedback")):
        # Feedback per response, joined on trace_id: small (one row per reacted-to trace).
        reacted = (
            _rollout(scan("feedback", data_dir), rollout_id)
            .group_by("trace_id")
            .agg(thumbs_down=(pl.col("kind") == "thumbs_down").any(), thumbs_up=(pl.col("kind") == "thumbs_up").any())
        )
        per_version = (
            traces.select([*keys, "trace_id"]).unique("trace_id")
            .join(reacted, on="trace_id", how="inner")
            .group_by(keys)
            .agg(thumbs_down_n=pl.col("thumbs_down").sum(), thumbs_up_n=pl.col("thumbs_up").sum())
        )
        summary = summary.join(per_version, on=keys, how="left", nulls_equal=True).with_columns(
            thumbs_down_rate=pl.col("thumbs_down_n").fill_null(0) / pl.col("responses"),
            thumbs_up_rate=pl.col("thumbs_up_n").fill_null(0) / pl.col("responses"),
        ).drop("thumbs_down_n", "thumbs_up_n")
    return summary.sort(keys, nulls_last=True)


def decision_timeline(data_dir: str | os.PathLike, rollout_id: str | None = None) -> pl.LazyFrame:
    decisions = _rollout(scan("decisions", data_dir), rollout_id)
    return (
        decisions.unique(["rollout_id", "seq"], keep="last")  # a decision republished is one event
        .with_columns(
            breached=pl.col("evidence").list.eval(
                pl.when(pl.element().struct.field("status") == "breach").then(pl.element().struct.field("metric"))
            ).list.drop_nulls().list.join(","),
        )
        .select("rollout_id", "seq", "ts", "action", "stage", "percent", "breached", "reason")
        .sort("rollout_id", "seq")
    )


def users_in_both_arms(data_dir: str | os.PathLike, rollout_id: str | None = None) -> pl.LazyFrame:
    traces = _rollout(scan("traces", data_dir), rollout_id)
    return (
        traces.group_by("rollout_id", "user_id")
        .agg(
            variants=pl.col("variant").n_unique(),
            control_responses=(pl.col("variant") == "control").sum(),
            candidate_responses=(pl.col("variant") == "candidate").sum(),
            first_seen=pl.col("ts").min(),
            last_seen=pl.col("ts").max(),
        )
        .filter(pl.col("variants") > 1)
        .drop("variants")
        .sort("rollout_id", "user_id")
    )


QUERIES: dict[str, Callable[..., pl.LazyFrame]] = {
    "summary": variant_summary,
    "timeline": decision_timeline,
    "both-arms": users_in_both_arms,
}
# The datasets each query reads (--sql: any of them).
READS: dict[str, list[str]] = {"summary": ["traces", "feedback"], "timeline": ["decisions"], "both-arms": ["traces"]}


def sql(data_dir: str | os.PathLike, query: str) -> pl.LazyFrame:
    """Polars SQL over every dataset, each registered as a table by its name."""
    context = pl.SQLContext({name: scan(name, data_dir) for name in DATASETS})
    return context.execute(query, eager=False)
