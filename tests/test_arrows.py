"""The arrows of ARCHITECTURE.md, kept by a test: every import of the three packages, read from
the source (module-level and lazy, inside functions, alike; type-only imports under
`if TYPE_CHECKING:` excepted, as they never run), checked against the rules.

- `watchers` and `balancers` never import `edgelb`, and never import each other.
- No import circle between modules.
- The data path (`edgelb.http`, `edgelb.tcp`, `edgelb.pool`) never imports the config parser
  (`edgelb.ops`), and `edgelb.http` and `edgelb.tcp` do not import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edgelb", "watchers", "balancers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports when it runs (a `from pkg import name` of a
    submodule counts as that submodule)."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            found.add(source)
            for alias in node.names:
                found.add(f"{source}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out = set()
    for name in found:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != me and name.split(".")[0] in PACKAGES:
            out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def test_watchers_and_balancers_stand_alone() -> None:
    wrong = [f"{m} imports {d}" for m, deps in graph().items() for d in sorted(deps)
             if (m.startswith("watchers") and d.split(".")[0] in ("edgelb", "balancers"))
             or (m.startswith("balancers") and d.split(".")[0] in ("edgelb", "watchers"))]
    assert not wrong, "\n".join(wrong)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each strongly connected set of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def test_no_import_circle() -> None:
    found = cycles(graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_data_path_does_not_import_operations_and_http_and_tcp_stay_apart() -> None:
    wrong = []
    for m, deps in graph().items():
        for d in sorted(deps):
            data_path = m.startswith(("edgelb.http", "edgelb.tcp")) or m == "edgelb.pool"
            if data_path and d.startswith("edgelb.ops"):
                wrong.append(f"{m} (data path) imports {d}")
            if m.startswith("edgelb.http") and d.startswith("edgelb.tcp"):
                wrong.append(f"{m} imports {d}")
            if m.startswith("edgelb.tcp") and d.startswith("edgelb.http"):
                wrong.append(f"{m} imports {d}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_lazy_imports_and_circles() -> None:
    """The rules above would pass vacuously if the reader missed imports: check it on a
    known shape."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    runtime = ROOT / "edgelb" / "control" / "runtime.py"
    modules = {module_name(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert "edgelb.pool" in imports_of(runtime, modules)
