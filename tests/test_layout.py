"""The house rules the layout in docs/architecture.md states, checked on the source.

Folders are the layers: a module imports only modules of its own layer or of the layers above
it (:data:`LAYERS`, top first), counting imports inside functions; there is no import cycle;
no stage imports another stage; nothing on the stage path imports the test support package;
and no module grows past 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deepfusion"
#: The layers, top first: each name is a module or a folder (everything under it). The
#: drawing in docs/architecture.md is this list.
LAYERS = [
    ("deepfusion", "errors", "config", "backbones", "views", "patches"),   # plain data
    ("io",),                                              # disk
    ("runtime", "metrics", "plots", "progress"),          # where and how things run; leaf tools
    ("audio", "features", "synth"),                       # decoding, the views, the generator
    ("data",),                                            # splits, normalisation, the Dataset
    ("models",),                                          # the networks and their checkpoints
    ("jobs",),                                            # the one per-file job
    ("inference",),                                       # models over clips and libraries
    ("train",),                                           # the train stage and its rooms
    ("extract", "evaluate", "predict", "embed", "export", "tag"),   # the other stages
    ("options", "console", "cli", "__main__"),            # the command-line shell
]
#: The stages: each imports the rooms above it, never another stage. ``train.crossval`` drives
#: the train stage K times (train --folds); ``cli`` is the shell over all of them.
STAGES = {"extract", "train.run", "evaluate", "predict", "embed", "export", "tag"}
MAX_LINES = 400


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


def _layer(module: str) -> int:
    """The layer of a module (``deepfusion.io.cache`` -> the layer of ``io``)."""
    parts = module.split(".")[1:] or ["deepfusion"]
    for depth in range(len(parts), 0, -1):
        name = ".".join(parts[:depth])
        for i, layer in enumerate(LAYERS):
            if name in layer:
                return i
    raise AssertionError(f"{module}: in no layer of LAYERS; add it to the drawing")


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() if not m.startswith("deepfusion.testing")
                  for d in deps if _layer(d) > _layer(m))


def test_every_module_is_in_a_layer_and_imports_flow_down():
    assert _upward(_graph()) == []


def test_an_upward_import_is_found():
    graph = _graph()
    before = set(_upward(graph))
    graph["deepfusion.io.cache"] = graph["deepfusion.io.cache"] | {"deepfusion.models.net"}
    assert set(_upward(graph)) - before == {"deepfusion.io.cache -> deepfusion.models.net"}


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
