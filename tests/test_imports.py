"""Every import in the package points one way: no cycle, and no project import hidden inside a function.

A static walk (AST, nothing imported): every `import indexcache...` / `from indexcache... import ...` of every
module under indexcache/, at module level and inside functions, becomes an edge of one graph. Left out are the
imports under `if TYPE_CHECKING:` (they never run) and under `if __name__ == "__main__":` (they run only in
`python -m indexcache.x`, whose module is `__main__`, not `indexcache.x`). A function-level project import is how a
cycle hides, so it is refused too, except where it defers an optional dependency (the Triton kernels).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "indexcache"

# Modules a function may import on use: they import Triton at the top, an optional dependency (CUDA only).
OPTIONAL_MODULES = frozenset(
    {
        "indexcache.kernels.triton_index",
        "indexcache.kernels.triton_sparse",
        "indexcache.losses.fused",
        "indexcache.losses.sparse_fused",
    }
)

# For the lead (issue 20, trainer.py is theirs): the edges that remain in the lead's files. Remove each entry as its
# edge goes (test_lead_pending_edges_still_exist says when); nothing else may be added here.
LEAD_PENDING_EDGES: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _never_imports(node: ast.If) -> bool:
    """`if TYPE_CHECKING:` (never runs) or `if __name__ == "__main__":` (runs as module `__main__`)."""
    test = node.test
    if isinstance(test, ast.Name | ast.Attribute):
        return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool, modules: set[str]) -> list[str]:
    """The project modules an import statement loads (`from pkg import sub` loads the submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "indexcache"]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = source.split(".") if is_package else source.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    if base.split(".")[0] != "indexcache":
        return []
    out = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        out.append(candidate if candidate in modules else base)
    return out


def module_edges(tree: ast.Module, source: str, is_package: bool, modules: set[str]) -> list[Edge]:
    """The project imports of one parsed module (those that never run as this module left out)."""
    edges = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _never_imports(child):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in _targets(child, source, is_package, modules):
                    if target != source:
                        edges.append(Edge(source, target, child.lineno, in_function))
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, False)
    return edges


def import_edges() -> list[Edge]:
    modules = _modules()
    edges = []
    for source, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges += module_edges(tree, source, path.name == "__init__.py", set(modules))
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def test_the_walk_sees_function_level_imports_and_skips_type_checking():
    """The walker itself, on a module written here: what it must and must not count."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "import indexcache.pattern\n"
        "if TYPE_CHECKING:\n"
        "    from indexcache.config import RunConfig\n"
        "def f():\n"
        "    from indexcache.model import wrapper\n"
        "    from . import pattern\n"
        "if __name__ == '__main__':\n"
        "    from indexcache.apps import x\n"
    )
    modules = {"indexcache.pattern", "indexcache.config", "indexcache.model", "indexcache.model.wrapper"}
    edges = module_edges(ast.parse(source), "indexcache.x", False, modules)
    assert [(e.target, e.in_function) for e in edges] == [
        ("indexcache.pattern", False),
        ("indexcache.model.wrapper", True),
        ("indexcache.pattern", True),
    ]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    edges = import_edges()
    assert len({edge.source for edge in edges}) > 30, "the walk found too few importing modules"
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if (edge.source, edge.target) not in LEAD_PENDING_EDGES:
            graph.setdefault(edge.source, set()).add(edge.target)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_function_level_project_import():
    hidden = sorted(
        {
            f"{edge.source}:{edge.line} imports {edge.target} inside a function"
            for edge in import_edges()
            if edge.in_function
            and edge.target not in OPTIONAL_MODULES
            and (edge.source, edge.target) not in LEAD_PENDING_EDGES
        }
    )
    assert not hidden, "\n".join(hidden)


def test_lead_pending_edges_still_exist():
    """An entry of LEAD_PENDING_EDGES whose import is gone must be removed from it (the list only shrinks)."""
    present = {(edge.source, edge.target) for edge in import_edges()}
    assert not LEAD_PENDING_EDGES - present, f"gone, remove from LEAD_PENDING_EDGES: {LEAD_PENDING_EDGES - present}"
