"""Graft CDMoE experts onto a dense Doge checkpoint (``upcycle expand``).

Dense tensors are copied bit-exact (or cast with ``dtype``). Each layer gains
``router_gate`` (normal, std ``initializer_range``), ``down_embed`` (same) and
``up_embed`` (zeros). With ``up_embed`` zero the expert term is exactly zero, so
the upcycled model computes the dense function; ``up_embed`` still receives a
gradient (the expert activations are non-zero), and once it moves, ``down_embed``
and ``router_gate`` learn too, the same idea as LoRA's zero ``B``.

Tensors stream from the source files into the output shards one at a time, so
peak memory is about the largest tensor, not the model.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from upcycle.errors import UpcycleError
from upcycle.folder import (check_room, parse_dtype, read_config, resolve_source, staged_output, weight_files,
                            write_folder_extras)
from upcycle.modeling_upcycle_doge import routed_tensor_shapes
from upcycle.safetensors_stream import SourceTensor, TensorPlan, human_bytes, parse_size, scan, write_sharded

DENSE_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class ExpandResult:
    """What ``expand`` wrote and how the parameter count changed."""

    out: Path
    params_before: int
    params_after: int
    params_added: int
    trainable: int
    bytes_on_disk: int
    num_experts: int
    experts_per_token: int

    def summary(self) -> str:
        rows = [
            ("output", str(self.out)),
            ("experts", f"{self.num_experts} per layer, {self.experts_per_token} per token"),
            ("parameters before", f"{self.params_before:,}"),
            ("parameters after", f"{self.params_after:,}"),
            ("added", f"{self.params_added:,}"),
            ("trainable (new experts)", f"{self.trainable:,}"),
            ("size on disk", human_bytes(self.bytes_on_disk)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def default_experts_per_token(num_experts: int) -> int:
    """sqrt(N)/4: 1024 -> 8 (the published Doge MoE), 4096 -> 16, 16384 -> 32."""
    return max(1, math.isqrt(max(num_experts, 0)) // 4)


def default_output(src: str, num_experts: int) -> Path:
    """A new sibling of a local SRC, or a folder in the working directory for a Hub id."""
    local = Path(src).expanduser()
    base = local.resolve() if local.exists() else Path.cwd() / str(src).rstrip("/").split("/")[-1]
    return base.with_name(f"{base.name}-moe{num_experts}")


def validate(num_experts: int, experts_per_token: int) -> None:
    if num_experts < 1:
        raise UpcycleError(f"--experts {num_experts} must be a positive perfect square (product-key routing needs "
                           "num_keys**2 experts): try 16, 256 or 1024")
    keys = math.isqrt(num_experts) if num_experts > 0 else 0
    if num_experts < 1 or keys * keys != num_experts:
        lower, upper = keys * keys, (keys + 1) ** 2
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        raise UpcycleError(f"--experts {num_experts} is not a perfect square (product-key routing needs "
                           f"num_keys**2 experts): try {hint}")
    if not 1 <= experts_per_token <= num_experts:
        raise UpcycleError(f"--experts-per-token {experts_per_token} must be between 1 and --experts ({num_experts})")


DEFAULT_LAYERS = "top-half"  # measured: less forgetting and a cheaper step than every layer (bench/frontier.py)


def parse_layers(spec: str | list[int] | None, num_layers: int) -> list[int] | None:
    """Layers that route experts: ``None``/``"all"``; ``"top-half"``; ``"top:N"``; or ``"4-7,9"`` (0-based)."""
    if spec is None or spec == "all":
        return None
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "top-half":
            picked = list(range(num_layers // 2, num_layers))
        elif text.startswith("top:") and text[4:].isdigit():
            picked = list(range(num_layers - int(text[4:]), num_layers))
        else:
            picked = []
            for part in filter(None, text.replace(" ", "").split(",")):
                low, _, high = part.partition("-")
                if not (low.isdigit() and (not high or high.isdigit())):
                    raise UpcycleError(f"--layers {spec!r} is not a layer list: write all, top-half, top:N "
                                       "or indices like 4-7,9 (0-based)")
                picked += range(int(low), int(high or low) + 1)
    else:
        picked = list(spec)
    if not picked or any(not 0 <= i < num_layers for i in picked):
        raise UpcycleError(f"--layers {spec!r} must pick layers among 0..{num_layers - 1} (the model has "
                           f"{num_layers})")
    picked = sorted(set(picked))
    return None if len(picked) == num_layers else picked


def new_tensor(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """Initial value of a grafted tensor, reproducible per (seed, name)."""
    if name.endswith("up_embed.weight"):
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * std


def plan_tensors(source: dict[str, SourceTensor], config, num_experts: int, dtype: torch.dtype | None,
                 seed: int) -> tuple[list[TensorPlan], list[str]]:
    """Every output tensor in order: the dense ones, then each layer's new experts."""
    plans, added = [], []
    for name, tensor in source.items():
        out_dtype = dtype if (dtype is not None and tensor.dtype.is_floating_point) else tensor.dtype
        plans.append(tensor.plan(out_dtype))
    float_dtype = dtype or next((t.dtype for n, t in source.items() if n.endswith("mlp.gate_proj.weight")),
                                torch.float32)
    for name, shape in routed_tensor_shapes(config.num_hidden_layers, num_experts, config.hidden_size).items():
        plans.append(TensorPlan(name, float_dtype, shape,
                                lambda n=name, s=shape: new_tensor(n, s, config.initializer_range, seed)))
        added.append(name)
    return plans, added


def check_dense_tensors(source: dict[str, SourceTensor], config, folder: Path) -> None:
    """Every layer must hold a dense SwiGLU MLP of the configured shape."""
    for layer in range(config.num_hidden_layers):
        for part in DENSE_MLP:
            name = f"model.layers.{layer}.mlp.{part}.weight"
            if name not in source:
                raise UpcycleError(f"{folder} lacks {name}: it is not a complete dense Doge checkpoint")
        shape = source[f"model.layers.{layer}.mlp.gate_proj.weight"].shape
        if shape != (config.intermediate_size, config.hidden_size):
            raise UpcycleError(f"{folder}: layer {layer} gate_proj has shape {shape}, config says "
                               f"{(config.intermediate_size, config.hidden_size)}; the config does not match the weights")


@dataclass
class ExpandPlan:
    """What :func:`expand` will write, worked out from the source's config and tensor headers alone."""

    folder: Path
    out: Path
    source: dict[str, SourceTensor]
    plans: list[TensorPlan]
    added: list[str]
    raw_config: dict
    num_experts: int
    experts_per_token: int
    active: list[int] | None

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.plans)

    def check_room(self) -> None:
        """Refuse (before anything is written) an output larger than the free disk or memory."""
        largest = max(math.prod(p.shape) for p in self.plans if p.name in set(self.added))
        # a new tensor is made in float32, then scaled
        check_room(self.out, self.total_bytes, 2 * 4 * largest, f"--experts {self.num_experts}")


def plan_expand(src: str | os.PathLike, num_experts: int, experts_per_token: int | None = None,
                out: str | os.PathLike | None = None, seed: int = 0, dtype: str | torch.dtype | None = None,
                layers: str | list[int] | None = DEFAULT_LAYERS) -> ExpandPlan:
    """Check the arguments and the source and plan every tensor of :func:`expand`'s output; writes nothing."""
    k = default_experts_per_token(num_experts) if experts_per_token is None else experts_per_token
    validate(num_experts, k)
    folder = resolve_source(src)
    config = read_config(folder)
    active = parse_layers(layers, config.num_hidden_layers)
    if config.is_moe:
        raise UpcycleError(f"{src} already has {config.num_experts} experts per layer: growing an upcycled "
                           "checkpoint is not supported yet; expand its dense source, or continue-train it as is")
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    source = scan(weight_files(folder))
    check_dense_tensors(source, config, folder)
    out = Path(out).expanduser() if out is not None else default_output(str(src), num_experts)
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise UpcycleError(f"output {out} is inside the source folder: choose a folder outside {folder}")
    plans, added = plan_tensors(source, config, num_experts, dtype, seed)

    raw = json.loads((folder / "config.json").read_text())
    raw.pop("transformers_version", None)
    raw.update(is_moe=True, num_experts=num_experts, num_experts_per_tok=k)
    raw["upcycle"] = {"base_model": str(src), "seed": seed, "init": "up_embed zero"}
    if active is not None:
        raw["upcycle_expert_layers"] = active
    if dtype is not None:
        raw["dtype"] = str(dtype).removeprefix("torch.")
    return ExpandPlan(folder, out, source, plans, added, raw, num_experts, k, active)


def expand(src: str | os.PathLike, num_experts: int, experts_per_token: int | None = None,
           out: str | os.PathLike | None = None, force: bool = False, seed: int = 0,
           dtype: str | torch.dtype | None = None, max_shard_size: str | int = "2GB",
           progress: bool = True, layers: str | list[int] | None = DEFAULT_LAYERS) -> ExpandResult:
    """Write an upcycled copy of the dense Doge checkpoint ``src`` with ``num_experts`` experts per layer.

    The result computes the same function as ``src`` and is ready for ``continue_train``. ``layers``
    (see :func:`parse_layers`; default: the top half) routes experts only in some layers: the others still hold (zero)
    expert tensors, so stock transformers loads the folder and computes the same function, but
    upcycle's model skips them and trains only the chosen ones; the backward pass then stops at the
    lowest chosen layer.
    """
    max_shard_size = parse_size(max_shard_size)
    plan = plan_expand(src, num_experts, experts_per_token, out, seed, dtype, layers)
    plan.check_room()
    out, plans, added, active = plan.out, plan.plans, plan.added, plan.active
    with staged_output(out, force=force) as stage:
        with tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="expand", disable=not progress) as bar:
            write_sharded(stage, plans, max_shard_size, on_bytes=bar.update)
        write_folder_extras(stage, plan.raw_config, plan.folder)
    written = sum(f.stat().st_size for f in out.iterdir() if f.is_file())

    def count(names) -> int:
        return sum(math.prod(p.shape) for p in plans if p.name in names)

    before = count(set(plan.source))
    added_count = count(set(added))
    trainable = count({n for n in added if active is None or int(n.split(".")[2]) in active})
    return ExpandResult(out, before, before + added_count, added_count, trainable, written, num_experts,
                        plan.experts_per_token)
