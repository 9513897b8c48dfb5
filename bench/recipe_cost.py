"""Cost of a training step of the default experts-only recipe against full fine-tuning of the dense model.

Doge-20M shape (8 layers, hidden 256, ff 512, 2 heads, 1 kv head, vocab 32768, tied embeddings),
batch 4 x 256 tokens, AdamW; random weights (the cost does not depend on them). Variants:

- ``full``: the dense model, every tensor trains (`--train all`);
- ``experts``: 1024 experts / 8 per token in every layer, experts-only, with the retain penalty
  (the default recipe: rowwise expert optimizer, 256 retain tokens per layer per step);
- ``experts-top``: the same with experts in the top half of the layers (`expand --layers top-half`).

Each step is built from the trainer's own pieces (`select_trainable`, `build_optimizer`,
`batch_loss` with `RetainPenalty`). Time: median of interleaved repeats after warm-up, one process.
Peak memory: extra peak RSS of the steps, each variant in its own subprocess (CPU) or
``max_memory_allocated`` (CUDA).

    python bench/recipe_cost.py [--device cuda] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DogeConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_section  # noqa: E402
from bench.train_step import hardware, interleaved, peak_extra  # noqa: E402
from upcycle.expert_init import init_blocks_needed  # noqa: E402
from upcycle.modeling_upcycle_doge import UpcycleDogeForCausalLM  # noqa: E402
from upcycle.recipe import resolve_config  # noqa: E402
from upcycle.retain import build_penalty  # noqa: E402
from upcycle.train import batch_loss  # noqa: E402
from upcycle.trainable import build_optimizer, select_trainable  # noqa: E402

# variant -> (layers with experts or None for the dense model, TrainConfig overrides, description)
VARIANT_SPECS: dict[str, tuple[list[int] | str | None, dict, str]] = {
    "full": (None, {"train": "all"},
        "the dense model, every tensor trains"),
    "experts": ("all", {},
        "the default recipe with experts in every layer (`expand --layers all`)"),
    "experts-top": (list(range(4, 8)), {},
        "the default recipe: experts in layers 4-7 (the top half, `expand`'s default), rowwise expert optimizer, "
        "retain penalty on 256 tokens per layer"),
    "experts-top-r256": (list(range(4, 8)), {"retain_tokens": 256},
        "the default recipe, penalty on 256 retain tokens per layer"),
    "experts-top-nopenalty": (list(range(4, 8)), {"retain_coef": 0.0},
        "the default recipe without the penalty (`--retain-coef 0`)"),
    "experts-top3": (list(range(5, 8)), {},
        "experts in layers 5-7 only (`--layers top:3`)"),
    "experts-top-adamw": (list(range(4, 8)), {"expert_optimizer": "adamw", "retain_tokens": 1024},
        "the previous default: top half, AdamW on the tables, penalty on 1024 tokens"),
    "experts-top-rowwise": (list(range(4, 8)), {"expert_optimizer": "rowwise"},
        "the default recipe (rowwise expert optimizer)"),
    "experts-top-rowwise-r256": (list(range(4, 8)), {"expert_optimizer": "rowwise", "retain_tokens": 256},
        "rowwise and 256 retain tokens"),
}

VARIANTS = ("full", "experts", "experts-top")
SHAPE = dict(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=2,
             num_key_value_heads=1, tie_word_embeddings=True)


def fresh_model(layers: list[int] | str | None, device: str) -> UpcycleDogeForCausalLM:
    """The Doge-20M shape, dense (``layers`` None) or with 1024 experts in ``layers``, as a fresh graft (zero
    ``up_embed``); random weights, seed 0."""
    torch.manual_seed(0)
    if layers is None:
        return UpcycleDogeForCausalLM(DogeConfig(**SHAPE)).to(device)
    config = DogeConfig(**SHAPE, is_moe=True, num_experts=1024, num_experts_per_tok=8)
    if layers != "all":
        config.upcycle_expert_layers = layers
    model = UpcycleDogeForCausalLM(config).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "up_embed" in name:
                p.zero_()
    return model


def build(variant: str, device: str, bsz: int, seq: int) -> Callable[[], None]:
    """One optimizer step of ``variant`` as a closure."""
    layers, overrides, _ = VARIANT_SPECS[variant]
    model = fresh_model(layers, device).train()
    train = resolve_config(None, model="m", data=["d"], **{"train": "experts", "lr": 1e-3, **overrides})
    model = select_trainable(model, train)
    optimizer = build_optimizer(model, train)
    retain = None
    if layers is not None:
        blocks = torch.randint(0, 32768, (64, seq), generator=torch.Generator().manual_seed(3))
        retain = None if train.retain_coef == 0 else build_penalty(model, blocks.to(device), train.retain_coef, train.retain_tokens, seed=0)
    ids = torch.randint(0, 32768, (bsz, seq), generator=torch.Generator().manual_seed(1)).to(device)
    state = {"step": 0}

    def step() -> None:
        loss, _ = batch_loss(model, ids, train, None, retain, state["step"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1

    return step


def fit_seconds(device: str, seq: int) -> float:
    """One-time cost of ``--expert-init data`` on the top-half model: the forward pass over the fitting blocks
    plus the k-means of every routed layer."""
    import time

    from upcycle.expert_init import init_from_data

    model = fresh_model(VARIANT_SPECS["experts-top"][0], device)
    blocks = torch.randint(0, 32768, (init_blocks_needed(seq), seq), generator=torch.Generator().manual_seed(2))
    started = time.perf_counter()
    init_from_data(model, blocks, seed=0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def memory(device: str, bsz: int, seq: int, variants: list[str]) -> dict[str, float]:
    if device.startswith("cuda"):
        return {v: peak_extra(build(v, device, bsz, seq), device) for v in variants}
    out = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--memory-of", v, "--batch", str(bsz), "--seq", str(seq)]
        out[v] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ",".join(VARIANT_SPECS))
    ap.add_argument("--memory-of", choices=sorted(VARIANT_SPECS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        print(json.dumps(peak_extra(build(args.memory_of, args.device, args.batch, args.seq), args.device)))
        return
    variants = ["full"] + [v for v in args.variants.split(",") if v and v != "full"]
    unknown = sorted(set(variants) - set(VARIANT_SPECS))
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANT_SPECS)}")
    where = hardware(args.device)
    steps = {v: build(v, args.device, args.batch, args.seq) for v in variants}
    times = interleaved(steps, args.repeats, args.warmup, args.device)
    del steps
    mem = memory(args.device, args.batch, args.seq, variants)
    fit = fit_seconds(args.device, args.seq)
    rows = ["| variant | step time (ms) | time / full | tokens/s | peak extra memory (MB) |", "|---|---|---|---|---|"]
    for v in variants:
        rows.append(f"| {v} | {times[v] * 1e3:.0f} | **{times[v] / times['full']:.2f}x** | "
                    f"{args.batch * args.seq / times[v]:,.0f} | {mem[v]:.0f} |")
    cmd = "python bench/recipe_cost.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    cmd += f" --variants {','.join(variants[1:])}" if variants[1:] != list(VARIANTS[1:]) else ""
    about = "; ".join(f"`{v}`: {VARIANT_SPECS[v][2]}" for v in variants)
    section = (f"## recipe cost: default experts-only step vs full fine-tuning, Doge-20M shape ({args.device})\n\n"
               f"{datetime.date.today()}, {where}. Command: `{cmd}`. Batch {args.batch} x {args.seq} tokens; "
               f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up; AdamW unless said; "
               f"1024 experts, 8 per token. {about}.\n\n" + "\n".join(rows)
               + f"\n\nOne-time cost of `--expert-init data` (top half, {init_blocks_needed(args.seq)} blocks of "
               f"{args.seq} tokens, before the first step): {fit:.1f} s, about {fit / times['full']:.0f} full "
               "fine-tuning steps.")
    print(section)
    if not args.no_write:
        write_section(f"bench/recipe_cost.py {'cuda' if args.device.startswith('cuda') else 'cpu'}", section)


if __name__ == "__main__":
    main()
