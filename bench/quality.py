"""Does experts-only continuation pay off? Same dense start, same domain-B tokens, several ways.

    python bench/quality.py                  # shipped 1.6M dense model, CPU, ~20 minutes
    python bench/quality.py --size large     # pretrains a ~6M dense model first (GPU: add --gpu)

Arms (each in its own subprocess, so peak RSS is per arm):
  none      no training (the dense start)
  experts   upcycle: expand to 1024 experts (8 per token), train only the experts
  full-lr3e-4  full fine-tuning of the dense model (train=all), lr 3e-4 (`full`: lr 1e-3, not by default)
  lora      LoRA on every linear layer, rank chosen to match the experts' trainable count
  experts*  experts-only with 10% domain-A replay (the better recipe found), labelled as such
  full-lr3e-4-replay  full fine-tuning with the same replay (the fair baseline for experts*; `full-replay`: lr 1e-3)
Default: the arms above, about 17 minutes on 2 CPU cores with 1 thread per arm; --arms picks others.
Held-out loss (nats/token) on B (gain) and on A (forgetting), wall time, peak RSS,
trainable parameters and what has to be stored on disk; loss curves to bench/quality.png,
the table to bench/RESULTS.md (section "Quality").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

SEQ_LEN = 256
EXPERTS, PER_TOKEN = 1024, 8
ARMS = {
    "none": {},
    "experts": {"train": "experts", "lr": 1e-2},
    "full": {"train": "all", "lr": 1e-3},
    "full-lr3e-4": {"train": "all", "lr": 3e-4},
    "lora": {"train": "lora", "lr": 3e-3},
    "experts*": {"train": "experts", "lr": 1e-2, "replay": 0.1},
    "full-replay": {"train": "all", "lr": 1e-3, "replay": 0.1},
    "full-lr3e-4-replay": {"train": "all", "lr": 3e-4, "replay": 0.1},
    # candidates tried for experts* (python bench/quality.py --arms ... --no-write), see SWEEP
    "experts-lr3e-3": {"train": "experts", "lr": 3e-3},
    "experts-k4-bal": {"train": "experts", "lr": 1e-2, "experts_per_token": 4, "balance_coef": 0.01},
}
LABELS = {"none": "no training (dense start)", "experts": "upcycle experts-only, E 1024 k 8",
          "full": "full fine-tuning (train=all)", "full-lr3e-4": "full fine-tuning, lower lr",
          "lora": "LoRA, same trainable count",
          "experts*": "**experts-only + 10% A replay (better recipe)**", "experts-lr3e-3": "experts-only, lr 3e-3",
          "experts-k4-bal": "experts-only, k 4, balance 0.01",
          "full-replay": "full fine-tuning + 10% A replay",
          "full-lr3e-4-replay": "full fine-tuning, lower lr, + 10% A replay"}
DEFAULT_ARMS = ("none", "experts", "full-lr3e-4", "lora", "experts*", "full-lr3e-4-replay")
SWEEP = ("Candidates tried for experts* on 2026-11-30 (same start, budget and settings as the table, run with "
         "`--no-write`; change in B / A vs the start): lr 3e-3 instead of 1e-2: -0.29 / +0.11; 4 experts per token "
         "and balance loss 0.01: -0.38 / +0.25 (no better than k 8 without it); 10% of the blocks from the shipped "
         "docs train sample (replay, same total tokens): -0.36 / +0.04, chosen.")
SIZES = {"small": {"steps": 200, "batch": 16, "eval_blocks": 64},
         "large": {"steps": 1000, "batch": 32, "eval_blocks": 256,
                   "shape": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                 num_attention_heads=2, num_key_value_heads=1), "pretrain_steps": 3000}}


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def lora_rank(dense: Path, target: int) -> int:
    """The LoRA rank whose trainable count (all 7 linear layers) is closest to ``target``."""
    from upcycle.folder import read_config

    c = read_config(dense)
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv, h, f = c.num_attention_heads * head, c.num_key_value_heads * head, c.hidden_size, c.intermediate_size
    per_rank = c.num_hidden_layers * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h))
    return max(1, round(target / per_rank))


def prepare(work: Path, args) -> dict:
    """Dense start, domain-B train/eval files and fixed eval blocks (A and B), shared by all arms."""
    import torch
    from transformers import AutoTokenizer

    from upcycle import assets
    from upcycle.demo import eval_sets, write_jsonl
    from upcycle.expansion import expand

    work.mkdir(parents=True, exist_ok=True)
    dense = args.dense or (assets.DENSE_MODEL if args.size == "small" else pretrain_large(work / "dense", args))
    tokenizer = AutoTokenizer.from_pretrained(dense)
    write_jsonl(assets.stdlib_documents("train", max_bytes=6_000_000), work / "b-train.jsonl")
    write_jsonl(assets.stdlib_documents("heldout"), work / "b-heldout.jsonl")
    write_jsonl(assets.docs_documents("train"), work / "a-train.jsonl")
    torch.save(eval_sets(tokenizer, SIZES[args.size]["eval_blocks"]), work / "eval.pt")
    moes = {}
    for k in sorted({ARMS[a].get("experts_per_token", PER_TOKEN) for a in args.arms if a.startswith("experts")}):
        moes[k] = work / f"moe-k{k}"
        if not moes[k].is_dir():
            expand(dense, num_experts=EXPERTS, experts_per_token=k, out=moes[k], dtype="float32", progress=False)
    return {"dense": str(dense), "moe": {str(k): str(v) for k, v in moes.items()}}


def pretrain_large(out: Path, args) -> Path:
    """A larger dense start, pretrained on the full docs corpus (needs python3.11-doc)."""
    if (out / "config.json").is_file():
        return out
    cmd = [sys.executable, str(BENCH / "make_assets.py"), "--out", str(out.parent / "assets-large"),
           "--steps", str(args.pretrain_steps or SIZES["large"]["pretrain_steps"]), "--batch", "32", "--shape",
           json.dumps(SIZES["large"]["shape"]), "--threads", str(args.threads)] + (["--gpu"] if args.gpu else [])
    if not Path("/usr/share/doc/python3.11/html/_sources").is_dir():
        print("python3.11-doc not installed: pretraining the large start on the shipped docs sample only", flush=True)
        cmd.append("--from-sample")
    subprocess.run(cmd, check=True)
    (out.parent / "assets-large" / "doge-pydocs-1.6m").rename(out)
    return out


def child(arm: str, work: Path, args) -> None:
    """Train one arm and evaluate it; writes ``work/ARM/result.json``."""
    import torch

    torch.set_num_threads(args.threads)
    from upcycle.folder import load_model
    from upcycle.demo import heldout_loss

    setup = json.loads((work / "setup.json").read_text())
    spec = ARMS[arm]
    run = work / arm.replace("*", "-better")
    started = time.time()
    summary, stored = {}, 0
    if spec:
        from upcycle.recipe import resolve_config
        from upcycle.train import continue_train

        k = spec.get("experts_per_token", PER_TOKEN)
        model = setup["moe"][str(k)] if spec["train"] == "experts" else setup["dense"]
        extra = {"lora_r": setup["lora_r"], "lora_alpha": 2.0 * setup["lora_r"]} if spec["train"] == "lora" else {}
        replay = spec.get("replay", 0.0)
        data = [f"{work / 'b-train.jsonl'}:{1 - replay}"] + ([f"{work / 'a-train.jsonl'}:{replay}"] if replay else [])
        config = resolve_config(None, model=model, data=data,
                                eval_data=[str(work / "b-heldout.jsonl")], output_dir=str(run),
                                train=spec["train"], lr=spec["lr"], balance_coef=spec.get("balance_coef", 0.0),
                                max_steps=args.steps, batch_size=args.batch, seq_len=SEQ_LEN, warmup=0.1, decay=0.9,
                                decay_shape="cosine", weight_decay=0.0, eval_every=max(1, args.steps // 5),
                                eval_blocks=16, save_every=0, report_to="none", seed=0, **extra)
        continue_train(config, force=True, progress=False)
        final = run / "final"
        summary = json.loads((run / "training_summary.json").read_text())
        stored = folder_bytes({"experts": run / "experts.safetensors", "lora": run / "adapter"}.get(
            spec["train"], final / "model.safetensors"))
    else:
        final = Path(setup["dense"])
    train_seconds = time.time() - started
    model = load_model(final, dtype="float32")
    blocks = torch.load(work / "eval.pt")
    losses = {name: heldout_loss(model, b) for name, b in blocks.items()}
    result = {"arm": arm, "label": LABELS[arm], **spec, "A": losses["A"], "B": losses["B"],
              "train_seconds": train_seconds, "trainable": summary.get("trainable_params", 0),
              "stored_bytes": stored, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "tokens": args.steps * args.batch * SEQ_LEN if spec else 0}
    run.mkdir(parents=True, exist_ok=True)
    (run / "result.json").write_text(json.dumps(result, indent=1) + "\n")


def curves(work: Path, arm: str) -> tuple[list, list]:
    """(train rows, eval rows) from the arm's metrics.jsonl."""
    path = work / arm.replace("*", "-better") / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def plot(work: Path, results: list[dict], out: Path) -> None:
    """Train loss, the trainer's held-out B loss over steps, and the final gain/forgetting trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.5))
    start = next((r for r in results if r["arm"] == "none"), None)
    for r in results:
        label = r["label"].strip("*")
        train, evals = curves(work, r["arm"])
        if train:
            losses = [row["loss"] for row in train]
            smooth = [sum(losses[max(0, i - 24):i + 1]) / len(losses[max(0, i - 24):i + 1])
                      for i in range(len(losses))]
            line, = left.plot([row["step"] for row in train], smooth, label=label)
            middle.plot([row["step"] for row in evals], [row["eval_loss"] for row in evals], marker="o",
                        color=line.get_color(), label=label)
            color = line.get_color()
        else:
            color = "gray"
        if start is not None:
            right.scatter(r["A"] - start["A"], r["B"] - start["B"], color=color, s=60)
            right.annotate(label, (r["A"] - start["A"], r["B"] - start["B"]), fontsize=7,
                           xytext=(4, 4), textcoords="offset points")
    left.set(title="train loss (25-step mean; replay arms include A blocks)", xlabel="step", ylabel="nats/token")
    middle.set(title="held-out B loss during training (trainer eval, 16 blocks)", xlabel="step")
    right.set(title="final: gain on B vs forgetting of A (table)", ylabel="change in B loss (gain, lower is better)",
              xlabel="change in A loss (forgetting, lower is better)")
    right.axhline(0, color="lightgray", linewidth=0.8)
    right.axvline(0, color="lightgray", linewidth=0.8)
    middle.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


TIE = 0.02  # nats: differences below this count as ties in the verdict


def verdict(results: list[dict]) -> str:
    """Which arm of each pair dominates (gain and forgetting no worse, ties within TIE), from the table."""
    by = {r["arm"]: r for r in results}
    lines = []
    pairs = (("experts", "full"), ("experts", "full-lr3e-4"), ("experts", "lora"), ("experts*", "full-replay"),
             ("experts*", "full-lr3e-4-replay"))
    for one, other in pairs:
        if one not in by or other not in by:
            continue
        a, b = by[one], by[other]
        d_b, d_a = b["B"] - a["B"], b["A"] - a["A"]  # other minus one; negative is better for other
        if d_b <= TIE and d_a <= TIE and (d_b < -TIE or d_a < -TIE):
            word = f"`{other}` dominates (B {d_b:+.2f}, A {d_a:+.2f} vs `{one}`): experts-only loses here"
        elif d_b >= -TIE and d_a >= -TIE and (d_b > TIE or d_a > TIE):
            word = f"`{one}` dominates (B {-d_b:+.2f}, A {-d_a:+.2f} vs `{other}`)"
        elif abs(d_b) <= TIE and abs(d_a) <= TIE:
            word = "a tie"
        else:
            word = f"a trade-off: `{other}` changes B by {d_b:+.2f} and A by {d_a:+.2f} relative to `{one}`"
        lines.append(f"- {one} vs {other}: {word}.")
    return "\n".join(lines)


def table(results: list[dict], start: dict) -> str:
    head = ("| run | lr | trainable | B (gain) | A (forgetting) | train time | peak RSS | stored |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        lr = f"{r['lr']:g}" if "lr" in r else "-"
        rows.append(f"| {r['label']} | {lr} | {r['trainable'] / 1e6:.2f}M | {r['B']:.3f} ({r['B'] - start['B']:+.2f}) "
                    f"| {r['A']:.3f} ({r['A'] - start['A']:+.2f}) | {r['train_seconds']:.0f} s "
                    f"| {r['peak_rss_mb']:.0f} MB | {r['stored_bytes'] / 1e6:.1f} MB |")
    return "\n".join([head, *rows])


def write_results(text: str, path: Path) -> None:
    """Replace (or append) this benchmark's marked section of RESULTS.md."""
    begin, end = "<!-- bench/quality.py -->", "<!-- /bench/quality.py -->"
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="small: shipped model, CPU")
    parser.add_argument("--gpu", action="store_true", help="large configuration on a GPU (implies --size large)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="comma-separated, from " + ",".join(ARMS))
    parser.add_argument("--steps", type=int, default=None, help="training steps per arm (same for all)")
    parser.add_argument("--batch", type=int, default=None, help="blocks of 256 tokens per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="--size large: pretraining steps")
    parser.add_argument("--dense", type=Path, default=None,
                        help="dense start  [default: shipped (small) or pretrained here (large)]")
    parser.add_argument("--work", type=Path, default=Path("/tmp/upcycle-quality"), help="scratch folder")
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md and quality.png")
    parser.add_argument("--report-only", action="store_true", help="re-plot and re-write from the results in --work")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = "large" if args.gpu else args.size
    args.steps = args.steps or SIZES[args.size]["steps"]
    args.batch = args.batch or SIZES[args.size]["batch"]
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm {unknown[0]}: choose from {', '.join(ARMS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        return child(args.child, args.work, args)

    if args.report_only:
        total = args.work / "total.json"
        seconds = json.loads(total.read_text())["seconds"] if total.is_file() else None
        return finish(args, json.loads((args.work / "setup.json").read_text()), load_results(args), seconds)
    started = time.time()
    setup = prepare(args.work, args)
    from upcycle.folder import read_config

    c = read_config(Path(setup["dense"]))
    keys = int(EXPERTS ** 0.5)
    experts_trainable = c.num_hidden_layers * (2 * keys * c.hidden_size + 2 * EXPERTS * c.hidden_size)
    setup["lora_r"] = lora_rank(Path(setup["dense"]), experts_trainable)
    (args.work / "setup.json").write_text(json.dumps(setup, indent=1))
    for arm in args.arms:
        print(f"[{time.time() - started:5.0f} s] arm {arm}: {LABELS[arm]}", flush=True)
        cmd = [sys.executable, __file__, "--child", arm, "--work", str(args.work), "--size", args.size,
               "--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads)]
        subprocess.run(cmd, check=True)
        result = json.loads((args.work / arm.replace("*", "-better") / "result.json").read_text())
        print(f"        B {result['B']:.3f}  A {result['A']:.3f}  {result['train_seconds']:.0f} s", flush=True)
    (args.work / "total.json").write_text(json.dumps({"seconds": time.time() - started}))
    finish(args, setup, load_results(args), time.time() - started)


def load_results(args) -> list[dict]:
    """The arms' result.json files, labelled with the current LABELS."""
    results = [json.loads((args.work / arm.replace("*", "-better") / "result.json").read_text()) for arm in args.arms]
    return [{**r, "label": LABELS[r["arm"]]} for r in results]


def finish(args, setup: dict, results: list[dict], seconds: float | None) -> None:
    """Print the report; write bench/quality.png and the RESULTS.md section unless --no-write."""
    start = next((r for r in results if r["arm"] == "none"), results[0])
    text = report(results, start, args, setup, seconds)
    print(text)
    if not args.no_write:
        plot(args.work, results, BENCH / "quality.png")
        write_results(text, BENCH / "RESULTS.md")


def report(results: list[dict], start: dict, args, setup: dict, seconds: float | None) -> str:
    import torch

    tokens = args.steps * args.batch * SEQ_LEN
    when = time.strftime("%Y-%m-%d")
    hardware = (f"{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() and args.gpu else
                f"CPU ({os.cpu_count()} cores, {args.threads} torch thread(s) per arm), "
        f"{platform.machine()}")
    better = ARMS["experts*"]
    return "\n".join([
        "## Quality: experts-only vs full fine-tuning vs LoRA (`bench/quality.py`)", "",
        f"{when}, {hardware}, torch {torch.__version__}; `python bench/quality.py"
        f"{' --size large' if args.size == 'large' else ''}"
        f"{'' if args.threads == 1 else f' --threads {args.threads}'}"
        f"{'' if tuple(args.arms) == DEFAULT_ARMS else ' --arms ' + ','.join(args.arms)}`"
        + (f" ({seconds / 60:.0f} min in all)." if seconds else "."),
        "",
        f"Dense start: `{Path(setup['dense']).name}` pretrained on Python documentation (domain A). Every arm "
        f"then sees the same {tokens:,} tokens of domain B (standard-library Python source) in the same order "
        f"(the replay arms: 90% B, 10% A blocks): "
        f"{args.steps} steps x {args.batch} x {SEQ_LEN}, AdamW (0.9, 0.95), wd 0, 10% warmup, cosine decay, "
        f"clip 1.0; the learning rates come from an earlier sweep on a similar setup. Held-out loss in "
        f"nats/token on {SIZES[args.size]['eval_blocks']} blocks per domain "
        f"(change vs the dense start in brackets): B lower is the gain, A higher is forgetting. LoRA: rank "
        f"{setup['lora_r']} (alpha 2r) on all 7 linear layers. Stored: what must be kept besides the dense base "
        f"(experts.safetensors, the LoRA adapter, or the whole model). Peak RSS of the arm's process.", "",
        table(results, start), "",
        f"Verdict (computed from the table; one seed, one budget; differences under {TIE} nats count as ties):",
        verdict(results), "",
        f"Better experts recipe (experts*): the `experts` arm (lr {better['lr']:g}, k {PER_TOKEN}) with "
        f"{better['replay']:.0%} of the training blocks drawn from the shipped docs train sample (domain A, disjoint "
        "from the A held-out files) instead of B: replay, a data recipe, so the `full*-replay` arms get the same data. "
        + (SWEEP if args.size == "small" else ""), ""])


if __name__ == "__main__":
    main()
