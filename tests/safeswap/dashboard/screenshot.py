"""Regenerate docs/dashboard.png from the scenario its caption documents (docs/dashboard.md):

    python -m tests.safeswap.dashboard.screenshot            # writes docs/dashboard.png
    python -m tests.safeswap.dashboard.screenshot --out x.png --workdir DIR   # keeps the dataset

``safeswap simulate`` of examples/plan.yaml with examples/scenario-fast-rollback.yaml
(embedded broker, a few minutes), then the recorded dashboard of its dataset in the same
headless Chromium as the browser test, which fails here too if a chart did not render
or a request left 127.0.0.1. Not a test: the picture is checked by looking at it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safeswap.dashboard.server import Dashboard
from streams.settings import Settings
from tests.safeswap.dashboard.browser import save, visit_page

ROOT = Path(__file__).resolve().parents[3]
PLAN = ROOT / "examples" / "plan.yaml"
SCENARIO = ROOT / "examples" / "scenario-fast-rollback.yaml"
DATASET = "safeswap-data"  # relative, so the page header reads "recorded: safeswap-data"


def simulate(workdir: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "safeswap",
        "simulate",
        "--plan",
        str(PLAN),
        "--scenario",
        str(SCENARIO),
        "--data",
        DATASET,
        "--json",
    ]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"safeswap simulate failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    print(done.stdout.strip().splitlines()[-1], file=sys.stderr)


def shoot(workdir: Path, out: Path) -> Path:
    os.chdir(workdir)
    board = Dashboard(Settings(), data_dir=DATASET, host="127.0.0.1", port=0).run_in_thread()
    try:
        visit = visit_page(board.url)
    finally:
        board.stop_thread()
    foreign = [u for u in visit.requests if not u.startswith("http://127.0.0.1:")]
    charts = visit.charts
    if foreign or visit.failed or visit.console_errors or charts.get("nonempty", 0) < 4:
        raise SystemExit(
            f"the page did not render cleanly: foreign={foreign} failed={visit.failed} "
            f"console={visit.console_errors} charts={ {k: charts.get(k) for k in ('svg', 'nonempty')} }"
        )
    return save(visit.screenshot, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the simulated dataset here (DIR/safeswap-data); if it is there already, only take the screenshot",
    )
    args = parser.parse_args()
    out = args.out.resolve()
    if args.workdir is not None:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        if not (workdir / DATASET).is_dir():
            simulate(workdir)
        print(f"wrote {shoot(workdir, out)}", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory(prefix="safeswap-screenshot-") as workdir:
        simulate(Path(workdir))
        print(f"wrote {shoot(Path(workdir), out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
