"""The house rules the layout in docs/architecture.md states, checked on the source.

Imports flow one way (no cycle among the package's modules, counting imports inside functions),
no stage imports another stage, nothing on the stage path imports the test support package,
and no module grows past 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deepfusion"
#: The stages: each imports the rooms below it, never another stage. ``crossval`` drives the
#: train stage K times and sits above it; ``cli`` is the shell over all of them.
STAGES = {"extract", "train", "evaluate", "predict", "tag"}
MAX_LINES = 500


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its source (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        # ``from pkg import sub`` imports the submodule; pkg itself only when a name of its own is
        subs = [c for c in candidates[1:] if c in known]
        if isinstance(node, ast.ImportFrom) and subs and len(subs) == len(candidates) - 1:
            candidates = subs
        for cand in candidates:
            if cand in known and cand != name:
                found.add(cand)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules, or [] (a package's ``__init__`` re-exporting its
    own submodules is not a cycle: a submodule importing its package's __init__ is)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_import_graph_sees_the_imports_inside_functions():
    graph = _graph()
    assert "deepfusion.synth" in graph["deepfusion.cli"]         # imported inside a command
    assert "deepfusion.io.store" in graph["deepfusion.io.features_file"]


def test_no_import_cycle_in_the_package():
    assert _find_cycle(_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = _graph()
    graph["deepfusion.config"] = graph["deepfusion.config"] | {"deepfusion.train.run"}
    cycle = _find_cycle(graph)
    assert cycle and cycle[0] == cycle[-1] and "deepfusion.train.run" in cycle


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_imports_another_stage(stage):
    others = {f"deepfusion.{s}" for s in STAGES - {stage}}
    assert not _graph()[f"deepfusion.{stage}"] & others


def test_nothing_below_the_cli_imports_it_or_the_test_support():
    for name, deps in _graph().items():
        if name.startswith("deepfusion.testing") or name in ("deepfusion.cli", "deepfusion.__main__"):
            continue
        assert "deepfusion.cli" not in deps, name
        assert not any(d.startswith("deepfusion.testing") for d in deps), name


def test_no_module_over_the_line_limit():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines())
             for name, path in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_every_subpackage_is_a_regular_package():
    """setup.cfg's find: skips folders without __init__.py: an installed (not editable)
    deepfusion would lack them."""
    folders = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert sorted(str(f) for f in folders if not (f / "__init__.py").exists()) == []
