"""The layout's rules (docs/architecture.md), checked on the source: no import circles;
``streams/`` never imports ``agents/``; only ``safeswap/cli/`` imports typer or the CLI;
the pure core imports no Kafka client, no Faust and no CLI. Function-level imports count."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("safeswap", "streams", "agents", "schemas", "sinks", "benchmarks")
# Decisions, windows, joins and statistics: pure functions of their inputs.
CORE = (
    "safeswap.controller",
    "safeswap.outcomes",
    "safeswap.metrics",
    "safeswap.plan",
    "safeswap.stats",
    "safeswap.assignment",
    "safeswap.shadow_analysis",
    "safeswap.live_scores",
    "safeswap.otlp",
    "streams.sessions",
    "streams.join",
    "streams.dedup",
    "schemas",
)
RUNTIME = ("faust", "aiokafka", "typer", "rich", "safeswap.cli", "agents")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module an import statement in the file names, at any level of the code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def graph() -> dict[str, set[str]]:
    found = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in found.items():
        for target in imports(path):
            if target in found and target != name and not target.startswith(name + "."):
                edges[name].add(target)
    return edges


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                circles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_streams_never_imports_agents_and_only_the_cli_imports_typer():
    wrong = []
    for name, path in modules().items():
        for target in imports(path):
            if name.startswith("streams") and under(target, ("agents",)):
                wrong.append(f"{name} imports {target}")
            if not under(name, ("safeswap.cli", "safeswap.__main__")) and under(target, ("typer", "safeswap.cli")):
                wrong.append(f"{name} imports {target}")
            # the benchmarks measure the product; only `safeswap bench` (and they themselves) import them
            if under(target, ("benchmarks",)) and not under(name, ("benchmarks", "safeswap.cli.bench")):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_the_core_imports_no_runtime():
    wrong = [
        f"{name} imports {target}"
        for name, path in modules().items()
        if under(name, CORE)
        for target in imports(path)
        if under(target, RUNTIME)
    ]
    assert not wrong, wrong
