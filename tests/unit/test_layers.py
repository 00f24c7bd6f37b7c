"""The import graph of scbench/, methods/ and tasks/ (as installed: scbench.methods, scbench.tasks) has no cycle and
no upward import between the layers of DESIGN.md: kv/ and kernels/ -> engines/ -> methods/ and tasks/ -> runner and
run -> store and report -> cli. Imports inside functions count (they couple modules as much); imports under
``if TYPE_CHECKING:`` do not. A new top-level module must be placed in a layer below."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"scbench": "scbench", "methods": "scbench.methods", "tasks": "scbench.tasks"}

LAYERS = [  # bottom first; a module may import its own layer and the ones below
    ("foundation", ["scbench.records", "scbench.prompts", "scbench.provenance", "scbench.registry",
                    "scbench.devices", "scbench.plugins", "scbench.introspect", "scbench.models",
                    "scbench.checks"]),
    # plain data, names and helpers (the registry imports by name, lazily; plugins fill registries they are given;
    # introspect reads method sources; scbench.models holds the shipped adapters, no code)
    ("kv and kernels", ["scbench.kv", "scbench.kernels"]),
    ("engines", ["scbench.engines"]),
    ("methods and tasks", ["scbench.methods", "scbench.tasks", "scbench.data", "scbench.scoring",
                           "scbench.validate"]),  # validate: a spec's checks before any model loads
    # the store sits beside run: run_spec writes every finished turn into it (the store imports only records)
    # batch (decode an example's turns together) extends the runner; group (sweeps sharing a prefill) runs specs
    ("runner and run", ["scbench.runner", "scbench.run", "scbench.store", "scbench.store_schema", "scbench.store_merge",
                        "scbench.leases", "scbench.batch", "scbench.batch_step", "scbench.group",
                        "scbench.group_example"]),
    ("report", ["scbench.report"]),
    ("cli", ["scbench.cli", "scbench.cli_inspect", "scbench.cli_report", "scbench.overrides", "scbench"]),  # the package itself: the public API (scbench.score_turns)
]


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for folder, pkg in FOLDERS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([pkg, *parts])] = (f, f.name == "__init__.py")
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph(mods: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """module -> the modules of ``mods`` it imports (a name resolves to its longest known module prefix)."""
    edges = {}
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        out = set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = name if is_pkg else name.rsplit(".", 1)[0]
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
                targets = [mod, *(f"{mod}.{a.name}" for a in node.names)]
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is no edge
                    out.add(t)
        edges[name] = out
    return edges


def layer_of(module: str) -> int | None:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (rank, p)
    return None if best is None else best[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def upward(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            if layer_of(b) > layer_of(a):
                bad.append(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})")
    return bad


@pytest.fixture(scope="module")
def graph():
    return import_graph(modules())


def test_every_module_has_a_layer(graph):
    assert len(graph) > 50
    assert [m for m in graph if layer_of(m) is None] == []


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_no_upward_import(graph):
    assert upward(graph) == []


def test_the_checks_can_fail():
    """The walker sees imports inside functions and relative imports; cycles and upward edges are reported."""
    mods = modules()
    graph = import_graph(mods)
    assert "scbench.engines.models" in graph["scbench.cli"]  # imported inside a function
    assert "scbench.methods.base" in graph["scbench.methods.full"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert upward({"scbench.kv.cache": {"scbench.engines.hf"}, "scbench.engines.hf": {"scbench.kv.cache"}}) == [
        "scbench.kv.cache (kv and kernels) imports scbench.engines.hf (engines)"]
