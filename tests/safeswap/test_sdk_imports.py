"""The app SDK loads without the worker's runtime: an app that emits events and asks for
variants installs safeswap but never imports Faust, typer or the statistics' heavy parts."""

from __future__ import annotations

import subprocess
import sys

# Importing any of these from the SDK would mean an app loads the worker or the CLI.
FORBIDDEN = ("faust", "typer", "rich", "polars", "pyarrow", "agents", "sinks")
SDK = ("safeswap.emitter", "safeswap.flags", "safeswap.openfeature", "safeswap.shadow", "safeswap.core.assignment")

PROBE = """
import importlib.abc, sys
FORBIDDEN = {forbidden!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"the SDK imported {{name}}")
        return None

sys.meta_path.insert(0, Refuse())
import safeswap
from safeswap import Emitter, FlagClient
for module in {sdk!r}:
    importlib.import_module(module)
print("ok")
"""


def test_the_app_sdk_imports_without_faust_typer_or_the_data_stack():
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(forbidden=FORBIDDEN, sdk=SDK)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
