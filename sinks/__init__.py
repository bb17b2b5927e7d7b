"""Parquet datasets of every event, statistic and decision, and polars reading helpers.

Writing (pinned Arrow schemas, staging + atomic rename, offset-named files,
checkpoints) is Faust-free here; ``agents/sink.py`` drives it from Kafka.
Reading: ``sinks.scan("traces", data_dir=...)`` -> ``polars.LazyFrame``;
``sinks.count_rows(data_dir)`` -> rows per dataset. See docs/data.md.
"""

from sinks.compact import compact
from sinks.datasets import DATASETS, Dataset, dataset
from sinks.queries import QUERIES, decision_timeline, sql, users_in_both_arms, variant_summary
from sinks.read import UnreadableFile, count_rows, list_files, scan, wait_for_rows
from sinks.writer import Layout, PartitionWriter, Rotation

__all__ = [
    "DATASETS",
    "Dataset",
    "Layout",
    "PartitionWriter",
    "QUERIES",
    "Rotation",
    "UnreadableFile",
    "compact",
    "count_rows",
    "dataset",
    "decision_timeline",
    "list_files",
    "scan",
    "sql",
    "users_in_both_arms",
    "variant_summary",
    "wait_for_rows",
]
