"""What trains and how: parameter selection, LoRA, AdamW, the WSD schedule, the balance loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from upcycle.modeling_upcycle_doge import ROUTED_PARAMETER_NAMES, CausalCDMoE
from upcycle.recipe import TrainConfig

EXPERT_SUFFIXES = tuple(f"mlp.{part}.weight" for part in ROUTED_PARAMETER_NAMES)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."


def is_expert(name: str) -> bool:
    return name.endswith(EXPERT_SUFFIXES)


def base_name(name: str) -> str:
    """A (possibly PEFT-wrapped) parameter name under the base model's state-dict names."""
    return name.removeprefix(PEFT_PREFIX)


def select_trainable(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Freeze all but the ``config.train`` tensors; wrap with LoRA when asked. Returns the model to train.

    ``experts`` modes need an MoE model (``train.check_model`` rejects dense ones first).
    """
    mode = config.train
    for name, param in model.named_parameters():
        param.requires_grad_(mode == "all" or (mode.startswith("experts") and is_expert(name)))
    if "lora" in mode:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        for name, param in model.named_parameters():
            if mode == "experts+lora" and is_expert(name):
                param.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable tensors only; no weight decay on vectors (norms, biases)."""
    params = list(trainable_parameters(model).values())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(config.beta1, config.beta2),
                             eps=config.eps)


class WarmupStableDecay:
    """LR factor for optimizer step ``s`` (0-based): linear warmup, flat, then linear/cosine decay."""

    def __init__(self, total: int, warmup: float, decay: float, shape: str, min_ratio: float):
        self.total = total
        self.warmup_steps = math.ceil(warmup * total)
        self.decay_steps = math.ceil(decay * total)
        self.shape = shape
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_start = self.total - self.decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / (self.decay_steps + 1))
        falloff = 1 - progress if self.shape == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_ratio + (1 - self.min_ratio) * falloff


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = WarmupStableDecay(config.max_steps, config.warmup, config.decay, config.decay_shape,
                                 config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class RouterLogits:
    """Collects each CDMoE layer's router logits ``(2, tokens, num_keys)`` during a forward."""

    def __init__(self, model: nn.Module):
        self.logits: list[torch.Tensor] = []
        self.layers = [m for m in model.modules() if isinstance(m, CausalCDMoE)]
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
