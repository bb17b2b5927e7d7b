"""User-written YAML/JSON files (plans, scenarios): decode into msgspec structs,
and say what is wrong with the field path, the line in the file and the fix."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import yaml


@dataclass(frozen=True)
class ConfigIssue:
    path: str  # "stages[1].percent"
    message: str
    line: int | None = None

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path}: {self.message}"


def read_config(path: str | Path) -> tuple[Any, dict[str, int], ConfigIssue | None]:
    """(data, line of every field path, None) or (None, {}, the reason it cannot be read)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None, {}, ConfigIssue("$", "file not found: check the path")
    except (OSError, UnicodeDecodeError) as exc:
        return None, {}, ConfigIssue("$", f"cannot read the file: {exc}")
    try:
        return yaml.safe_load(text), _lines_of(text), None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        return None, {}, ConfigIssue("$", f"not valid YAML/JSON: {problem}", mark.line + 1 if mark else None)


def _lines_of(text: str) -> dict[str, int]:
    lines: dict[str, int] = {}
    root = yaml.compose(text, Loader=yaml.SafeLoader)

    def walk(node: yaml.Node, path: str) -> None:
        lines.setdefault(path or "$", node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = f"{path}.{key.value}" if path else str(key.value)
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = f"{path}[{index}]"
                lines[child] = item.start_mark.line + 1
                walk(item, child)

    if root is not None:
        walk(root, "")
    return lines


_PARENT = re.compile(r"(\.[^.\[]+|\[\d+\])$")


def line_for(path: str, lines: dict[str, int]) -> int | None:
    """The line of ``path``, or of its nearest parent the file has."""
    while path:
        if path in lines:
            return lines[path]
        parent = _PARENT.sub("", path)
        path = "" if parent == path else parent
    return lines.get("$")


def unknown_fields(data: Any, struct: type, path: str = "") -> list[tuple[str, str]]:
    """Fields the struct (and the structs inside it) do not have, with the allowed ones."""
    found: list[tuple[str, str]] = []

    def walk(value: Any, info: mi.Type, where: str) -> None:
        if isinstance(info, mi.UnionType):
            structs = [t for t in info.types if isinstance(t, mi.StructType)]
            if isinstance(value, dict) and structs:
                tagged = [t for t in structs if t.tag_field and value.get(t.tag_field) == t.tag]
                chosen = tagged or (structs if len(structs) == 1 else [])
                for member in chosen:  # an unknown tag is msgspec's to report
                    walk(value, member, where)
            for member in info.types:
                if not isinstance(member, mi.StructType):
                    walk(value, member, where)
        elif isinstance(info, mi.StructType) and isinstance(value, dict):
            names = {f.encode_name: f for f in info.fields}
            for key, item in value.items():
                child = f"{where}.{key}" if where else str(key)
                if key not in names:
                    if info.tag_field != key:
                        found.append((child, f"unknown field; allowed here: {', '.join(names)}"))
                else:
                    walk(item, names[key].type, child)
        elif isinstance(info, mi.ListType) and isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, info.item_type, f"{where}[{index}]")
        elif isinstance(info, mi.DictType) and isinstance(value, dict):
            for key, item in value.items():
                walk(item, info.value_type, f"{where}.{key}" if where else str(key))

    walk(data, mi.type_info(struct), path)
    return found


_MSGSPEC_PATH = re.compile(r" - at `\$\.?([^`]*)`")


def convert_config(data: Any, struct: type, lines: dict[str, int], what: str) -> tuple[Any, list[ConfigIssue]]:
    """(struct, []) or (None, issues): unknown fields first (a typo must not be ignored)."""
    if not isinstance(data, dict):
        return None, [ConfigIssue("$", f"a {what} is a mapping of fields", 1)]
    unknown = unknown_fields(data, struct)
    if unknown:
        return None, [ConfigIssue(p, m, line_for(p, lines)) for p, m in unknown]
    try:
        return msgspec.convert(data, struct), []
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _MSGSPEC_PATH.search(text)
        path = (match.group(1) if match else "") or "$"
        return None, [ConfigIssue(path, _MSGSPEC_PATH.sub("", text), line_for(path, lines))]
