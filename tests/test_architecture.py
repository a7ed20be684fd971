"""The library's shape (docs/architecture.md): no import cycles, no oversized module.

Imports are read from the source (``ast``), lazy ones inside functions included: a cycle
hidden behind a function-level import is still two modules that cannot be understood, tested or
moved apart from each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "platform" / "smartccs"
MAX_LINES = 500


def _module_name(path: Path, lib: Path) -> str:
    parts = path.relative_to(lib.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, package: str, modules: set[str]) -> set[str]:
    """The library modules an import statement loads (``from pkg import mod`` names ``mod``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            up = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*up, base] if base else up)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def import_graph(lib: Path = LIB) -> dict[str, set[str]]:
    """Module -> the library modules it imports anywhere in its body."""
    files = {_module_name(p, lib): p for p in lib.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _imported(node, package, set(files))
        edges.discard(name)
        # a package's __init__ is imported on the way to any of its modules: not an edge
        graph[name] = {e for e in edges if not name.startswith(f"{e}.")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_library_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_package_of_the_library_imports_one_that_imports_it_back():
    graph = import_graph()
    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        top = module.split(".")[1] if "." in module else module
        targets = {d.split(".")[1] for d in deps if "." in d}
        packages.setdefault(top, set()).update(targets - {top})
    assert cycles(packages) == []


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import(tmp_path):
    lib = tmp_path / "smartccs"
    (lib / "a").mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "a" / "__init__.py").write_text("")
    (lib / "a" / "x.py").write_text("from smartccs.b import y\n")
    (lib / "b.py").write_text("def f():\n    from smartccs.a.x import g\n")
    assert cycles(import_graph(lib)) == [["smartccs.a.x", "smartccs.b"]]


def test_no_library_module_is_over_500_lines():
    long = {
        str(p.relative_to(LIB)): n
        for p in LIB.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_service_s_http_ingress_imports_no_torch():
    """The API replicas answer submissions and status; only the screeners need the models."""
    code = "import sys, smartccs.service.app; print(sorted(m for m in sys.modules if m == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


MAX_FUNCTION_LINES = 80
_PARSER_CALLS = {
    "add_argument",
    "add_parser",
    "add_subparsers",
    "set_defaults",
    "add_argument_group",
}


def _is_argparse_table(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A function whose lines are mostly ``add_argument``/``add_parser`` calls: a table."""
    calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)]
    parser = [
        c for c in calls if isinstance(c.func, ast.Attribute) and c.func.attr in _PARSER_CALLS
    ]
    return len(parser) >= 10 and len(parser) * 2 >= len(fn.body)


def test_no_library_function_is_over_80_lines_argparse_tables_aside():
    long = []
    for path in LIB.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and not _is_argparse_table(node):
                    long.append(f"{path.relative_to(LIB)}:{node.lineno} {node.name} ({lines})")
    assert long == []
