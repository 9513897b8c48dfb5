"""The quickstart demo (``upcycle quickstart``): the whole loop on the embedded default, offline, in a few minutes.

The shipped dense Doge (pretrained on Python documentation, domain A) grows CDMoE
experts, only the experts train on standard-library Python source (domain B), and the
run is merged and exported (a model folder and an expert adapter). Held-out loss on both
domains is measured before and after: the gain on B and the forgetting on A.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.utils import logging

from upcycle import assets
from upcycle.errors import UpcycleError
from upcycle.expansion import expand, plan_expand
from upcycle.expansion import validate as validate_experts
from upcycle.exporting import export
from upcycle.folder import check_output, load_model
from upcycle.manifest import NAME as MANIFEST
from upcycle.manifest import Manifest
from upcycle.merging import merge
from upcycle.recipe import DEFAULT_LR, TrainConfig, resolve_config
from upcycle.train import continue_train
from upcycle.train import quiet_libraries as hide_progress_bars

SEQ_LEN = 256
PARTS = ("data", "moe", "run", "model", "adapter", "quickstart.json")


@dataclass
class QuickstartResult:
    """Held-out losses (nats/token) before and after, and what was written where."""

    out: Path
    before: dict[str, float]
    after: dict[str, float]
    seconds: float
    steps: int
    trainable: int
    paths: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        rows = [f"{'held-out loss':<34}{'before':>8}{'after':>8}{'change':>8}"]
        for key, label in (("A", "A: Python docs (forgetting)"), ("B", "B: stdlib source (gain)")):
            b, a = self.before[key], self.after[key]
            rows.append(f"{label:<34}{b:>8.3f}{a:>8.3f}{a - b:>+8.3f}")
        rows.append(f"trained {self.trainable:,} expert parameters for {self.steps} steps in {self.seconds:.0f} s")
        rows += [f"{name:<10}{path}" for name, path in self.paths.items()]
        return "\n".join(rows)


def token_blocks(tokenizer, texts: list[str], max_blocks: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Documents joined with EOS and cut into at most ``max_blocks`` blocks ``(n, seq_len)``."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= max_blocks * seq_len:
            break
    n = min(max_blocks, len(ids) // seq_len)
    if n == 0:
        raise UpcycleError(f"the held-out text has fewer than {seq_len} tokens: use more text")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss (nats/token) of ``model`` on ``blocks``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i:i + batch_size]
        tokens = chunk[:, 1:].numel()
        total += model(input_ids=chunk, labels=chunk).loss.float().item() * tokens
        count += tokens
    model.train(was_training)
    return total / count


def eval_sets(tokenizer, max_blocks: int) -> dict[str, torch.Tensor]:
    """Held-out blocks: A from the shipped docs sample, B from held-out stdlib files."""
    return {"A": token_blocks(tokenizer, assets.docs_documents("heldout"), max_blocks),
            "B": token_blocks(tokenizer, assets.stdlib_documents("heldout"), max_blocks)}


def write_jsonl(texts: list[str], path: Path) -> Path:
    """One ``{"text": ...}`` per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def prepare_out(out: Path, force: bool, files: list[Path] = ()) -> Manifest:
    """Refuse a non-empty OUT unless ``force``; with it, delete only the files OUT's manifest lists.

    ``files``: what quickstart writes itself (the verbs check their own folders). Everything is
    checked before anything is deleted: OUT must hold a previous quickstart (its manifest), no
    part may be a symlink, and none of ``files`` may be a file quickstart did not write.
    """
    check_output(out, force)  # with force: every manifest entry inside OUT, none behind a symlink
    manifest = Manifest(out)
    if force and out.is_dir() and any(out.iterdir()):
        listed = manifest.owned()
        present = [name for name in PARTS if os.path.lexists(out / name)]
        if present and not manifest.path.is_file():
            raise UpcycleError(f"{out} holds {present[0]} but no {MANIFEST}, so quickstart did not write it: "
                               "choose another output folder (--force only replaces a previous quickstart)")
        for name in present:
            if (out / name).is_symlink():
                raise UpcycleError(f"{out / name} is a symlink: quickstart does not write through links; remove "
                                   "it or choose another output folder")
        for path in files:
            name = path.relative_to(out).as_posix()
            if os.path.lexists(path) and name not in listed:
                raise UpcycleError(f"{out} holds {name}, which quickstart did not write: move it away or choose "
                                   "another output folder (--force only replaces upcycle's own files)")
        manifest.remove_listed()
    out.mkdir(parents=True, exist_ok=True)
    return manifest


def quickstart(out: str | Path = "upcycle-quickstart", force: bool = False, num_experts: int = 1024,
               experts_per_token: int = 8, max_steps: int = 300, batch_size: int = 8, lr: float = DEFAULT_LR["experts"],
               replay: float = 0.0, train_bytes: int = 3_000_000, eval_blocks: int = 64, seed: int = 0,
               progress: bool = True,
               echo: Callable[[str], None] = print) -> QuickstartResult:
    """Expand the shipped dense Doge, train only its experts on stdlib code, merge and export into ``out``.

    ``replay``: fraction of training blocks drawn from the shipped docs train sample (domain A).
    """
    if not 0.0 <= replay < 1.0:
        raise UpcycleError(f"--replay {replay} must be in [0, 1): the fraction of blocks taken from domain A")
    validate_experts(num_experts, experts_per_token)
    for flag, value in (("--eval-blocks", eval_blocks), ("train_bytes", train_bytes)):
        if value < 1:
            raise UpcycleError(f"{flag} must be at least 1, got {value}")
    start = time.time()
    out = Path(out).expanduser()
    train_file, docs_file = out / "data" / "stdlib-train.jsonl", out / "data" / "docs-train.jsonl"
    eval_file = out / "data" / "stdlib-heldout.jsonl"
    data = [f"{train_file}:{1 - replay}", f"{docs_file}:{replay}"] if replay else [str(train_file)]
    config = train_config(out, data, eval_file, max_steps, batch_size, lr, seed)  # checks every setting first
    written = [train_file, eval_file, *([docs_file] if replay else [])]
    plan_expand(assets.DENSE_MODEL, num_experts, experts_per_token, out=out / "moe", seed=seed,
                dtype="float32").check_room()  # before anything is written
    manifest = prepare_out(out, force, [*written, out / "quickstart.json"])
    quiet_libraries()
    tokenizer = AutoTokenizer.from_pretrained(assets.DENSE_MODEL)
    echo(f"[1/5] data: stdlib sources from {assets.STDLIB} (B), shipped Python docs sample (A)")
    write_jsonl(assets.stdlib_documents("train", max_bytes=train_bytes), train_file)
    if replay:
        write_jsonl(assets.docs_documents("train"), docs_file)
    write_jsonl(assets.stdlib_documents("heldout"), eval_file)
    manifest.record(*written)
    blocks = eval_sets(tokenizer, eval_blocks)

    echo(f"[2/5] expand {assets.DENSE_MODEL.name}: {num_experts} experts per layer, {experts_per_token} per token")
    try:
        expanded = expand(assets.DENSE_MODEL, num_experts=num_experts, experts_per_token=experts_per_token,
                          out=out / "moe", seed=seed, dtype="float32", force=force, progress=progress)
    finally:
        record_folder(manifest, out / "moe")
    before = evaluate(load_model(out / "moe"), blocks, progress)
    echo(f"      held-out loss before: A {before['A']:.3f}  B {before['B']:.3f}")

    mix = f", {replay:.0%} of blocks from domain A (replay)" if replay else ""
    echo(f"[3/5] continue-train the experts only: {max_steps} steps x {batch_size} x {SEQ_LEN} tokens{mix}")
    try:
        run = continue_train(config, force=force, progress=progress).run
    finally:
        record_folder(manifest, out / "run")

    echo("[4/5] merge the run; export the model and its expert adapter")
    try:
        paths = merge_and_export(out, run, force=force)
    finally:
        record_folder(manifest, out / "model")
        record_folder(manifest, out / "adapter")
    after = evaluate(load_model(paths["model"]), blocks, progress)
    echo(f"      held-out loss after:  A {after['A']:.3f}  B {after['B']:.3f}")

    result = QuickstartResult(out, before, after, time.time() - start, max_steps, expanded.trainable,
                              {"data": out / "data", "moe": out / "moe", "run": run, **paths})
    if not all(math.isfinite(v) for v in (*before.values(), *after.values())):
        raise UpcycleError("a held-out loss is not finite: training diverged; lower --lr")
    record = {"before": before, "after": after, "seconds": round(result.seconds, 1), "steps": max_steps,
              "batch_size": batch_size, "seq_len": SEQ_LEN, "lr": lr, "replay": replay,
              "num_experts": num_experts, "experts_per_token": experts_per_token, "trainable": expanded.trainable,
              "eval_blocks": eval_blocks,
              "paths": {k: str(v) for k, v in result.paths.items()}}
    (out / "quickstart.json").write_text(json.dumps(record, indent=1) + "\n")
    manifest.record(out / "quickstart.json")
    result.paths["summary"] = out / "quickstart.json"
    echo("[5/5] done")
    return result


def evaluate(model: torch.nn.Module, blocks: dict[str, torch.Tensor], progress: bool) -> dict[str, float]:
    """Held-out loss per domain."""
    return {name: heldout_loss(model, b) for name, b in tqdm(blocks.items(), desc="eval", disable=not progress,
                                                               leave=False)}


def record_folder(manifest: Manifest, folder: Path) -> None:
    """List in OUT's manifest what a verb wrote in ``folder`` (its own manifest's files, and that manifest)."""
    if Manifest(folder).path.is_file():
        manifest.include(folder)


def train_config(out: Path, data: list[str], eval_file: Path, max_steps: int, batch_size: int, lr: float,
                 seed: int) -> TrainConfig:
    """The ``continue_train`` config for the experts of ``OUT/moe`` into ``OUT/run`` (checked)."""
    return resolve_config(None, model=str(out / "moe"), data=data, eval_data=[str(eval_file)],
                          output_dir=str(out / "run"), train="experts", max_steps=max_steps,
                          batch_size=batch_size, seq_len=SEQ_LEN, lr=lr,
                          weight_decay=0.0, eval_every=0, eval_blocks=8, save_every=0, report_to="none",
                          seed=seed)


def merge_and_export(out: Path, run: Path, force: bool = False) -> dict[str, Path]:
    """Merge the run; export the merged model (``OUT/model``) and its expert adapter (``OUT/adapter``)."""
    with tempfile.TemporaryDirectory(prefix=".merged-", dir=out) as tmp:
        merge(run, Path(tmp) / "merged")
        export(Path(tmp) / "merged", out / "model", force=force, progress=False)
        export(Path(tmp) / "merged", out / "adapter", adapter_only=True, base=assets.DENSE_MODEL, force=force,
               progress=False)
    return {"model": out / "model", "adapter": out / "adapter"}


def quiet_libraries() -> None:
    """The trainer's quiet mode (no library progress bars), plus no library info lines (ours stay)."""
    import datasets  # the data pipeline imports it on first use too; it is slow to import

    hide_progress_bars()
    logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
