"""Benchmark ``upcycle expand`` (streaming) against load-grow-save with transformers.

Baseline: ``DogeForCausalLM.from_pretrained(src, is_moe=True, num_experts=N)`` then
``save_pretrained`` (the obvious way; it also leaves the experts randomly
initialized, so it does not even preserve the dense function). Each variant runs in
its own subprocess; we report wall time of the operation and peak RSS above the
process's RSS after imports, as ratios baseline/ours.

    python bench/expand.py                      # Doge-320M shape, 16384 experts (about 10 min, 8 GB disk)
    python bench/expand.py --shape 20m --experts 1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "20m": dict(num_hidden_layers=8, hidden_size=256, intermediate_size=512, num_attention_heads=2,
                num_key_value_heads=1, tie_word_embeddings=True),
    "320m": dict(num_hidden_layers=32, hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
                 num_key_value_heads=4, tie_word_embeddings=True),
}
RESULTS = Path(__file__).with_name("RESULTS.md")


def rss_mb(field: str = "VmRSS") -> float:
    """Current RSS, or with ``VmHWM`` the peak RSS of this process image (ru_maxrss would include the
    parent's peak, inherited at fork)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(variant: str, src: str, out: str, experts: int) -> None:
    """Run one variant in this (fresh) process and print a JSON line."""
    import torch

    torch.set_num_threads(2)
    if variant == "ours":
        from upcycle.expansion import expand
    else:
        from transformers import DogeForCausalLM
    start_rss = rss_mb()
    start = time.perf_counter()
    if variant == "ours":
        expand(src, num_experts=experts, out=out, progress=False)
    else:
        model = DogeForCausalLM.from_pretrained(src, is_moe=True, num_experts=experts,
                                                num_experts_per_tok=max(1, int(experts**0.5) // 4), dtype="auto")
        model.save_pretrained(out)
    seconds = time.perf_counter() - start
    peak = rss_mb("VmHWM")
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    print(json.dumps({"variant": variant, "seconds": seconds, "peak_mb": peak - start_rss, "bytes": size}))


def make_source(folder: Path, shape: str) -> None:
    import torch
    from transformers import DogeConfig, DogeForCausalLM

    torch.manual_seed(0)
    config = DogeConfig(vocab_size=32768, max_position_embeddings=2048, **SHAPES[shape])
    with torch.device("meta"):
        model = DogeForCausalLM(config)
    model = model.to_empty(device="cpu")
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    model.to(torch.bfloat16).save_pretrained(folder)


def run(variant: str, src: Path, out: Path, experts: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--src", str(src), "--out", str(out), "--experts", str(experts)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def hardware() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "cpu")
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def write_section(text: str) -> None:
    begin, end = "<!-- bench/expand.py -->", "<!-- /bench/expand.py -->"
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="320m")
    parser.add_argument("--experts", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats of each variant")
    parser.add_argument("--workdir", default=None, help="scratch folder (needs ~8 GB for 320m/16384)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.src, args.out, args.experts)

    work = Path(tempfile.mkdtemp(prefix="upcycle-bench-", dir=args.workdir))
    try:
        src = work / "dense"
        print(f"building a random bf16 Doge-{args.shape} checkpoint in {src} ...", flush=True)
        make_source(src, args.shape)
        rows: dict[str, list[dict]] = {"baseline": [], "ours": []}
        for _ in range(args.repeats):
            for variant in ("baseline", "ours"):
                rows[variant].append(run(variant, src, work / f"out-{variant}", args.experts))
                print(variant, rows[variant][-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def best(variant: str, key: str) -> float:
        return min(r[key] for r in rows[variant])

    b_t, o_t, b_m, o_m = best("baseline", "seconds"), best("ours", "seconds"), best("baseline", "peak_mb"), best("ours", "peak_mb")
    table = "\n".join([
        f"## expand: Doge-{args.shape} shape (bf16) grown to {args.experts} experts per layer",
        "",
        f"{datetime.date.today()}, {hardware()}. Command: `python bench/expand.py --shape {args.shape} "
        f"--experts {args.experts}`. Best of {args.repeats}; peak RSS is above the process's RSS after imports.",
        "",
        "| variant | time (s) | peak RSS (MB) | output (GB) |",
        "|---|---|---|---|",
        f"| baseline: from_pretrained(is_moe=True) + save_pretrained | {b_t:.1f} | {b_m:.0f} | {rows['baseline'][0]['bytes'] / 1e9:.2f} |",
        f"| upcycle expand (streaming) | {o_t:.1f} | {o_m:.0f} | {rows['ours'][0]['bytes'] / 1e9:.2f} |",
        f"| **ratio baseline / ours** | **{b_t / o_t:.2f}x** | **{b_m / max(o_m, 1):.1f}x** | |",
        "",
        "The baseline also leaves `up_embed` random, so its output does not compute the dense function;"
        " ours does (zero `up_embed`).",
    ])
    print(table)
    if not args.no_write:
        write_section(table)


if __name__ == "__main__":
    main()
