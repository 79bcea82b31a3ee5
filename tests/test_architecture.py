"""The package's shape, as docs/architecture.md describes it: every module the map names imports, every module of
the package is on the map, imports form no circle (counting imports under TYPE_CHECKING and inside functions), no
module runs over 600 lines (the real datasets' loaders aside), and no two modules share a file name (functional/X
beside scoring/X aside: the math and the scorer that wraps it)."""

from __future__ import annotations

import ast
import importlib
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_chips"
MAP = ROOT / "docs" / "architecture.md"
MAX_LINES = 600
LONG_ALLOWED = {"lightning_chips.datasets.real"}  # three datasets' loaders, one file per the data docs


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its file (top level, TYPE_CHECKING, inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from a.b import c` imports module a.b.c when it is one, else a name of a.b
            candidates = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
            candidates = candidates or [target]
        else:
            continue
        found.update(c for c in candidates if c in modules and c != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_scan_finds_a_circle() -> None:
    """The cycle search itself: a two-module circle and a three-module one are found, a chain is not."""
    graph = defaultdict(set, {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"g"}, "g": set()})
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_modules_stay_short() -> None:
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LONG_ALLOWED}  # fmt: skip
    assert long == {}


def test_no_two_modules_share_a_file_name() -> None:
    by_name: dict[str, list[str]] = defaultdict(list)
    for name, path in _modules().items():
        if path.name != "__init__.py":
            by_name[path.name].append(name.rpartition(".")[0])
    shared = {file: sorted(packages) for file, packages in by_name.items() if len(packages) > 1}
    allowed = ["lightning_chips.functional", "lightning_chips.scoring"]
    assert {file: packages for file, packages in shared.items() if packages != allowed} == {}


def _named_on_the_map() -> set[str]:
    return set(re.findall(r"`(lightning_chips(?:\.\w+)*)`", MAP.read_text()))


def test_the_map_names_modules_that_import() -> None:
    named = _named_on_the_map()
    assert len(named) > 20, "docs/architecture.md names the modules in backticks: `lightning_chips.engine`"
    for name in sorted(named):
        importlib.import_module(name)


def test_every_module_is_on_the_map() -> None:
    missing = sorted(set(_modules()) - _named_on_the_map())
    assert missing == [], f"docs/architecture.md does not say what these modules own: {missing}"


@pytest.mark.parametrize("name", ["lightning_chips.engine", "lightning_chips.callback"])
def test_the_map_says_what_a_module_owns(name: str) -> None:
    """Every module line on the map says what it owns (a module in backticks followed by text on its line)."""
    lines = [line for line in MAP.read_text().splitlines() if f"`{name}`" in line]
    assert lines and all(len(line.split(f"`{name}`", 1)[1].strip(" :-|")) > 10 for line in lines[:1]), lines
