"""`safeswap query` and `safeswap compact` as a user meets them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sinks import DATASETS, Layout
from sinks.writer import write_rows
from tests.support.sinks import raw, trace


def safeswap(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFESWAP_")}
    return subprocess.run(
        [sys.executable, "-m", "safeswap", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_query_formats_sql_compact_and_one_line_errors(tmp_path: Path):
    ds = DATASETS["traces"]
    for batch in range(3):
        write_rows(Layout(tmp_path), ds, 0, [ds.row(raw(trace(batch * 4 + i))) for i in range(4)], batch * 4)
    data = str(tmp_path)

    summary = safeswap("query", "summary", "--data", data, "--format", "json")
    assert summary.returncode == 0, summary.stderr
    rows = json.loads(summary.stdout)
    assert {r["variant"]: r["responses"] for r in rows} == {"candidate": 6, "control": 6}

    both = safeswap("query", "both-arms", "--data", data, "--format", "csv")
    assert both.returncode == 0 and both.stdout.splitlines()[0].startswith("rollout_id,user_id")

    sql = safeswap("query", "--sql", "SELECT COUNT(*) AS n FROM traces", "--data", data, "--format", "json")
    assert json.loads(sql.stdout) == [{"n": 12}]

    table = safeswap("query", "timeline", "--data", data)
    assert table.returncode == 0 and "timeline" in table.stdout

    for args, words in [
        (("query", "summary", "--data", str(tmp_path / "nowhere")), ["nowhere", "--data"]),
        (("query", "--sql", "SELECT nope FROM traces", "--data", data), ["--sql", "nope"]),
        (("query", "frobnicate", "--data", data), ["frobnicate", "summary"]),
        (("query", "summary", "--data", data, "--format", "xml"), ["xml", "csv"]),
        (("compact", "--data", data, "--before", "tomorrow"), ["tomorrow", "YYYY-MM-DD"]),
    ]:
        result = safeswap(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and all(w in result.stderr for w in words), result.stderr

    compact = safeswap("compact", "--data", data, "--before", "2100-01-01", "--grace", "0", "--json")
    assert compact.returncode == 0, compact.stderr
    assert json.loads(compact.stdout.strip().splitlines()[-1])["merged_files"] == 3
    assert json.loads(
        safeswap("query", "--sql", "SELECT COUNT(*) AS n FROM traces", "--data", data, "--format", "json").stdout
    ) == [{"n": 12}]


def test_a_file_that_is_not_parquet_is_named_with_the_fix_on_every_query_path(tmp_path: Path):
    ds = DATASETS["traces"]
    write_rows(Layout(tmp_path), ds, 0, [ds.row(raw(trace(i))) for i in range(4)])
    folder = tmp_path / "traces" / "rollout_id=r1" / "date=2026-01-01"
    bad = folder / "part-1-0-0.parquet"  # another partition: not superseded by part-0-0-3
    bad.write_text("copied here by hand, not Parquet")
    decisions = tmp_path / "decisions" / "rollout_id=r1" / "date=2026-01-01"
    decisions.mkdir(parents=True)
    (decisions / "part-1-5-5.parquet").write_bytes(b"")  # a truncated file
    for args, named in [
        (("query", "summary"), bad),
        (("query", "summary", "--exact"), bad),
        (("query", "summary", "--approx"), bad),
        (("query", "both-arms"), bad),
        (("query", "timeline"), decisions / "part-1-5-5.parquet"),
        (("query", "--sql", "SELECT COUNT(*) AS n FROM traces"), None),
    ]:
        result = safeswap(*args, "--data", str(tmp_path))
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1 and "not a readable Parquet file" in line and "remove it" in line, line
        if named is not None:
            assert str(named) in line.replace("\n", ""), line
    bad.unlink()
    ok = safeswap("query", "summary", "--data", str(tmp_path), "--format", "json")
    assert ok.returncode == 0 and sum(r["responses"] for r in json.loads(ok.stdout)) == 4, ok.stderr
