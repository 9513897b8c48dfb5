"""Routing health of the CDMoE layers on some text: experts used, balance, and how loud the experts are.

Per layer, over every token of the blocks evaluated:

- ``used``: fraction of the pool's experts picked at least once;
- ``usage_entropy``: entropy of the expert-hit histogram over ``log(num_experts)`` (1 = uniform);
- ``router_entropy``: mean entropy of a token's softmax over its ``k`` picked experts, over ``log(k)``;
- ``expert_ratio``: mean norm of the routed-expert term over the mean norm of the shared MLP's output
  (0 for a fresh graft; how far the experts have moved the layer off the dense function).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from upcycle.modeling_upcycle_doge import CausalCDMoE, route


class _Layer:
    def __init__(self, module: CausalCDMoE):
        self.module = module
        self.hits = torch.zeros(module.num_experts, dtype=torch.float64)
        self.tokens = 0
        self.router_entropy = self.expert_norm = self.shared_norm = 0.0

    def hook(self, module: CausalCDMoE, args, output) -> None:
        flat = args[0].reshape(-1, args[0].shape[-1])
        expert, logits = module.routed_experts(flat)  # one router pass: the indices come from its logits
        expert = expert.float()
        scores, indices = route(logits, module.num_keys, module.top_k)
        weights = scores.float().softmax(-1)
        shared = output[0].reshape(flat.shape).float() - expert
        self.hits += torch.bincount(indices.flatten().cpu(), minlength=module.num_experts).double()
        self.tokens += flat.shape[0]
        self.router_entropy += -(weights * weights.clamp_min(1e-12).log()).sum(-1).sum().item()
        self.expert_norm += expert.norm(dim=-1).sum().item()
        self.shared_norm += shared.norm(dim=-1).sum().item()

    def pack(self) -> torch.Tensor:
        sums = [self.tokens, self.router_entropy, self.expert_norm, self.shared_norm]
        return torch.cat([self.hits, torch.tensor(sums, dtype=torch.float64)])

    def unpack(self, packed: torch.Tensor) -> None:
        packed = packed.double().cpu()
        self.hits = packed[:-4]
        self.tokens, self.router_entropy, self.expert_norm, self.shared_norm = packed[-4:].tolist()

    def result(self) -> dict[str, float]:
        total = self.hits.sum().item()
        share = self.hits[self.hits > 0] / max(total, 1.0)
        entropy = -(share * share.log()).sum().item()
        k = max(self.module.top_k, 2)
        return {"used": (self.hits > 0).double().mean().item(),
                "usage_entropy": entropy / math.log(self.module.num_experts),
                "router_entropy": self.router_entropy / max(self.tokens, 1) / math.log(k),
                "expert_ratio": self.expert_norm / max(self.shared_norm, 1e-12)}


class RoutingStats:
    """Collects routing health while it is active (see :func:`collect`)."""

    def __init__(self, model: nn.Module):
        self.layers = [_Layer(m) for m in model.modules() if isinstance(m, CausalCDMoE) and m.routed]

    def reduce(self, sum_over_processes) -> None:
        """Sum the counts of every process (``sum_over_processes``: tensor -> tensor, e.g. accelerate's)."""
        for layer in self.layers:
            layer.unpack(sum_over_processes(layer.pack()))

    def metrics(self, prefix: str = "routing") -> dict[str, float]:
        """Flat metrics: per layer ``{prefix}/layerN/...`` and the means ``{prefix}/...``."""
        out: dict[str, float] = {}
        per_layer = [layer.result() for layer in self.layers]
        for i, values in enumerate(per_layer):
            out.update({f"{prefix}/layer{i}/{k}": v for k, v in values.items()})
        for key in per_layer[0] if per_layer else ():
            out[f"{prefix}/{key}"] = sum(v[key] for v in per_layer) / len(per_layer)
        return out


@contextmanager
def collect(model: nn.Module) -> Iterator[RoutingStats]:
    """``with collect(model) as stats: model(...)`` then ``stats.metrics()``; no-op for dense models."""
    stats = RoutingStats(model)
    handles = [layer.module.register_forward_hook(layer.hook) for layer in stats.layers]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
