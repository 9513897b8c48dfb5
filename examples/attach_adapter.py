"""Attach an expert adapter (the trained experts only) to its dense base, with and without upcycle.

    python examples/attach_adapter.py upcycle-quickstart/adapter      # after `upcycle quickstart`
    python examples/attach_adapter.py                                 # builds a small adapter first (~1 min)

An adapter holds ``experts.safetensors`` (router_gate, down_embed, up_embed per layer) and
``adapter_config.json`` naming the dense base; it is a fraction of the merged model's size.
"""

from __future__ import annotations

import argparse
import email
from pathlib import Path

import torch

import upcycle
from upcycle import assets
from upcycle.recipe import resolve_config
from upcycle.train import continue_train


def build_adapter(out: Path, steps: int) -> Path:
    """Expand the shipped model, train its experts briefly on stdlib ``email`` sources, export the adapter."""
    upcycle.expand(assets.DENSE_MODEL, num_experts=1024, out=out / "moe", force=True, dtype="float32",
                   progress=False)
    config = resolve_config(None, model=str(out / "moe"), data=[str(Path(email.__file__).parent)],
                            output_dir=str(out / "run"), train="experts", max_steps=steps, batch_size=8, seq_len=256,
                            lr=3e-3, eval_every=0, eval_blocks=4, save_every=0, report_to="none")
    run = continue_train(config, force=True).run
    upcycle.export_adapter(run / "final", out / "adapter", base=assets.DENSE_MODEL, force=True, progress=False)
    return out / "adapter"


def size(folder: Path, pattern: str) -> float:
    return sum(p.stat().st_size for p in folder.glob(pattern)) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", nargs="?", type=Path, default=None, help="adapter folder  [default: build one]")
    parser.add_argument("--base", default=None, help="dense base folder  [default: the one the adapter names]")
    parser.add_argument("--out", type=Path, default=Path("adapter-example"), help="work folder when building one")
    parser.add_argument("--max-steps", type=int, default=60)
    args = parser.parse_args()
    adapter = args.adapter or build_adapter(args.out, args.max_steps)

    # 1. with upcycle installed
    model = upcycle.load_with_adapter(adapter, base=args.base)
    # 2. plain transformers: the adapter folder ships the modeling code
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cls = get_class_from_dynamic_module("modeling_upcycle_doge.UpcycleDogeForCausalLM", str(adapter))
    plain = cls.from_dense_and_adapter(str(adapter), base=args.base)

    ids = torch.arange(3, 67).unsqueeze(0)
    with torch.no_grad():
        gap = (model(ids).logits - plain(ids).logits).abs().max().item()
    base = args.base or model.config._name_or_path
    print(f"adapter {adapter}: {size(adapter, '*.safetensors'):.1f} MB; dense base {base}: "
          f"{size(Path(base), '*.safetensors'):.1f} MB")
    print(f"attached: {model.config.num_experts} experts/layer, {model.config.num_experts_per_tok} per token, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; upcycle vs plain transformers max |dlogit| "
          f"{gap:.2e}")


if __name__ == "__main__":
    main()
