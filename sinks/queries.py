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

import functools
import operator
import os
from collections.abc import Callable

import polars as pl

from sinks.datasets import DATASETS
from sinks.read import list_files, scan


def _rollout(frame: pl.LazyFrame, rollout_id: str | None) -> pl.LazyFrame:
    return frame if rollout_id is None else frame.filter(pl.col("rollout_id") == rollout_id)


SUMMARY_KEYS = ["rollout_id", "variant", "prompt_version", "model_version"]
# Groups are keyed on one 64-bit hash of the four keys (their values taken from the group's
# first row): cheaper than comparing four strings per row. Each key is hashed with its own
# seed and the hashes XORed, which costs 0.6x a struct's hash (that row-encodes the
# strings first); two different key tuples share a hash with odds about 2**-64.
_GROUP = functools.reduce(operator.xor, [pl.col(key).hash(seed=i) for i, key in enumerate(SUMMARY_KEYS)]).alias(
    "_group"
)


def _streamable_figures() -> list[pl.Expr]:
    """The figures polars' streaming engine computes per group in one pass."""
    return [
        *[pl.col(key).first() for key in SUMMARY_KEYS],
        pl.len().alias("responses"),
        pl.col("latency_ms").mean().alias("latency_ms_mean"),
        pl.col("cost_usd").sum().alias("cost_usd_total"),
        (pl.col("error") != "none").mean().alias("error_rate"),
        pl.col("cache_hit").mean().alias("cache_hit_rate"),
        pl.col("output_tokens").mean().alias("output_tokens_mean"),
    ]


def _reactions(feedback: pl.LazyFrame) -> pl.LazyFrame:
    """One row per trace that got feedback: did it get a thumbs-down, a thumbs-up?"""
    return feedback.group_by("trace_id").agg(
        thumbs_down=(pl.col("kind") == "thumbs_down").any(), thumbs_up=(pl.col("kind") == "thumbs_up").any()
    )


def _thumbs(traces: pl.LazyFrame, reactions: pl.LazyFrame) -> pl.LazyFrame:
    """Per group: responses that got a thumbs-down / thumbs-up. Reactions are few (one row
    per reacted-to trace), so they are joined first and only the matches deduplicated."""
    return (
        traces.select("_group", "trace_id")
        .join(reactions, on="trace_id", how="inner")
        .unique("trace_id")  # a trace written twice (a replayed file) is one response
        .group_by("_group")
        .agg(thumbs_down_n=pl.col("thumbs_down").sum(), thumbs_up_n=pl.col("thumbs_up").sum())
    )


# The summary's columns, in the order `safeswap query summary` prints them.
SUMMARY_COLUMNS = [
    *SUMMARY_KEYS,
    "responses",
    "users",
    "sessions",
    "latency_ms_mean",
    "latency_ms_p95",
    "cost_usd_total",
    "error_rate",
    "cache_hit_rate",
    "output_tokens_mean",
    "cost_per_response",
    "cost_per_session",
    "thumbs_down_rate",
    "thumbs_up_rate",
]


def _assemble(figures: pl.LazyFrame, thumbs: pl.LazyFrame | None) -> pl.LazyFrame:
    summary = figures.with_columns(
        cost_per_response=pl.col("cost_usd_total") / pl.col("responses"),
        cost_per_session=pl.col("cost_usd_total") / pl.col("sessions"),
    )
    if thumbs is not None:
        summary = summary.join(thumbs, on="_group", how="left").with_columns(
            thumbs_down_rate=pl.col("thumbs_down_n").fill_null(0) / pl.col("responses"),
            thumbs_up_rate=pl.col("thumbs_up_n").fill_null(0) / pl.col("responses"),
        )
    present = summary.collect_schema().names()
    return summary.select([c for c in SUMMARY_COLUMNS if c in present]).sort(SUMMARY_KEYS, nulls_last=True)


def variant_summary(
    data_dir: str | os.PathLike, rollout_id: str | None = None, *, exact: bool | None = None
) -> pl.LazyFrame:
    """Per rollout, variant, prompt_version and model_version: responses, users, sessions,
    latency, cost, error and cache-hit rates, tokens; thumbs-down/up rates per response
    when there is feedback.

    Default (``exact`` True or None): exact distinct users and sessions and
    ``latency_ms_p95`` at any size. Exact distinct counts and quantiles need each
    group's values at once, which polars' streaming engine does not do: given them, it
    reads every column the query names into memory (~3 GB over 10M rows, a third of the
    time spent on page faults). So they are computed apart, over only the ids (as 64-bit
    hashes: distinct counts on integers, not strings, ~0.3 s a column against ~2.7 s)
    and the latency; everything else streams. Exact but for a hash collision between two
    ids of one group: odds about n**2 / 2**65, 3e-8 for a million sessions.

    ``exact=False`` (``--approx``): HyperLogLog estimates (``approx_n_unique``, about 1%
    error) and no p95, in one streaming pass (docs/data.md has both timings)."""
    exact = exact is not False
    traces = _rollout(scan("traces", data_dir), rollout_id).with_columns(_GROUP)
    reactions = (
        _reactions(_rollout(scan("feedback", data_dir), rollout_id)).with_columns(pl.col("trace_id").hash())
        if list_files(os.path.join(data_dir, "feedback"))
        else None
    )
    distinct = (
        []
        if exact
        else [
            pl.col("user_id").approx_n_unique().alias("users"),
            pl.col("session_id").approx_n_unique().alias("sessions"),
        ]
    )
    streamed = traces.group_by("_group").agg(*_streamable_figures(), *distinct)
    # Ids as 64-bit hashes; trace_id only when there is feedback to join it with (a false
    # match: odds about traces x reactions / 2**64).
    hashed = (["user_id", "session_id"] if exact else []) + (["trace_id"] if reactions is not None else [])
    ids = (
        traces.select("_group", *[pl.col(c).hash() for c in hashed], *(["latency_ms"] if exact else []))
        if hashed
        else None
    )

    def summary(streamed: pl.LazyFrame, ids: pl.LazyFrame | None, reactions: pl.LazyFrame | None) -> pl.LazyFrame:
        figures = streamed
        if exact:
            figures = streamed.join(
                ids.group_by("_group").agg(
                    pl.col("user_id").n_unique().alias("users"),
                    pl.col("session_id").n_unique().alias("sessions"),
                    pl.col("latency_ms").quantile(0.95, interpolation="nearest").alias("latency_ms_p95"),
                ),
                on="_group",
            )
        return _assemble(figures, None if reactions is None else _thumbs(ids, reactions))

    return _one_after_the_other(summary, [streamed, ids, reactions])


def _one_after_the_other(build: Callable[..., pl.LazyFrame], inputs: list[pl.LazyFrame | None]) -> pl.LazyFrame:
    """``build(*inputs)``, collecting its inputs one after the other (streaming) when it is
    collected itself. Written as one plan, polars would cache a scan two inputs share,
    the whole dataset in memory (10M traces: 1.8 GB for the approximate summary with
    feedback, against 0.5); collected together (``pl.collect_all``) they peak ~1.8x higher
    and are no faster on two cores."""

    def run() -> pl.DataFrame:
        now = [None if frame is None else frame.collect(engine="streaming").lazy() for frame in inputs]
        return build(*now).collect(engine="streaming")

    schema = build(*[None if frame is None else pl.LazyFrame(schema=frame.collect_schema()) for frame in inputs])
    return pl.defer(run, schema=schema.collect_schema())


def decision_timeline(data_dir: str | os.PathLike, rollout_id: str | None = None) -> pl.LazyFrame:
    decisions = _rollout(scan("decisions", data_dir), rollout_id)
    return (
        decisions.unique(["rollout_id", "seq"], keep="last")  # a decision republished is one event
        .with_columns(
            breached=pl.col("evidence")
            .list.eval(
                pl.when(pl.element().struct.field("status") == "breach").then(pl.element().struct.field("metric"))
            )
            .list.drop_nulls()
            .list.join(","),
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
