"""Checkpoint file formats: safetensors tensors, JSON state (RNG, data position), weights-only optimizer state.

Nothing here unpickles code: a checkpoint from someone else is safe to resume.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from upcycle.errors import DamagedCheckpoint


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


def set_rng_state(state: dict[str, Any], origin: Path | None = None) -> None:
    """Restore :func:`rng_state`'s values; a malformed state is a :class:`DamagedCheckpoint`."""
    try:
        apply_rng_state(state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, OverflowError) as error:
        raise DamagedCheckpoint(f"{origin or 'the RNG state'} is not an RNG state ({type(error).__name__}): "
                                "the checkpoint is damaged", origin) from None


def apply_rng_state(state: dict[str, Any]) -> None:
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCheckpoint(f"{path} is not valid JSON ({error}): the checkpoint is damaged", path) from None


def load_torch_state(path: Path) -> Any:
    """An optimizer state file, loaded without executing pickled code (``weights_only=True``)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path} is missing: the checkpoint is incomplete", path) from None
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DamagedCheckpoint(f"cannot read {path} safely ({first[:160]}): it is damaged or not an upcycle "
                                "checkpoint", path) from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a one-line error when the file is damaged."""
    try:
        return load_file(path)
    except Exception as error:
        raise DamagedCheckpoint(f"cannot read {path} ({str(error).splitlines()[0]}): the file is damaged", path) from None
