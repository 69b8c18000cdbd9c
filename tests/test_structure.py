"""The package's import graph, read from the source (module-level and function-level imports alike): no cycle,
no private name imported from another module, and the library never imports argparse or the CLI."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "layerboost"


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, str]], dict[str, set[str]]]:
    """(edges: module -> package modules it imports, private names imported across modules, every top-level
    name each module imports). A module importing `a.b.c` also imports the packages `a.b` and `a` above it,
    unless it lives inside them (then they are already being imported)."""
    edges = {m: set() for m in mods}
    private, external = [], {m: set() for m in mods}

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for m, f in mods.items():
        pkg = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                for a in node.names:
                    external[m].add(a.name.split(".")[0])
                    if a.name.split(".")[0] == "layerboost":
                        targets.append((known(a.name), None))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                external[m].add(base.split(".")[0])
                if base.split(".")[0] != "layerboost":
                    continue
                for a in node.names:
                    t = known(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else known(base)
                    targets.append((t, a.name))
            for t, name in targets:
                if t is None or t == m:
                    continue
                edges[m].add(t)
                if name and name.startswith("_") and not name.startswith("__"):
                    private.append((m, t, name))
                parent = t.rpartition(".")[0]
                while parent:
                    if not m.startswith(parent + ".") and parent != m:
                        edges[m].add(parent)
                    parent = parent.rpartition(".")[0]
    return edges, private, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checks_catch_a_cycle_and_a_private_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    edges, _, _ = imports(modules())
    assert len(edges) > 40 and any(edges.values())  # the parser found the package and its imports
    assert cycles(edges) == []


def test_no_private_name_crosses_modules():
    _, private, _ = imports(modules())
    assert private == []


def test_the_library_never_imports_argparse_or_the_cli():
    mods = modules()
    edges, _, external = imports(mods)
    library = [m for m in mods if not m.startswith("layerboost.cli") and not m.endswith("__main__")]
    assert "layerboost.cli" in mods and "layerboost.heal" in library
    bad = {m: sorted(t for t in edges[m] if t.startswith("layerboost.cli")) for m in library}
    assert {m: t for m, t in bad.items() if t} == {}
    assert [m for m in library if "argparse" in external[m]] == []


def test_no_function_over_100_lines():
    long = []
    for m, f in modules().items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 100:
                long.append(f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
