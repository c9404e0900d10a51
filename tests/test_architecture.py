"""The package's shape: imports run one way through named layers, no cycles, short functions
and modules, and a small documented command line.

Every module of ``src/safety_layers`` is read with ``ast`` (imports at module level and
inside functions, relative and absolute), so the check costs no import of torch.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "safety_layers"

#: The layers, bottom up. A module may import from its own layer or a lower one; a step may
#: import another step as long as no cycle results. The root ``__init__`` is the public
#: facade: it sits above everything and nothing inside the package imports it.
LAYERS = {
    "core": 0,
    "engine": 1,
    "judges": 2, "analysis": 2, "locate": 2, "finetune": 2, "evaluate": 2, "align": 2, "scenarios": 2,
    "transplant": 2,
    "experiment": 3, "report": 3, "recipes": 3,
    "cli": 4,
}
LAYER_NAMES = {0: "core", 1: "engine", 2: "steps", 3: "application", 4: "cli", 5: "facade"}
FACADE = 5
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600
MAX_FLAG_NAMES = 60     # distinct flags a user learns across all commands (--device on every command is one)
MAX_FLAGS_PER_COMMAND = 16


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer(module: str) -> int:
    """The layer of a dotted module name (a top-level name missing from LAYERS fails the test)."""
    parts = module.split(".")
    if len(parts) == 1:
        return FACADE
    if parts[1] not in LAYERS:
        pytest.fail(f"{module} belongs to no layer: add {parts[1]!r} to LAYERS in tests/test_architecture.py")
    return LAYERS[parts[1]]


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _targets(module: str, node: ast.AST) -> list[str]:
    """The package modules an import statement makes Python load: the named module (a
    submodule for ``from pkg import sub``, the package itself for ``from pkg import name``)
    and the packages above it that the importer is not inside."""
    if isinstance(node, ast.Import):
        named = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if _is_package(module) else module.split(".")[:-1]
            stem = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
        else:
            stem = node.module
        named = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in MODULES else stem for a in node.names]
    found = []
    for name in named:
        if name not in MODULES:
            continue
        found += [name] if name != module else []
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if not (module == parent or module.startswith(parent + ".")):
                found.append(parent)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}."""
    graph = {}
    for module, path in MODULES.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, node):
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def upward_imports(graph) -> list[str]:
    return [f"{m}:{line} imports {t} ({LAYER_NAMES[layer(m)]} -> {LAYER_NAMES[layer(t)]})"
            for m, edges in graph.items() for t, line in edges.items() if layer(t) > layer(m)]


def import_cycles(graph) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, set(c)) for c in comps]


def _one_cycle(graph, comp: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component."""
    start = min(comp)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]]):
            if w == start:
                return path + [start]
            if w in comp and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return sorted(comp)


def long_functions() -> list[str]:
    out = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{module}.{node.name} ({n} lines, line {node.lineno})")
    return out


def long_modules() -> list[str]:
    out = []
    for module, path in MODULES.items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{module} ({n} lines)")
    return out


# --------------------------------------------------------------------------- the tests


def test_every_module_has_a_layer():
    assert len(MODULES) > 20
    for module in MODULES:
        layer(module)


def test_no_import_goes_up_a_layer():
    bad = upward_imports(import_graph())
    assert not bad, f"{len(bad)} upward import(s):\n" + "\n".join(bad)


def test_no_import_cycle():
    cycles = import_cycles(import_graph())
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_functions_and_modules_are_short():
    bad = long_functions() + long_modules()
    assert not bad, (f"over {MAX_FUNCTION_LINES} lines per function or {MAX_MODULE_LINES} per module:\n"
                     + "\n".join(bad))


def test_the_checks_see_what_they_check():
    """The graph reader resolves relative, absolute and in-function imports, and the cycle
    finder reports a cycle it is given."""
    graph = import_graph()
    assert "safety_layers.core.errors" in graph["safety_layers.core.config"]          # from .errors import
    assert "safety_layers.core.registry" in graph["safety_layers"]                     # inside a function
    assert "safety_layers.cli.main" in graph["safety_layers.cli"]                      # package __init__
    assert "safety_layers.core" not in graph["safety_layers.core.config"]              # own package: not an edge
    toy = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert import_cycles(toy) == [["a", "b", "c", "a"]]
    assert upward_imports({"safety_layers.core.x": {"safety_layers.cli.main": 3}}) == [
        "safety_layers.core.x:3 imports safety_layers.cli.main (core -> cli)"]


# --------------------------------------------------------------------------- the command line


def command_flags() -> dict[str, list[argparse.Action]]:
    """Our options per subcommand: every shown option except -h/--help. The Trainer's flags
    that finetune passes through are not in our parser, so they do not count."""
    from safety_layers.cli.main import make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
                   and a.help != argparse.SUPPRESS]
            for name, p in sub.choices.items()}


def test_flag_budget():
    """The public surface stays small: few distinct flags overall, few per command.

    A flag shared by several commands (--model, --device) is one thing to learn, so the budget
    counts distinct names; the per-command cap keeps each command's --help readable.
    """
    flags = command_flags()
    counts = {name: len(actions) for name, actions in flags.items()}
    names = {a.option_strings[-1] for actions in flags.values() for a in actions}
    print("flags per command:", counts, "distinct:", len(names))
    assert len(names) <= MAX_FLAG_NAMES, f"{len(names)} distinct flags (at most {MAX_FLAG_NAMES}): {sorted(names)}"
    crowded = {name: n for name, n in counts.items() if n > MAX_FLAGS_PER_COMMAND}
    assert not crowded, f"commands with more than {MAX_FLAGS_PER_COMMAND} flags: {crowded}"


def _documented(action: argparse.Action) -> bool:
    text = (action.help or "").strip()
    return bool(text) and not text.startswith(("(default:", "(paper:"))


def test_every_argument_has_help():
    from safety_layers.cli.main import make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings[0] if a.option_strings else a.dest}"
               for name, p in sub.choices.items() for a in p._actions
               if a.help != argparse.SUPPRESS and not _documented(a)]
    assert not missing, "arguments without help (add metadata={'help': ...} to the field): " + ", ".join(missing)


def test_every_config_field_has_help():
    """YAML-only fields too: --help of the config's flags and the docs read the same text."""
    import dataclasses

    from safety_layers.cli.main import COMMANDS

    missing = [f"{cmd.config.split(':')[1]}.{f.name}" for cmd in COMMANDS.values() if cmd.config
               for f in dataclasses.fields(cmd.config_class()) if f.init and not f.metadata.get("help")]
    assert not missing, "config fields without metadata={'help': ...}: " + ", ".join(missing)
