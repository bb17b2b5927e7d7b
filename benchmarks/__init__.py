"""Benchmarks, each printing its baseline measured in the same run (docs/performance.md).

``benchmarks.pipeline`` is the pipeline's (``safeswap bench``: installed with the package,
to run against any cluster); the ``bench_*.py`` scripts measure components.
"""
