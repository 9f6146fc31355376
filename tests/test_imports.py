"""The package's import graph: no cycle, and no lower layer importing a higher one.

Imports inside functions count as much as those at the top of a module: they hide a cycle from
Python at import time, not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

import tunelab

PACKAGE = Path(tunelab.__file__).parent

LAYERS = [
    {"errors", "text", "cores"},
    {"files"},
    {"data.load", "data.dedup", "template", "models", "client", "runlock"},
    {"encoding", "teacher.schema"},
    {"config"},
    {"serve.options", "ui.options"},
    {"device", "runfolder", "teacher.ask"},
    {"data.novelty", "data.augment", "data.copied", "data.extra", "fit"},
    {"data.check"},
    {"teacher.label"},
    {"teacher.synth"},
    {"train.batching", "train.checkpoint", "train.stopping"},
    {"train.loss", "train.preference"},
    {"train.loop"},
    {"decoding.copying"},
    {"decoding.generate"},
    {"evaluate.metrics", "evaluate.baselines", "evaluate.assertions", "evaluate.endpoint", "evaluate.results"},
    {"evaluate.forgetting", "evaluate.judge", "evaluate.names", "data.corrections"},
    {"evaluate.core", "data.review"},
    {"run"},
    {"serve.protocol", "serve.moderation", "serve.scheduler"},
    {"report.runs", "report.plots", "serve.app", "export.merged", "export.gguf", "demo.bookings", "ui.guard",
     "ui.jobs", "ui.follow", "ui.repair", "ui.arena", "ui.teacher"},
    {"report.sections", "export.ollama", "ui.runs", "ui.datafix"},
    {"report.html", "export.card", "ui.app"},
    {"iterate.runs", "iterate.forecast"},
    {"iterate.curve", "iterate.sweep"},
    {"demo", "export"},
    {"cli", "__init__"},
]
"""From the bottom up: a module may import from the layers below its own, never from its own or
a higher one. At the bottom, the shared core: errors and the text helpers; reading data and
models, the template, and tokenizing examples with it (encoding); the config, the device and the
run folder. Above it the stages follow the pipeline: data -> teacher -> train -> decoding ->
evaluate -> report/serve/export -> cli, with the `Run` facade above evaluation. (data.corrections
turns a run's eval.json into training rows, and data.review reviews them as it reviews the pairs
the teacher labelled, so both sit above evaluate.results.)"""


def module_names() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names.add(".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts))
    return names


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The tunelab modules that `path` imports anywhere in its code (module or function level)."""
    package_parts = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, up `level - 1` packages
                base = ".".join(["tunelab", *package_parts[: len(package_parts) - node.level + 1]])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from tunelab import data` imports the module tunelab.data.load; `from tunelab.data.load import
            # Example` a name of tunelab.data.load.
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}".removeprefix("tunelab.") in modules
                       else module for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "tunelab":
                found.add("__init__")
            elif target.startswith("tunelab.") and target.removeprefix("tunelab.") in modules:
                found.add(target.removeprefix("tunelab."))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        graph[name] = imports_of(path, modules) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    done, path = set(), []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph.get(name, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name)
        if cycle:
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert {"train.loss", "runfolder", "train.loop", "train.checkpoint"} <= graph.keys()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lower_layers_do_not_import_higher_ones():
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    upward = [f"{name} (layer {layer_of[name]}) imports {target} (layer {layer_of[target]})"
              for name, targets in import_graph().items() if name in layer_of
              for target in sorted(targets) if target in layer_of and layer_of[target] >= layer_of[name]]
    assert not upward, upward


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The checks above would pass on an empty graph; this one shows the parser finds what it must."""
    graph = import_graph()
    assert "runfolder" in graph["train.checkpoint"]  # module level
    assert "data.check" in graph["train.loop"]  # inside prepare()
    assert "run" in graph["cli"]  # inside a command function
    assert "data.load" in graph["runfolder"]  # `from tunelab.data import load as ...`
    assert {"data.copied", "encoding"} <= graph["data.check"]  # what the data check runs sits below it
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_layer():
    """A new module is placed in LAYERS, so the check above covers it. A stage package's
    `__init__` holds only its docstring."""
    layered = {name for layer in LAYERS for name in layer}
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    unplaced = sorted(set(import_graph()) - layered - packages)
    assert not unplaced, f"modules missing from LAYERS: {unplaced}"
