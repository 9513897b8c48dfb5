"""One experts-only training step: upcycle's causal CDMoE against transformers' stock DogeCDMoE.

Doge-20M shape (8 layers, hidden 256, ff 512, 2 heads, 1 kv head, vocab 32768, tied embeddings)
with 1024 experts, 8 per token; only ``router_gate``, ``down_embed``, ``up_embed`` train (AdamW).
Both models hold the same weights and see the same batch. Times are medians of interleaved
repeats (warm-up excluded). Peak memory is the extra memory of the steps over the memory before
them: on CPU peak RSS, each variant in its own subprocess; on CUDA ``max_memory_allocated``.

    python bench/train_step.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DogeConfig, DogeForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_section  # noqa: E402
from upcycle.modeling_upcycle_doge import ROUTED_PARAMETER_NAMES, UpcycleDogeForCausalLM  # noqa: E402

VARIANTS = ("stock", "ours")


def config() -> DogeConfig:
    return DogeConfig(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      is_moe=True, num_experts=1024, num_experts_per_tok=8)


def build(variants: tuple[str, ...], device: str) -> dict[str, torch.nn.Module]:
    """The requested models with identical weights, experts-only trainable."""
    torch.manual_seed(0)
    stock = DogeForCausalLM(config())
    models = {"stock": stock}
    if "ours" in variants:
        models["ours"] = UpcycleDogeForCausalLM(config())
        models["ours"].load_state_dict(stock.state_dict())
    for name in list(models):
        if name not in variants:
            del models[name]
    for model in models.values():
        model.to(device).train()
        for pname, p in model.named_parameters():
            p.requires_grad_(any(key in pname for key in ROUTED_PARAMETER_NAMES))
    return models


def batch(device: str, bsz: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 32768, (bsz, seq), generator=torch.Generator().manual_seed(1)).to(device)


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def module_step(model: torch.nn.Module, tokens: int, device: str) -> Callable[[], None]:
    """Forward + backward of layer 0's CDMoE on fixed hidden states (dense part frozen)."""
    mlp = model.model.layers[0].mlp
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, tokens, 256, generator=gen).to(device).requires_grad_()
    grad = torch.randn(1, tokens, 256, generator=gen).to(device)

    def step() -> None:
        mlp(x)[0].backward(grad)
        x.grad = None
        mlp.zero_grad(set_to_none=True)

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds per call, variants alternating (order flipped every repeat)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name in (list(fns) if r % 2 else list(fns)[::-1]):
            sync(device)
            t = time.perf_counter()
            fns[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_extra(fn: Callable[[], None], device: str, calls: int = 1) -> float:
    """Peak memory during ``calls`` calls of ``fn`` above the memory before them, in MB."""
    fn()  # warm-up: optimizer state, lazy init
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(calls):
            fn()
        sync(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so RSS is live memory
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    for _ in range(calls):
        fn()
    return (_status("VmHWM") - before) / 2**20


def measure_memory(variant: str, device: str, bsz: int, seq: int) -> dict[str, float]:
    model = build((variant,), device)[variant]
    return {"step": peak_extra(train_step(model, batch(device, bsz, seq)), device),
            "module": peak_extra(module_step(model, bsz * seq, device), device)}


def memory(device: str, bsz: int, seq: int) -> dict[str, dict[str, float]]:
    if device.startswith("cuda"):
        return {v: measure_memory(v, device, bsz, seq) for v in VARIANTS}
    out = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--memory-of", v, "--batch", str(bsz), "--seq", str(seq)]
        out[v] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    return out


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
        name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return (f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at start")


def table(times: dict, module_times: dict, mem: dict) -> str:
    rows = [("full training step, time (ms)", times["stock"] * 1e3, times["ours"] * 1e3),
            ("full training step, peak extra memory (MB)", mem["stock"]["step"], mem["ours"]["step"]),
            ("one CDMoE layer fwd+bwd, time (ms)", module_times["stock"] * 1e3, module_times["ours"] * 1e3),
            ("one CDMoE layer fwd+bwd, peak extra memory (MB)", mem["stock"]["module"], mem["ours"]["module"])]
    lines = ["| measurement | stock DogeCDMoE | upcycle CausalCDMoE | stock / ours |", "|---|---|---|---|"]
    lines += [f"| {name} | {s:.1f} | {o:.1f} | **{s / o:.2f}x** |" for name, s, o in rows]
    return "\n".join(lines)


def update_results(section: str, device: str) -> None:
    write_section(f"bench/train_step.py {'cuda' if device.startswith('cuda') else 'cpu'}", section)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args.device, args.batch, args.seq)))
        return
    models = build(VARIANTS, args.device)
    ids = batch(args.device, args.batch, args.seq)
    times = interleaved({k: train_step(m, ids) for k, m in models.items()}, args.repeats, args.warmup, args.device)
    module_times = interleaved({k: module_step(m, args.batch * args.seq, args.device) for k, m in models.items()},
                               3 * args.repeats, args.warmup, args.device)
    del models
    mem = memory(args.device, args.batch, args.seq)
    cmd = "python bench/train_step.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    section = (f"## train step: Doge-20M shape, 1024 experts, 8 per token, experts-only AdamW ({args.device})\n\n"
               f"{datetime.date.today()}, {hardware(args.device)}. Command: `{cmd}`. Batch {args.batch} x {args.seq} "
               f"tokens, same weights and batch for both; time = median of {args.repeats} interleaved repeats "
               f"({3 * args.repeats} for the layer) after {args.warmup} warm-up; peak extra memory = peak "
               + ("`max_memory_allocated`" if args.device.startswith("cuda") else "RSS (own subprocess per variant)")
               + " during the steps minus the memory before them.\n\n" + table(times, module_times, mem))
    print(section)
    if not args.no_write:
        update_results(section, args.device)


if __name__ == "__main__":
    main()
