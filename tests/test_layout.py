"""The package layout holds: no private names across modules, a core free of the training stack, no
import cycles, and shared kernels in efficient_attn/ops with public, documented names."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("efficient_attn", "efficient_attn_tasks")
TRAINING_STACK = ("pytorch_lightning", "hydra", "omegaconf", "wandb", "matplotlib")
# the registry's lazy registration: attention/* import the registry at load time to register, and the
# registry imports attention/ inside ``_load_builtins``, on the first read (see efficient_attn/registry.py)
LAZY_CYCLE_EDGE = ("efficient_attn.registry", "efficient_attn.attention")


def _modules(packages: tuple[str, ...] = PACKAGES) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__) for every .py file of ``packages``."""
    found = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]):
    """Import statements that run when the module loads: not inside functions, not under TYPE_CHECKING."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level_imports(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _module_level_imports(node.body)


def _runtime_nodes(node: ast.AST):
    """``node``'s descendants that can run: an ``if TYPE_CHECKING:`` body is left out (its else kept)."""
    for child in ast.iter_child_nodes(node):
        yield child
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _runtime_nodes(other)
        else:
            yield from _runtime_nodes(child)


def _all_imports(tree: ast.Module):
    """Every import statement that can run, lazy ones included (not under TYPE_CHECKING), and
    ``importlib.import_module("<literal>")`` calls."""
    for node in _runtime_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            name = node.args[0].value
            level = len(name) - len(name.lstrip("."))
            if level and name.lstrip("."):
                yield ast.ImportFrom(module=name.lstrip("."), names=[ast.alias(name="*")], level=level)
            elif not level:
                yield ast.Import(names=[ast.alias(name=name)])


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` in ``module`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, is_package: bool, node: ast.stmt, known: dict) -> set[str]:
    """The modules of ``known`` an import statement loads (``from pkg import sub`` loads pkg.sub)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    source = _absolute(module, is_package, node)
    found = {f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names}
    return {name for name in found if name in known and name != module}


def _graph(packages: tuple[str, ...], lazy: bool) -> dict[str, set[str]]:
    known = _modules(packages)
    graph = {}
    for module, (path, is_package) in known.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = _all_imports(tree) if lazy else _module_level_imports(tree.body)
        graph[module] = set().union(*(_targets(module, is_package, n, known) for n in nodes))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def _describe(cycles: list[list[str]], graph: dict[str, set[str]]) -> str:
    return "\n".join(
        " ; ".join(f"{a} -> {b}" for a in cycle for b in sorted(graph[a] & set(cycle))) for cycle in cycles
    )


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for module, (path, _) in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                if private:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {private}")
    assert not offenders, "imports of another module's private names:\n" + "\n".join(offenders)


def test_every_core_module_imports_without_the_training_stack():
    script = (
        "import importlib, json, pkgutil, sys\n"
        "import efficient_attn\n"
        "names = [m.name for m in pkgutil.walk_packages(efficient_attn.__path__, 'efficient_attn.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps([names, sorted(m for m in {TRAINING_STACK!r} if m in sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    names, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"efficient_attn.registry", "efficient_attn.ops.favor_fused", "efficient_attn.attention.favor"} <= set(names)
    assert loaded == [], f"importing every efficient_attn module loaded {loaded}"


def test_module_level_imports_have_no_cycles():
    graph = _graph(PACKAGES, lazy=False)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk found the packages' imports
    cycles = _cycles(graph)
    assert not cycles, "import cycles among module-level imports:\n" + _describe(cycles, graph)


def test_the_only_lazy_import_cycle_is_the_registrys():
    graph = _graph(PACKAGES, lazy=True)
    source, target = LAZY_CYCLE_EDGE
    assert target in graph[source], "the registry does not import attention/ lazily: update LAZY_CYCLE_EDGE"
    assert "efficient_attn_tasks.bench.kernels" in graph["efficient_attn_tasks.commands.bench"]  # a lazy one
    graph[source].discard(target)
    cycles = _cycles(graph)
    assert not cycles, "import cycles, lazy imports included (not TYPE_CHECKING):\n" + _describe(cycles, graph)


def test_the_lazy_walk_counts_function_imports_not_type_checking_ones():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import typed\nelse:\n    import fallback\n"
        "def f():\n    import lazy\n    importlib.import_module('dynamic')\n"
    )
    names = {alias.name for node in _all_imports(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert names == {"fallback", "lazy", "dynamic"}


def _imported_from_ops() -> set[tuple[str, str]]:
    """(ops module, name) for every name a file outside that module imports from efficient_attn.ops.*."""
    found = set()
    files = [p for folder in (*PACKAGES, "tests", "tools") for p in (ROOT / folder).rglob("*.py")]
    known = _modules()
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(module, is_package, node)
                if source.startswith("efficient_attn.ops.") and source != module:
                    found |= {(source, a.name) for a in node.names if f"{source}.{a.name}" not in known}
    return found


def test_names_imported_from_ops_are_public_and_documented():
    imported = _imported_from_ops()
    assert ("efficient_attn.ops.causal_linear", "causal_linear_attention") in imported
    for module, name in sorted(imported):
        obj = getattr(importlib.import_module(module), name)
        assert not name.startswith("_"), f"{module}.{name} is private but imported elsewhere"
        if callable(obj):
            assert (obj.__doc__ or "").strip(), f"{module}.{name} has no docstring"


@pytest.mark.parametrize("module", sorted(_modules(("efficient_attn",))))
def test_every_core_module_has_a_docstring(module):
    path, _ = _modules(("efficient_attn",))[module]
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(ROOT)} has no module docstring"
