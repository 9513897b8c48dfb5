"""Expand a dense Doge into a CDMoE model and train only the new experts, from Python.

    python examples/expand_and_train.py                      # shipped tiny model, ~1 minute on a CPU
    python examples/expand_and_train.py --model DENSE/ --data my_texts/ --max-steps 500

Defaults: the shipped dense model and this interpreter's ``email`` package sources as data.
"""

from __future__ import annotations

import argparse
import email
from pathlib import Path

import upcycle
from upcycle import assets
from upcycle.recipe import resolve_config
from upcycle.train import continue_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(assets.DENSE_MODEL), help="dense Doge checkpoint folder")
    parser.add_argument("--data", default=str(Path(email.__file__).parent), help="text file(s) folder or file")
    parser.add_argument("--out", type=Path, default=Path("example-run"), help="work folder (moe/ and run/)")
    parser.add_argument("--experts", type=int, default=1024)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--force", action="store_true", help="overwrite a previous example run in --out")
    args = parser.parse_args()

    expanded = upcycle.expand(args.model, num_experts=args.experts, out=args.out / "moe", force=args.force,
                              dtype="float32")
    print(expanded.summary())
    config = resolve_config(None, model=str(args.out / "moe"), data=[args.data], output_dir=str(args.out / "run"),
                            train="experts", max_steps=args.max_steps, batch_size=8, seq_len=256, lr=3e-3,
                            warmup=0.05, eval_every=0, eval_blocks=8, save_every=0, report_to="none")
    result = continue_train(config, force=args.force)
    print(result.summary())


if __name__ == "__main__":
    main()
