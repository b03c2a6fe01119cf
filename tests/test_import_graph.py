"""The package's modules import each other without cycles: every import counts, at the top of a
module, inside a function, or under ``TYPE_CHECKING``."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tcod_fast"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports (its own parent packages aside)."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_module_of_the_package_is_part_of_an_import_cycle():
    known = _module_names()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert len(graph) > 50 and graph["tcod_fast.algorithms"] >= {"tcod_fast.curriculum"}
    assert _cycles(graph) == []


def test_a_cycle_through_a_function_local_import_is_found(tmp_path):
    module = tmp_path / "late.py"
    module.write_text("def f():\n    from tcod_fast.curriculum import CurriculumSampler\n    from . import algorithms\n")
    known = {"tcod_fast.late": module, "tcod_fast.curriculum": module, "tcod_fast.algorithms": module}
    assert _imports("tcod_fast.late", module, known) == {"tcod_fast.curriculum", "tcod_fast.algorithms"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
