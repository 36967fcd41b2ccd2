"""The package's shape: no import cycles (lazy imports included), small modules.

Imports are read from the source with `ast` (every `import` statement,
including those inside functions), so the check covers imports that only run
on some code paths.
"""

from __future__ import annotations

import ast
from pathlib import Path

from paths import REPO

PACKAGE = REPO / "gqa_t5x"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `path` imports (a package import counts as its __init__)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import module` imports that module; `from module import x` the module.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycles_including_lazy_imports():
    graph = _graph()
    # A package's __init__ re-exporting its modules is not a cycle with them
    # unless a module imports its own package's __init__ back.
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_the_command_line():
    graph = _graph()
    entry_points = ("gqa_t5x.main", "gqa_t5x.__main__")
    offenders = sorted(m for m, deps in graph.items() if any(d == "gqa_t5x.cli" or d.startswith("gqa_t5x.cli.") for d in deps)
                       and m not in entry_points and not m.startswith("gqa_t5x.cli"))
    assert offenders == []


def test_model_package_imports_nothing_outside_it_but_errors():
    graph = _graph()
    outside = {
        (m, d) for m, deps in graph.items() if m.startswith("gqa_t5x.model")
        for d in deps if not d.startswith("gqa_t5x.model") and d not in ("gqa_t5x", "gqa_t5x.errors")
    }
    assert outside == set()


def test_no_module_is_longer_than_600_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


APPLICATIONS = ("bench", "planning", "sweeps", "study")


def test_experiment_applications_share_only_the_core():
    """bench/, planning/, sweeps/ and study/ import each other nowhere; the core
    (experiments/*.py: stages, timing, machine, figures, paper) imports none of them."""
    graph = _graph()
    crossing = set()
    for module, deps in graph.items():
        if not module.startswith("gqa_t5x.experiments"):
            continue
        parts = module.split(".")
        own = parts[2] if len(parts) > 3 and parts[2] in APPLICATIONS else None
        for dep in deps:
            dep_parts = dep.split(".")
            app = dep_parts[2] if dep.startswith("gqa_t5x.experiments.") and len(dep_parts) > 3 else None
            if app in APPLICATIONS and app != own:
                crossing.add((module, dep))
    assert crossing == set()


def test_application_finder_sees_a_crossing():
    """The check above is not vacuous: the study does drive stages of the core."""
    graph = _graph()
    assert "gqa_t5x.experiments.stages" in graph["gqa_t5x.experiments.study.stages"]
    assert "gqa_t5x.experiments.stages" in graph["gqa_t5x.experiments.sweeps.sweep"]


# docs/architecture.md's layering: what each part may import (besides itself).
ALLOWED = {
    "errors": set(),
    "storage": {"errors"},
    "model": {"errors"},
    "data": {"storage", "errors"},
    "checkpoints": {"model", "storage", "errors"},
    "gin_config": {"model", "errors"},
    "runtime": {"storage"},
    "conversion": {"checkpoints", "model", "storage", "errors"},
    "training": {"checkpoints", "data", "model", "storage", "errors"},
    "launcher": {"gin_config", "storage", "errors"},
    "experiments": {"launcher", "checkpoints", "data", "model", "storage", "errors"},
    "experiments.bench": {"experiments", "conversion", "training", "checkpoints", "model", "storage", "errors"},
    "experiments.planning": {"experiments", "conversion", "checkpoints", "model", "storage", "errors"},
    "experiments.sweeps": {"experiments", "conversion", "data", "gin_config", "model", "storage", "errors"},
    "experiments.study": {"experiments", "conversion", "checkpoints", "data", "gin_config", "model", "storage",
                          "errors"},
}


def _part(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return ""
    if parts[0] == "experiments" and len(parts) > 2:
        return f"experiments.{parts[1]}"
    return parts[0]


def test_every_part_imports_only_the_layers_docs_architecture_draws():
    graph = _graph()
    extra = set()
    for module, deps in graph.items():
        part = _part(module)
        if part not in ALLOWED:
            continue  # cli, main, __main__: the entry points import everything
        for dep in deps:
            if (target := _part(dep)) and target != part and target not in ALLOWED[part]:
                extra.add((module, dep))
    assert extra == set()
    assert set(ALLOWED) >= {_part(m) for m in graph} - {"", "cli", "main", "__main__"}
