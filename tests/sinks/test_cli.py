"""`safeswap query` and `safeswap compact` as a user meets them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sinks import DATASETS, Layout
from sinks.writer import write_rows
from tests.sinks.helpers import raw, trace


def safeswap(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFESWAP_")}
    return subprocess.run([sys.executable, "-m", "safeswap", *args], capture_output=True, text=True, env=env,
                          timeout=60)


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
    assert json.loads(safeswap("query", "--sql", "SELECT COUNT(*) AS n FROM traces", "--data", data,
                               "--format", "json").stdout) == [{"n": 12}]
