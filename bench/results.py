"""Write one benchmark's marked section of bench/RESULTS.md (replace it, or append it the first time)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(marker: str, text: str, path: Path = RESULTS) -> None:
    """Replace the block between ``<!-- MARKER -->`` and ``<!-- /MARKER -->`` with ``text``."""
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)
