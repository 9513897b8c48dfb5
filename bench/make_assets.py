"""Rebuild ``upcycle/assets/``: tokenizer, Python-docs sample, tiny dense Doge pretrained on the docs.

    python bench/make_assets.py            # ~14 minutes on one CPU thread
    python bench/make_assets.py --steps 20 --out /tmp/assets   # quick dry run

Needs the Debian package ``python3.11-doc`` (the reStructuredText sources under
/usr/share/doc/python3.11/html/_sources). Deterministic: fixed seeds, one thread.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch
from transformers import DogeConfig, DogeForCausalLM, GenerationConfig, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from upcycle.assets import ASSETS, docs_records, stdlib_documents  # noqa: E402

DOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
EOS, PAD, BOS = "<|endoftext|>", "<|pad|>", "<|bos|>"
VOCAB, CONTEXT = 4096, 256
HELDOUT_BYTES, SAMPLE_TRAIN_BYTES = 250_000, 1_000_000
MODEL_SHAPE = dict(hidden_size=160, intermediate_size=320, num_hidden_layers=4, num_attention_heads=2,
                   num_key_value_heads=1)


def docs_files(root: Path) -> list[tuple[str, str]]:
    """Every docs source as ``(relative path, text)``, ordered by a stable hash of the path."""
    files = sorted(root.rglob("*.rst.txt"), key=lambda p: (zlib.crc32(p.relative_to(root).as_posix().encode()),
                                                            p.relative_to(root).as_posix()))
    return [(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")) for p in files]


def split_docs(files: list[tuple[str, str]]) -> tuple[list, list, list]:
    """(held-out sample, shipped train sample, pretraining corpus = everything but the held-out files)."""
    heldout, sample, size_h, size_s = [], [], 0, 0
    for name, text in files:
        if size_h < HELDOUT_BYTES and len(text) <= 40_000:
            heldout.append((name, text))
            size_h += len(text)
        elif size_s < SAMPLE_TRAIN_BYTES and len(text) <= 80_000:
            sample.append((name, text))
            size_s += len(text)
    held = {name for name, _ in heldout}
    return heldout, sample, [(n, t) for n, t in files if n not in held]


def write_sample(out: Path, heldout: list, sample: list) -> None:
    with gzip.GzipFile(out, "wb", mtime=0) as raw:
        for split, records in (("train", sample), ("heldout", heldout)):
            for name, text in records:
                raw.write((json.dumps({"source": name, "split": split, "text": text}) + "\n").encode())


def train_tokenizer(texts: list[str], out: Path) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS, PAD, BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=BOS,
                                   model_max_length=CONTEXT)
    fast.save_pretrained(out)
    return fast


def blocks_of(tokenizer, texts: list[str], size: int = CONTEXT) -> torch.Tensor:
    """Tokenize, join with EOS, cut into ``(n, size)`` blocks (the tail is dropped)."""
    ids: list[int] = []
    for encoding in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoding)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // size
    return torch.tensor(ids[: n * size]).view(n, size)


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        chunk = blocks[i:i + batch]
        total += model(input_ids=chunk, labels=chunk).loss.item() * chunk.numel()
        count += chunk.numel()
    model.train()
    return total / count


def pretrain(model, train: torch.Tensor, heldout: torch.Tensor, steps: int, batch: int, lr: float,
             seed: int, log) -> list[dict]:
    """AdamW (0.9, 0.95), wd 0.01, linear warmup then cosine to lr/10, clip 1.0."""
    generator = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, factor)
    order = torch.randperm(len(train), generator=generator)
    history, start, running = [], time.time(), []
    for step in range(steps):
        if (step + 1) * batch > len(order):
            order = torch.cat([order, torch.randperm(len(train), generator=generator)])
        chunk = train[order[step * batch:(step + 1) * batch]]
        loss = model(input_ids=chunk, labels=chunk).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        running.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            row = {"step": step + 1, "train_loss": sum(running) / len(running), "s": round(time.time() - start)}
            if (step + 1) % 200 == 0 or step + 1 == steps:
                row["heldout_loss"] = mean_loss(model, heldout)
            history.append(row)
            running = []
            log(json.dumps(row))
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets folder to (re)write")
    parser.add_argument("--docs", type=Path, default=DOCS_ROOT, help="python3.11-doc _sources folder")
    parser.add_argument("--steps", type=int, default=900, help="pretraining steps")
    parser.add_argument("--batch", type=int, default=16, help="blocks of 256 tokens per step")
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=json.loads, default=None, help="DogeConfig overrides as JSON (bench use)")
    parser.add_argument("--gpu", action="store_true", help="pretrain on CUDA (bench use)")
    parser.add_argument("--from-sample", action="store_true",
                        help="without the docs package: pretrain on the shipped docs sample only (bench use)")
    args = parser.parse_args()
    if not args.docs.is_dir() and not args.from_sample:
        sys.exit(f"{args.docs} not found: apt-get install python3.11-doc (or pass --docs)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    log = lambda text: print(text, flush=True)  # noqa: E731

    if args.docs.is_dir():
        files = docs_files(args.docs)
        heldout, sample, corpus = split_docs(files)
    else:  # --from-sample: only the shipped 1 MB sample (a much smaller pretraining corpus)
        records = docs_records()
        files = [(r["source"], r["text"]) for r in records]
        heldout = [(r["source"], r["text"]) for r in records if r["split"] == "heldout"]
        sample = corpus = [(r["source"], r["text"]) for r in records if r["split"] == "train"]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.out.resolve() != ASSETS.resolve() or args.docs.is_dir():
        write_sample(args.out / "python-docs-sample.jsonl.gz", heldout, sample)
    log(f"docs: {len(files)} files; held-out {len(heldout)} files {sum(len(t) for _, t in heldout):,} chars; "
        f"shipped train sample {len(sample)} files; pretraining corpus {sum(len(t) for _, t in corpus):,} chars")

    model_dir = args.out / "doge-pydocs-1.6m"
    shutil.rmtree(model_dir, ignore_errors=True)
    code = stdlib_documents("train", max_bytes=4_000_000)
    tokenizer = train_tokenizer([t for _, t in corpus] + code, model_dir)
    train_blocks = blocks_of(tokenizer, [t for _, t in corpus])
    heldout_blocks = blocks_of(tokenizer, [t for _, t in heldout])
    log(f"tokens: pretraining {train_blocks.numel():,}, held-out {heldout_blocks.numel():,}")

    config = DogeConfig(vocab_size=VOCAB, max_position_embeddings=CONTEXT, tie_word_embeddings=True,
                        eos_token_id=0, pad_token_id=1, bos_token_id=2, **(args.shape or MODEL_SHAPE))
    device = "cuda" if args.gpu else "cpu"
    model = DogeForCausalLM(config).to(device)
    train_blocks, heldout_blocks = train_blocks.to(device), heldout_blocks.to(device)
    params = sum(p.numel() for p in model.parameters())
    start_loss = mean_loss(model, heldout_blocks)
    log(f"model: {params:,} parameters; held-out loss at init {start_loss:.3f}")
    history = pretrain(model, train_blocks, heldout_blocks, args.steps, args.batch, args.lr, args.seed, log)
    model.cpu().save_pretrained(model_dir)
    (model_dir / "model.safetensors").chmod(0o644)
    GenerationConfig(eos_token_id=0, pad_token_id=1, bos_token_id=2, max_new_tokens=64, do_sample=True,
                     temperature=0.8, top_k=50).save_pretrained(model_dir)
    summary = {"parameters": params, "steps": args.steps, "batch": args.batch, "context": CONTEXT, "lr": args.lr,
               "tokens_seen": args.steps * args.batch * CONTEXT, "heldout_loss_init": round(start_loss, 4),
               "final_train_loss": round(history[-1]["train_loss"], 4),
               "final_heldout_loss": round(history[-1]["heldout_loss"], 4),
               "seconds": history[-1]["s"], "threads": args.threads, "history": history}
    (model_dir / "pretraining.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
