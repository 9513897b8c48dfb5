"""Gain-vs-forgetting frontier: experts-only recipes against full fine-tuning and LoRA, over lr grids and seeds.

    python bench/frontier.py                     # shipped 1.6M model, CPU, resumable (cached arms are skipped)
    python bench/frontier.py --size large        # pretrains a 4x larger dense start on domain A first (cached)
    python bench/frontier.py --report-only       # table, plot and verdict from the cached arms
    python bench/frontier.py & python bench/frontier.py   # two runners share the arms (one core each)

Every arm starts from the same dense model (pretrained on domain A, Python documentation) and trains
on the same domain-B text (standard-library Python source) for the same number of tokens, through
the trainer's Python API (`upcycle.continue_train`), each in its own process. Per method, a learning
rate grid of 4 values and 2 seeds (expand seed and data order). Each arm is evaluated on separate
validation and test blocks of both domains, drawn from many held-out files (a few windows per file);
settings are chosen on validation, the table and plot report test.

Results go to WORK/arms/*.json (one per arm; a cut-off run continues where it stopped), the plot to
bench/frontier-SIZE.png and the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

SEQ_LEN = 256
EXPERTS, PER_TOKEN = 1024, 8
EXPERT_LRS = [3e-3, 1e-2, 3e-2, 1e-1]
IDEA_LRS = [3e-3, 1e-2, 3e-2]  # variations of the default recipe, around its lr
FULL_LRS = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
LORA_LRS = [3e-4, 1e-3, 3e-3, 1e-2]
# earlier default recipes' settings, spelled out so that the arms do not follow later changes of the defaults
OLD = {"expert_optimizer": "adamw", "retain_tokens": 1024, "retain_coef": 1e-3, "expert_init": "graft"}
DEFAULT = {"layers": "top-half", "expert_optimizer": "rowwise", "retain_tokens": 256, "retain_coef": 1e-3,
           "expert_init": "graft"}
METHODS = {
    "experts-top-rowwise-r256": {"label": "experts-only, previous default recipe (top half of the layers, rowwise "
                                          "optimizer, penalty 1e-3 on 256 self-sampled retain tokens)",
                                 "train": "experts", **DEFAULT, "lrs": EXPERT_LRS},
    "default-retain": {"label": "experts-only, previous default recipe + --retain-data (A sample)",
                       "train": "experts", **DEFAULT, "retain": True, "lrs": EXPERT_LRS},
    "default-retain-replay": {"label": "experts-only, default recipe + --retain-data used for the penalty and as "
                                       "10% replay", "train": "experts", **DEFAULT, "retain": True, "replay": 0.1,
                              "lrs": IDEA_LRS},
    "recipe": {"label": "experts-only, default recipe (top half, rowwise, data-fitted keys, penalty 1e-4 on 256 "
                         "self-sampled retain tokens)", "train": "experts", **DEFAULT, "expert_init": "data",
               "retain_coef": 1e-4, "lrs": EXPERT_LRS},
    "recipe-retain": {"label": "experts-only, default recipe + --retain-data (A sample)", "train": "experts",
                      **DEFAULT, "expert_init": "data", "retain_coef": 1e-4, "retain": True, "lrs": EXPERT_LRS},
    "recipe-slots": {"label": "default recipe, only the 25% of experts B uses most relative to the retain text train "
                              "(--slot-fraction 0.25)", "train": "experts", **DEFAULT, "expert_init": "data",
                     "retain_coef": 1e-4, "slot_fraction": 0.25, "lrs": IDEA_LRS},
    "recipe-retain-slots": {"label": "default recipe + --retain-data, --slot-fraction 0.25 ranked against the A "
                                     "sample", "train": "experts", **DEFAULT, "expert_init": "data",
                            "retain_coef": 1e-4, "retain": True, "slot_fraction": 0.25, "lrs": IDEA_LRS},
    "recipe-all": {"label": "experts-only, default recipe with experts in every layer (expand --layers all)",
                   "train": "experts", **{**DEFAULT, "layers": "all"}, "expert_init": "data", "retain_coef": 1e-4,
                   "lrs": IDEA_LRS},
    "recipe-all-retain": {"label": "experts-only, default recipe in every layer + --retain-data (A sample)",
                          "train": "experts", **{**DEFAULT, "layers": "all"}, "expert_init": "data",
                          "retain_coef": 1e-4, "retain": True, "lrs": IDEA_LRS},
    "full": {"label": "full fine-tuning", "train": "all", "lrs": FULL_LRS},
    "full-replay": {"label": "full fine-tuning + 10% replay of the same A sample", "train": "all", "replay": 0.1,
                    "lrs": FULL_LRS},
    "lora-top": {"label": "LoRA, rank matching the top-half experts' trainable count", "train": "lora",
                 "lora_r": "matched-top", "lrs": LORA_LRS},
    "experts-top": {"label": "experts-only, top half, AdamW on the tables, 1024 retain tokens (previous default)",
                    "train": "experts", "layers": "top-half", **OLD, "lrs": EXPERT_LRS},
    "experts-top-retain": {"label": "experts-only, previous default + --retain-data (A sample)",
                           "train": "experts", "layers": "top-half", "retain": True, **OLD, "lrs": EXPERT_LRS},
    "experts-top-r256": {"label": "experts-only, top half, AdamW, penalty on 256 retain tokens", "train": "experts",
                         "layers": "top-half", **OLD, "retain_tokens": 256, "lrs": EXPERT_LRS},
    "experts-top-rowwise": {"label": "experts-only, top half, rowwise, 1024 retain tokens", "train": "experts",
                            "layers": "top-half", **OLD, "expert_optimizer": "rowwise", "lrs": EXPERT_LRS},
    "experts": {"label": "experts-only, every layer (--layers all), AdamW, 1024 retain tokens", "train": "experts",
                **OLD, "lrs": EXPERT_LRS},
    "experts-retain": {"label": "experts-only, every layer, AdamW + --retain-data (A sample)", "train": "experts",
                       "retain": True, **OLD, "lrs": EXPERT_LRS},
    "lora-matched": {"label": "LoRA, rank matching the every-layer experts' trainable count", "train": "lora",
                     "lora_r": "matched", "lrs": LORA_LRS},
    "experts-c1e-2": {"label": "experts-only, every layer, penalty coefficient 1e-2", "train": "experts",
                      **OLD, "retain_coef": 1e-2, "lrs": EXPERT_LRS},
    "experts-plain": {"label": "experts-only, every layer, no penalty", "train": "experts",
                      **OLD, "retain_coef": 0.0, "lrs": EXPERT_LRS},
    "default-lrx4": {"label": "default recipe, tables at 4x the router's lr (--expert-lr-scale 4)",
                     "train": "experts", **DEFAULT, "expert_lr_scale": 4.0, "lrs": IDEA_LRS},
    "default-lrx10": {"label": "default recipe, router at 1/10 of the tables' lr (--expert-lr-scale 10; lr is "
                               "the router's)", "train": "experts", **DEFAULT, "expert_lr_scale": 10.0,
                      "lrs": [1e-3, 3e-3, 1e-2]},
    "default-datainit": {"label": "default recipe, keys and down_embed fitted to B by k-means (--expert-init data)",
                         "train": "experts", **DEFAULT, "expert_init": "data", "lrs": IDEA_LRS},
    "default-warmup10": {"label": "default recipe, 10% warmup (--warmup 0.1)", "train": "experts", **DEFAULT,
                         "warmup": 0.1, "lrs": IDEA_LRS},
    "default-balance": {"label": "default recipe + load-balancing loss (--balance-coef 0.01)", "train": "experts",
                        **DEFAULT, "balance_coef": 0.01, "lrs": IDEA_LRS},
    "default-c1e-2": {"label": "default recipe, penalty coefficient 1e-2 (--retain-coef 1e-2)", "train": "experts",
                      **DEFAULT, "retain_coef": 1e-2, "lrs": IDEA_LRS},
    "default-c1e-4": {"label": "default recipe, penalty coefficient 1e-4 (--retain-coef 1e-4)", "train": "experts",
                      **DEFAULT, "retain_coef": 1e-4, "lrs": IDEA_LRS},
    "default-c0": {"label": "default recipe without the penalty (--retain-coef 0)", "train": "experts", **DEFAULT,
                   "retain_coef": 0.0, "lrs": IDEA_LRS},
    "default-k32": {"label": "default recipe, 32 experts per token (expand --experts-per-token 32)",
                    "train": "experts", **DEFAULT, "per_token": 32, "lrs": IDEA_LRS},
    "default-n4096": {"label": "default recipe, 4096 experts, 16 per token (expand --experts 4096)",
                      "train": "experts", **DEFAULT, "experts": 4096, "per_token": 16, "lrs": IDEA_LRS},
    "default-all": {"label": "default recipe with experts in every layer (expand --layers all)", "train": "experts",
                    **{**DEFAULT, "layers": "all"}, "lrs": IDEA_LRS},
    "lora-r8": {"label": "LoRA r 8", "train": "lora", "lora_r": 8, "lrs": LORA_LRS},
    "lora-r32": {"label": "LoRA r 32", "train": "lora", "lora_r": 32, "lrs": LORA_LRS},
}
SIZES = {"small": {"steps": 150, "batch": 8, "eval_per_file": 4},
         "large": {"steps": 60, "batch": 8, "eval_per_file": 4, "pretrain_steps": 400,
                   "shape": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=8,
                                 num_attention_heads=2, num_key_value_heads=1)}}
TIE = 0.02  # nats
# variations of the default recipe, each compared against it
IDEAS = ("default-lrx4", "default-lrx10", "default-datainit", "default-warmup10", "default-balance", "default-c1e-2",
         "default-c1e-4", "default-c0", "default-k32", "default-n4096", "default-all")


# ------------------------------------------------------------------ data and starts


def write_jsonl(texts: list[str], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def windows(tokenizer, texts: list[str], per_file: int, seed: int):
    """Up to ``per_file`` non-overlapping random SEQ_LEN windows from each text: blocks from many files."""
    import torch

    rng, blocks = random.Random(seed), []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        starts = list(range(0, len(ids) - SEQ_LEN + 1, SEQ_LEN))
        for start in rng.sample(starts, min(per_file, len(starts))):
            blocks.append(ids[start:start + SEQ_LEN])
    return torch.tensor(blocks, dtype=torch.long)


def halves(items: list, key) -> tuple[list, list]:
    """Split held-out files into validation and test by a stable hash of their name."""
    val = [x for x in items if zlib.crc32(key(x).encode()) % 2 == 0]
    return val, [x for x in items if zlib.crc32(key(x).encode()) % 2 == 1]


def prepare(work: Path, args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from upcycle import assets

    work.mkdir(parents=True, exist_ok=True)
    setup_file = work / "setup.json"
    if setup_file.is_file():
        return json.loads(setup_file.read_text())
    dense = args.dense or (assets.DENSE_MODEL if args.size == "small" else pretrain_large(work, args))
    tokenizer = AutoTokenizer.from_pretrained(dense)
    write_jsonl(assets.stdlib_documents("train", max_bytes=6_000_000), work / "b-train.jsonl")
    write_jsonl(assets.docs_documents("train"), work / "a-train.jsonl")
    a_val, a_test = halves(assets.docs_records("heldout"), key=lambda r: r["source"])
    b_files = assets.stdlib_files("heldout")
    b_val, b_test = halves(b_files, key=lambda p: p.as_posix())
    per = SIZES[args.size]["eval_per_file"]
    read = lambda paths: [p.read_text(encoding="utf-8", errors="replace") for p in paths]  # noqa: E731
    blocks = {"A_val": windows(tokenizer, [r["text"] for r in a_val], per, 1),
              "A_test": windows(tokenizer, [r["text"] for r in a_test], per, 2),
              "B_val": windows(tokenizer, read(b_val), per, 3), "B_test": windows(tokenizer, read(b_test), per, 4)}
    torch.save(blocks, work / "eval.pt")
    files = {"A_val": len(a_val), "A_test": len(a_test), "B_val": len(b_val), "B_test": len(b_test)}
    setup = {"dense": str(dense), "blocks": {k: len(v) for k, v in blocks.items()}, "files": files}
    setup_file.write_text(json.dumps(setup, indent=1))
    return setup


def pretrain_large(work: Path, args) -> Path:
    """A 4x larger dense start pretrained on domain A with the shipped tokenizer (cached in WORK)."""
    out = work / "dense-large"
    if (out / "config.json").is_file():
        return out
    cmd = [sys.executable, str(BENCH / "make_assets.py"), "--out", str(work / "assets-large"), "--steps",
           str(args.pretrain_steps or SIZES["large"]["pretrain_steps"]), "--batch", "16", "--shape",
           json.dumps(SIZES["large"]["shape"]), "--threads", str(args.threads), "--from-sample"]
    subprocess.run(cmd + (["--gpu"] if args.gpu else []), check=True)
    (work / "assets-large" / "doge-pydocs-1.6m").rename(out)
    return out


def moe_start(work: Path, dense: str, seed: int, layers: str = "all", experts: int = EXPERTS,
              per_token: int = PER_TOKEN) -> Path:
    from upcycle.expansion import expand

    pool = "" if (experts, per_token) == (EXPERTS, PER_TOKEN) else f"-n{experts}k{per_token}"
    out = work / (f"moe{pool}-s{seed}" if layers == "all" else f"moe-{layers}{pool}-s{seed}")
    if not (out / "config.json").is_file():
        expand(dense, num_experts=experts, experts_per_token=per_token, out=out, seed=seed, dtype="float32",
               progress=False, layers=layers)
    return out


def expert_count(dense: str, layers: str = "all") -> int:
    from upcycle.expansion import parse_layers
    from upcycle.folder import read_config

    c = read_config(Path(dense))
    routed = len(parse_layers(layers, c.num_hidden_layers) or range(c.num_hidden_layers))
    return routed * (2 * math.isqrt(EXPERTS) * c.hidden_size + 2 * EXPERTS * c.hidden_size)


def lora_rank(dense: str, target: int) -> int:
    from upcycle.folder import read_config

    c = read_config(Path(dense))
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv, h, f = c.num_attention_heads * head, c.num_key_value_heads * head, c.hidden_size, c.intermediate_size
    per_rank = c.num_hidden_layers * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h))
    return max(1, round(target / per_rank))


# ------------------------------------------------------------------ one arm


def arm_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-s{seed}"


def run_arm(work: Path, method: str, lr: float, seed: int, args) -> dict:
    """Train and evaluate one arm (in this process); returns its result."""
    import torch

    torch.set_num_threads(args.threads)
    from upcycle.demo import heldout_loss
    from upcycle.folder import load_model
    from upcycle.recipe import resolve_config
    from upcycle.train import continue_train

    setup = json.loads((work / "setup.json").read_text())
    spec = METHODS[method]
    run = work / "runs" / arm_name(method, lr, seed)
    replay = spec.get("replay", 0.0)
    data = [f"{work / 'b-train.jsonl'}:{1 - replay}"] + ([f"{work / 'a-train.jsonl'}:{replay}"] if replay else [])
    extra: dict = {}
    if spec["train"] == "lora":
        matched = {"matched": "all", "matched-top": "top-half"}
        rank = (lora_rank(setup["dense"], expert_count(setup["dense"], matched[spec["lora_r"]]))
                if spec["lora_r"] in matched else spec["lora_r"])
        extra = {"lora_r": rank, "lora_alpha": 2.0 * rank}
    if spec.get("retain"):
        extra["retain_data"] = [str(work / "a-train.jsonl")]
    for key in ("retain_coef", "retain_tokens", "expert_optimizer", "expert_lr_scale", "warmup", "balance_coef",
                "expert_init", "slot_fraction"):
        if key in spec:
            extra[key] = spec[key]
    model = (moe_start(work, setup["dense"], seed, spec.get("layers", "all"), spec.get("experts", EXPERTS),
                       spec.get("per_token", PER_TOKEN)) if spec["train"] == "experts" else setup["dense"])
    config = resolve_config(None, model=str(model), data=data, eval_data=[str(work / "b-train.jsonl")],
                            output_dir=str(run), train=spec["train"], lr=lr, max_steps=args.steps,
                            batch_size=args.batch, seq_len=SEQ_LEN, weight_decay=0.0, eval_every=0, eval_blocks=4,
                            save_every=0, report_to="none", seed=seed, **extra)
    started = time.time()
    continue_train(config, force=True, progress=False)
    seconds = time.time() - started
    summary = json.loads((run / "training_summary.json").read_text())
    final = load_model(run / "final", dtype="float32")
    blocks = torch.load(work / "eval.pt")
    losses = {name: heldout_loss(final, b) for name, b in blocks.items()}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][5:]
    return {"method": method, "lr": lr, "seed": seed, **losses, "train_seconds": seconds,
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "trainable": summary["trainable_params"], "load": os.getloadavg()[0]}


def start_losses(work: Path, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from upcycle.demo import heldout_loss
    from upcycle.folder import load_model

    setup = json.loads((work / "setup.json").read_text())
    model, blocks = load_model(setup["dense"], dtype="float32"), torch.load(work / "eval.pt")
    return {name: heldout_loss(model, b) for name, b in blocks.items()}


# ------------------------------------------------------------------ report


def grouped(results: list[dict]) -> dict[str, dict[float, list[dict]]]:
    out: dict[str, dict[float, list[dict]]] = {}
    for r in results:
        out.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r)
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def curve(points: dict[float, list[dict]], split: str = "test") -> list[tuple[float, float, float]]:
    """(lr, mean A, mean B) per lr."""
    return [(lr, mean([r[f"A_{split}"] for r in rs]), mean([r[f"B_{split}"] for r in rs]))
            for lr, rs in sorted(points.items())]


def frontier_b(points: list[tuple[float, float]], a: float) -> float | None:
    """B of a frontier (lower envelope of (A, B) points, the start included) interpolated at A = ``a``."""
    pts = sorted(points)
    best = []
    for x, y in pts:  # keep points that improve B as A grows (the Pareto front)
        if not best or y < best[-1][1]:
            best.append((x, y))
    if a < best[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(best, best[1:]):
        if x0 <= a <= x1:
            return y0 + (y1 - y0) * (a - x0) / (x1 - x0) if x1 > x0 else min(y0, y1)
    return best[-1][1]


def compare(results: dict, start: dict, method: str, baseline: str, split: str = "test") -> list[str]:
    """For each lr of ``method``: its B against the baseline's frontier at the same A (plus TIE)."""
    if method not in results or baseline not in results:
        return []
    base_pts = [(start[f"A_{split}"], start[f"B_{split}"])] + [(a, b) for _, a, b in curve(results[baseline], split)]
    lines = []
    for lr, a, b in curve(results[method], split):
        ref = frontier_b(base_pts, a)
        if ref is None:
            lines.append(f"  - lr {lr:g}: A {a:.3f} below every {baseline} point: on or beyond its frontier")
            continue
        gap = b - ref
        verdict = "on or beyond" if gap <= TIE else "behind"
        lines.append(f"  - lr {lr:g}: A {a:.3f}, B {b:.3f} vs {baseline} {ref:.3f} at that A: {gap:+.3f} ({verdict})")
    return lines


def best_lr(points: dict[float, list[dict]], key: str) -> tuple[float, bool]:
    """The lr with the lowest mean validation ``key`` and whether it is at an end of the grid."""
    lrs = sorted(points)
    scores = {lr: mean([r[key] for r in points[lr]]) for lr in lrs}
    lr = min(scores, key=scores.get)
    return lr, lr in (lrs[0], lrs[-1])


def table(results: dict, start: dict) -> str:
    lines = ["| method | lr | trainable | B test (gain) | A test (forgetting) | B+A val | tokens/s | seeds |",
             "|---|---|---|---|---|---|---|---|",
             f"| dense start | - | 0 | {start['B_test']:.3f} | {start['A_test']:.3f} | "
             f"{start['B_val'] + start['A_val']:.3f} | - | - |"]
    for method, points in results.items():
        best_b, _ = best_lr(points, "B_val")
        best_sum = min(points, key=lambda lr: mean([r["B_val"] + r["A_val"] for r in points[lr]]))
        for lr, rs in sorted(points.items()):
            b, a = [r["B_test"] for r in rs], [r["A_test"] for r in rs]
            marks = ("B" if lr == best_b else "") + ("Σ" if lr == best_sum else "")
            speed = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s")]
            lines.append(f"| {method} | {lr:g}{' ' + marks if marks else ''} | {rs[0]['trainable'] / 1e6:.2f}M | "
                         f"{mean(b):.3f} ± {spread(b):.3f} ({mean(b) - start['B_test']:+.2f}) | "
                         f"{mean(a):.3f} ± {spread(a):.3f} ({mean(a) - start['A_test']:+.2f}) | "
                         f"{mean([r['B_val'] + r['A_val'] for r in rs]):.3f} | "
                         f"{mean(speed):,.0f} | {len(rs)} |" if speed else "- |")
    return "\n".join(lines)


def idea_table(results: dict, start: dict, base: str = "experts-top-rowwise-r256", seed: int = 0) -> str:
    """Each idea at its best validation-B lr on ``seed``, against ``base`` on the same seed (ideas have 1 seed)."""
    def best(method: str) -> tuple[float, dict] | None:
        points = {lr: r for lr, rs in results.get(method, {}).items() for r in rs if r["seed"] == seed}
        return (min(points.items(), key=lambda item: item[1]["B_val"])) if points else None

    reference = best(base)
    if reference is None:
        return ""
    lines = [f"| idea (seed {seed}) | lr | B test (gain) | A test (forgetting) | B test vs `{base}` |",
             "|---|---|---|---|---|"]
    for method in (base, *IDEAS, "recipe", "recipe-all", "recipe-slots", "recipe-retain", "recipe-all-retain",
                   "recipe-retain-slots"):
        found = best(method)
        if found is None:
            continue
        lr, r = found
        lines.append(f"| {method} | {lr:g} | {r['B_test'] - start['B_test']:+.3f} | "
                     f"{r['A_test'] - start['A_test']:+.3f} | {r['B_test'] - reference[1]['B_test']:+.3f} |")
    return "\n".join(lines)


PLOTTED = ("recipe", "recipe-retain", "recipe-all", "recipe-all-retain", "experts-top-rowwise-r256", "full",
           "full-replay", "lora-top", "lora-r8", "lora-r32")  # the headline methods; the table has every arm


def plot(results: dict, start: dict, out: Path, title: str) -> None:
    """Two panels for the headline methods: every lr, and a zoom on low forgetting (A within 0.35 nats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in PLOTTED if m in results]
    fig, axes = plt.subplots(1, 2, figsize=(14, 7.5))
    for ax in axes:
        ax.scatter([start["A_test"]], [start["B_test"]], color="black", marker="*", s=120, label="dense start",
                   zorder=3)
        for index, method in enumerate(shown):
            points = results[method]
            pts = curve(points)
            errs = [(spread([r["A_test"] for r in points[lr]]), spread([r["B_test"] for r in points[lr]]))
                    for lr, _, _ in pts]
            style = "-" if METHODS[method]["train"] == "experts" else "--"
            line = ax.errorbar([a for _, a, _ in pts], [b for _, _, b in pts], xerr=[e[0] for e in errs],
                               yerr=[e[1] for e in errs], fmt="o" + style, capsize=2, color=f"C{index}",
                               label=f"{method}: {METHODS[method]['label']}")
            for lr, a, b in pts:
                ax.annotate(f"{lr:g}", (a, b), fontsize=6, xytext=(3, 3), textcoords="offset points",
                            color=line[0].get_color())
        ax.set(xlabel="held-out loss on A, the old domain (forgetting: lower is better)",
               ylabel="held-out loss on B, the new domain (gain: lower is better)")
    axes[0].set_title(title)
    axes[1].set_xlim(start["A_test"] - 0.02, start["A_test"] + 0.35)
    axes[1].set_title("zoom: forgetting up to +0.35 nats (points are lrs, bars the seed spread)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(out, dpi=100)


def write_results(text: str, size: str) -> None:
    from bench.results import write_section

    write_section(f"bench/frontier.py {size}", text)


def report(work: Path, args, seconds: float | None) -> str:
    import torch

    setup = json.loads((work / "setup.json").read_text())
    start = json.loads((work / "start.json").read_text())
    results = grouped([json.loads(p.read_text()) for p in sorted((work / "arms").glob("*.json"))])
    results = {m: results[m] for m in METHODS if m in results}
    when = time.strftime("%Y-%m-%d")
    hardware = (torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else
                f"CPU ({os.cpu_count()} cores, {args.threads} torch thread(s)), {platform.machine()}")
    loads = [r["load"] for m in results.values() for rs in m.values() for r in rs]
    lines = [f"## Frontier, {args.size} start (`bench/frontier.py`)", "",
             f"{when}, {hardware}, torch {torch.__version__}; `python bench/frontier.py"
             f"{' --size ' + args.size if args.size != 'small' else ''}`"
             + (f" ({seconds / 60:.0f} min for the arms run this time)" if seconds else "")
             + (f"; load average {min(loads):.1f}-{max(loads):.1f} during the arms (tokens/s are indicative only)."
                if loads else "."), "",
             f"Dense start `{Path(setup['dense']).name}` (domain A: Python documentation). Each arm: {args.steps} steps "
             f"x {args.batch} x {SEQ_LEN} tokens of domain B (standard-library source), AdamW (0.9, 0.95), wd 0, "
             "1% warmup, 10% linear decay (the trainer's defaults), clip 1.0; experts arms: "
             f"{EXPERTS} experts, {PER_TOKEN} per token. Mean ± half-range over seeds "
             f"(seed = expand seed and data order). Eval blocks: {setup['blocks']} from {setup['files']} held-out "
             "files; `B`/`Σ` mark the lr with the best validation B loss / validation B+A. Forgetting of A and gain "
             "on B are on the test blocks.", "",
             table(results, start), "",
             "Frontier checks (test split; a method is on or beyond a baseline's frontier at an lr when its B loss "
             f"is within {TIE} nats of the baseline's B interpolated at the same A, the dense start counting as the "
             "baseline's zero-lr point):"]
    for method, baseline in (("recipe", "full"), ("recipe-retain", "full-replay"), ("recipe-all", "full"),
                             ("recipe-all-retain", "full-replay"), ("recipe-slots", "recipe"),
                             ("recipe-retain-slots", "recipe-retain"), ("recipe", "lora-top"),
                             ("recipe", "lora-r8"), ("recipe", "lora-r32"), ("recipe", "experts-top-rowwise-r256"),
                             ("experts-top-rowwise-r256", "full"), ("default-retain", "full-replay"),
                             ("default-retain-replay", "full-replay"),
                             ("experts-top-rowwise-r256", "lora-top"), ("experts-top", "full"),
                             ("experts-top-retain", "full-replay"), ("experts", "full"),
                             ("experts-retain", "full-replay"), ("experts", "lora-matched"),
                             ("experts-top-rowwise-r256", "lora-r8"), ("experts-top-rowwise-r256", "lora-r32"),
                             *[(idea, "experts-top-rowwise-r256") for idea in IDEAS]):
        rows = compare(results, start, method, baseline)
        if rows:
            lines += [f"- `{method}` against `{baseline}`:", *rows]
    ideas = idea_table(results, start)
    if ideas:
        lines += ["", "Ideas on one seed, each at its best validation-B lr (3 lrs around the default's):", "", ideas]
    edges = [f"{m} ({key})" for m, points in results.items() for key in ("B_val",) if best_lr(points, key)[1]]
    if edges:
        lines += ["", "Best validation B at an end of the lr grid (extend the grid): " + ", ".join(edges) + "."]
    lines += ["", f"![frontier](frontier-{args.size}.png)", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def claim_arm(claim: Path) -> bool:
    """Several runners may share WORK (one per core): each arm is claimed by one live runner."""
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(claim.read_text() or 0), 0)
                return False  # a live runner has it
            except (ProcessLookupError, ValueError, FileNotFoundError):
                claim.unlink(missing_ok=True)  # left by a runner that was killed
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--gpu", action="store_true", help="run the arms on CUDA (large configuration)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ",".join(METHODS))
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--dense", default=None, help="dense start  [default: shipped (small) / pretrained (large)]")
    parser.add_argument("--work", type=Path, default=None, help="cache folder  [default: /tmp/upcycle-frontier-SIZE]")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the plot alone")
    parser.add_argument("--arm", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or SIZES[args.size]["steps"]
    args.batch = args.batch or SIZES[args.size]["batch"]
    args.work = args.work or Path(f"/tmp/upcycle-frontier-{args.size}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.arm:
        method, lr, seed = args.arm[0], float(args.arm[1]), int(args.arm[2])
        result = run_arm(args.work, method, lr, seed, args)
        (args.work / "arms" / f"{arm_name(method, lr, seed)}.json").write_text(json.dumps(result, indent=1))
        return
    started, ran = time.time(), 0
    if not args.report_only:
        prepare(args.work, args)
        (args.work / "arms").mkdir(exist_ok=True)
        if not (args.work / "start.json").is_file():
            (args.work / "start.json").write_text(json.dumps(start_losses(args.work, args)))
        methods = [m for m in args.methods.split(",") if m]
        seeds = [int(s) for s in args.seeds.split(",")]
        todo = [(m, lr, s) for s in seeds for m in methods for lr in METHODS[m]["lrs"]
                if not (args.work / "arms" / f"{arm_name(m, lr, s)}.json").is_file()]
        for i, (m, lr, s) in enumerate(todo):
            done = args.work / "arms" / f"{arm_name(m, lr, s)}.json"
            claim = done.with_suffix(".claim")
            if not claim_arm(claim):
                continue
            if done.is_file():  # another runner finished it meanwhile
                claim.unlink(missing_ok=True)
                continue
            print(f"[{time.time() - started:6.0f} s] {i + 1}/{len(todo)} {arm_name(m, lr, s)}", flush=True)
            cmd = [sys.executable, __file__, "--arm", m, str(lr), str(s), "--size", args.size, "--work", str(args.work),
                   "--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads)]
            try:
                subprocess.run(cmd, check=True)
            finally:
                claim.unlink(missing_ok=True)
            ran += 1
    text = report(args.work, args, time.time() - started if ran else None)
    print(text)
    if not args.no_write:
        results = grouped([json.loads(p.read_text()) for p in sorted((args.work / "arms").glob("*.json"))])
        plot({m: results[m] for m in METHODS if m in results}, json.loads((args.work / "start.json").read_text()),
             BENCH / f"frontier-{args.size}.png", f"{args.size} start: gain on B vs forgetting of A (test blocks)")
        write_results(text, args.size)


if __name__ == "__main__":
    main()
