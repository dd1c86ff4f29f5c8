"""The package's import structure: floors that only import downwards, and no import cycle.

Floors (STYLE.md): 1 config, runtime, mole/, data/, models/, answers, routing tables, demo/; 2 parallel/,
patching; 3 checkpoint/, export, peft_export; 4 train/, inference/, eval/, studies/; 5 the package root (the
public API re-exports). Every import of a mole_ds module counts, at module level or inside a function.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "mole_ds"

FLOORS = {
    1: ("config", "runtime", "mole", "data", "models", "answers", "routing_table", "demo"),
    2: ("parallel", "patching"),
    3: ("checkpoint", "export", "peft_export"),
    4: ("train", "inference", "eval", "studies"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 5  # mole_ds/__init__.py: the public API, above everything it re-exports
    top = parts[1]
    for floor, names in FLOORS.items():
        if top in names:
            return floor
    raise AssertionError(f"{module}: not assigned to a floor in {__file__} (add it to FLOORS)")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The mole_ds modules that ``module`` imports (relative imports resolved; ``from pkg import sub`` names
    the submodule when it is one)."""
    is_pkg = path.name == "__init__.py"
    pkg_parts = module.split(".") if is_pkg else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mole_ds"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[:len(pkg_parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mole_ds":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found |= subs if subs else {target}
    return {m for m in found if m != module}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {}
    for m, p in mods.items():
        deps = set()
        for t in _imports(m, p, known):
            while t not in known and "." in t:  # `from mole_ds.x import name`: name is an attribute of x
                t = t.rsplit(".", 1)[0]
            deps.add(t)
        graph[m] = deps
    return graph


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
            for m, deps in sorted(graph.items()) for t in sorted(deps) if _floor(t) > _floor(m)]


def test_imports_only_go_down_the_floors():
    upward = _upward(_graph())
    assert not upward, "imports that reach up a floor:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles (each a set of modules that import each other):\n  " + "\n  ".join(
        " <-> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    bad = []
    for m, p in _modules().items():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("mole_ds", ""):
                if node.level == 0 and (node.module or "").split(".")[0] != "mole_ds":
                    continue
                bad += [f"{m}: from {'.' * node.level}{node.module or ''} import {a.name}"
                        for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert not bad, "private names imported from another module:\n  " + "\n  ".join(bad)


def test_the_layering_check_sees_a_violation():
    """The check itself: an upward import in a synthetic graph is reported, and the real graph has the edges
    it should (guards against a vacuous pass)."""
    assert _floor("mole_ds.data.loader") == 1 and _floor("mole_ds.train.loop") == 4
    assert _upward({"mole_ds.data.loader": {"mole_ds.train.loop"}}) == [
        "mole_ds.data.loader (floor 1) imports mole_ds.train.loop (floor 4)"]
    g = _graph()
    assert "mole_ds.checkpoint.layout" in g["mole_ds.checkpoint"]
    assert "mole_ds.train.engine" in g["mole_ds.train.loop"]
