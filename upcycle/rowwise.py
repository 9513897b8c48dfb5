"""A lean optimizer for huge expert tables: one second moment per row, lazy rows (``--expert-optimizer``).

Groups marked ``rowwise`` (``down_embed``/``up_embed``) keep one fp32 second moment per table row (the
mean squared gradient of the row, as FBGEMM's rowwise Adagrad/Adam for embedding tables) and, with
``momentum="bf16"``, a bf16 first moment; other groups (the router) get plain AdamW. A row whose
gradient is exactly zero in a step (no token picked it) is left untouched: no moment update, no weight
decay. A row's moments start at its first gradient instead of at zero, so no bias correction (and no
per-row step count) is needed. State: ``1 / hidden`` of the table bytes without momentum,
``0.5 + 1 / hidden`` with it (fp32 tables).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

MOMENTUM = ("none", "bf16")


class RowwiseAdamW(torch.optim.Optimizer):
    """Rowwise lazy Adam for groups with ``rowwise=True``, AdamW for the others."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: str = "none"):
        if momentum not in MOMENTUM:
            raise ValueError(f"momentum {momentum!r} is not one of {MOMENTUM}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      rowwise=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["rowwise"]:
                    self._rowwise(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _rowwise(self, p: torch.Tensor, group: dict) -> None:
        if p.ndim != 2:
            raise RuntimeError(f"the rowwise optimizer needs whole 2-D tables, got shape {tuple(p.shape)} "
                               "(sharded by FSDP/DeepSpeed?): use --expert-optimizer adamw there")
        state, (beta1, beta2), lr = self.state[p], group["betas"], group["lr"]
        if not state:
            state["row_sq"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
            if group["momentum"] == "bf16":
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
        grad = p.grad.float()
        mean_sq = grad.square().mean(1)
        rows = mean_sq.nonzero().squeeze(1)
        if not rows.numel():
            return
        row_sq = state["row_sq"]
        old_sq, new_sq = row_sq[rows], mean_sq[rows]
        fresh = old_sq == 0
        second = torch.where(fresh, new_sq, old_sq * beta2 + new_sq * (1 - beta2))
        row_sq[rows] = second
        direction = grad[rows]
        if "exp_avg" in state:
            old = state["exp_avg"][rows].float()
            direction = torch.where(fresh[:, None], direction, old * beta1 + direction * (1 - beta1))
            state["exp_avg"][rows] = direction.to(torch.bfloat16)
        weights = p[rows].float() * (1 - lr * group["weight_decay"])
        weights.addcdiv_(direction, second.sqrt().add_(group["eps"])[:, None], value=-lr)
        p[rows] = weights.to(p.dtype)

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state, (beta1, beta2), lr = self.state[p], group["betas"], group["lr"]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"].item()
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2 ** step) ** 0.5).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** step))

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``Optimizer.load_state_dict``, keeping the row moments fp32 and the momentum bf16 (the base
        class casts floating state to the parameter's dtype)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if group["rowwise"] and "row_sq" in state:
                    state["row_sq"] = state["row_sq"].float()
                    if "exp_avg" in state:
                        state["exp_avg"] = state["exp_avg"].to(torch.bfloat16)


def state_bytes(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None) -> int:
    """Bytes of optimizer state tensors (of ``params`` only, when given)."""
    wanted = None if params is None else {id(p) for p in params}
    return sum(t.numel() * t.element_size() for p, state in optimizer.state.items()
               if wanted is None or id(p) in wanted for t in state.values() if torch.is_tensor(t))
