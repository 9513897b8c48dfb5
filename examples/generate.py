"""Generate text from an exported model folder with plain transformers (no upcycle import).

    python examples/generate.py                                   # the shipped dense model
    python examples/generate.py upcycle-quickstart/model --prompt "def parse_args("

MoE folders carry their modeling code (``auto_map``), hence ``trust_remote_code=True``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "upcycle" / "assets" / "doge-pydocs-1.6m"


def default_model() -> str:
    for candidate in (Path("upcycle-quickstart/model"), SHIPPED):
        if (candidate / "config.json").is_file():
            return str(candidate)
    import upcycle.assets  # installed package without a source checkout

    return str(upcycle.assets.DENSE_MODEL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder  [default: quickstart or shipped]")
    parser.add_argument("--prompt", default="The :mod:`json` module")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = args.model or default_model()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.8,
                            top_k=50, pad_token_id=tokenizer.pad_token_id)
    print(f"[{folder}]")
    print(tokenizer.decode(output[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
