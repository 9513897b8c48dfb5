"""The ``upcycle`` command line: a thin layer over the Python API.

Each verb is a click command named ``command`` in ``upcycle/commands/<verb>.py``,
calling the Python API (``upcycle.expansion``, ``upcycle.train``, ``upcycle.merging``,
``upcycle.exporting``, ``upcycle.demo``); this file only collects them and turns
:class:`UpcycleError` into a one-line message.
"""

from __future__ import annotations

import os
import sys

import click

from upcycle.commands import continue_train, expand, export, merge, quickstart
from upcycle.errors import UpcycleError, describe
from upcycle.version import __version__

VERBS: dict[str, click.Command] = {
    "expand": expand.command,
    "continue-train": continue_train.command,
    "merge": merge.command,
    "export": export.command,
    "quickstart": quickstart.command,
}


class VerbGroup(click.Group):
    """Lists the verbs in the order of the workflow (click sorts them by name)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=VerbGroup, commands=VERBS,
             context_settings={"help_option_names": ["-h", "--help"], "terminal_width": 100,
                               "max_content_width": 100})
@click.version_option(__version__, prog_name="upcycle")
def cli() -> None:
    """Continual sparse upcycling for Doge language models.

    Grow CDMoE experts on a dense Doge checkpoint, train only the new experts,
    merge, and export to the Hugging Face Hub.
    """


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, no tracebacks, non-zero exits."""
    try:
        cli.main(args=argv, prog_name="upcycle", standalone_mode=False)
    except UpcycleError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as error:  # a bad flag or value: one line, and where the help is
        where = f"upcycle {error.ctx.info_name}" if error.ctx and error.ctx.parent else "upcycle"
        click.echo(f"error: {error.format_message()} (see `{where} --help`)", err=True)
        sys.exit(error.exit_code)
    except click.ClickException as error:
        click.echo(f"error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except Exception as error:  # a bug or an unforeseen input: still one line, the traceback on request
        if os.environ.get("UPCYCLE_DEBUG"):
            raise
        known = describe(error)  # disk full, permissions, safetensors I/O
        if known:
            click.echo(f"error: {known}", err=True)
            sys.exit(1)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        click.echo(f"error: unexpected {type(error).__name__}: {first} (set UPCYCLE_DEBUG=1 for the traceback "
                   "and please report it)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
