"""The README's CLI reference is the real ``--help`` text (regenerate: ``python tests/test_readme.py``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- help:(?P<verb>[\w-]+) -->\n```\n(?P<text>.*?)```\n<!-- /help -->", re.S)


def help_text(verb: str) -> str:
    from click.testing import CliRunner

    from upcycle.cli import cli

    result = CliRunner().invoke(cli, [verb, "--help"], prog_name="upcycle")
    assert result.exit_code == 0, result.output
    return result.output


def regenerate() -> None:
    text = README.read_text()
    README.write_text(BLOCK.sub(lambda m: f"<!-- help:{m['verb']} -->\n```\n{help_text(m['verb'])}```\n<!-- /help -->",
                                text))


def test_readme_documents_every_verb_with_its_current_help():
    from upcycle.cli import VERBS

    blocks = {m["verb"]: m["text"] for m in BLOCK.finditer(README.read_text())}
    assert set(blocks) == set(VERBS)
    for verb, text in blocks.items():
        assert text == help_text(verb), f"README help for {verb} is stale: run python tests/test_readme.py"


def test_readme_setup_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0 && pip install -e \".[dev]\" && upcycle quickstart" in text
    test_command = ci.strip().splitlines()[-1]
    assert f"```bash\n{test_command}\n```" in text


if __name__ == "__main__":
    regenerate()
    sys.exit(0)
