"""Continued training of an upcycled Doge model (``upcycle continue-train``).

One optimizer step consumes ``batch_size * grad_accum * world_size`` packed blocks, the same
blocks in the same order whatever the world size: every process reads the whole stream and
takes its slice of each micro-step, and the loss is a mean over equal-sized blocks, so the
update equals a single process run at the same global batch.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from upcycle.checkpoint import RunFolder, find_checkpoint, read_state, set_rng_state
from upcycle.errors import UpcycleError
from upcycle.folder import read_config, resolve_source
from upcycle.recipe import TrainConfig, validate
from upcycle.session import Session, open_session
from upcycle.trainable import RouterLogits


@dataclass
class TrainResult:
    """Where the run is and how it went."""

    run: Path
    steps: int
    tokens_seen: int
    initial_eval_loss: float | None
    final_train_loss: float | None
    final_eval_loss: float | None

    def summary(self) -> str:
        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.4f}"

        rows = [("run", str(self.run)), ("final model", str(self.run / "final")), ("steps", str(self.steps)),
                ("tokens seen", f"{self.tokens_seen:,}"), ("eval loss", f"{fmt(self.initial_eval_loss)} -> "
                                                           f"{fmt(self.final_eval_loss)}"),
                ("final train loss", fmt(self.final_train_loss))]
        return "\n".join(f"{k:<16}  {v}" for k, v in rows)


def default_run(model: str, mode: str) -> Path:
    return Path("runs") / f"{Path(model.rstrip('/')).name}-{mode.replace('+', '-')}"


def check_model(config: TrainConfig) -> Path:
    """Resolve MODEL and reject settings it cannot train with, before anything is written."""
    folder = resolve_source(config.model)
    model_config = read_config(folder)
    if config.seq_len > model_config.max_position_embeddings:
        raise UpcycleError(f"--seq-len {config.seq_len} exceeds the model's max_position_embeddings "
                           f"({model_config.max_position_embeddings}): lower --seq-len")
    if config.train.startswith("experts") and not model_config.is_moe:
        raise UpcycleError(f"{config.model} is a dense model: --train {config.train} needs experts; "
                           "run `upcycle expand` first (or use --train lora / all)")
    return folder


def batch_loss(model: torch.nn.Module, blocks: torch.Tensor, config: TrainConfig,
               router: RouterLogits | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimize, language-model loss) of one micro-batch."""
    if router is not None:
        router.logits.clear()
    lm_loss = model(input_ids=blocks, labels=blocks, use_cache=False).loss
    if router is None:
        return lm_loss, lm_loss
    return lm_loss + config.balance_coef * router.balance_loss(), lm_loss


@torch.no_grad()
def evaluate(session: Session) -> float:
    """Mean next-token loss on the held-out blocks (each process takes an equal share)."""
    acc, model, blocks = session.accelerator, session.model, session.eval_blocks
    world, rank = acc.num_processes, acc.process_index
    usable = blocks[: len(blocks) // world * world]
    mine = usable[rank::world].to(acc.device)
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    model.eval()
    for start in range(0, len(mine), session.config.batch_size):
        batch = mine[start:start + session.config.batch_size]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        count = batch.shape[0] * (batch.shape[1] - 1)
        total += torch.tensor([loss.double().item() * count, count], dtype=torch.float64, device=acc.device)
    model.train()
    if session.router is not None:
        session.router.logits.clear()
    total = acc.reduce(total, "sum")
    return (total[0] / total[1]).item() if total[1] > 0 else math.nan


def train_step(session: Session, blocks: torch.Tensor) -> tuple[float, float]:
    """One optimizer step on the global blocks; returns (lm loss, grad norm). Raises on a non-finite loss."""
    acc, config, model = session.accelerator, session.config, session.model
    per, world, rank = config.batch_size, acc.num_processes, acc.process_index
    lm_total = torch.zeros((), device=acc.device)
    for micro in range(config.grad_accum):
        start = (micro * world + rank) * per
        batch = blocks[start:start + per].to(acc.device)
        with acc.accumulate(model):
            loss, lm_loss = batch_loss(model, batch, config, session.router)
            acc.backward(loss)
        lm_total += lm_loss.detach() / config.grad_accum
    lm_value = acc.reduce(lm_total, "mean").item()
    norm = acc.clip_grad_norm_(session.trainable, config.clip if config.clip > 0 else math.inf)
    norm_value = float(norm) if norm is not None else math.nan
    if not math.isfinite(lm_value) or (norm is not None and not math.isfinite(norm_value)):
        session.optimizer.zero_grad(set_to_none=True)
        last = session.last_checkpoint
        raise UpcycleError(f"non-finite loss ({lm_value}) or gradient ({norm_value}) at step {session.step + 1}: "
                           f"stopped without saving; last good checkpoint: {last or 'none'}; "
                           "lower --lr or raise the warmup")
    session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    return lm_value, norm_value


def log_row(session: Session, row: dict) -> None:
    """Append a metrics row (main process) and send it to the trackers."""
    acc = session.accelerator
    if acc.is_main_process:
        path = session.run.path / "metrics.jsonl"
        with path.open("a") as out:
            out.write(json.dumps(row) + "\n")
    acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def run_loop(session: Session, progress: bool) -> tuple[float | None, float | None]:
    """Train to ``max_steps``; returns (last train loss, last eval loss)."""
    acc, config = session.accelerator, session.config
    global_blocks = config.global_batch(acc.num_processes)
    tokens_per_step = global_blocks * config.seq_len
    stream = iter(session.stream)
    train_loss = eval_loss = None
    bar = tqdm(total=config.max_steps, initial=session.step, desc="continue-train", dynamic_ncols=True,
               disable=not (progress and acc.is_main_process))
    with bar:
        while session.step < config.max_steps:
            session.snapshot()
            started = time.perf_counter()
            blocks = torch.stack([next(stream) for _ in range(global_blocks)])
            lr = session.scheduler.get_last_lr()[0]
            train_loss, norm = train_step(session, blocks)
            session.step += 1
            session.saved = {}  # at a step boundary: an interrupt saves the live state
            speed = tokens_per_step / max(time.perf_counter() - started, 1e-9)
            if session.step % config.log_every == 0 or session.step == config.max_steps:
                log_row(session, {"step": session.step, "loss": train_loss, "lr": lr,
                                  "tokens": session.step * tokens_per_step, "tokens_per_s": speed,
                                  "grad_norm": norm})
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{speed:,.0f}", lr=f"{lr:.2e}", refresh=False)
            bar.update()
            if session.step == config.max_steps or (config.eval_every and session.step % config.eval_every == 0):
                eval_loss = evaluate(session)
                log_row(session, {"step": session.step, "eval_loss": eval_loss})
            if session.step == config.max_steps or (config.save_every and session.step % config.save_every == 0):
                session.save_checkpoint(train_loss, eval_loss)
    return train_loss, eval_loss


def continue_train(config: TrainConfig, *, resume: str | None = None, force: bool = False,
                   progress: bool = True) -> TrainResult:
    """Train the ``config.train`` tensors of ``config.model``; write the run folder (docs/run-layout.md).

    ``resume``: ``"latest"`` or a checkpoint folder. ``force``: start over in a RUN holding a
    previous run, deleting only files upcycle wrote there.
    """
    validate(config)
    if not progress:
        quiet_libraries()
    folder = check_model(config)
    checkpoint = None
    if resume:
        run_hint = Path(config.output_dir) if config.output_dir else None
        checkpoint = find_checkpoint(run_hint or default_run(config.model, config.train), resume)
        run = run_hint or checkpoint.parent
        check_resumable(read_state(checkpoint), config, folder)
        if run.resolve() != checkpoint.parent.resolve():
            RunFolder(run).check_fresh(force)
    else:
        run = Path(config.output_dir) if config.output_dir else default_run(config.model, config.train)
        RunFolder(run).check_fresh(force)
    config.output_dir = str(run)
    session = open_session(config, folder, RunFolder(run), checkpoint)
    try:
        return train_session(session, checkpoint, progress)
    finally:
        session.accelerator.end_training()


def quiet_libraries() -> None:
    """Silence the progress bars of datasets and transformers (loading, shard writing)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def check_resumable(state: dict, config: TrainConfig, folder: Path) -> None:
    if state.get("train") != config.train or state.get("base_model_path") != str(folder.resolve()):
        raise UpcycleError(f"the checkpoint trained {state.get('train')} on {state.get('base_model_path')}, not "
                           f"{config.train} on {folder.resolve()}: resume with the same MODEL and --train")
    if state["step"] > config.max_steps:
        raise UpcycleError(f"the checkpoint is at step {state['step']}, beyond --max-steps {config.max_steps}")


def train_session(session: Session, checkpoint: Path | None, progress: bool) -> TrainResult:
    """Resume or start, train, and write the final outputs."""
    acc, config = session.accelerator, session.config
    initial_eval = None
    if checkpoint is None and config.eval_blocks:
        initial_eval = evaluate(session)
        log_row(session, {"step": 0, "eval_loss": initial_eval})
    if checkpoint is not None:
        set_rng_state(torch.load(rng_file(checkpoint, acc.process_index), weights_only=False))
    try:
        train_loss, eval_loss = run_loop(session, progress)
    except KeyboardInterrupt:
        path = session.save_interrupted()
        if acc.is_main_process:
            print(f"interrupted after step {session.step}: saved {path}; continue with --resume", file=sys.stderr)
        raise
    finally:
        logs = session.run.path / "logs"
        if acc.is_main_process and logs.is_dir():
            session.run.record(logs)
    session.finish(train_loss, eval_loss, asdict(config))
    tokens = session.step * config.global_batch(acc.num_processes) * config.seq_len
    return TrainResult(session.run.path, session.step, tokens, initial_eval, train_loss, eval_loss)


def rng_file(checkpoint: Path, rank: int) -> Path:
    """This rank's RNG state, or rank 0's when resuming on more processes than were saved."""
    path = checkpoint / f"rng-{rank}.pt"
    return path if path.is_file() else checkpoint / "rng-0.pt"

