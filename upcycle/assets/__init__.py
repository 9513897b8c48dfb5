"""The embedded default: a tiny dense Doge pretrained on Python documentation, and its data.

Made by ``bench/make_assets.py``; see ``README.md`` in this folder.

- ``DENSE_MODEL``: a complete dense Doge model folder (weights, config, tokenizer).
- Domain A: ``docs_documents(split)`` reads the shipped Python-docs sample (PSF license, see NOTICE).
- Domain B: ``stdlib_documents(split)`` reads this interpreter's own standard-library sources.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path

ASSETS = Path(__file__).parent
DENSE_MODEL = ASSETS / "doge-pydocs-1.6m"
DOCS_SAMPLE = ASSETS / "python-docs-sample.jsonl.gz"
STDLIB = Path(os.__file__).parent
SPLITS = ("train", "heldout")
STDLIB_SKIP = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def _check_split(split: str) -> None:
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of train, heldout, all; got {split!r}")


def docs_records(split: str = "all") -> list[dict]:
    """Records ``{"source", "split", "text"}`` of the shipped Python-docs sample (domain A)."""
    _check_split(split)
    with gzip.open(DOCS_SAMPLE, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r for r in records if split == "all" or r["split"] == split]


def docs_documents(split: str = "all") -> list[str]:
    """The texts of the shipped Python-docs sample (domain A), one per source file."""
    return [r["text"] for r in docs_records(split)]


def stdlib_split(relative: str) -> str:
    """``"heldout"`` for about one file in ten (a stable hash of the path), else ``"train"``."""
    return "heldout" if zlib.crc32(relative.encode()) % 10 == 0 else "train"


def stdlib_files(split: str = "all", root: Path = STDLIB) -> list[Path]:
    """Standard-library ``.py`` files (tests and site-packages excluded), ordered by a stable hash."""
    _check_split(split)
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root).as_posix()
        if STDLIB_SKIP.intersection(relative.split("/")[:-1]):
            continue
        if split == "all" or stdlib_split(relative) == split:
            files.append((zlib.crc32(relative.encode()), relative, path))
    return [path for _, _, path in sorted(files)]


def stdlib_documents(split: str = "all", max_bytes: int | None = None, max_file_bytes: int = 200_000) -> list[str]:
    """Texts of standard-library sources (domain B), up to ``max_bytes`` in total."""
    texts, total = [], 0
    for path in stdlib_files(split):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text) > max_file_bytes:
            continue
        texts.append(text)
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    return texts
