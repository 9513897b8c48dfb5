"""What trains and how: parameter selection, LoRA, AdamW, the WSD schedule, the balance loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from upcycle.modeling_upcycle_doge import ROUTED_PARAMETER_NAMES, CausalCDMoE
from upcycle.errors import UpcycleError
from upcycle.recipe import TrainConfig
from upcycle.rowwise import RowwiseAdamW

EXPERT_SUFFIXES = tuple(f"mlp.{part}.weight" for part in ROUTED_PARAMETER_NAMES)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."


def is_expert(name: str) -> bool:
    return name.endswith(EXPERT_SUFFIXES)


def base_name(name: str) -> str:
    """A (possibly PEFT-wrapped) parameter name under the base model's state-dict names."""
    return name.removeprefix(PEFT_PREFIX)


def routed_expert_names(model: nn.Module) -> set[str]:
    """Parameter names of the expert tensors in layers that route (all CDMoE layers unless
    ``expand --layers`` chose some)."""
    return {f"{name}.{part}.weight" for name, module in model.named_modules()
            if isinstance(module, CausalCDMoE) and module.routed for part in ROUTED_PARAMETER_NAMES}


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant checkpoints).

    transformers also makes the embedding output require a gradient (which only reentrant checkpoints
    need); that is undone, so the backward pass still stops at the lowest layer that trains.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()


def select_trainable(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Freeze all but the ``config.train`` tensors; wrap with LoRA when asked. Returns the model to train.

    ``experts`` modes need an MoE model (``train.check_model`` rejects dense ones first).
    """
    mode = config.train
    routed = routed_expert_names(model)
    for name, param in model.named_parameters():
        param.requires_grad_(mode == "all" or (mode.startswith("experts") and name in routed))
    if "lora" in mode:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        routed = routed_expert_names(model)
        for name, param in model.named_parameters():
            if mode == "experts+lora" and name in routed:
                param.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def is_expert_table(name: str) -> bool:
    """``down_embed``/``up_embed`` (the expert tables), as opposed to the router."""
    return is_expert(name) and "router_gate" not in name


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Optimizer groups of the trainable tensors with the current config's hyper-parameters.

    Vectors (norms, biases) get no weight decay; the expert tables get ``lr * expert_lr_scale``.
    Each group carries ``base_lr``, the stable-stage lr that :func:`apply_schedule` scales, and with a
    rowwise ``--expert-optimizer`` a ``rowwise`` flag (true for the expert tables).
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in trainable_parameters(model).items():
        groups.setdefault((p.ndim >= 2, is_expert_table(name)), []).append(p)
    out = []
    for (matrix, table), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": config.weight_decay if matrix else 0.0,
                    "base_lr": config.lr * (config.expert_lr_scale if table else 1.0)})
        if config.expert_optimizer != "adamw":
            out[-1]["rowwise"] = table
    return out


def group_hyperparameters(config: TrainConfig) -> dict:
    return {"betas": (config.beta1, config.beta2), "eps": config.eps}


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of the trainable tensors only (groups from :func:`param_groups`), at the step-0 lr.

    AdamW, or with a rowwise ``--expert-optimizer`` :class:`~upcycle.rowwise.RowwiseAdamW` (rowwise
    expert tables, AdamW for the rest).
    """
    groups = param_groups(model, config)
    for group in groups:
        group["lr"] = group["base_lr"]
    if config.expert_optimizer == "adamw":
        return torch.optim.AdamW(groups, **group_hyperparameters(config))
    momentum = "bf16" if config.expert_optimizer == "rowwise-bf16" else "none"
    return RowwiseAdamW(groups, momentum=momentum, **group_hyperparameters(config))


def adopt_hyperparameters(optimizer: torch.optim.Optimizer, model: nn.Module, config: TrainConfig) -> None:
    """After loading a saved optimizer state: keep its moments, take every hyper-parameter from ``config``.

    ``load_state_dict`` restores the saved run's lr, weight decay, betas and eps; a resumed run
    must follow the plan it is given now.
    """
    fresh = param_groups(model, config)
    if len(fresh) != len(optimizer.param_groups):
        raise UpcycleError("the checkpoint's optimizer has other parameter groups than this run "
                           f"({len(optimizer.param_groups)} vs {len(fresh)}): resume with the same --train, "
                           "--weight-decay sign and expert lr setting, or start a new run")
    for group, new in zip(optimizer.param_groups, fresh):
        if group.get("rowwise", False) != new.get("rowwise", False):
            raise UpcycleError("the checkpoint's optimizer state is for another --expert-optimizer than "
                               f"{config.expert_optimizer}: resume with the one it was trained with")
        group.update({"weight_decay": new["weight_decay"], "base_lr": new["base_lr"],
                      **group_hyperparameters(config)})
        group.pop("initial_lr", None)


class WarmupStableDecay:
    """LR factor for optimizer step ``s`` (0-based): linear warmup, flat, then linear/cosine decay."""

    def __init__(self, total: int, warmup: float, decay: float, shape: str, min_ratio: float):
        self.total = total
        self.warmup_steps = math.ceil(warmup * total)
        self.decay_steps = math.ceil(decay * total)
        self.shape = shape
        self.min_ratio = min_ratio

    @classmethod
    def from_config(cls, config: TrainConfig) -> "WarmupStableDecay":
        return cls(config.max_steps, config.warmup, config.decay, config.decay_shape, config.min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_start = self.total - self.decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / (self.decay_steps + 1))
        falloff = 1 - progress if self.shape == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_ratio + (1 - self.min_ratio) * falloff


def apply_schedule(optimizer: torch.optim.Optimizer, schedule: WarmupStableDecay, step: int) -> float:
    """Set every group's lr for optimizer step ``step`` (0-based) from the schedule; returns the factor.

    The lr is a pure function of the step and the current config, so nothing about the schedule is
    saved in checkpoints: a resumed run with a new --max-steps, --lr, --warmup or --decay follows
    the new plan from the step it resumes at.
    """
    factor = schedule(step)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return factor


class RouterLogits:
    """Collects each CDMoE layer's router logits ``(2, tokens, num_keys)`` during a forward."""

    def __init__(self, model: nn.Module):
        self.logits: list[torch.Tensor] = []
        self.layers = [m for m in model.modules() if isinstance(m, CausalCDMoE) and m.routed]
        self.handles = [m.register_forward_hook(self.hook) for m in self.layers]

    def hook(self, module: nn.Module, args, output) -> None:
        self.logits.append(output[1])

    def balance_loss(self) -> torch.Tensor:
        """Switch-style balance loss per product-key half: ``K * sum_i f_i * P_i``, 1.0 when uniform.

        ``f_i`` is the share of the half's top-k picks that chose key ``i``, ``P_i`` the mean router
        probability of key ``i``. Costs tokens x num_keys, not tokens x num_experts; balanced halves
        spread tokens over the num_keys**2 experts.
        """
        top_k = self.layers[0].top_k
        losses = []
        for logits in self.logits:
            logits = logits.float()
            keys = logits.shape[-1]
            k = min(top_k, keys)
            picks = logits.topk(k, dim=-1).indices.flatten(1)  # (2, tokens * k)
            share = torch.zeros(2, keys, device=logits.device).scatter_add_(
                1, picks, torch.ones_like(picks, dtype=torch.float32)) / picks.shape[1]
            probability = logits.softmax(dim=-1).mean(dim=1)  # (2, keys)
            losses.append(keys * (share * probability).sum(dim=-1).mean())
        self.logits.clear()
        return torch.stack(losses).mean()
