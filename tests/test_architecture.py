"""Dependency rules of DESIGN §5, read from the source with `ast` (nothing is imported):
the library never imports its CLI, and module imports form no cycle, function-level imports
included (a cycle hidden in a function still ties two modules into one).

Edges: `import mistral7b.a.b` and `from mistral7b.a import b` (when `b` is a module) point at
`mistral7b.a.b`; `from mistral7b.a import name` points at `mistral7b.a`. Imports under
`if TYPE_CHECKING:` never run: they count for the CLI rule, not for cycles. A package's
`__init__` re-exporting its own submodules is not a cycle either: that is what it is for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mistral7b

SRC = Path(mistral7b.__file__).parent
ROOT = "mistral7b"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
PACKAGES = {_module_name(p) for p in MODULES.values() if p.name == "__init__.py"}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported mistral7b module, runs at import or call time) for every import statement."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if module in PACKAGES else module.rpartition(".")[0]
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        runs = id(node) not in typing_only
        if isinstance(node, ast.Import):
            found += [(alias.name, runs) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, runs))
    return [(name, runs) for name, runs in found if name == ROOT or name.startswith(ROOT + ".")]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, runs in _imports(module):
            reexport = module in PACKAGES and target.startswith(module + ".")
            if runs and target != module and not reexport and target in MODULES:
                graph[module].add(target)
    return graph


def test_module_table_is_complete():
    assert "mistral7b.api" in MODULES and "mistral7b.quant" in PACKAGES
    assert ("mistral7b.quant.checkpoint", True) in _imports("mistral7b.quant.load")


def test_no_library_module_imports_the_cli():
    offenders = sorted(
        f"{module} imports {target}"
        for module in MODULES if not module.startswith(f"{ROOT}.cli")
        for target, _ in _imports(module)
        if target == f"{ROOT}.cli" or target.startswith(f"{ROOT}.cli.")
    )
    assert offenders == []


def test_module_imports_have_no_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert [" -> ".join(c) for c in cycles] == []
