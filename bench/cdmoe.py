"""One CDMoE layer, forward + backward with the dense part frozen: upcycle's CausalCDMoE against stock DogeCDMoE.

Variants, all with the same weights: ``stock`` (transformers' ``DogeCDMoE``), ``ours`` (``CausalCDMoE``, the
fast expert path), ``reference`` (``CausalCDMoE`` with ``reference_routed_experts``, the plain gather/bmm
version the tests compare against) and ``shared`` (the shared SwiGLU alone, which every variant pays);
``--compile`` adds ``compiled`` (``torch.compile`` of ``ours``), ``--triton`` adds ``triton`` (``ours`` with
``UPCYCLE_TRITON=1``: the Triton kernels; CUDA only). On CUDA, ``roofline`` is the time the expert tables'
row traffic would take at the device's memory bandwidth, measured in the same run with a 1 GiB copy. The
router and both expert tables train; ``gate_proj``/``up_proj``/``down_proj`` are frozen; the input needs a
gradient (a layer above others that train) unless ``--no-input-grad``. Intermediate size is 2 x hidden.

Time: median of interleaved repeats after warm-up, all variants in one process; the routed part is a
variant's time minus ``shared``. Peak memory: extra peak RSS of one step over the memory before it, each
variant in its own subprocess (CPU), or ``max_memory_allocated`` (CUDA).

    python bench/cdmoe.py [--device cuda] [--tokens 2048 8192] [--repeats 5] [--shapes 256,1024,8]
    python bench/cdmoe.py --compile --shapes 256,1024,8        # torch.compile against eager
    python bench/cdmoe.py --device cuda --compile --triton     # on a GPU (bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DogeConfig
from transformers.models.doge.modeling_doge import DogeCDMoE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_section  # noqa: E402
from bench.train_step import hardware, interleaved, peak_extra  # noqa: E402
from upcycle.modeling_upcycle_doge import CausalCDMoE, reference_routed_experts  # noqa: E402

VARIANTS = ("stock", "ours", "reference", "shared")
EXTRAS = ("compiled", "triton")
SHAPES = ((256, 1024, 8), (512, 16384, 64), (1024, 16384, 64))  # hidden, experts, per token
DENSE = ("gate_proj", "up_proj", "down_proj")


class ReferenceCDMoE(CausalCDMoE):
    """``CausalCDMoE`` computing its expert term with the plain reference."""

    def routed_experts(self, flat_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reference_routed_experts(self, flat_states)


class SharedOnly(torch.nn.Module):
    """The shared SwiGLU of a CDMoE layer, alone."""

    def __init__(self, layer: DogeCDMoE):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        m = self.layer
        return m.down_proj(m.act_fn(m.gate_proj(x)) * m.up_proj(x)), None


def build(variant: str, shape: tuple[int, int, int], device: str) -> torch.nn.Module:
    hidden, experts, k = shape
    config = DogeConfig(hidden_size=hidden, intermediate_size=2 * hidden, is_moe=True, num_experts=experts,
                        num_experts_per_tok=k)
    torch.manual_seed(0)
    stock = DogeCDMoE(config)
    if variant == "stock":
        module = stock
    elif variant == "shared":
        module = SharedOnly(stock)
    else:
        module = (ReferenceCDMoE if variant == "reference" else CausalCDMoE)(config)
        module.load_state_dict(stock.state_dict())
    for name, p in module.named_parameters():
        p.requires_grad_(name.split(".")[-2] not in DENSE)
    module = module.to(device).train()
    return torch.compile(module) if variant == "compiled" else module


def step_of(module: torch.nn.Module, hidden: int, tokens: int, device: str, input_grad: bool,
            triton: bool = False) -> Callable[[], None]:
    """Forward + backward of ``module`` on fixed states and output gradient (``triton``: the Triton kernels on)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, hidden, generator=gen).to(device).requires_grad_(input_grad)
    grad = torch.randn(1, tokens, hidden, generator=gen).to(device)

    def step() -> None:
        os.environ["UPCYCLE_TRITON"] = "1" if triton else "0"
        out = module(x)[0]
        if out.requires_grad:  # the shared MLP alone with --no-input-grad has nothing to differentiate
            out.backward(grad)
        x.grad = None
        module.zero_grad(set_to_none=True)

    return step


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), median of 5."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = interleaved({"copy": lambda: dst.copy_(src)}, 5, 2, device)
    return 2 * src.numel() * 4 / times["copy"]


def roofline_seconds(shape: tuple[int, int, int], tokens: int, bandwidth: float) -> float:
    """Seconds to move the expert path's table rows at ``bandwidth``: each picked row of both tables read in
    the forward and again in the backward, and its gradient row added (read + write), all fp32."""
    hidden, _, k = shape
    return 2 * (2 + 2) * tokens * k * hidden * 4 / bandwidth


def memory(variant: str, shape: tuple[int, int, int], tokens: int, args: argparse.Namespace) -> float:
    """Peak extra memory (MB) of one step of ``variant``: in a subprocess on CPU."""
    if args.device.startswith("cuda"):
        module = build(variant, shape, args.device)
        return peak_extra(step_of(module, shape[0], tokens, args.device, args.input_grad, variant == "triton"),
                          args.device)
    cmd = [sys.executable, __file__, "--memory-of", variant, "--shapes", ",".join(map(str, shape)),
           "--tokens", str(tokens), "--device", args.device] + ([] if args.input_grad else ["--no-input-grad"])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def measure(shape: tuple[int, int, int], tokens: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    modules = {v: build(v, shape, args.device) for v in args.variants}
    steps = {v: step_of(m, shape[0], tokens, args.device, args.input_grad, v == "triton") for v, m in modules.items()}
    times = interleaved(steps, args.repeats, args.warmup, args.device)
    del steps, modules
    peak = {v: memory(v, shape, tokens, args) for v in args.variants if v != "shared"} if args.memory else {}
    if args.device.startswith("cuda"):
        times["roofline"] = roofline_seconds(shape, tokens, args.bandwidth)
    return {"time": times, "peak": peak}


def columns(args: argparse.Namespace) -> list[str]:
    """The extra timing columns of this run."""
    return [v for v in EXTRAS if v in args.variants] + (["roofline"] if args.device.startswith("cuda") else [])


def row(shape: tuple[int, int, int], tokens: int, result: dict, args: argparse.Namespace) -> str:
    t, peak = result["time"], result["peak"]
    routed = {v: t[v] - t["shared"] for v in ("stock", "ours", "reference")}
    mem = " / ".join(f"{peak[v]:.0f}" for v in peak) if peak else "-"
    extras = "".join(f" {t[v] * 1e3:.1f} ({t['ours'] / t[v]:.2f}x) |" for v in columns(args))
    return (f"| {shape[0]}, {shape[1]}, {shape[2]} | {tokens} | {t['stock'] * 1e3:.1f} | {t['ours'] * 1e3:.1f} | "
            f"{t['reference'] * 1e3:.1f} | {t['shared'] * 1e3:.1f} | **{t['stock'] / t['ours']:.2f}x** | "
            f"**{routed['stock'] / routed['ours']:.2f}x** | {tokens / t['ours']:,.0f} |{extras} {mem} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in SHAPES],
                    help="HIDDEN,EXPERTS,PER_TOKEN triples")
    ap.add_argument("--tokens", nargs="+", type=int, default=[2048])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-input-grad", dest="input_grad", action="store_false",
                    help="the input needs no gradient (the lowest trained layer): no backward through the shared MLP")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--compile", action="store_true", help="add torch.compile of ours")
    ap.add_argument("--triton", action="store_true", help="add ours with the Triton kernels (CUDA)")
    ap.add_argument("--memory-of", choices=VARIANTS + EXTRAS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.variants = VARIANTS + tuple(v for v in EXTRAS if getattr(args, "compile" if v == "compiled" else v))
    if "triton" in args.variants and not args.device.startswith("cuda"):
        ap.error("--triton needs --device cuda (the tests run the kernels on CPU under Triton's interpreter)")
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    if args.memory_of:
        module = build(args.memory_of, shapes[0], args.device)
        print(json.dumps(peak_extra(step_of(module, shapes[0][0], args.tokens[0], args.device, args.input_grad,
                                            args.memory_of == "triton"), args.device)))
        return
    where = hardware(args.device)
    if args.device.startswith("cuda"):
        args.bandwidth = copy_bandwidth(args.device)
        where += f", copy bandwidth {args.bandwidth / 1e12:.2f} TB/s"
    extra = "".join(f" {v} (ms; ours / {v}) |" for v in columns(args))
    mem = " / ".join(v for v in args.variants if v != "shared")
    lines = ["| hidden, experts, per token | tokens | stock (ms) | ours (ms) | reference (ms) | shared MLP (ms) | "
             f"whole stock / ours | routed stock / ours | ours tokens/s |{extra} peak extra MB {mem} |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(columns(args)) + "---|"]
    for shape in shapes:
        for tokens in args.tokens:
            lines.append(row(shape, tokens, measure(shape, tokens, args), args))
            print(lines[-1], flush=True)
    cmd = "python bench/cdmoe.py " + " ".join(sys.argv[1:])
    section = (f"## one CDMoE layer, forward + backward, dense part frozen ({args.device})\n\n"
               f"{datetime.date.today()}, {where}; load average {os.getloadavg()[0]:.1f} at the end. Command: "
               f"`{cmd.strip()}`. Same weights for all; router and expert tables train, the input "
               f"{'needs' if args.input_grad else 'needs no'} a gradient; intermediate size 2 x hidden. Time: "
               f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up; routed = variant minus "
               "the shared MLP alone; peak extra memory = "
               + ("`max_memory_allocated`" if args.device.startswith("cuda") else
                  "peak RSS (own subprocess per variant)") + " during one step minus the memory before it.\n\n"
               + "\n".join(lines))
    print(section)
    if not args.no_write:
        write_section(f"bench/cdmoe.py {'cuda' if args.device.startswith('cuda') else 'cpu'}", section)


if __name__ == "__main__":
    main()
