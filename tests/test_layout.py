"""The house the code is: who imports whom, read from the source (every import, at module level or inside a
function).

- No circle among the modules of the three packages.
- Floors: ``evaluation`` above ``trainers`` above ``modeling_unime``; nothing imports upwards.
- ``modeling_unime/util/`` is the ground floor: it imports nothing of the package outside ``util/``.
- The traveling model files (copied into every checkpoint) import only the standard library, torch, transformers,
  PIL and each other (``sentence_unime.py`` also sentence-transformers, which loads it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGES = ("modeling_unime", "trainers", "evaluation")
FLOOR = {"modeling_unime": 0, "trainers": 1, "evaluation": 2}
TRAVELING = {
    "modeling_unime.configuration_unime": set(),
    "modeling_unime.modeling_unime": set(),
    "modeling_unime.processing_unime": set(),
    "modeling_unime.scoring_unime": set(),
    "modeling_unime.sentence_unime": {"sentence_transformers"},
    # numpy comes with transformers; PyAV only decodes video files, imported when one is given.
    "modeling_unime.video_unime": {"numpy", "av"},
}
TRAVELING_ALLOWED = {"torch", "transformers", "PIL"}


def package_modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            # evaluate's metric scripts are loaded by path, one by one, not imported as modules of the package
            if path.relative_to(root).parts[:2] == ("evaluation", "metrics") and path.parent.name != "metrics":
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """Every imported dotted name (``a.b`` and ``a.b.c`` for ``from a.b import c``), absolute, with its line."""
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names += [(prefix, node.lineno)] + [(f"{prefix}.{alias.name}", node.lineno) for alias in node.names]
    return names


def import_graph(root: Path = REPO_ROOT) -> dict[str, dict[str, int]]:
    """module -> {imported module of the packages: line}."""
    modules = package_modules(root)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for name, line in imported_names(module, path):
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in modules:
                    if candidate != module:
                        edges.setdefault(candidate, line)
                    break
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for neighbour in graph[node]:
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for node in graph:
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return cycles


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph()


def test_the_graph_sees_imports_at_every_level(graph):
    # A function-level import and a relative one are edges too (the checks below would be blind otherwise).
    assert "modeling_unime.model_specs" in graph["modeling_unime.judge.mllm"]  # inside from_pretrained
    assert "modeling_unime.util.retrieval" in graph["modeling_unime.mining.selection"]


def test_no_import_circle(graph):
    assert find_cycles(graph) == []


def test_a_planted_circle_is_found():
    planted = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert find_cycles(planted) == [["a", "b", "c"]]


def test_no_upward_import(graph):
    upward = [f"{module} imports {target} (line {line})" for module, edges in graph.items()
              for target, line in edges.items()
              if FLOOR[target.split(".")[0]] > FLOOR[module.split(".")[0]]]
    assert upward == []


def test_util_is_the_ground_floor(graph):
    above = [f"{module} imports {target} (line {line})" for module, edges in graph.items()
             if module.startswith("modeling_unime.util")
             for target, line in edges.items() if not target.startswith("modeling_unime.util")
             and target != "modeling_unime"]
    assert above == []


def test_traveling_files_import_only_torch_transformers_and_each_other():
    modules = package_modules()
    offenders = []
    for module, extra in TRAVELING.items():
        for name, line in imported_names(module, modules[module]):
            top = name.split(".")[0]
            if name in TRAVELING or name.rsplit(".", 1)[0] in TRAVELING or top == "__future__":
                continue
            if top in TRAVELING_ALLOWED | extra or top in sys.stdlib_module_names:
                continue
            offenders.append(f"{module}: {name} (line {line})")
    assert offenders == []
