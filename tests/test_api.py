"""The package surface: lazy API names, CLI help, one-line errors."""

from __future__ import annotations

import importlib
import subprocess
import sys



def test_api_names_stay_functions_after_submodule_import():
    import upcycle.expand  # noqa: F401  (sets the package attribute to the submodule in plain Python)
    import upcycle.merge  # noqa: F401

    assert callable(upcycle.expand) and upcycle.expand.__name__ == "expand"
    assert callable(upcycle.merge) and upcycle.merge.__name__ == "merge"
    assert set(upcycle.__all__) >= {"expand", "load_model", "continue_train", "merge", "export"}


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
    expand_module = importlib.import_module("upcycle.expand")

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(expand_module, "expand", broken)
    monkeypatch.delenv("UPCYCLE_DEBUG", raising=False)
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
