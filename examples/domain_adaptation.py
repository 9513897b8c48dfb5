"""Adapt the shipped model to your own text files by training only new experts.

    python examples/domain_adaptation.py notes/ more.txt          # files or folders (.txt .md .rst .py)
    python examples/domain_adaptation.py                           # default: stdlib asyncio sources

About one file in ten (a stable hash of its path) is held out; the held-out loss on your
text (gain) and on the shipped Python-docs sample (forgetting) is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import zlib
from pathlib import Path

from transformers import AutoTokenizer

import upcycle
from upcycle import assets
from upcycle.demo import heldout_loss, token_blocks, write_jsonl
from upcycle.recipe import resolve_config
from upcycle.train import continue_train

SUFFIXES = {".txt", ".md", ".rst", ".py"}


def read_files(paths: list[Path]) -> list[tuple[str, str]]:
    """(path, text) of every text file under ``paths``."""
    files = []
    for path in paths:
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
        files += [(str(p), p.read_text(encoding="utf-8", errors="replace")) for p in found]
    return [(name, text) for name, text in files if text.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path(asyncio.__file__).parent])
    parser.add_argument("--out", type=Path, default=Path("domain-adaptation"), help="work folder")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    files = read_files(args.paths)
    heldout = [t for name, t in files if zlib.crc32(name.encode()) % 10 == 0] or [files[-1][1]]
    train = [t for name, t in files if t not in heldout] or heldout
    tokenizer = AutoTokenizer.from_pretrained(assets.DENSE_MODEL)
    blocks = {"yours": token_blocks(tokenizer, heldout, 32),
              "docs": token_blocks(tokenizer, assets.docs_documents("heldout"), 32)}
    data = write_jsonl(train, args.out / "train.jsonl")

    upcycle.expand(assets.DENSE_MODEL, num_experts=1024, out=args.out / "moe", force=args.force, dtype="float32")
    before = {k: heldout_loss(upcycle.load_model(args.out / "moe"), b) for k, b in blocks.items()}
    config = resolve_config(None, model=str(args.out / "moe"), data=[str(data)], output_dir=str(args.out / "run"),
                            train="experts", max_steps=args.max_steps, batch_size=8, seq_len=256, lr=args.lr,
                            warmup=0.05, eval_every=0, eval_blocks=4, save_every=0, report_to="none")
    run = continue_train(config, force=args.force).run
    model = upcycle.load_model(run / "final")
    after = {k: heldout_loss(model, b) for k, b in blocks.items()}
    print(f"{len(train)} training files, {len(heldout)} held out; trained model: {run / 'final'}")
    for key in blocks:
        print(f"held-out loss on {key:<6} {before[key]:.3f} -> {after[key]:.3f} ({after[key] - before[key]:+.3f})")


if __name__ == "__main__":
    main()
