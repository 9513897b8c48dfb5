"""Expert adapters: the trained tensors of an upcycled model, attachable to its dense base.

An adapter folder holds ``adapter_config.json`` (``adapter_type: upcycle-experts``,
``base_model_name_or_path``, ``num_experts``, ``num_experts_per_tok``, the config keys
that differ from the dense base, and the tensor names), ``experts.safetensors`` (every
tensor the dense base lacks, i.e. ``router_gate``/``down_embed``/``up_embed``, plus any
dense tensor that training changed, e.g. merged LoRA weights) and the remote code
``modeling_upcycle_doge.py``. PEFT cannot express it: the CDMoE layers add modules
the dense model does not have. Attach it without upcycle installed::

    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    cls = get_class_from_dynamic_module("modeling_upcycle_doge.UpcycleDogeForCausalLM", ADAPTER)
    model = cls.from_dense_and_adapter(ADAPTER)          # or (ADAPTER, base=DENSE_FOLDER)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from upcycle.errors import UpcycleError
from upcycle.folder import MODELING_FILE, read_config, resolve_source, weight_files
from upcycle.modeling_upcycle_doge import UpcycleDogeForCausalLM, routed_tensor_shapes
from upcycle.safetensors_stream import scan, write_safetensors
from upcycle.version import __version__

ADAPTER_TYPE = "upcycle-experts"
NOT_OVERRIDES = {"architectures", "auto_map", "upcycle", "_name_or_path", "transformers_version", "dtype",
                 "torch_dtype"}


def dense_base_of(model_folder: Path, base: str | os.PathLike | None) -> str:
    """The dense model an upcycled folder grew from: ``base`` or its config's ``upcycle.base_model``."""
    if base is not None:
        return str(base)
    raw = json.loads((model_folder / "config.json").read_text())
    given = (raw.get("upcycle") or {}).get("base_model")
    if not given:
        raise UpcycleError(f"{model_folder} does not name its dense base (no upcycle.base_model in config.json): "
                           "pass --base DENSE_MODEL")
    return str(given)


def config_overrides(moe_raw: dict, dense_raw: dict) -> dict:
    """Config keys whose values differ between the upcycled model and its dense base."""
    return {k: v for k, v in moe_raw.items() if k not in NOT_OVERRIDES and dense_raw.get(k) != v}


def write_adapter(stage: Path, model_folder: Path, base: str | os.PathLike | None = None,
                  base_name: str | None = None, on_bytes=None) -> dict:
    """Write the adapter of ``model_folder`` (relative to its dense base) into ``stage``; return its config."""
    given = dense_base_of(model_folder, base)
    try:
        dense_folder = resolve_source(given)
    except UpcycleError as error:
        raise UpcycleError(f"dense base {given} not found ({error}): pass --base DENSE_MODEL") from None
    dense_config, moe_config = read_config(dense_folder), read_config(model_folder)
    if not moe_config.is_moe:
        raise UpcycleError(f"{model_folder} is a dense model: an expert adapter needs an upcycled (MoE) model")
    if dense_config.is_moe:
        raise UpcycleError(f"base {given} already has experts: pass the dense model it was upcycled from (--base)")
    moe, dense = scan(weight_files(model_folder)), scan(weight_files(dense_folder))
    expected = routed_tensor_shapes(moe_config.num_hidden_layers, moe_config.num_experts, moe_config.hidden_size)
    for name, shape in expected.items():
        if name not in moe or tuple(moe[name].shape) != shape:
            found = f"shape {tuple(moe[name].shape)}" if name in moe else "missing"
            raise UpcycleError(f"{model_folder}: expert tensor {name} is {found}, expected {shape} for "
                               f"{moe_config.num_experts} experts: the model folder is damaged; re-save it")
    new, replaced = [], []
    for name, tensor in moe.items():
        if name not in dense:
            new.append(name)
        elif tuple(dense[name].shape) != tuple(tensor.shape):
            raise UpcycleError(f"{name} has shape {tensor.shape} in {model_folder} but {dense[name].shape} in "
                               f"{given}: pass the dense model it was upcycled from (--base)")
        elif not torch.equal(tensor.read(), dense[name].read().to(tensor.dtype)):
            replaced.append(name)
    plans = [moe[n].plan() for n in new + replaced]
    write_safetensors(stage / "experts.safetensors", plans, on_bytes)
    moe_raw = json.loads((model_folder / "config.json").read_text())
    dense_raw = json.loads((dense_folder / "config.json").read_text())
    meta = {
        "adapter_type": ADAPTER_TYPE,
        "base_model_name_or_path": base_name or given,
        "num_experts": moe_config.num_experts,
        "num_experts_per_tok": moe_config.num_experts_per_tok,
        "config": config_overrides(moe_raw, dense_raw),
        "new_tensors": new,
        "replaced_tensors": replaced,
        "upcycle_version": __version__,
    }
    (stage / "adapter_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.copy2(MODELING_FILE, stage / MODELING_FILE.name)
    return meta


def load_with_adapter(adapter: str | os.PathLike, base: str | os.PathLike | None = None,
                      **kwargs) -> torch.nn.Module:
    """Dense ``base`` (default: the adapter's base_model_name_or_path) with the adapter's experts attached."""
    try:
        return UpcycleDogeForCausalLM.from_dense_and_adapter(str(adapter), base=str(base) if base else None, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise UpcycleError(f"cannot attach {adapter}: {str(error).splitlines()[0]}") from None
