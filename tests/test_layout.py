"""The package's shape: layers that only import downwards, no cycles, small modules."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gradclip"
MAX_LINES = 450

# Each floor may import its own and the floors below it, never one above.
FLOORS = [
    ("core",),
    ("rules",),
    (
        "advice",
        "hooks",
        "step_guard",
        "copying",
        "fused",
        "fused_scaler",
        "fused_hooks",
        "normalizer",
        "normalize",
        "config",
        "recording",
        "insight",
    ),
    ("__init__",),
    ("integrations", "commands", "__main__"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for level, names in enumerate(FLOORS):
        if top in names:
            return level
    raise AssertionError(f"{module} belongs to no floor of FLOORS")


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found |= {n for n in names if n in modules and n != module}
        graph[module] = found
    return graph


def test_lower_floors_never_import_higher_ones() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in _imports().items()
        for target in targets
        if target != "gradclip" and _floor(target) > _floor(module)
    ]
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    graph = _imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(
                "import cycle: " + " -> ".join([*path[path.index(module) :], module])
            )
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            if target != "gradclip":
                visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_modules_are_small_and_do_not_shadow_the_standard_library(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES, path
    assert path.stem not in sys.stdlib_module_names, path
