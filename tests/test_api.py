"""The package surface: plain API names, distinct module names, no import cycles, CLI help, one-line errors."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from unittest import mock

PACKAGE = Path(__file__).resolve().parents[1] / "upcycle"


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (``upcycle``, ``upcycle.folder``, ...).

    ``upcycle.__main__`` is left out: importing it runs the CLI.
    """
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] != "__main__":
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {node.module})
    return found & known


def test_api_names_are_the_functions_and_no_module_shares_one():
    import upcycle

    modules = module_files()
    for name in modules:
        __import__(name)
    for name in upcycle.__all__:
        value = getattr(upcycle, name)
        assert not isinstance(value, type(upcycle)), name
        assert f"upcycle.{name}" not in modules, f"module upcycle.{name} shadows the API name {name}"
    assert callable(upcycle.expand) and upcycle.expand.__module__ == "upcycle.expansion"
    assert callable(upcycle.merge) and upcycle.merge.__module__ == "upcycle.merging"
    assert set(upcycle.__all__) >= {"expand", "load_model", "continue_train", "merge", "export", "quickstart"}


def test_no_import_cycles():
    """No module imports (even inside a function) a module that leads back to it."""
    modules = module_files()
    graph = {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}

    def reaches(start: str, target: str) -> list[str] | None:
        stack, seen = [[start]], set()
        while stack:
            chain = stack.pop()
            for nxt in graph[chain[-1]]:
                if nxt == target:
                    return [*chain, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append([*chain, nxt])
        return None

    cycles = [chain for name in modules if (chain := reaches(name, name))]
    assert not cycles, " -> ".join(cycles[0])


def test_every_module_imports_on_its_own():
    """Each module imported first in a clean package state (third-party imports stay cached)."""
    names = sorted(module_files())
    script = f"""
import importlib, sys
import torch, transformers  # noqa: F401  (cached; only upcycle's modules are re-imported)
for name in {names!r}:
    for loaded in [m for m in sys.modules if m == "upcycle" or m.startswith("upcycle.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_every_verb_has_help(run_cli):
    from upcycle.cli import VERBS

    for verb in VERBS:
        code, out, err = run_cli(verb, "--help")
        assert code == 0 and out.startswith(f"Usage: upcycle {verb}"), (verb, err)


def test_cli_help_lists_verbs():
    result = subprocess.run([sys.executable, "-m", "upcycle", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for verb in ("expand", "continue-train", "merge", "export", "quickstart"):
        assert verb in result.stdout


def test_unknown_option_is_a_usage_error(run_cli):
    code, _, err = run_cli("expand", "--experts", "16", "x", "--bogus")
    assert code == 2 and "No such option" in err and "Traceback" not in err


def test_unexpected_exception_is_one_line_with_a_debug_switch(run_cli, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.delenv("UPCYCLE_DEBUG", raising=False)
    with mock.patch("upcycle.expansion.expand", broken):  # the API module: the CLI calls through it
        code, out, err = run_cli("expand", "--experts", "16", "x")
        assert code == 1 and err.strip() == ("error: unexpected RuntimeError: boom (set UPCYCLE_DEBUG=1 for the "
                                             "traceback and please report it)")
        monkeypatch.setenv("UPCYCLE_DEBUG", "1")
        try:
            run_cli("expand", "--experts", "16", "x")
        except RuntimeError as error:
            assert str(error).startswith("boom")
        else:
            raise AssertionError("UPCYCLE_DEBUG=1 should re-raise")


def test_remote_code_needs_only_what_transformers_brings():
    """transformers refuses remote code whose imports are missing: the shipped file may import only torch,
    transformers, their dependencies and the standard library (optional ones inside ``try`` blocks)."""
    from transformers.dynamic_module_utils import get_imports

    from upcycle.folder import MODELING_FILE

    allowed = {"torch", "transformers", "safetensors", "huggingface_hub"} | set(sys.stdlib_module_names)
    assert set(get_imports(str(MODELING_FILE))) <= allowed
