"""The library's imports go one way: no module of sn_ext imports, directly or through others, a module that imports
it back (at module level or inside a function: a "late import" hides a cycle, it does not remove it), and the
library never imports the applications built on it (sngan, benchmarks)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sn_ext"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The sn_ext modules `path` imports (a `from X import name` counts X.name when that is a module, else X)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules or m.split(".")[0] in ("sngan", "benchmarks")}


def _graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    # The compiled library (sn_ext._C) is a module too, whether or not it is built here: `from . import _C`.
    modules.add("sn_ext._C")
    return {_module_name(p): _imports(p, modules) for p in paths}


def test_no_import_cycle_in_sn_ext():
    graph = _graph()
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_library_does_not_import_its_applications():
    for module, targets in _graph().items():
        assert not {t for t in targets if t.split(".")[0] in ("sngan", "benchmarks")}, module


def test_the_graph_sees_the_imports():
    """The check above reads real edges (a parser that found none would pass it)."""
    graph = _graph()
    assert "sn_ext.ops" in graph["sn_ext.backends"]
    assert "sn_ext.nn.spectral_norm" in graph["sn_ext.nn.legacy_hook"]
    assert "sn_ext.nn.spectral_norm" in graph["sn_ext.legacy"]
    assert "sn_ext._autograd" in graph["sn_ext.ops"]
