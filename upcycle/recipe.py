"""Training recipes: :class:`TrainConfig` is the single source of keys and defaults.

A recipe is a YAML mapping of ``TrainConfig`` keys; command-line flags override it
and the resolved config is saved as ``RUN/config.yaml``. ``data``/``eval_data``
entries are ``"PATH[:WEIGHT]"`` strings or mappings of :class:`upcycle.data.DataSource`
fields (``path``, ``weight``, ``text_field``, ``split``, ``name``).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from upcycle.errors import UpcycleError

TRAIN_MODES = ("experts", "experts+lora", "lora", "all")
DECAY_SHAPES = ("linear", "cosine")
DataSpec = str | dict[str, Any]


@dataclass
class TrainConfig:
    """Every setting of ``upcycle continue-train`` (recipe keys and flags)."""

    model: str = ""  # MODEL: an upcycled (or, for lora/all, dense) checkpoint folder or Hub id
    data: list[DataSpec] = field(default_factory=list)  # training sources, "PATH[:WEIGHT]" or mappings
    eval_data: list[DataSpec] = field(default_factory=list)  # held-out sources; empty: a split of data
    retain_data: list[DataSpec] = field(default_factory=list)  # text the model knows and must not forget
    output_dir: str | None = None  # RUN folder; default runs/<model name>-<train>
    train: str = "experts"  # experts | experts+lora | lora | all
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # blocks per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    seq_len: int = 2048  # tokens per block
    lr: float = 1e-3  # peak (stable-stage) learning rate
    min_lr_ratio: float = 0.0  # lr at the end of the decay, as a fraction of lr
    warmup: float = 0.01  # fraction of max_steps spent warming up linearly
    decay: float = 0.1  # fraction of max_steps (the last ones) spent decaying
    decay_shape: str = "linear"  # linear | cosine
    weight_decay: float = 0.01  # AdamW decoupled weight decay (matrices only)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0  # gradient-norm clip; 0 disables
    balance_coef: float = 0.0  # router load-balancing loss coefficient; 0 disables
    retain_coef: float = 1e-3  # expert-off penalty on retain tokens (experts modes); 0 disables
    retain_tokens: int = 1024  # retain tokens per layer per step for the penalty
    retain_samples: int = 64  # blocks sampled from the dense model when no retain_data is given; 0: none
    expert_lr_scale: float = 1.0  # lr of down_embed/up_embed relative to lr (router keeps lr)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = False
    bf16: bool = True  # bf16 autocast on GPU; CPU always trains in fp32
    streaming: bool = False  # stream Hub datasets instead of downloading them whole
    eval_every: int = 200  # steps between eval-loss measurements; 0: only at start and end
    eval_blocks: int = 32  # held-out blocks of seq_len tokens
    save_every: int = 500  # steps between checkpoints; 0: only on interrupt
    keep_checkpoints: int = 0  # keep only the newest N checkpoints; 0 keeps all
    log_every: int = 1  # steps between metrics.jsonl rows
    report_to: str = "auto"  # auto (tensorboard when installed) | none | tensorboard | wandb | "tensorboard,wandb"
    seed: int = 0

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
    for key in ("max_steps", "batch_size", "grad_accum", "eval_blocks", "log_every", "lora_r"):
        if getattr(config, key) < 1:
            raise UpcycleError(f"{key} must be at least 1, got {getattr(config, key)}")
    if config.seq_len < 2:
        raise UpcycleError(f"--seq-len must be at least 2, got {config.seq_len}")
    for key in ("eval_every", "save_every", "keep_checkpoints"):
        if getattr(config, key) < 0:
            raise UpcycleError(f"{key} must be 0 or more, got {getattr(config, key)}")
    if not config.lr > 0:
        raise UpcycleError(f"--lr must be positive, got {config.lr}")
    if not (0 <= config.warmup <= 1 and 0 <= config.decay <= 1 and config.warmup + config.decay <= 1):
        raise UpcycleError(f"warmup ({config.warmup}) and decay ({config.decay}) are fractions of max_steps "
                           "and must add up to at most 1")


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config (every key) as YAML."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
