"""Fold a training run into a standalone model, or average checkpoints (``upcycle merge``).

``merge(RUN_OR_CHECKPOINT)`` loads the base model, overwrites the trained tensors
(``checkpoint-STEP/trainable.safetensors`` or the run's ``experts.safetensors``), merges
a PEFT LoRA adapter (``adapter/``) with ``merge_and_unload`` and saves a model folder.

``average(A, B, ..., method=...)`` combines same-shaped models tensor by tensor through a
small registry of merge methods (:data:`METHODS`): ``sma`` (simple), ``ema`` (exponential,
oldest input first) and ``wma`` (weighted), the checkpoint averaging of Doge training.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from upcycle.errors import UpcycleError
from upcycle.folder import (check_output, read_config, resolve_source, save_model,
                            staged_output, weight_files, write_folder_extras)
from upcycle.run_folder import (check_experts_fit, find_checkpoint, fold_model, is_checkpoint, resolve_base, run_base,
                                run_summary)
from upcycle.safetensors_stream import TensorPlan, scan, write_sharded

# ---------------------------------------------------------------- merge methods


MergeMethod = Callable[..., list[float]]
METHODS: dict[str, MergeMethod] = {}


def register_method(name: str) -> Callable[[MergeMethod], MergeMethod]:
    """Add a merge method: a function ``(n, **params) -> coefficients`` (one per input, summing to 1)."""

    def add(fn: MergeMethod) -> MergeMethod:
        METHODS[name] = fn
        return fn

    return add


@register_method("sma")
def simple_average(n: int, **_: object) -> list[float]:
    """Every input counts the same."""
    return [1.0 / n] * n


@register_method("ema")
def exponential_average(n: int, ema_decay: float = 0.5, **_: object) -> list[float]:
    """``avg = decay * avg + (1 - decay) * x`` over the inputs in order, starting from the first."""
    if not 0.0 <= ema_decay < 1.0:
        raise UpcycleError(f"--ema-decay {ema_decay} must be in [0, 1)")
    return [ema_decay ** (n - 1)] + [(1 - ema_decay) * ema_decay ** (n - 1 - i) for i in range(1, n)]


@register_method("wma")
def weighted_average(n: int, weights: list[float] | None = None, **_: object) -> list[float]:
    """Given weights (normalized), or linear 1..n so later inputs count more."""
    weights = list(weights) if weights else [float(i + 1) for i in range(n)]
    if len(weights) != n:
        raise UpcycleError(f"--weights has {len(weights)} values for {n} inputs: give one weight per input")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UpcycleError("--weights must be non-negative with a positive sum")
    total = sum(weights)
    return [w / total for w in weights]


def coefficients(method: str, n: int, weights: list[float] | None = None, ema_decay: float = 0.5) -> list[float]:
    """The per-input coefficients of ``method``."""
    if method not in METHODS:
        raise UpcycleError(f"unknown merge method {method!r}: use one of {', '.join(sorted(METHODS))}")
    if weights and method != "wma":
        raise UpcycleError("--weights only applies to --method wma")
    return METHODS[method](n, weights=weights, ema_decay=ema_decay)


# ---------------------------------------------------------------- fold


@dataclass
class MergeResult:
    """What a merge wrote."""

    out: Path
    sources: list[str]
    detail: str

    def summary(self) -> str:
        return f"wrote {self.out}\n{self.detail}"


def merge(src: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None,
          force: bool = False, max_shard_size: str | int = "2GB") -> MergeResult:
    """Fold a run (latest state) or one checkpoint into a standalone model folder ``out``."""
    check_output(Path(out).expanduser().absolute(), force)
    checkpoint = find_checkpoint(src)
    base_folder = resolve_base(checkpoint, base)
    read_config(base_folder)
    model = fold_model(checkpoint, base_folder)
    summary = run_summary(checkpoint, model, base if base is not None else run_base(checkpoint))
    save_model(model, out, source=base_folder, force=force, max_shard_size=max_shard_size, summary=summary)
    parts = [*checkpoint.tensors, *([checkpoint.adapter] if checkpoint.adapter else [])]
    detail = "folded " + " + ".join(str(p) for p in parts) + f" into {base_folder}"
    return MergeResult(Path(out), [str(p) for p in parts], detail)


# ---------------------------------------------------------------- average


@dataclass
class TensorSource:
    """One averaging input: how to read each of its tensors, and its model folder."""

    label: str
    folder: Path
    tensors: dict[str, TensorPlan]


def model_source(folder: Path, label: str) -> TensorSource:
    read_config(folder)
    return TensorSource(label, folder, {n: t.plan() for n, t in scan(weight_files(folder)).items()})


def checkpoint_source(path: Path, base: str | os.PathLike | None) -> TensorSource:
    """A checkpoint seen as a full model: base tensors overlaid with the trained ones."""
    checkpoint = find_checkpoint(path)
    base_folder = resolve_base(checkpoint, base)
    if checkpoint.adapter is not None:  # LoRA must be merged first: materialize this one in memory
        state = {k: v.detach() for k, v in fold_model(checkpoint, base_folder).state_dict().items()}
        source = model_source(base_folder, str(path))
        source.tensors = {n: TensorPlan(n, state[n].dtype, tuple(state[n].shape), lambda n=n: state[n])
                          for n in source.tensors}
        return source
    source = model_source(base_folder, str(path))
    for file in checkpoint.tensors:
        trained = scan([file])
        check_experts_fit({n: t.shape for n, t in trained.items()}, read_config(base_folder), file)
        for name, tensor in trained.items():
            if name not in source.tensors:
                raise UpcycleError(f"{file} holds {name}, which the base {base_folder} lacks: pass --base MODEL")
            plan = source.tensors[name]
            if tuple(tensor.shape) != tuple(plan.shape):
                raise UpcycleError(f"{name} has shape {tuple(tensor.shape)} in {file} but {tuple(plan.shape)} in the "
                                   f"base {base_folder}: pass --base MODEL")
            source.tensors[name] = TensorPlan(name, plan.dtype, plan.shape, tensor.read)
    return source


def open_source(src: str | os.PathLike, base: str | os.PathLike | None) -> TensorSource:
    path = Path(src).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and not is_checkpoint(path):
        return model_source(path, str(src))
    if path.is_dir():
        return checkpoint_source(path, base)
    return model_source(resolve_source(src), str(src))


def check_same_shapes(sources: list[TensorSource]) -> None:
    """Every input must hold the same tensor names and shapes; the error names the first mismatch."""
    first = sources[0]
    for other in sources[1:]:
        for name in sorted(set(first.tensors) | set(other.tensors)):
            if name not in other.tensors or name not in first.tensors:
                has, lacks = (first, other) if name in first.tensors else (other, first)
                raise UpcycleError(f"cannot average: tensor {name} is in {has.label} but not in {lacks.label}")
            a, b = first.tensors[name].shape, other.tensors[name].shape
            if tuple(a) != tuple(b):
                raise UpcycleError(f"cannot average: tensor {name} has shape {tuple(a)} in {first.label} but "
                                   f"{tuple(b)} in {other.label}; average checkpoints of one model")


def combine(readers: list[Callable[[], torch.Tensor]], coeffs: list[float], dtype: torch.dtype) -> torch.Tensor:
    """``sum(c * x)`` accumulated in float64, cast back; non-float tensors come from the last input."""
    if not dtype.is_floating_point:
        return readers[-1]()
    total = None
    for read, c in zip(readers, coeffs):
        term = read().to(torch.float64) * c
        total = term if total is None else total.add_(term)
    return total.to(dtype)


def average(sources: list[str | os.PathLike], out: str | os.PathLike, method: str = "sma",
            weights: list[float] | None = None, ema_decay: float = 0.5, base: str | os.PathLike | None = None,
            force: bool = False, max_shard_size: str | int = "2GB", progress: bool = True) -> MergeResult:
    """Average same-shaped model folders or checkpoints, streaming one tensor at a time."""
    if len(sources) < 2:
        raise UpcycleError("--average needs at least two models or checkpoints")
    coeffs = coefficients(method, len(sources), weights, ema_decay)
    check_output(Path(out).expanduser().absolute(), force)
    opened = [open_source(s, base) for s in sources]
    check_same_shapes(opened)
    first = opened[0]
    plans = [TensorPlan(name, plan.dtype, plan.shape,
                        lambda n=name, d=plan.dtype: combine([s.tensors[n].make for s in opened], coeffs, d))
             for name, plan in first.tensors.items()]
    config = json.loads((first.folder / "config.json").read_text())
    config.pop("transformers_version", None)
    if isinstance(config.get("upcycle"), dict):
        config["upcycle"] = {**config["upcycle"], "merge": {"method": method, "coefficients": coeffs}}
    with staged_output(out, force=force) as stage:
        with tqdm(total=sum(p.nbytes for p in plans), unit="B", unit_scale=True, desc=f"merge {method}",
                  disable=not progress) as bar:
            write_sharded(stage, plans, max_shard_size, on_bytes=bar.update)
        write_folder_extras(stage, config, first.folder)
    shown = ", ".join(f"{s} x {c:.4g}" for s, c in zip(sources, coeffs))
    return MergeResult(Path(out), [str(s) for s in sources], f"{method}: {shown}")


