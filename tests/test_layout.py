"""The project's layout: one lesson per script, one home per setting. The scripts import the
library and never each other; the flags they share are defined once, in llama_models/cli.py."""

import argparse
import ast
from pathlib import Path

import pytest

import llama_models
from helpers import REPO
from llama_models import cli

SCRIPTS = sorted(p.name for p in REPO.glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """The top-level names of the absolute imports in a file (also those inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_script_imports_a_script_and_the_library_imports_none():
    scripts = {name.removesuffix(".py") for name in SCRIPTS}
    assert {"run_inference", "chat", "explore", "minimal_run_inference"} <= scripts
    for name in SCRIPTS:
        assert not imported_modules(REPO / name) & (scripts - {name.removesuffix(".py")}), name
    for path in Path(llama_models.__file__).parent.glob("*.py"):
        assert not imported_modules(path) & scripts, path.name


def parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script builds, caught as it parses (nothing is loaded)."""
    class Caught(Exception):
        pass

    caught = []

    def catch(parser, *args, **kwargs):
        caught.append(parser)
        raise Caught

    monkeypatch.setattr(cli.ArgumentParser, "parse_args", catch)
    module = {}
    exec(compile((REPO / script).read_text(), script, "exec"), module)  # as an import would, not as __main__
    with pytest.raises(Caught):
        (module.get("parse_args") or module["main"])()
    return caught[0]


# Flags that mean one thing in every script but whose default is what that script's reader edits.
SCRIPT_DEFAULTS = {"--chat", "--max-new-tokens"}


def test_each_shared_flag_has_one_definition(monkeypatch):
    flags = {}  # flag -> {script: argparse action}
    for script in SCRIPTS:
        for action in parser_of(script, monkeypatch)._actions:
            name = action.option_strings[0] if action.option_strings else None  # --chat, not --no-chat
            if name and name.startswith("--"):
                flags.setdefault(name, {})[script] = action
    shared = {name: by_script for name, by_script in flags.items() if len(by_script) > 1}
    assert {"--model-dir", "--device", "--threads", "--max-seq-len", "--top-p"} <= set(shared)
    for name, by_script in shared.items():
        actions = list(by_script.values())
        # --decoding: each script offers the decodings it has (chat.py: greedy and sample).
        assert name in cli.FLAGS or name == "--decoding", f"{name} is defined by {', '.join(by_script)}"
        assert len({a.help for a in actions}) == 1, name
        assert len({a.type for a in actions}) == 1, name
        if name not in SCRIPT_DEFAULTS:
            assert len({repr(a.default) for a in actions}) == 1, (name, {s: a.default for s, a in by_script.items()})


def test_no_import_circle_in_the_library():
    """Every module of llama_models imports only modules below it: the import graph has no cycle."""
    package = Path(llama_models.__file__).parent
    graph = {}
    for path in package.glob("*.py"):
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):  # also imports inside functions
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imports |= {node.module} if node.module else {alias.name for alias in node.names}
        graph[path.stem] = imports - {None}
    graph.pop("__init__")
    visiting, done = set(), set()

    def visit(module, chain):
        assert module not in visiting, f"import circle: {' -> '.join(chain + [module])}"
        if module in done:
            return
        visiting.add(module)
        for imported in graph.get(module, ()):
            visit(imported, chain + [module])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        visit(module, [])
