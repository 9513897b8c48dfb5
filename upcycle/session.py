"""A training session: accelerator, model, optimizer, data and the run folder, plus save/resume/finish."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

from upcycle.checkpoint import load_tensors, load_torch_state, read_json, rng_state, save_tensors, write_json
from upcycle.data import DataSource, PackedStream, build_data, build_retain, parse_source
from upcycle.errors import DamagedCheckpoint, UpcycleError
from upcycle.expert_init import MAX_STATES, fit_from_states, init_blocks_needed
from upcycle.folder import SUMMARY, load_model, save_model
from upcycle.modeling_upcycle_doge import CausalCDMoE
from upcycle.recipe import DataSpec, TrainConfig, save_config
from upcycle.run_folder import RunFolder, crash_point, fold, read_state, training_summary
from upcycle.retain import (RetainPenalty, blocks_needed, build_penalty, cdmoe_layers, layer_inputs,
                            retain_blocks_path, synthesize)
from upcycle.slots import freeze_unselected, masks_from_tensors, masks_to_tensors, select_slots, slots_path
from upcycle.trainable import (RouterLogits, WarmupStableDecay, adopt_hyperparameters, base_name,
                               build_optimizer, enable_activation_checkpointing, is_expert, select_trainable,
                               trainable_parameters)


@dataclass
class Session:
    """Everything one run holds; ``step`` counts completed optimizer steps."""

    config: TrainConfig
    folder: Path
    run: RunFolder
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: WarmupStableDecay
    stream: PackedStream
    eval_blocks: torch.Tensor
    trainable: list[torch.nn.Parameter]
    plain_names: list[str]  # trainable non-LoRA parameter names (PEFT names when wrapped)
    router: RouterLogits | None
    retain: RetainPenalty | None = None  # the expert-off penalty on retain tokens
    retain_eval: torch.Tensor | None = None  # retain blocks whose loss every eval reports
    step: int = 0
    last_checkpoint: Path | None = None
    saved: dict[str, Any] = field(default_factory=dict)  # data and RNG state at the start of the step
    resumed_from: dict[str, Any] | None = None  # checkpoint, step and the settings this run changed

    @property
    def sharded(self) -> bool:
        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    @property
    def lora(self) -> bool:
        return "lora" in self.config.train

    def snapshot(self) -> None:
        """Remember where the step starts, so an interrupted step can be redone after resume."""
        self.saved = {"data": self.stream.state_dict(), "rng": rng_state()}

    def state(self, train_loss: float | None, eval_loss: float | None) -> dict[str, Any]:
        world = self.accelerator.num_processes
        blocks = self.step * self.config.global_batch(world)
        return {"step": self.step, "tokens_seen": blocks * self.config.seq_len, "blocks_consumed": blocks,
                "train": self.config.train, "base_model": self.config.model,
                "base_model_path": str(self.folder.resolve()), "world_size": world, "sharded": self.sharded,
                "seq_len": self.config.seq_len, "data": self.config.data, "seed": self.config.seed,
                "train_loss": train_loss, "eval_loss": eval_loss, "config": dataclasses.asdict(self.config)}

    def save_checkpoint(self, train_loss: float | None, eval_loss: float | None,
                        data: dict | None = None, rng: dict | None = None) -> Path:
        """Write RUN/checkpoint-STEP atomically (staged, then renamed); every process calls this."""
        acc = self.accelerator
        stage = self.run.stage_path(self.step)
        full = acc.get_state_dict(self.model)
        if acc.is_main_process:
            self.run.checkpoint_stage(self.step)
        acc.wait_for_everyone()
        try:
            self.write_stage(stage, full, train_loss, eval_loss, data, rng)
        except Exception:  # disk full, ...: an unfinished stage is never left behind
            shutil.rmtree(stage, ignore_errors=True)
            raise
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.run.publish_checkpoint(stage, self.step, self.config.keep_checkpoints)
        acc.wait_for_everyone()
        self.last_checkpoint = self.run.path / f"checkpoint-{self.step}"
        return self.last_checkpoint

    def write_stage(self, stage: Path, full: dict, train_loss: float | None, eval_loss: float | None,
                    data: dict | None, rng: dict | None) -> None:
        """This process's files of a checkpoint (the main process writes the shared ones)."""
        acc = self.accelerator
        write_json(stage / f"rng-{acc.process_index}.json", rng or rng_state())
        if self.sharded:
            torch.save(self.optimizer.state_dict(), stage / f"optimizer-{acc.process_index}.pt")
        if acc.is_main_process:
            plain = {base_name(n): full[n] for n in self.plain_names}
            if plain:
                save_tensors(plain, stage / "trainable.safetensors")
            crash_point("checkpoint-write", self.step)
            if self.lora:
                acc.unwrap_model(self.model).save_pretrained(stage / "adapter", state_dict=full)
            if not self.sharded:
                torch.save(self.optimizer.state_dict(), stage / "optimizer.pt")
            write_json(stage / "data.json", data or self.stream.state_dict())
            write_json(stage / "state.json", self.state(train_loss, eval_loss))

    def save_interrupted(self) -> Path:
        """Checkpoint the last completed step (the interrupted one is redone on resume)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.last_checkpoint is not None and self.last_checkpoint.name == f"checkpoint-{self.step}":
            return self.last_checkpoint
        return self.save_checkpoint(None, None, self.saved.get("data"), self.saved.get("rng"))

    def load_state(self, checkpoint: Path, optimizer_state: dict) -> None:
        """Optimizer moments (``optimizer_state``, read by :func:`read_optimizer`), data position and step
        (after ``prepare``); hyper-parameters stay the config's."""
        rank, world, state = self.accelerator.process_index, self.accelerator.num_processes, read_state(checkpoint)
        if (state.get("sharded") or self.sharded) and state.get("world_size") != world:
            raise UpcycleError(f"the checkpoint's optimizer state is sharded over {state.get('world_size')} "
                               f"process(es): resume it on {state.get('world_size')}, not {world}")
        optimizer = checkpoint / (f"optimizer-{rank}.pt" if self.sharded else "optimizer.pt")
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise DamagedCheckpoint(f"{optimizer} does not fit this run's optimizer ({type(error).__name__}): "
                                    "the checkpoint is damaged", optimizer) from None
        adopt_hyperparameters(self.optimizer, self.accelerator.unwrap_model(self.model), self.config)
        self.stream.load_state_dict(read_json(checkpoint / "data.json"))
        self.step = state["step"]
        before, now = state.get("config", {}), dataclasses.asdict(self.config)
        changed = {k: [before[k], now[k]] for k in now if k in before and k != "output_dir" and before[k] != now[k]}
        self.resumed_from = {"checkpoint": str(checkpoint.resolve()), "step": self.step, "changed": changed}
        self.last_checkpoint = checkpoint
        if self.accelerator.is_main_process:
            trim_metrics(self.run.path / "metrics.jsonl", self.step)

    def finish(self, train_loss: float | None, eval_loss: float | None, recipe: dict) -> None:
        """Write RUN/final (LoRA merged), experts.safetensors, adapter/ and training_summary.json."""
        acc, run = self.accelerator, self.run.path
        full = acc.get_state_dict(self.model)
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(self.model)
            if self.lora:
                unwrapped.save_pretrained(run / "adapter", state_dict=full)
                self.run.record(run / "adapter")
            trained = {base_name(n): full[n] for n in self.plain_names}
            final = fold(self.folder, trained, run / "adapter" if self.lora else None, run)
            if (run / "final").exists():
                self.run.forget(run / "final")  # only the files the run wrote there; a user's stay
            summary = self.summary(final, train_loss, eval_loss, recipe)
            crash_point("final-write")
            save_model(final, run / "final", source=self.folder, summary=summary, force=True)
            crash_point("final-written")
            self.run.files.include(run / "final")
            experts = {k: v for k, v in final.state_dict().items() if is_expert(k)}
            if experts:
                save_tensors(experts, run / "experts.safetensors")
                self.run.record(run / "experts.safetensors")
            (run / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
            self.run.record(run / SUMMARY)
        acc.wait_for_everyone()

    def summary(self, final: torch.nn.Module, train_loss, eval_loss, recipe: dict) -> dict[str, Any]:
        return training_summary(final, self.state(train_loss, eval_loss), sum(p.numel() for p in self.trainable),
                                recipe, self.resumed_from)


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics rows after ``step`` (written before an interruption, redone on resume)."""
    if not path.is_file():
        return
    rows, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn += 1  # a line cut short by a crash while it was being appended
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            rows.append(line)
    if torn:
        print(f"{path}: dropped {torn} unreadable line(s) (cut short by an earlier crash)", file=sys.stderr)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(row + "\n" for row in rows))
    os.replace(tmp, path)


def sources(specs: list[DataSpec]) -> list[DataSource]:
    out = []
    for spec in specs:
        if isinstance(spec, str):
            out.append(parse_source(spec))
            continue
        try:
            out.append(DataSource(**spec))
        except TypeError:
            names = [f.name for f in dataclasses.fields(DataSource)]
            raise UpcycleError(f"data entry {spec} has unknown keys: use {', '.join(names)}") from None
    return out


def trackers(report_to: str) -> list[str]:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    wanted = [t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"]
    if wanted == ["auto"]:
        return ["tensorboard"] if is_tensorboard_available() else []
    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    for name in wanted:
        if name not in available:
            raise UpcycleError(f"report_to {name!r} is not one of auto, none, tensorboard, wandb")
        if not available[name]:
            raise UpcycleError(f"report_to {name} needs the {name} package: pip install {name}")
    return wanted


def make_accelerator(config: TrainConfig, run: Path) -> Accelerator:
    mixed = "bf16" if config.bf16 and torch.cuda.is_available() else "no"
    project = ProjectConfiguration(project_dir=str(run), logging_dir=str(run / "logs"))
    acc = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=config.grad_accum,
                      log_with=trackers(config.report_to) or None, project_config=project)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    return acc


def load_tokenizer(folder: Path):
    """The model folder's tokenizer; a one-line error when it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise UpcycleError(f"{folder} has no usable tokenizer ({str(error).splitlines()[0].strip()}): copy the "
                           "tokenizer files (tokenizer.json, tokenizer_config.json) of its dense source into it") from None
    if tokenizer.eos_token_id is None:
        raise UpcycleError(f"the tokenizer in {folder} has no EOS token, which packing puts between documents: "
                           "set eos_token in its tokenizer_config.json")
    return tokenizer


def open_session(config: TrainConfig, folder: Path, run: RunFolder, checkpoint: Path | None,
                 progress: bool = True) -> Session:
    """Load data and model, choose what trains, restore ``checkpoint``, prepare the run folder."""
    acc = make_accelerator(config, run.path)
    tokenizer = load_tokenizer(folder)
    stream, eval_blocks = build_data(sources(config.data), tokenizer, config.seq_len,
                                     eval_sources=sources(config.eval_data) or None, eval_blocks=config.eval_blocks,
                                     seed=config.seed, streaming=config.streaming)
    set_seed(config.seed)
    model = load_model(folder, dtype=torch.float32)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if config.compile:
        for module in model.modules():
            if isinstance(module, CausalCDMoE):
                module.compile()  # in place: parameter names and state dicts stay as they are
    router = RouterLogits(model) if config.balance_coef > 0 and model.config.is_moe else None
    model = select_trainable(model, config)
    if acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        model = model.to(acc.device)  # the set-up passes below run where training will, fresh or resumed
    experts = config.train.startswith("experts")
    saved_slots = slots_path(checkpoint.parent) if checkpoint is not None else None
    fit = checkpoint is None and config.expert_init == "data" and experts
    pick = config.slot_fraction < 1 and experts and not (saved_slots is not None and saved_slots.is_file())
    # the routed layers' inputs on the next training blocks, read once for the key fit and the slot choice
    train_states = (layer_inputs(model, stream.peek(init_blocks_needed(config.seq_len)), MAX_STATES, config.seed)[0]
                    if fit or pick else None)
    if fit:
        fit_from_states(model, train_states, config.seed)
    retain_blocks = load_retain_blocks(config, model, tokenizer, checkpoint, acc, progress)
    retain = None
    if retain_blocks is not None and config.retain_coef > 0 and config.train.startswith("experts"):
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise UpcycleError("the retain penalty evaluates expert tables outside the sharded forward, which "
                               "FSDP/DeepSpeed do not allow: use DDP, or pass --retain-coef 0")
        retain = build_penalty(model, retain_blocks, config.retain_coef, config.retain_tokens, config.seed)
    slots = None
    if config.slot_fraction < 1 and experts:
        slots = (choose_slots(config, model, train_states, retain, retain_blocks, acc) if pick
                 else masks_from_tensors(load_tensors(saved_slots)))  # a resume trains the same experts
        freeze_unselected(cdmoe_layers(model), slots)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    if config.expert_optimizer != "adamw" and acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UpcycleError(f"--expert-optimizer {config.expert_optimizer} keeps one moment per table row and needs "
                           "whole tables, which FSDP/DeepSpeed shard: use DDP, or pass --expert-optimizer adamw")
    trainable = trainable_parameters(model)
    plain_names = [n for n in trainable if "lora_" not in n]
    optimizer = build_optimizer(model, config)
    optimizer_state = read_optimizer(checkpoint, acc) if checkpoint is not None else None  # before any write
    acc.wait_for_everyone()  # every process has checked RUN before the main one writes there
    if acc.is_main_process:
        if checkpoint is None:
            run.clear()
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(config, run.path / "config.yaml")
        if retain_blocks is not None and not config.retain_data:
            save_tensors({"input_ids": retain_blocks}, retain_blocks_path(run.path))
            run.record(retain_blocks_path(run.path))
        if slots is not None:
            save_tensors(masks_to_tensors(slots), slots_path(run.path))
            run.record(slots_path(run.path))
        (run.path / "metrics.jsonl").touch()
        run.record(run.path / "config.yaml", run.path / "metrics.jsonl")
    acc.wait_for_everyone()
    model, optimizer = acc.prepare(model, optimizer)
    session = Session(config, folder, run, acc, model, optimizer, WarmupStableDecay.from_config(config), stream, eval_blocks,
                      list(trainable.values()), plain_names, router, retain,
                      None if retain_blocks is None else retain_blocks[: config.eval_blocks])
    if checkpoint is not None:
        session.load_state(checkpoint, optimizer_state)
    hparams = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in
               dataclasses.asdict(config).items()}
    acc.init_trackers("upcycle", config=hparams)
    return session


def read_optimizer(checkpoint: Path, acc: Accelerator) -> dict:
    """This process's optimizer state file, loaded with ``weights_only=True`` (nothing is unpickled)."""
    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    return load_torch_state(checkpoint / (f"optimizer-{acc.process_index}.pt" if sharded else "optimizer.pt"))


def load_retain_blocks(config: TrainConfig, model: torch.nn.Module, tokenizer, checkpoint: Path | None,
                       acc: Accelerator, progress: bool) -> torch.Tensor | None:
    """Retain blocks: from ``retain_data``, else sampled from the base model (reused on resume); ``None`` if off."""
    wanted = config.retain_data or (config.retain_samples > 0 and model.config.is_moe
                                    and config.train.startswith("experts"))
    if not wanted:
        return None
    n = blocks_needed(config.seq_len, config.retain_tokens, config.retain_samples)
    if config.retain_data:
        return build_retain(sources(config.retain_data), tokenizer, config.seq_len, n, config.seed)
    saved = checkpoint.parent / retain_blocks_path(Path()).name if checkpoint is not None else None
    if saved is not None and saved.is_file():
        return load_tensors(saved)["input_ids"]
    blocks = synthesize(model, tokenizer, n, config.seq_len, config.seed,
                        progress=progress and acc.is_main_process)
    if acc.num_processes > 1:  # every process penalizes the same tokens: sample once, on the main process
        from accelerate.utils import broadcast

        blocks = broadcast(blocks.to(acc.device), from_process=0).cpu()
    return blocks


def choose_slots(config: TrainConfig, model: torch.nn.Module, train_states: list[torch.Tensor],
                 retain: RetainPenalty | None, retain_blocks: torch.Tensor | None,
                 acc: Accelerator) -> list[torch.Tensor]:
    """The experts that train, per routed layer, ranked against the retain states (the penalty's pool when there is
    one); the main process's choice on every process."""
    retain_states = (retain.states if retain is not None else None if retain_blocks is None
                     else layer_inputs(model, retain_blocks, MAX_STATES, config.seed)[0])
    masks = select_slots(cdmoe_layers(model), train_states, retain_states, config.slot_fraction)
    if acc.num_processes > 1:  # ties could break differently across processes: use the main one's
        from accelerate.utils import broadcast

        stacked = broadcast(torch.stack(masks).to(acc.device, torch.uint8), from_process=0).cpu()
        masks = list(stacked.bool())
    return masks


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Copy the checkpoint's trainable tensors (and LoRA adapter) into the model, before ``prepare``."""
    params = {base_name(n): p for n, p in model.named_parameters()}
    plain = checkpoint / "trainable.safetensors"
    for name, tensor in (load_tensors(plain) if plain.is_file() else {}).items():
        if name not in params:
            raise UpcycleError(f"{plain} holds {name}, which the model lacks: resume with the same MODEL")
        with torch.no_grad():
            params[name].copy_(tensor)
    adapter = checkpoint / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_tensors(adapter))
