"""The ``pirl`` package's import graph has no cycles.

Every module is parsed with ``ast`` (not imported), and every ``import pirl.x`` /
``from pirl.x import y`` / ``from . import y`` becomes an edge, wherever it is written: at the top,
inside a function, or under ``if TYPE_CHECKING``.  A lazy import that only hides a cycle is still
a cycle here.  ``from pirl.x import y`` points at the module ``pirl.x.y`` when that is a module,
else at ``pirl.x``.  Importing ``pirl.x.y`` also runs the ``__init__`` of ``pirl`` and
``pirl.x``; those implicit edges are left out, as import linters do (``pirl/__init__.py``
imports the training entry point, so counting them would make every module part of a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pirl"


def module_names() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (``pirl.data`` is its __init__)."""
    names: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` refers to: itself, or the closest enclosing module (``pirl.x.y`` where
    y is a function of ``pirl.x`` -> ``pirl.x``); None outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``module`` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pirl.x import y``: y may be a submodule, else a name defined in pirl.x.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _target(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = module_names()
    return {m: imports_of(m, path, modules) for m, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_graph_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The parser finds an import inside a function, resolves ``from pirl.x import y`` and
    relative imports, and the search finds a cycle."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from pirl.kernels import colour\n    import pirl.config\n"
                   "from pirl.data.augment import resize\nfrom .kernels import colour_job\n")
    found = imports_of("pirl.m", src, module_names())
    assert found == {"pirl.kernels.colour", "pirl.config", "pirl.data.augment",
                     "pirl.kernels.colour_job"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_package_file_outside_kernels_is_much_over_400_lines() -> None:
    """The layout rule: one concept per file, ~400 lines at most, the engine room excepted."""
    too_long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
                if "kernels" not in p.parts
                and (n := len(p.read_text().splitlines())) > 420}
    assert not too_long, f"files over ~400 lines outside pirl/kernels: {too_long}"
