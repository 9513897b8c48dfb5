"""The run folder of ``continue-train`` (layout in docs/run-layout.md): guard, checkpoints, resume.

``RUN/.upcycle-manifest.json`` lists every file the run wrote; ``--force`` deletes exactly
those and refuses to overwrite anything else.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from upcycle.errors import UpcycleError
from upcycle.folder import MANIFEST, SUMMARY

OUR_NAMES = ("config.yaml", "metrics.jsonl", "experts.safetensors", SUMMARY, "adapter", "final",
             "logs")
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


class RunFolder:
    """RUN and the manifest of the files this tool wrote there."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest = path / MANIFEST

    def written(self) -> set[str]:
        if not self.manifest.is_file():
            return set()
        try:
            return set(json.loads(self.manifest.read_text()).get("files", []))
        except (json.JSONDecodeError, AttributeError):
            return set()

    def record(self, *paths: Path) -> None:
        """Add files (or every file under folders) to the manifest."""
        files = self.written()
        for path in paths:
            found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            files.update(str(p.relative_to(self.path)) for p in found)
        self.manifest.write_text(json.dumps({"files": sorted(files)}, indent=1) + "\n")

    def forget(self, folder: Path) -> None:
        """Remove a folder this run wrote, and its files from the manifest."""
        prefix = str(folder.relative_to(self.path)) + "/"
        shutil.rmtree(folder, ignore_errors=True)
        files = {f for f in self.written() if not f.startswith(prefix)}
        self.manifest.write_text(json.dumps({"files": sorted(files)}, indent=1) + "\n")

    def ours(self, entry: Path) -> bool:
        return entry.name in OUR_NAMES or bool(CHECKPOINT.match(entry.name))

    def check_fresh(self, force: bool) -> None:
        """Refuse a RUN that holds another run, unless ``force`` (then only our own files may go)."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise UpcycleError(f"{self.path} is a file: choose another --output-dir")
        entries = [e for e in self.path.iterdir() if e.name != MANIFEST]
        if not entries:
            return
        if not force:
            raise UpcycleError(f"{self.path} already holds a run ({entries[0].name}): pass --resume to continue it, "
                               "--force to start over, or choose another --output-dir")
        written = self.written()
        for entry in filter(self.ours, entries):
            files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
            foreign = [p for p in files if str(p.relative_to(self.path)) not in written]
            if foreign:
                raise UpcycleError(f"{foreign[0]} was not written by upcycle: --force only replaces upcycle's own "
                                   "files; move it away or choose another --output-dir")

    def clear(self) -> None:
        """Delete the files the manifest lists (``--force``), then the folders they leave empty."""
        files = [self.path / name for name in self.written()]
        for path in files:
            path.unlink(missing_ok=True)
        folders = {p for path in files for p in path.parents if self.path in p.parents}
        for folder in sorted(folders, key=lambda p: -len(p.parts)):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self.manifest.unlink(missing_ok=True)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = [p for p in self.path.glob("checkpoint-*") if CHECKPOINT.match(p.name) and (p / "state.json").is_file()]
        return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def find_checkpoint(run: Path, resume: str) -> Path:
    """The checkpoint to resume: ``latest`` in RUN, or the folder given."""
    if resume != "latest":
        path = Path(resume).expanduser()
        if not (path / "state.json").is_file():
            raise UpcycleError(f"{resume} is not a checkpoint folder (no state.json): pass RUN/checkpoint-STEP")
        return path
    found = RunFolder(run).checkpoints()
    if not found:
        raise UpcycleError(f"{run} holds no checkpoint to resume: start without --resume (or pass --force)")
    return found[-1]


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "state.json").read_text())


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a one-line error when the file is damaged."""
    try:
        return load_file(path)
    except Exception as error:
        raise UpcycleError(f"cannot read {path} ({str(error).splitlines()[0]}): the file is damaged") from None
