"""Causal Cross Domain Mixture of Experts (CDMoE) for Doge models.

This single file is both part of the ``upcycle`` package and the remote code that
ships inside every model folder upcycle writes (``auto_map`` in ``config.json``).
It must therefore import nothing from ``upcycle`` itself: only torch, transformers
and (optionally) einx.

The block is transformers' ``DogeCDMoE`` with the same parameters
(``gate_proj``/``up_proj``/``down_proj`` shared expert, ``router_gate``,
``down_embed``, ``up_embed``) and one difference that matters: routing is computed
per token. The stock module reshapes the router output with
``view(2, bsz * seq_len, -1)``, which splits across tokens instead of into the two
product-key halves, so a token's experts depend on other (including later) tokens.
Here each token's logits are viewed as ``(2, num_keys)``, so routing is causal and
a full forward equals token-by-token decoding.

Top-k is exact product-key search: the best ``k`` sums ``x_i + y_j`` only use ``i``
among the top ``k`` of ``x`` and ``j`` among the top ``k`` of ``y``, so we take the
top ``k`` per half and then the top ``k`` of the ``k * k`` candidate sums.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers.models.doge.configuration_doge import DogeConfig
from transformers.utils import logging
from transformers.models.doge.modeling_doge import DogeCDMoE, DogeForCausalLM

try:  # einx is optional for remote-code users; the fallback is the same sum.
    import einx

    def _pair_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return einx.add("n i, n j -> n (i j)", x, y)

except ImportError:  # pragma: no cover - exercised only where einx is absent

    def _pair_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(-1) + y.unsqueeze(-2)).flatten(-2)


def num_keys_for(num_experts: int) -> int:
    """Product-key count per half; ``num_experts`` must be a perfect square."""
    keys = math.isqrt(num_experts)
    if keys * keys != num_experts:
        raise ValueError(f"num_experts={num_experts} is not a perfect square (try {keys * keys} or {(keys + 1) ** 2})")
    return keys


def routed_parameter_shapes(num_experts: int, hidden_size: int) -> dict[str, tuple[int, int]]:
    """The expert tensors CDMoE adds to a dense MLP: module name -> shape of its ``weight``.

    The one definition of the expert tensors (names and shapes). ``router_gate`` scores the two
    product-key halves (``2 * num_keys`` logits per token); ``down_embed`` and ``up_embed`` hold
    one ``hidden_size`` vector per expert.
    """
    num_keys = num_keys_for(num_experts)
    return {
        "router_gate": (2 * num_keys, hidden_size),
        "down_embed": (num_experts, hidden_size),
        "up_embed": (num_experts, hidden_size),
    }


ROUTED_PARAMETER_NAMES = tuple(routed_parameter_shapes(1, 1))


def routed_tensor_shapes(num_layers: int, num_experts: int, hidden_size: int) -> dict[str, tuple[int, int]]:
    """State-dict name -> shape of every expert tensor of a Doge MoE model (all ``num_layers`` layers)."""
    per_layer = routed_parameter_shapes(num_experts, hidden_size)
    return {f"model.layers.{layer}.mlp.{name}.weight": shape
            for layer in range(num_layers) for name, shape in per_layer.items()}


def is_routed_tensor(name: str) -> bool:
    """``name`` is the state-dict name of an expert tensor (``...mlp.<router_gate|down_embed|up_embed>.weight``)."""
    return name.endswith(tuple(f"mlp.{part}.weight" for part in ROUTED_PARAMETER_NAMES))


def route(
    router_logits: torch.Tensor, num_keys: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact product-key top-k for per-token logits of shape ``(N, 2, num_keys)``.

    Returns ``(scores, expert_indices)``, both ``(N, top_k)``, sorted by score.
    """
    half_k = min(top_k, num_keys)
    half_scores, half_indices = router_logits.topk(half_k, dim=-1)  # (N, 2, half_k)
    candidate_scores = _pair_sum(half_scores[:, 0], half_scores[:, 1])
    candidate_indices = _pair_sum(half_indices[:, 0] * num_keys, half_indices[:, 1])
    scores, position = candidate_scores.topk(top_k, dim=-1)
    return scores, candidate_indices.gather(-1, position)


class CausalCDMoE(DogeCDMoE):
    """``DogeCDMoE`` with per-token (causal) routing and exact product-key top-k.

    Parameters, names and shapes are those of the stock module, so state dicts
    interchange. ``forward`` returns ``(hidden_states, router_logits)`` with
    ``router_logits`` shaped ``(2, tokens, num_keys)`` like the stock module (half
    first), so transformers' load-balancing loss can consume it unchanged.
    """

    def __init__(self, config: DogeConfig, routed: bool = True):
        num_keys_for(config.num_experts)
        super().__init__(config)
        self.routed = routed  # False: the layer holds expert tensors but computes only the shared MLP

    def routed_experts(self, flat_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert term for ``(N, hidden)`` states; returns it and ``(N, 2, keys)`` logits."""
        router_logits = self.router_gate(flat_states).view(-1, 2, self.num_keys)
        scores, indices = route(router_logits, self.num_keys, self.top_k)
        routing_weights = F.softmax(scores, dim=-1, dtype=torch.float32)
        if self.norm_topk_prob:
            routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        down = F.embedding(indices, self.down_embed.weight)  # (N, k, hidden)
        expert_scores = torch.bmm(down, flat_states.unsqueeze(-1).to(down.dtype)).squeeze(-1)
        weights = (self.act_fn(expert_scores) * routing_weights).to(self.up_embed.weight.dtype)
        expert_states = F.embedding_bag(
            indices, self.up_embed.weight, per_sample_weights=weights, mode="sum"
        )
        return expert_states, router_logits

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        shared = self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        if not self.routed:
            return shared, None
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        expert_states, router_logits = self.routed_experts(flat)
        output = shared + expert_states.view(shape).to(shared.dtype)
        return output, router_logits.transpose(0, 1)


class UpcycleDogeForCausalLM(DogeForCausalLM):
    """``DogeForCausalLM`` whose MoE layers use :class:`CausalCDMoE`.

    Loads any Doge checkpoint (dense or MoE) with no missing or unexpected keys. A config key
    ``upcycle_expert_layers`` (a list of layer indices) routes experts in those layers only; the
    others hold zero experts (so stock transformers computes the same function) and skip them.
    """

    def __init__(self, config: DogeConfig):
        super().__init__(config)
        if config.is_moe:
            active = getattr(config, "upcycle_expert_layers", None)
            for index, layer in enumerate(self.model.layers):
                layer.mlp = CausalCDMoE(config, routed=active is None or index in active).to(
                    device=layer.mlp.gate_proj.weight.device, dtype=layer.mlp.gate_proj.weight.dtype
                )
            self.post_init()

    @classmethod
    def from_dense_and_adapter(cls, adapter: str, base: str | None = None, **kwargs) -> "UpcycleDogeForCausalLM":
        """Load the dense ``base`` (default: the adapter's ``base_model_name_or_path``) and attach ``adapter``.

        An expert adapter (``upcycle export --adapter-only``) is a folder with ``adapter_config.json``
        (adapter_type "upcycle-experts", base model, config overrides) and ``experts.safetensors`` (the
        new expert tensors plus any dense tensor training changed). Works without upcycle installed.
        """
        if not os.path.isdir(adapter):
            from huggingface_hub import snapshot_download

            adapter = snapshot_download(adapter)
        with open(os.path.join(adapter, "adapter_config.json")) as handle:
            meta = json.load(handle)
        if meta.get("adapter_type") != "upcycle-experts":
            raise ValueError(f"{adapter} is not an upcycle expert adapter (adapter_type {meta.get('adapter_type')!r})")
        base = base or meta["base_model_name_or_path"]
        config = DogeConfig.from_pretrained(base)
        for key, value in meta["config"].items():
            setattr(config, key, value)
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the expert tensors are missing from the dense base by design
        try:
            model = cls.from_pretrained(base, config=config, **kwargs)
        finally:
            logging.set_verbosity(verbosity)
        tensors = load_file(os.path.join(adapter, "experts.safetensors"))
        state = model.state_dict()
        expected = routed_tensor_shapes(config.num_hidden_layers, config.num_experts, config.hidden_size)
        unknown = [name for name in tensors if name not in state]
        missing = [name for name in expected if name not in tensors]
        misshaped = [name for name, shape in expected.items()
                     if name in tensors and tuple(tensors[name].shape) != shape]
        if unknown or missing or misshaped:
            raise ValueError(f"adapter {adapter} does not fit {base}: unknown {unknown[:3]}, missing {missing[:3]}, "
                             f"wrong shape {misshaped[:3]}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                state[name].copy_(tensor.to(state[name].dtype))
        return model
