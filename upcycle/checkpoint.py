"""The run folder of ``continue-train`` (layout in docs/run-layout.md): guard, checkpoints, resume.

``RUN/.upcycle-manifest.json`` lists every file the run wrote (``upcycle.manifest``); ``--force``
deletes exactly those, never a path outside RUN, and refuses to overwrite anything else.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from upcycle.errors import UpcycleError
from upcycle.folder import MANIFEST, SUMMARY
from upcycle.manifest import Manifest

OUR_NAMES = ("config.yaml", "metrics.jsonl", "experts.safetensors", SUMMARY, "adapter", "final",
             "logs", "retain.safetensors")
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


class RunFolder:
    """RUN and the manifest of the files this tool wrote there.

    Files already in RUN and not listed when the object is made (a user's) are never recorded by
    ``record`` of a folder, so they are never deleted later either.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = self.path / MANIFEST
        self.files = Manifest(self.path)
        listed = set(self.files.entries())
        self.foreign = {n for n in self.files.files_under(self.path) if n not in listed} if self.path.is_dir() else set()

    def written(self) -> set[str]:
        """The files the manifest lists, every entry checked (an unreadable manifest lists none)."""
        return self.files.read()

    def record(self, *paths: Path) -> None:
        """Add files this run wrote to the manifest: a file as named; a folder, every file under it
        except those that were there, unlisted, before this run."""
        found = []
        for path in paths:
            names = self.files.files_under(path)
            found += names if Path(path).is_file() and not Path(path).is_symlink() else \
                [n for n in names if n not in self.foreign]
        self.files.record(*(self.path / n for n in found))

    def forget(self, folder: Path) -> None:
        """Delete the files this run wrote under ``folder`` (a user's files there stay), the folders
        left empty, and their manifest entries."""
        self.files.remove_listed(folder)

    def ours(self, entry: Path) -> bool:
        return entry.name in OUR_NAMES or bool(CHECKPOINT.match(entry.name))

    def check_fresh(self, force: bool) -> None:
        """Refuse a RUN that holds another run, unless ``force`` (then only our own files may go)."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise UpcycleError(f"{self.path} is a file: choose another --output-dir")
        entries = sorted(e for e in self.path.iterdir() if not e.name.startswith(MANIFEST))
        if entries and not force:
            raise UpcycleError(f"{self.path} already holds a run ({entries[0].name}): pass --resume to continue it, "
                               "--force to start over, or choose another --output-dir")
        written = self.files.owned()  # every entry inside RUN, none behind a symlink; a damaged one refuses
        for entry in filter(self.ours, entries):
            if entry.is_symlink():
                raise UpcycleError(f"{entry} is a symlink: upcycle does not write through links in a run folder; "
                                   "remove it or choose another --output-dir")
            foreign = [n for n in self.files.files_under(entry) if n not in written]
            if foreign:
                raise UpcycleError(f"{self.path / foreign[0]} was not written by upcycle: --force only replaces "
                                   "upcycle's own files; move it away or choose another --output-dir")

    def clear(self) -> None:
        """Delete the files the manifest lists (``--force``), then the folders they leave empty."""
        self.files.remove_listed()
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
    return read_json(checkpoint / "state.json")


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG state as plain JSON values (no pickles in checkpoints)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": [version, list(internal), gauss],
                             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def read_json(path: Path) -> Any:
    """A JSON file of a run folder; a one-line error when it is damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UpcycleError(f"{path} is not valid JSON ({error}): the checkpoint is damaged") from None


def load_torch_state(path: Path) -> Any:
    """An optimizer state file, loaded without executing pickled code (``weights_only=True``)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise UpcycleError(f"{path} is missing: the checkpoint is incomplete, resume from another one") from None
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UpcycleError(f"cannot read {path} safely ({first[:160]}): it is damaged or not an upcycle "
                           "checkpoint") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a one-line error when the file is damaged."""
    try:
        return load_file(path)
    except Exception as error:
        raise UpcycleError(f"cannot read {path} ({str(error).splitlines()[0]}): the file is damaged") from None
