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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from upcycle.checkpoint import CHECKPOINT, RunFolder, load_tensors
from upcycle.errors import UpcycleError
from upcycle.folder import (SUMMARY, check_output, load_model, read_config, resolve_source, save_model,
                            staged_output, weight_files, write_folder_extras)
from upcycle.modeling_upcycle_doge import is_routed_tensor, routed_tensor_shapes
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
    if any(w < 0 for w in weights) or sum(weights) <= 0:
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


# ---------------------------------------------------------------- runs and checkpoints


@dataclass
class Checkpoint:
    """The trained state to fold: tensors, optional LoRA adapter, and where they came from."""

    path: Path
    run: Path | None
    tensors: list[Path]
    adapter: Path | None
    state: dict = field(default_factory=dict)
    final: bool = False


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UpcycleError(f"{path} is not valid JSON ({error}): the run folder is damaged") from None


def is_checkpoint(path: Path) -> bool:
    """A checkpoint-STEP folder (a finished RUN also holds adapter/, but no state.json)."""
    lora_only = (path / "adapter" / "adapter_config.json").is_file() and (path / "state.json").is_file()
    return (path / "trainable.safetensors").is_file() or lora_only


def find_checkpoint(src: str | os.PathLike) -> Checkpoint:
    """A checkpoint folder as is; a RUN: its final tensors when it finished, else its latest checkpoint."""
    path = Path(src).expanduser()
    if not path.is_dir():
        raise UpcycleError(f"{src} does not exist: pass a run folder or one of its checkpoint-STEP folders")
    if is_checkpoint(path):
        state = read_json(path / "state.json") if (path / "state.json").is_file() else {}
        run = path.parent if CHECKPOINT.match(path.name) else None
        return Checkpoint(path, run, optional(path / "trainable.safetensors"), optional_adapter(path), state)
    if (path / "experts.safetensors").is_file():
        summary = read_json(path / SUMMARY) if (path / SUMMARY).is_file() else {}
        if summary.get("train") not in (None, "experts", "experts+lora", "lora") and (path / "final").is_dir():
            # dense tensors trained too: experts.safetensors is not enough, take every tensor of final/
            return Checkpoint(path, path, weight_files(path / "final"), None, summary, final=True)
        return Checkpoint(path, path, [path / "experts.safetensors"], optional_adapter(path), summary, final=True)
    found = RunFolder(path).checkpoints()
    if not found:
        if (path / "config.json").is_file():
            raise UpcycleError(f"{src} is a model folder, not a run: merge takes a run folder or checkpoint "
                               "(use --average to average model folders)")
        raise UpcycleError(f"{src} has no checkpoint-STEP folders and no experts.safetensors: train longer "
                           "than --save-every steps, or pass a checkpoint folder")
    latest = found[-1]
    state = read_json(latest / "state.json") if (latest / "state.json").is_file() else {}
    return Checkpoint(latest, path, optional(latest / "trainable.safetensors"), optional_adapter(latest), state)


def optional(path: Path) -> list[Path]:
    return [path] if path.is_file() else []


def optional_adapter(folder: Path) -> Path | None:
    return folder / "adapter" if (folder / "adapter" / "adapter_config.json").is_file() else None


def run_base(checkpoint: Checkpoint) -> str | None:
    """The base model recorded by the run: state.json, training_summary.json, then config.yaml."""
    records = [checkpoint.state]
    if checkpoint.run is not None:
        for name in (SUMMARY, "config.yaml"):
            file = checkpoint.run / name
            if file.is_file():
                records.append(read_json(file) if name.endswith(".json") else read_yaml(file))
    for record in records:
        path, given = record.get("base_model_path"), record.get("base_model") or record.get("model")
        if path and Path(path).exists():
            return str(path)
        if given:
            return str(given)
    return None


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UpcycleError(f"{path} is not valid YAML ({error}): the run folder is damaged") from None
    return data if isinstance(data, dict) else {}


def resolve_base(checkpoint: Checkpoint, base: str | os.PathLike | None) -> Path:
    """The base model folder: ``base`` if given, else the one the run recorded."""
    given = str(base) if base is not None else run_base(checkpoint)
    if given is None:
        raise UpcycleError(f"{checkpoint.path} does not name its base model (no state.json or config.yaml "
                           "base_model): pass --base MODEL")
    try:
        return resolve_source(given)
    except UpcycleError as error:
        where = "" if base is not None else f" (recorded by the run in {checkpoint.run or checkpoint.path})"
        raise UpcycleError(f"base model {given}{where} not found: pass --base MODEL ({error})") from None


# ---------------------------------------------------------------- fold


@dataclass
class MergeResult:
    """What a merge wrote."""

    out: Path
    sources: list[str]
    detail: str

    def summary(self) -> str:
        return f"wrote {self.out}\n{self.detail}"


def fold_model(checkpoint: Checkpoint, base_folder: Path) -> torch.nn.Module:
    """Base model + trained tensors + merged LoRA, in memory."""
    config = read_config(base_folder)
    for file in checkpoint.tensors:
        check_experts_fit({n: t.shape for n, t in scan([file]).items()}, config, file)
    model = load_model(base_folder)
    for file in checkpoint.tensors:
        overlay(model, load_tensors(file), file)
    if checkpoint.adapter is not None:
        model = merge_lora(model, checkpoint.adapter)
    return model


def check_experts_fit(trained: dict[str, tuple[int, ...]], base_config, origin: Path) -> None:
    """Trained expert tensors (name -> shape) must be the base's experts: the same names and shapes.

    Checked from headers before anything loads, so a dense base, or one with another number of
    experts, is an error that says so.
    """
    experts = (routed_tensor_shapes(base_config.num_hidden_layers, base_config.num_experts, base_config.hidden_size)
               if base_config.is_moe else {})
    for name, shape in trained.items():
        if not is_routed_tensor(name):
            continue
        if not experts:
            raise UpcycleError(f"{origin} holds expert tensors ({name}) but the base model is dense: pass the "
                               "upcycled model the run trained (--base MODEL)")
        if experts.get(name) != tuple(shape):
            raise UpcycleError(f"{name} has shape {tuple(shape)} in {origin} but the base model's "
                               f"{base_config.num_experts} experts per layer need {experts.get(name)}: pass the base "
                               "the run trained (--base MODEL)")


def overlay(model: torch.nn.Module, tensors: dict[str, torch.Tensor], origin: Path) -> None:
    """Copy ``tensors`` into ``model``; every name and shape must match."""
    params = model.state_dict()
    for name, tensor in tensors.items():
        if name not in params:
            raise UpcycleError(f"{origin} holds {name}, which the base model lacks: pass the base the run "
                               "trained (--base MODEL)")
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise UpcycleError(f"{name} has shape {tuple(tensor.shape)} in {origin} but "
                               f"{tuple(params[name].shape)} in the base model: pass the base the run trained")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))


def merge_lora(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """Apply the PEFT adapter and fold it into the weights."""
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter))
    except Exception as error:
        raise UpcycleError(f"cannot apply the LoRA adapter {adapter} ({str(error).splitlines()[0]}): "
                           "pass the base the run trained (--base MODEL)") from None
    return wrapped.merge_and_unload()


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


def run_summary(checkpoint: Checkpoint, model: torch.nn.Module, base: str | os.PathLike | None) -> dict:
    """training_summary.json for the merged folder: the run's own when final, else built from the checkpoint."""
    run = checkpoint.run
    if checkpoint.final and run is not None and (run / SUMMARY).is_file():
        return read_json(run / SUMMARY)
    state, config = checkpoint.state, model.config
    lora = checkpoint.adapter / "adapter_model.safetensors" if checkpoint.adapter is not None else None
    trainable = stored_parameters([*checkpoint.tensors, *([lora] if lora and lora.is_file() else [])])
    recipe = read_yaml(run / "config.yaml") if run is not None and (run / "config.yaml").is_file() else {}
    return {
        "base_model": str(base) if base is not None else None,
        "num_experts": getattr(config, "num_experts", None) if config.is_moe else None,
        "experts_per_token": getattr(config, "num_experts_per_tok", None) if config.is_moe else None,
        "train": state.get("train"),
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "tokens_seen": state.get("tokens_seen"),
        "steps": state.get("step"),
        "final_train_loss": state.get("train_loss"),
        "final_eval_loss": state.get("eval_loss"),
        "recipe": recipe or None,
        "checkpoint": checkpoint.path.name,
    }


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


def stored_parameters(files: list[Path]) -> int:
    """Number of parameters stored in safetensors files (headers only)."""
    return sum(math.prod(t.shape) for t in scan(files).values())
