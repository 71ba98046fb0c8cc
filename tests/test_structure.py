"""kvmpy's structure: no import cycle inside the package, no hand-written module over ~400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import kvmpy

PKG = Path(kvmpy.__file__).resolve().parent
MAX_LINES = 400
GENERATED = {"kvmpy.guest.stages"}   # written by build_guest.sh from guests/lib/stages.h
# Packages left out of the checks (empty: the whole package is checked).
NOT_YET: tuple = ()


def _checked(name: str) -> bool:
    return not any(name == p or name.startswith(p + ".") for p in NOT_YET)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__.py)."""
    out = {}
    for path in sorted(PKG.rglob("*.so")):      # the compiled binding (kvmpy._kvm_abi)
        out[".".join(("kvmpy",) + path.relative_to(PKG).parent.parts + (path.name.split(".")[0],))] = path
    for path in sorted(PKG.rglob("*.py")):
        parts = ("kvmpy",) + path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The kvmpy modules ``name`` imports when it runs: top level and inside functions,
    not under ``if TYPE_CHECKING`` (annotations only)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:      # kvmpy.x.y.Name -> kvmpy.x.y
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    if path.suffix == ".py":
        visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m.startswith("kvmpy")}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {m for m in imports(name, path, known) if _checked(m)}
            for name, path in mods.items() if _checked(name)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}     # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "kvmpy.guest.vm" in graph["kvmpy.guest.stepper"]
    assert "kvmpy.kvm" in graph["kvmpy.selftest.fixtures"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_kvmpy():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_over_400_lines():
    long = {name: n for name, path in modules().items()
            if name not in GENERATED and _checked(name) and path.suffix == ".py" and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concept: {long}"
