"""Peak training memory: experts-only continued training against full fine-tuning, Doge-160M/320M shapes.

Experts-only is the default recipe: the routed layers' ``router_gate``/``down_embed``/``up_embed`` train, the
rest is frozen, the expert tables use the rowwise optimizer (one fp32 second moment per row), the router
AdamW. Full fine-tuning trains every tensor of the dense model with AdamW. fp32 throughout (CPU training;
bf16 autocast on a GPU would change the activations), tied embeddings, micro-batch x seq-len tokens.

- **Computed** exactly: weight, gradient and optimizer-state bytes of a meta-device model, with the trainer's
  own parameter selection and optimizer groups (``select_trainable``, ``param_groups``).
- **Measured** on CPU, each in its own subprocess: one decoder layer at the real shape (and the head:
  embedding, final norm, tied lm_head, ``next_token_loss``), forward + backward after a warm-up step.
  ``kept`` = RSS held after the forward, ``peak`` = peak RSS (VmHWM) of forward + backward, once with each
  gradient dropped as soon as it is accumulated and once with the layer's gradients kept (``peak_grads``).
  Layer kinds: ``first`` (the lowest routed layer: its input needs no gradient), ``routed``, ``frozen``
  (below the routed layers; in the backward only under checkpointing, whose
  ``activation_checkpointing_enable`` makes the embedding output require a gradient) and ``dense``.
- **Combined** over the phases of a step: the loss (all layers' ``kept`` + the head), the backward of each
  layer j (``kept`` below j + j's peak + the gradients written by then), the end (all gradients).
- **Checked**: whole models of ``--check-layers`` layers run a real training step; their measured peak is
  compared with the same estimate at that depth.

    python bench/memory.py [--shapes 160m,320m] [--layers all,top-half] [--experts 16384] [--per-token 64]
                           [--seq-len 2048] [--batch 1] [--check-layers 4] [--no-write]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from transformers import DogeConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_section  # noqa: E402
from bench.train_step import _status, hardware, peak_extra  # noqa: E402
from upcycle.expansion import parse_layers  # noqa: E402
from upcycle.loss import next_token_loss  # noqa: E402
from upcycle.modeling_upcycle_doge import UpcycleDogeForCausalLM  # noqa: E402
from upcycle.recipe import resolve_config  # noqa: E402
from upcycle.retain import POOL_PER_STEP  # noqa: E402
from upcycle.trainable import build_optimizer, is_expert, param_groups, select_trainable  # noqa: E402

SHAPES = {
    "160m": dict(num_hidden_layers=24, hidden_size=768, intermediate_size=1536, num_attention_heads=6,
                 num_key_value_heads=3),
    "320m": dict(num_hidden_layers=32, hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
                 num_key_value_heads=4),
}
LAYER_KINDS = ("first", "routed", "frozen", "dense")
HEAD_KINDS = ("head-frozen", "head-full")
GIB = 2**30
MIB = 2**20


def make_config(shape: str, experts: int, per_token: int, seq_len: int, layers: int | None = None,
                expert_layers: str | None = None) -> DogeConfig:
    """A Doge config at ``shape`` (``layers`` overrides the depth); ``experts`` 0 is the dense model."""
    dims = dict(SHAPES[shape], **({} if layers is None else {"num_hidden_layers": layers}))
    config = DogeConfig(vocab_size=32768, max_position_embeddings=seq_len, tie_word_embeddings=True, **dims)
    if experts:
        config.is_moe, config.num_experts, config.num_experts_per_tok = True, experts, per_token
        active = parse_layers(expert_layers, config.num_hidden_layers)
        if active is not None:
            config.upcycle_expert_layers = active
    return config


def train_config(method: str):
    if method == "full":
        return resolve_config(None, model="m", data=["d"], train="all", expert_optimizer="adamw")
    return resolve_config(None, model="m", data=["d"], train="experts")  # the default: rowwise expert tables


def static_bytes(shape: str, method: str, layers: str, args: argparse.Namespace,
                 num_layers: int | None = None) -> dict:
    """Computed weight, gradient and optimizer-state bytes (and the retain pool) of one configuration."""
    experts = 0 if method == "full" else args.experts
    config = make_config(shape, experts, args.per_token, args.seq_len, num_layers, layers)
    with torch.device("meta"):
        model = UpcycleDogeForCausalLM(config)
    train = train_config(method)
    model = select_trainable(model, train)
    size = lambda p: p.numel() * p.element_size()  # noqa: E731
    weights = sum(size(p) for p in model.parameters()) + sum(size(b) for b in model.buffers())
    grads = sum(size(p) for p in model.parameters() if p.requires_grad)
    layer_grads = [sum(size(p) for p in layer.parameters() if p.requires_grad) for layer in model.model.layers]
    idle = sum(size(p) for name, p in model.named_parameters() if is_expert(name) and not p.requires_grad)
    optimizer = 0
    for group in param_groups(model, train):
        for p in group["params"]:
            # rowwise: one fp32 second moment per table row; AdamW: exp_avg + exp_avg_sq (fp32) + a 0-d fp32 step
            optimizer += p.shape[0] * 4 if group.get("rowwise") else 2 * p.numel() * 4 + 4
    routed = 0 if method == "full" else len(parse_layers(layers, config.num_hidden_layers)
                                            or range(config.num_hidden_layers))
    retain = routed * POOL_PER_STEP * train.retain_tokens * config.hidden_size * 4 if train.retain_coef else 0
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "retain": retain, "layer_grads": layer_grads,
            "idle": idle}


# ---------------------------------------------------------------- measured: one layer (child process)

class _Captured(Exception):
    pass


def layer_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    """The keyword arguments the model passes its first decoder layer (mask, position embeddings, ...)."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)
        raise _Captured

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured


def measure(kind: str, shape: str, checkpointing: bool, args: argparse.Namespace) -> dict[str, float]:
    """Kept and peak memory (MB) of one forward + backward of ``kind`` at the real shape; runs in its own process."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    experts = 0 if kind in ("dense", "head-full") else args.experts
    config = make_config(shape, experts, args.per_token, args.seq_len, layers=1)
    model = UpcycleDogeForCausalLM(config).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if kind == "frozen":
        model.model.layers[0].mlp.routed = False
    full = kind in ("dense", "head-full")
    for name, p in model.named_parameters():
        p.requires_grad_(full or (kind in ("first", "routed") and is_expert(name)))
    drop = {"grads": True}  # drop each gradient once accumulated: the peak holds activations and temporaries only
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None) if drop["grads"] else None)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(args.batch, args.seq_len, config.hidden_size, generator=torch.Generator().manual_seed(2))
    hidden.requires_grad_(kind not in ("first",) + HEAD_KINDS)
    grad_out = torch.randn_like(hidden)
    if kind in HEAD_KINDS:
        def forward() -> torch.Tensor:
            embedded = model.model.embed_tokens(ids)
            if not full:
                embedded.requires_grad_()  # stands for the top layer's output (or the checkpointed input)
            return next_token_loss(model.lm_head(model.model.norm(embedded)), ids)

        def backward(out: torch.Tensor) -> None:
            out.backward()
    else:
        kwargs = layer_inputs(model, ids)
        layer = model.model.layers[0]

        def forward() -> torch.Tensor:
            return layer(hidden, **kwargs)

        def backward(out: torch.Tensor) -> None:
            out.backward(grad_out)

    libc = ctypes.CDLL("libc.so.6")
    result = {}
    for run in ("warm-up", "activations", "with grads"):
        drop["grads"] = run != "with grads"
        model.zero_grad(set_to_none=True)
        hidden.grad = None
        libc.malloc_trim(0)
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        start = time.perf_counter()
        out = forward()
        libc.malloc_trim(0)
        kept = _status("VmRSS") - before
        backward(out)
        seconds = time.perf_counter() - start
        peak = _status("VmHWM") - before
        if run == "activations":
            result.update(kept=kept / MIB, peak=peak / MIB, seconds=seconds)
        elif run == "with grads":  # the layer's own gradients appear during its backward and stay
            result.update(peak_grads=peak / MIB, grads=(_status("VmRSS") - before) / MIB)
        del out
    return result


def whole_step(method: str, layers: str, shape: str, checkpointing: bool, args: argparse.Namespace) -> dict[str, float]:
    """The check: peak memory (MB) of a real training step of a ``--check-layers`` model above the memory before it."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = make_config(shape, 0 if method == "full" else args.experts, args.per_token, args.seq_len,
                         args.check_layers, layers)
    model = UpcycleDogeForCausalLM(config).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    train = train_config(method)
    model = select_trainable(model, train)
    optimizer = build_optimizer(model, train)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))

    def step() -> None:
        next_token_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"peak_grads": peak_extra(step, "cpu")}  # after a warm-up step (the optimizer state)


def measure_in_child(kind: str, shape: str, checkpointing: bool, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--measure", kind, "--shapes", shape, "--experts", str(args.experts),
           "--per-token", str(args.per_token), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
           "--check-layers", str(args.check_layers)]
    cmd += ["--checkpointing"] if checkpointing else []
    # a fixed mmap threshold: freed tensors go back to the system at once, so RSS follows live memory
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    result = json.loads(done.stdout.splitlines()[-1])
    print(f"  measured {shape} {kind}{' checkpointed' if checkpointing else ''}: "
          + ", ".join(f"{k} {v:.1f}" for k, v in result.items()), file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------- the model: computed + measured

def layer_plan(method: str, layers: str, num_layers: int, checkpointing: bool) -> list[str | None]:
    """Each layer's measured kind, bottom to top (``None``: keeps nothing, no backward)."""
    if method == "full":
        return ["dense"] * num_layers
    active = parse_layers(layers, num_layers) or list(range(num_layers))
    low = active[0]
    if checkpointing:  # the embedding output requires grad: every layer is in the backward
        return ["routed" if i in active else "frozen" for i in range(num_layers)]
    return [None if i < low else "first" if i == low else "routed" if i in active else "frozen"
            for i in range(num_layers)]


def dynamic_bytes(plan: list[str | None], head: dict, measured: dict[str, dict], layer_grads: list[int],
                  other_grads: int) -> tuple[float, float]:
    """(peak activations, peak of activations + the gradients present at that time), in bytes.

    Phases: the loss (every layer's kept + the head's peak), the backward of layer j (kept below j + its
    peak + the gradients of the layers above and of the tensors outside the layers), the end (all gradients).
    The first number uses the peaks without gradients, the second the peaks with the layer's own gradients.
    """
    kept = [measured[k]["kept"] * MIB if k else 0.0 for k in plan]
    backward = [(j, measured[k]) for j, k in enumerate(plan) if k]
    activations = max([sum(kept) + head["peak"] * MIB] + [sum(kept[:j]) + m["peak"] * MIB for j, m in backward])
    phases = [sum(kept) + head["peak_grads"] * MIB, sum(layer_grads) + other_grads]
    phases += [sum(kept[:j]) + m["peak_grads"] * MIB + sum(layer_grads[j + 1:]) + other_grads for j, m in backward]
    return activations, max(phases)


def estimate(shape: str, method: str, layers: str, checkpointing: bool, measured: dict, args: argparse.Namespace,
             num_layers: int | None = None) -> tuple[dict, float, float]:
    """(computed bytes, peak activation bytes, peak bytes of the step) of one configuration."""
    num_layers = num_layers or SHAPES[shape]["num_hidden_layers"]
    fixed = static_bytes(shape, method, layers, args, num_layers)
    plan = layer_plan(method, layers, num_layers, checkpointing)
    head = measured[("head-full" if method == "full" else "head-frozen", False)]
    acts, dynamic = dynamic_bytes(plan, head, {k: measured[(k, checkpointing)] for k in set(plan) if k},
                                  fixed["layer_grads"], fixed["grads"] - sum(fixed["layer_grads"]))
    return fixed, acts, fixed["weights"] + fixed["optimizer"] + dynamic


def run(args: argparse.Namespace) -> str:
    rows = ["| shape | method | expert layers | checkpointing | weights GiB | grads GiB | optimizer GiB "
            "| activations GiB | sum GiB | **peak GiB** |", "|---|---|---|---|---|---|---|---|---|---|"]
    detail = ["| shape | kind | checkpointing | kept MB | peak MB | peak with its grads MB | fwd+bwd s |",
              "|---|---|---|---|---|---|---|"]
    lines, retain, checks = [], [], []
    variants = [("experts", layers, ckpt) for layers in args.layers for ckpt in (False, True)]
    variants += [("full", "all", False), ("full", "all", True)]
    for shape in args.shapes:
        num_layers = SHAPES[shape]["num_hidden_layers"]
        needed = {("head-frozen", False), ("head-full", False)}
        needed |= {(k, c) for m, layers, c in variants for k in layer_plan(m, layers, num_layers, c) if k}
        order = LAYER_KINDS + HEAD_KINDS
        measured = {key: measure_in_child(key[0], shape, key[1], args)
                    for key in sorted(needed, key=lambda k: (order.index(k[0]), k[1]))}
        for (kind, ckpt), m in measured.items():
            detail.append(f"| {shape} | {kind} | {'on' if ckpt else 'off' if kind in LAYER_KINDS else '-'} "
                          f"| {m['kept']:.0f} | {m['peak']:.0f} | {m['peak_grads']:.0f} | {m['seconds']:.1f} |")
        peaks = {}
        for method, layers, ckpt in variants:
            fixed, acts, peak = estimate(shape, method, layers, ckpt, measured, args)
            peaks[(method, layers, ckpt)] = peak
            cells = [fixed["weights"], fixed["grads"], fixed["optimizer"], acts,
                     fixed["weights"] + fixed["grads"] + fixed["optimizer"] + acts]
            rows.append(f"| {shape} | {'full FT (AdamW)' if method == 'full' else 'experts-only (rowwise)'} | "
                        f"{layers if method != 'full' else '-'} | {'on' if ckpt else 'off'} | "
                        + " | ".join(f"{c / GIB:.2f}" for c in cells) + f" | **{peak / GIB:.2f}** |")
            if fixed["retain"] and not ckpt:
                retain.append(f"{shape} {layers} {fixed['retain'] / GIB:.2f}")
            if fixed["idle"] and not ckpt:
                lines.append(f"- {shape} {layers}: {fixed['idle'] / GIB:.2f} GiB of the weights are the zero expert "
                             "tables of the layers that do not route")
        for ckpt in (False, True):
            full = peaks[("full", "all", ckpt)]
            parts = ", ".join(f"{layers} **{peaks[('experts', layers, ckpt)] / full:.2f}x**" for layers in args.layers)
            lines.append(f"- {shape}, checkpointing {'on' if ckpt else 'off'} for both: experts-only / full FT peak "
                         f"= {parts} (full FT {full / GIB:.2f} GiB)")
        parts = ", ".join(f"{layers} {peaks[('experts', layers, True)] / peaks[('full', 'all', False)]:.2f}x"
                          for layers in args.layers)
        lines.append(f"- {shape}, experts-only checkpointed / full FT not checkpointed = {parts}")
        if args.check_layers:
            parts = []
            for method, layers, ckpt in variants:
                fixed, _, peak = estimate(shape, method, layers, ckpt, measured, args, args.check_layers)
                whole = measure_in_child(f"whole:{method}:{layers}", shape, ckpt, args)["peak_grads"]
                name = "full" if method == "full" else f"experts {layers}"
                parts.append(f"{name} ckpt {'on' if ckpt else 'off'} {whole:.0f} / "
                             f"{(peak - fixed['weights'] - fixed['optimizer']) / MIB:.0f}")
            checks.append(f"- {shape} at {args.check_layers} layers: " + ", ".join(parts))
    command = "python bench/memory.py" + "".join(f" {a}" for a in sys.argv[1:])
    check = ("" if not checks else "\n\nCheck of the composition: whole models of "
             f"{args.check_layers} layers at the same shapes, one real training step each (the trainer's "
             "`select_trainable`, `build_optimizer`, `next_token_loss`, optimizer step), own subprocess, after a "
             "warm-up step; peak RSS above the memory before the step (weights and optimizer state) against the "
             "estimate at that depth, measured / estimated MB:\n\n" + "\n".join(checks))
    return (f"## training memory: experts-only ({args.experts} experts, {args.per_token} per token) vs full "
            "fine-tuning, Doge-160M/320M shapes\n\n"
            f"{datetime.date.today()}, {hardware('cpu')}, {platform.platform()}. Command: `{command}`. Micro-batch "
            f"{args.batch} x {args.seq_len} tokens, fp32, tied embeddings, vocab 32768. Experts-only is the "
            "default recipe (expert tables and router train, rowwise expert optimizer, router AdamW); full FT trains "
            "the dense model with AdamW. **Computed** exactly from a meta-device model with the trainer's parameter "
            "selection and optimizer groups: weights (every tensor the model holds), grads (the trainable tensors), "
            "optimizer (AdamW: 2 fp32 moments; rowwise: 1 fp32 per table row). **Measured** on CPU: one decoder "
            "layer at the real shape, and the head (embedding, final norm, tied lm_head, next-token loss), forward + "
            "backward, each in its own subprocess (second table). activations = the larger of (all layers' kept + "
            "the head's peak: the loss) and, over layers j, (kept below j + j's peak: its backward); sum = weights + "
            "grads + optimizer + activations, an upper bound. **peak** = weights + optimizer + the largest phase of "
            "the step counting the gradients written by then (in layer j's backward: j's own, those of the layers "
            "above and of the tensors outside the layers; at the end: all): the estimate the ratios use. Not "
            "counted: optimizer-step temporaries and the default recipe's retain pool (GiB: " + "; ".join(retain)
            + ").\n\n" + "\n".join(rows) + "\n\n" + "\n".join(lines) + check + "\n\n"
            "Measured per decoder layer, MB above the memory before, after a warm-up step, with the fixed glibc "
            "mmap threshold (`MALLOC_MMAP_THRESHOLD_=131072`: freed tensors go back at once, so RSS follows live "
            "memory): kept = RSS held after the forward (saved tensors and the output); peak = peak RSS (VmHWM) of "
            "forward + backward with each gradient dropped once accumulated, and with the layer's gradients kept. "
            "Kinds: first = the lowest routed layer (its input needs no gradient); routed; frozen = a layer below "
            "the routed ones (nothing trains), in the backward only under checkpointing because "
            "`activation_checkpointing_enable` makes the embedding output require a gradient; dense = full FT.\n\n"
            + "\n".join(detail))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="160m,320m", help="comma-separated, from " + ",".join(SHAPES))
    ap.add_argument("--layers", default="all,top-half", help="expert layer sets to compare (expand's --layers)")
    ap.add_argument("--experts", type=int, default=16384, help="experts per layer (a perfect square)")
    ap.add_argument("--per-token", type=int, default=64, help="experts per token")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1, help="micro-batch (sequences per step)")
    ap.add_argument("--no-write", action="store_true", help="print the section only")
    ap.add_argument("--check-layers", type=int, default=4, help="also run whole models of this depth (a real "
                    "training step) and compare their peak with the estimate at that depth (0: skip)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.layers = [s for s in args.layers.split(",") if s]
    unknown = sorted(set(args.shapes) - set(SHAPES))
    if unknown:
        ap.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    torch.set_num_threads(1)
    if args.measure:
        if args.measure.startswith("whole:"):  # whole:METHOD:LAYERS
            _, method, layers = args.measure.split(":")
            print(json.dumps(whole_step(method, layers, args.shapes[0], args.checkpointing, args)))
        else:
            print(json.dumps(measure(args.measure, args.shapes[0], args.checkpointing, args)))
        return
    section = run(args)
    print(section)
    if not args.no_write:
        write_section("bench/memory.py", section)


if __name__ == "__main__":
    main()
