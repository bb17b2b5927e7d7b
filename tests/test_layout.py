"""The layout's rules (docs/architecture.md), checked on the source: no import circles;
each package imports only the layers below it; only ``safeswap/cli/`` imports typer or
the CLI; the pure core imports no Kafka client, no Faust and no CLI. Function-level
imports count."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("safeswap", "streams", "agents", "schemas", "sinks", "benchmarks")
SDK = ("safeswap.emitter", "safeswap.flags", "safeswap.openfeature", "safeswap.shadow")
# What each part of the tree may import of the others (its own modules aside): the data
# flow read bottom-up. Parts are matched longest prefix first.
MAY_IMPORT = {
    "schemas": (),
    "safeswap.core": ("schemas",),
    "streams": ("schemas",),
    "sinks": ("schemas", "streams"),
    **{sdk: ("schemas", "streams", "safeswap.core", *SDK) for sdk in SDK},
    "safeswap.judge": ("schemas", "streams", "safeswap.core"),
    "agents": ("schemas", "streams", "sinks", "safeswap.core", "safeswap.judge", *SDK),
    "safeswap.dashboard": ("schemas", "streams", "sinks", "safeswap.core"),
    "safeswap.tools": ("schemas", "streams", "sinks", "safeswap.core", "safeswap.judge", *SDK),
    "benchmarks": ("schemas", "streams", "sinks", "agents", "safeswap.core", "safeswap.tools", *SDK),
    "safeswap.cli": ("schemas", "streams", "sinks", "agents", "benchmarks", "safeswap"),
    "safeswap.__main__": ("safeswap.cli",),
    "safeswap": SDK,  # the package's own __init__: the SDK's lazy exports
}
RUNTIME = ("faust", "aiokafka", "typer", "rich")


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


def part(name: str) -> str:
    return max((p for p in MAY_IMPORT if under(name, (p,))), key=len)


def test_a_new_module_at_the_top_of_safeswap_is_given_its_part():
    # safeswap/ holds the app SDK, the judge and the concept packages; anything else
    # there would have no declared place in the data flow.
    loose = [name for name in modules() if part(name) == "safeswap" and name != "safeswap"]
    assert not loose, f"{loose}: put them in a package (core, tools, ...) or declare them in MAY_IMPORT"


def test_each_part_imports_only_the_layers_below_it():
    wrong = []
    for name, path in modules().items():
        mine = part(name)
        for target in imports(path):
            if target.split(".")[0] not in PACKAGES:
                continue
            theirs = part(target)
            if theirs != mine and not under(target, MAY_IMPORT[mine]):
                wrong.append(f"{name} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_only_the_cli_imports_typer_and_the_core_imports_no_runtime():
    wrong = [
        f"{name} imports {target}"
        for name, path in modules().items()
        for target in imports(path)
        if (under(target, ("typer",)) and not under(name, ("safeswap.cli",)))
        or (under(name, ("safeswap.core", "schemas")) and under(target, RUNTIME))
    ]
    assert not wrong, wrong


def test_the_tests_mirror_the_tree():
    # tests/<path>/ tests the package (or the module, when it has many tests) at <path>
    beside = {"support", "faults"}  # shared helpers; the running system under faults
    tests = ROOT / "tests"
    wrong = [
        str(folder.relative_to(ROOT))
        for folder in tests.rglob("*")
        if folder.is_dir()
        and folder.name != "__pycache__"
        and folder.relative_to(tests).parts[0] not in beside
        and not (ROOT / folder.relative_to(tests)).is_dir()
        and not (ROOT / folder.relative_to(tests)).with_suffix(".py").is_file()
    ]
    assert not wrong, f"{wrong}: no package or module at that path to mirror"
