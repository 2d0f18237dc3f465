"""The packages' layering, as docs/architecture.md writes it ("Layers"): every import among
the modules of retrodb, retrodb_model and retrodb_cli (at module level, inside functions,
and under TYPE_CHECKING) goes to a module of the same layer or a lower one, and no import
circle exists, even within a layer. A new module must be given a layer there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("retrodb", "retrodb_model", "retrodb_cli")
DOC = ROOT / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``name`` imports, anywhere in its file. ``from X import y``
    counts as importing ``X.y`` when that is a module, else ``X``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
            targets = [t for t in targets[:-1] if t in known] or [stem]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import retrodb.neighbours.compute` -> that module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def read_layers() -> dict[str, int]:
    """Module -> layer number, from the table between the ``layers`` markers of the doc."""
    text = DOC.read_text()
    block = text.split("<!-- layers -->")[1]
    layers: dict[str, int] = {}
    for line in block.splitlines():
        m = re.match(r"^\|\s*(\d+)\s*\|[^|]*\|(.*)\|\s*$", line)
        if not m:
            continue
        for mod in re.findall(r"`([\w.]+)`", m.group(2)):
            assert mod not in layers, f"{mod} is given two layers in {DOC.name}"
            layers[mod] = int(m.group(1))
    return layers


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle() -> None:
    assert cycles(graph()) == []


def test_every_module_has_a_layer() -> None:
    layers, mods = read_layers(), set(project_modules())
    assert sorted(mods - set(layers)) == [], f"modules without a layer in {DOC.name}"
    assert sorted(set(layers) - mods) == [], f"{DOC.name} names modules that do not exist"


def test_imports_go_down_the_layers() -> None:
    layers = read_layers()
    upward = [
        f"{a} (layer {layers[a]}) imports {b} (layer {layers[b]})"
        for a, targets in sorted(graph().items())
        for b in sorted(targets)
        if a in layers and b in layers and layers[b] > layers[a]
    ]
    assert upward == []


def test_the_checks_can_fail() -> None:
    """The graph reader sees relative, lazy and TYPE_CHECKING imports, and the cycle
    finder reports a circle."""
    src = ROOT / "retrodb" / "writer.py"
    found = imports_of("retrodb.writer", src, set(project_modules()))
    assert {"retrodb.storage", "retrodb.snapshot", "retrodb.segment"} <= found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
