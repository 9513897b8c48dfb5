"""Continued training of an upcycled Doge model (``upcycle continue-train``).

One optimizer step consumes ``batch_size * grad_accum * world_size`` packed blocks, the same
blocks in the same order whatever the world size: every process reads the whole stream and
takes its slice of each micro-step, and the loss is a mean over equal-sized blocks, so the
update equals a single process run at the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from upcycle.checkpoint import read_json, set_rng_state
from upcycle.errors import DamagedCheckpoint, UpcycleError
from upcycle.folder import read_config, resolve_source
from upcycle.loss import next_token_loss
from upcycle.recipe import TrainConfig, validate
from upcycle.session import Session, open_session
from upcycle.retain import RetainPenalty
from upcycle.run_folder import RunFolder, check_checkpoint, damaged_hint, resume_checkpoint
from upcycle.routing_stats import collect
from upcycle.trainable import RouterLogits, apply_schedule


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


def batch_loss(model: torch.nn.Module, blocks: torch.Tensor, config: TrainConfig, router: RouterLogits | None,
               retain: RetainPenalty | None = None, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimize, language-model loss) of one micro-batch."""
    if router is not None:
        router.logits.clear()
    lm_loss = next_token_loss(model(input_ids=blocks, use_cache=False).logits, blocks)
    loss = lm_loss
    if router is not None:
        loss = loss + config.balance_coef * router.balance_loss()
    if retain is not None:
        loss = loss + retain(step)
    return loss, lm_loss


@torch.no_grad()
def mean_loss(session: Session, blocks: torch.Tensor) -> float:
    """Mean next-token loss over ``blocks`` (each process takes an equal share)."""
    acc, model = session.accelerator, session.model
    world, rank = acc.num_processes, acc.process_index
    usable = blocks[: len(blocks) // world * world]
    mine = usable[rank::world].to(acc.device)
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    for start in range(0, len(mine), session.config.batch_size):
        batch = mine[start:start + session.config.batch_size]
        loss = next_token_loss(model(input_ids=batch, use_cache=False).logits, batch)
        count = batch.shape[0] * (batch.shape[1] - 1)
        total += torch.tensor([loss.double().item() * count, count], dtype=torch.float64, device=acc.device)
    total = acc.reduce(total, "sum")
    return (total[0] / total[1]).item() if total[1] > 0 else math.nan


def evaluate(session: Session) -> dict[str, float]:
    """Held-out loss and routing health (``routing/...``); with retain blocks, their loss and routing too."""
    acc = session.accelerator
    unwrapped = acc.unwrap_model(session.model)
    session.model.eval()
    out: dict[str, float] = {}
    try:
        for name, blocks, prefix in (("eval_loss", session.eval_blocks, "routing"),
                                     ("retain_loss", session.retain_eval, "retain_routing")):
            if blocks is None or not len(blocks):
                continue
            with collect(unwrapped) as stats:
                out[name] = mean_loss(session, blocks)
            stats.reduce(lambda t: acc.reduce(t.to(acc.device), "sum"))
            out.update(stats.metrics(prefix))
    finally:
        session.model.train()
        if session.router is not None:
            session.router.logits.clear()
    return out


def train_step(session: Session, blocks: torch.Tensor) -> tuple[float, float]:
    """Gradients of one optimizer step on the global blocks, clipped; returns (lm loss, grad norm).

    The update itself is :func:`apply_update`. Raises on a non-finite loss or gradient.
    """
    acc, config, model = session.accelerator, session.config, session.model
    per, world, rank = config.batch_size, acc.num_processes, acc.process_index
    lm_total = torch.zeros((), device=acc.device)
    for micro in range(config.grad_accum):
        start = (micro * world + rank) * per
        batch = blocks[start:start + per].to(acc.device)
        with acc.accumulate(model):
            loss, lm_loss = batch_loss(model, batch, config, session.router, session.retain, session.step)
            acc.backward(loss)
        lm_total += lm_loss.detach() / config.grad_accum
    lm_value = acc.reduce(lm_total, "mean").item()
    # model.parameters(), not the trainable list: under FSDP accelerate then computes the global norm
    # (frozen tensors have no gradient and add nothing).
    norm = acc.clip_grad_norm_(model.parameters(), config.clip if config.clip > 0 else math.inf)
    norm_value = float(norm) if norm is not None else math.nan
    if not math.isfinite(lm_value) or (norm is not None and not math.isfinite(norm_value)):
        session.optimizer.zero_grad(set_to_none=True)
        last = session.last_checkpoint
        raise UpcycleError(f"non-finite loss ({lm_value}) or gradient ({norm_value}) at step {session.step + 1}: "
                           f"stopped without saving; last good checkpoint: {last or 'none'}; "
                           "lower --lr or raise the warmup")
    return lm_value, norm_value


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C and SIGTERM until the block ends, so weights, step count and data position move together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    previous = {sig: signal.signal(sig, lambda *a: caught.append(a)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


def interrupt(*_) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (a scheduler's stop, ``kill``) stops the trainer like Ctrl-C: it saves, unlocks and exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def apply_update(session: Session) -> None:
    """Apply the step's update and count it (inside :func:`deferred_interrupt`, with its metrics row)."""
    session.optimizer.step()
    session.optimizer.zero_grad(set_to_none=True)
    session.step += 1
    session.saved = {}  # at a step boundary: an interrupt saves the live state


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
    used = None  # mean fraction of experts used at the last eval, for the progress bar
    bar = tqdm(total=config.max_steps, initial=session.step, desc="continue-train", dynamic_ncols=True,
               disable=not (progress and acc.is_main_process))
    with bar:
        while session.step < config.max_steps:
            session.snapshot()
            started = time.perf_counter()
            blocks = torch.stack([next(stream) for _ in range(global_blocks)])
            lr = config.lr * apply_schedule(session.optimizer, session.schedule, session.step)
            train_loss, norm = train_step(session, blocks)
            with deferred_interrupt():  # weights, step count, data position and metrics move together
                apply_update(session)
                speed = tokens_per_step / max(time.perf_counter() - started, 1e-9)
                if session.step % config.log_every == 0 or session.step == config.max_steps:
                    log_row(session, {"step": session.step, "loss": train_loss, "lr": lr,
                                      "tokens": session.step * tokens_per_step, "tokens_per_s": speed,
                                      "grad_norm": norm})
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{speed:,.0f}", lr=f"{lr:.2e}",
                            **({"used": used} if used else {}), refresh=False)
            bar.update()
            if session.step == config.max_steps or (config.eval_every and session.step % config.eval_every == 0):
                measured = evaluate(session)
                eval_loss = measured.get("eval_loss")
                log_row(session, {"step": session.step, **measured})
                if "routing/used" in measured:
                    used = f"{measured['routing/used']:.0%}"
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
    run_hint = Path(config.output_dir) if config.output_dir else None
    if run_hint is not None:
        RunFolder(run_hint).check_unlocked()  # a busy or stale lock is reported before anything else
    if resume:
        checkpoint = resume_checkpoint(run_hint or default_run(config.model, config.train), resume)
        run = run_hint or checkpoint.parent
    else:
        run = run_hint or default_run(config.model, config.train)
    with terminate_as_interrupt(), RunFolder(run).lock():  # one trainer per RUN; released on any exit
        try:
            return locked_run(config, folder, run, checkpoint, force, progress)
        except DamagedCheckpoint as error:
            if checkpoint is None:
                raise
            raise damaged_hint(error, checkpoint) from None


def locked_run(config: TrainConfig, folder: Path, run: Path, checkpoint: Path | None, force: bool,
               progress: bool) -> TrainResult:
    """Check RUN (and the checkpoint), then open the session and train, holding RUN's lock."""
    if checkpoint is not None:
        check_resumable(check_checkpoint(checkpoint), config, folder)
    if checkpoint is not None and run.resolve() == checkpoint.parent.resolve():
        RunFolder(run).written()  # every manifest entry inside RUN, before anything is written
    else:
        RunFolder(run).check_fresh(force)
    config.output_dir = str(run)
    session = open_session(config, folder, RunFolder(run), checkpoint, progress)
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


UNCHANGEABLE = {"train": "--train", "seq_len": "--seq-len", "data": "--data", "seed": "--seed"}


def check_resumable(state: dict, config: TrainConfig, folder: Path) -> None:
    """Refuse a resume whose config changes what the checkpoint cannot carry over, naming the setting.

    Schedule and optimizer hyper-parameters (--max-steps, --lr, --warmup, --decay, --weight-decay...)
    may change: the resumed run follows the new values.
    """
    if state.get("base_model_path") != str(folder.resolve()):
        raise UpcycleError(f"the checkpoint trained {state.get('base_model_path')}, not {folder.resolve()}: "
                           "resume with the same MODEL")
    now = {"train": config.train, "seq_len": config.seq_len, "data": config.data, "seed": config.seed}
    for key, flag in UNCHANGEABLE.items():
        if key in state and state[key] != now[key]:
            raise UpcycleError(f"the checkpoint was trained with {flag} {state[key]}, this run asks for "
                               f"{now[key]}: a resume cannot change {flag}; start a new run (without --resume)")
    saved_optimizer = state.get("config", {}).get("expert_optimizer", "adamw")
    if saved_optimizer != config.expert_optimizer:
        raise UpcycleError(f"the checkpoint was trained with --expert-optimizer {saved_optimizer}, this run asks for "
                           f"{config.expert_optimizer}: its optimizer state cannot carry over; resume with "
                           f"--expert-optimizer {saved_optimizer} or start a new run (without --resume)")
    if state["step"] > config.max_steps:
        raise UpcycleError(f"the checkpoint is at step {state['step']}, beyond --max-steps {config.max_steps}")


def train_session(session: Session, checkpoint: Path | None, progress: bool) -> TrainResult:
    """Resume or start, train, and write the final outputs."""
    acc, config = session.accelerator, session.config
    initial_eval = None
    if checkpoint is None and config.eval_blocks:
        measured = evaluate(session)
        initial_eval = measured.get("eval_loss")
        log_row(session, {"step": 0, **measured})
    if checkpoint is not None:
        rng = rng_file(checkpoint, acc.process_index)
        set_rng_state(read_json(rng), rng)
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
    path = checkpoint / f"rng-{rank}.json"
    return path if path.is_file() else checkpoint / "rng-0.json"

