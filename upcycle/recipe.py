"""Training recipes: :class:`TrainConfig` is the single source of keys and defaults.

A recipe is a YAML mapping of ``TrainConfig`` keys; command-line flags override it
and the resolved config is saved as ``RUN/config.yaml``. ``data``/``eval_data``
entries are ``"PATH[:WEIGHT]"`` strings or mappings of :class:`upcycle.data.DataSource`
fields (``path``, ``weight``, ``text_field``, ``split``, ``name``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from upcycle.errors import UpcycleError

TRAIN_MODES = ("experts", "experts+lora", "lora", "all")
# measured on bench/frontier.py (bench/RESULTS.md): experts-only gains most at 1e-2
DEFAULT_LR = {"experts": 1e-2, "experts+lora": 1e-2, "lora": 1e-3, "all": 1e-4}
DECAY_SHAPES = ("linear", "cosine")
EXPERT_OPTIMIZERS = ("adamw", "rowwise", "rowwise-bf16")
EXPERT_INITS = ("graft", "data")
DataSpec = str | dict[str, Any]


@dataclass
class TrainConfig:
    """Every setting of ``upcycle continue-train`` (recipe keys and flags)."""

    model: str = field(default="", metadata={
        "help": "MODEL: an upcycled (or, for lora and all, dense) checkpoint folder or Hub id."})
    data: list[DataSpec] = field(default_factory=list, metadata={
        "help": "Training text: a file, folder or hf:org/name, optionally PATH:WEIGHT; repeat to mix sources "
                "(required: here or in the recipe)."})
    eval_data: list[DataSpec] = field(default_factory=list, metadata={
        "help": "Held-out text (same syntax as --data).  [default: a split of --data]"})
    retain_data: list[DataSpec] = field(default_factory=list, metadata={
        "help": "Text the model already knows and must not forget, for the retain penalty (same syntax as --data).  "
                "[default: --retain-samples blocks sampled from the base model]"})
    output_dir: str | None = field(default=None, metadata={"help": "Run folder.  [default: runs/MODELNAME-TRAIN]"})
    train: str = field(default="experts", metadata={"help": "What trains (lora and all also train a dense model)."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per process per micro-step."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    seq_len: int = field(default=2048, metadata={"help": "Tokens per block."})
    lr: float | None = field(default=None, metadata={
        "help": "Peak (stable-stage) learning rate.  [default: by --train: "
                + ", ".join(f"{mode} {value:g}" for mode, value in DEFAULT_LR.items()) + "]"})
    min_lr_ratio: float = field(default=0.0, metadata={
        "help": "Learning rate at the end of the decay, as a fraction of --lr."})
    warmup: float = field(default=0.01, metadata={"help": "Linear warmup, as a fraction of --max-steps."})
    decay: float = field(default=0.1, metadata={"help": "Decay over the last fraction of --max-steps."})
    decay_shape: str = field(default="linear", metadata={"help": "Shape of the decay."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay (matrices only)."})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0 disables)."})
    balance_coef: float = field(default=0.0, metadata={"help": "Router load-balancing loss coefficient (0 disables)."})
    retain_coef: float = field(default=1e-4, metadata={
        "help": "Expert-off penalty on retain tokens in the experts modes (0 disables)."})
    retain_tokens: int = field(default=256, metadata={"help": "Retain tokens per layer per step for the penalty."})
    retain_samples: int = field(default=64, metadata={
        "help": "Blocks sampled from the base model when no --retain-data is given (0: none)."})
    expert_lr_scale: float = field(default=1.0, metadata={
        "help": "Learning rate of down_embed/up_embed relative to --lr (the router keeps --lr)."})
    expert_optimizer: str = field(default="rowwise", metadata={
        "help": "Optimizer of down_embed/up_embed: adamw (dense moments, 2x the table bytes), rowwise (one second "
                "moment per row, about 1/hidden x; rows no token picked stay untouched) or rowwise-bf16 (rowwise "
                "plus a bf16 first moment, 0.5x + 1/hidden). The router and other tensors keep AdamW."})
    expert_init: str = field(default="data", metadata={
        "help": "Router keys and down_embed of a fresh graft at the first step: graft (as expand wrote them, "
                "random) or data (fitted by k-means to each layer's inputs on training text; up_embed stays zero, "
                "so the model still equals the dense one). Layers whose experts already learned keep theirs."})
    slot_fraction: float = field(default=1.0, metadata={
        "help": "Fraction of each layer's experts that train, chosen at the start of a run as those the training "
                "text picks most often relative to the retain text (sparse slot selection); the rest stay frozen. "
                "1 trains them all."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (updates are scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass (less memory, more time)."})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile each CDMoE layer in place (the expert path compiles without graph breaks; the "
                "first steps pay the compile time)."})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on GPU (CPU always trains in fp32)."})
    streaming: bool = field(default=False, metadata={"help": "Stream Hub datasets instead of downloading them whole."})
    eval_every: int = field(default=200, metadata={
        "help": "Steps between eval losses (0: only at the start and the end)."})
    eval_blocks: int = field(default=32, metadata={"help": "Held-out blocks of --seq-len tokens to evaluate."})
    save_every: int = field(default=500, metadata={"help": "Steps between checkpoints (0: only on interrupt)."})
    keep_checkpoints: int = field(default=0, metadata={"help": "Keep only the newest N checkpoints (0 keeps all)."})
    log_every: int = field(default=1, metadata={"help": "Steps between metrics.jsonl rows."})
    report_to: str = field(default="auto", metadata={
        "help": "Trackers: auto (tensorboard when installed), none, tensorboard, wandb, or a comma-separated list."})
    seed: int = field(default=0, metadata={"help": "Seed for data order, eval split and LoRA init."})

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.train, 1e-3)

    def global_batch(self, world_size: int) -> int:
        """Blocks per optimizer step."""
        return self.batch_size * self.grad_accum * world_size


KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def coerce(key: str, value: Any) -> Any:
    """Convert a YAML/flag value to the field's type, or raise naming the key."""
    kind = field_types()[key]
    try:
        if value is None:
            if type(None) in typing.get_args(kind):
                return None
            raise ValueError("null")
        optional = [a for a in typing.get_args(kind) if a is not type(None)]
        if type(None) in typing.get_args(kind) and len(optional) == 1 and optional[0] in (int, float, bool):
            kind = optional[0]  # e.g. ``lr: float | None``
        if kind is bool:
            if isinstance(value, str):
                value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[value.lower()]
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError(value)
            return int(float(value))
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typing.get_origin(kind) is list:
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(item, str | dict) for item in items):
                raise ValueError(value)
            return [os.fspath(item) if isinstance(item, os.PathLike) else item for item in items]
        return str(value)
    except (ValueError, TypeError, KeyError):
        raise UpcycleError(f"recipe key {key!r} has invalid value {value!r} (expected {kind})") from None


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a recipe YAML; unknown keys are an error that names them."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UpcycleError(f"recipe {path} does not exist: pass a YAML file (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UpcycleError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UpcycleError(f"recipe {path} must be a mapping of settings, got {type(raw).__name__}")
    check_keys(raw, f"recipe {path}")
    return raw


def check_keys(values: dict[str, Any], where: str) -> None:
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise UpcycleError(f"unknown key {unknown[0]!r} in {where}: known keys are {', '.join(KEYS)}")


def resolve_config(recipe: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe, then every override that is not ``None``."""
    values = load_recipe(recipe) if recipe else {}
    given = {k: v for k, v in overrides.items() if v is not None and not (isinstance(v, list | tuple) and not v)}
    check_keys(given, "the overrides")
    values.update(given)
    config = TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Reject settings no run could use, with the flag to fix."""
    if not config.model:
        raise UpcycleError("no MODEL given: pass an upcycled checkpoint folder (see `upcycle expand`)")
    if not config.data:
        raise UpcycleError("no training data: pass --data PATH (a file, a folder or hf:org/name)")
    if config.train not in TRAIN_MODES:
        raise UpcycleError(f"--train {config.train!r} is not one of {', '.join(TRAIN_MODES)}")
    if config.decay_shape not in DECAY_SHAPES:
        raise UpcycleError(f"decay_shape {config.decay_shape!r} is not one of {', '.join(DECAY_SHAPES)}")
    if config.expert_optimizer not in EXPERT_OPTIMIZERS:
        raise UpcycleError(f"--expert-optimizer {config.expert_optimizer!r} is not one of "
                           f"{', '.join(EXPERT_OPTIMIZERS)}")
    if config.slot_fraction < 1 and not config.expert_optimizer.startswith("rowwise"):
        raise UpcycleError(f"--slot-fraction needs a rowwise --expert-optimizer (AdamW's weight decay would still move "
                           f"the frozen experts): drop --expert-optimizer {config.expert_optimizer} or the fraction")
    if config.expert_init not in EXPERT_INITS:
        raise UpcycleError(f"--expert-init {config.expert_init!r} is not one of {', '.join(EXPERT_INITS)}")
    for key in ("max_steps", "batch_size", "grad_accum", "eval_blocks", "log_every", "lora_r"):
        if getattr(config, key) < 1:
            raise UpcycleError(f"{key} must be at least 1, got {getattr(config, key)}")
    if config.seq_len < 2:
        raise UpcycleError(f"--seq-len must be at least 2, got {config.seq_len}")
    for key in ("eval_every", "save_every", "keep_checkpoints"):
        if getattr(config, key) < 0:
            raise UpcycleError(f"{key} must be 0 or more, got {getattr(config, key)}")
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UpcycleError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    checks = {"lr": (lambda v: v > 0, "above 0"), "eps": (lambda v: v > 0, "above 0"),
              "expert_lr_scale": (lambda v: v > 0, "above 0"), "lora_alpha": (lambda v: v > 0, "above 0"),
              "weight_decay": (lambda v: v >= 0, "at least 0"), "clip": (lambda v: v >= 0, "at least 0"),
              "balance_coef": (lambda v: v >= 0, "at least 0"), "retain_coef": (lambda v: v >= 0, "at least 0"),
              "min_lr_ratio": (lambda v: 0 <= v <= 1, "between 0 and 1"),
              "slot_fraction": (lambda v: 0 < v <= 1, "above 0 and at most 1"),
              "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"), "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
              "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)")}
    for key, (ok, wanted) in checks.items():
        if not ok(getattr(config, key)):
            raise UpcycleError(f"--{key.replace('_', '-')} must be {wanted}, got {getattr(config, key)}")
    for key in ("retain_tokens", "retain_samples"):
        if getattr(config, key) < (1 if key == "retain_tokens" else 0):
            raise UpcycleError(f"--{key.replace('_', '-')} must be at least {1 if key == 'retain_tokens' else 0}, "
                               f"got {getattr(config, key)}")
    if not (0 <= config.warmup <= 1 and 0 <= config.decay <= 1 and config.warmup + config.decay <= 1):
        raise UpcycleError(f"warmup ({config.warmup}) and decay ({config.decay}) are fractions of max_steps "
                           "and must add up to at most 1")


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config (every key) as YAML."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
