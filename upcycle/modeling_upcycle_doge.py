"""Causal Cross Domain Mixture of Experts (CDMoE) for Doge models.

This single file is both part of the ``upcycle`` package and the remote code that
ships inside every model folder upcycle writes (``auto_map`` in ``config.json``).
It must therefore import nothing from ``upcycle`` itself: only torch and transformers.

The block is transformers' ``DogeCDMoE`` with the same parameters
(``gate_proj``/``up_proj``/``down_proj`` shared expert, ``router_gate``,
``down_embed``, ``up_embed``) and one difference that matters: routing is computed
per token. The stock module reshapes the router output with
``view(2, bsz * seq_len, -1)``, which splits across tokens instead of into the two
product-key halves, so a token's experts depend on other (including later) tokens.
Here each token's logits are viewed as ``(2, num_keys)``, so routing is causal and
a full forward equals token-by-token decoding.

Top-k is exact product-key search: the best ``k`` sums ``x_i + y_j`` only use ``i``
among the top ``k`` of ``x`` and ``j`` among the top ``k`` of ``y``, and only rank pairs
with ``(rank_i + 1) * (rank_j + 1) <= k`` (:func:`candidate_pairs`), so we take the top
``k`` per half and then the top ``k`` of about ``k ln k`` candidate sums.

The expert term runs through two small autograd functions (:class:`RowDot`, :class:`RowMix`) that
never build or keep the gathered ``(tokens, k, hidden)`` rows: scores are one sampled dense-dense
product, or gathered and reduced in cache-sized token chunks (:func:`row_dots`), the mix is
``embedding_bag``, and the table gradients are one sparse-dense product each (:func:`scatter_rows`).
:func:`reference_routed_experts` is the straightforward version the tests compare against. The
router (logits and top-k) runs in fp32 even under autocast. With ``UPCYCLE_TRITON=1`` and Triton
installed, the three primitives run as Triton kernels on CUDA (see "Triton kernels" below), and under
``torch.compile`` the whole path traces in one graph.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers.models.doge.configuration_doge import DogeConfig
from transformers.utils import logging
from transformers.models.doge.modeling_doge import DogeCDMoE, DogeForCausalLM

try:  # optional GPU kernels for the expert path (see "Triton kernels" below); PyTorch is the fallback
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


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


def candidate_pairs(half_k: int, top_k: int, device: torch.device | str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs ``(i, j)`` (0-based, each half sorted by score) that can be among the best ``top_k`` sums.

    A pair is beaten or tied by the ``(i + 1) * (j + 1) - 1`` pairs of lower ranks in both halves,
    so only pairs with ``(i + 1) * (j + 1) <= top_k`` are needed: about ``top_k * ln(top_k)``, not ``top_k ** 2``.
    """
    device = torch.device(device if device is not None else "cpu")
    return (_candidate_tensors.__wrapped__ if compiling() else _candidate_tensors)(half_k, top_k, device)


@functools.lru_cache(maxsize=64)
def _candidate_tensors(half_k: int, top_k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`candidate_pairs`, made once per shape and device (read-only index tensors). Built from Python
    ints, a constant of the shapes, so ``torch.compile`` (which traces past the cache) sees no data-dependent op."""
    pairs = [(i, j) for i in range(half_k) for j in range(min(half_k, top_k // (i + 1)))]
    return (torch.tensor([i for i, _ in pairs], device=device), torch.tensor([j for _, j in pairs], device=device))


def route(
    router_logits: torch.Tensor, num_keys: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact product-key top-k for per-token logits of shape ``(N, 2, num_keys)``.

    Returns ``(scores, expert_indices)``, both ``(N, top_k)``, sorted by score. The search runs without
    autograd; the scores are then gathered from the logits, so their gradient is two ``(N, top_k)`` scatters.
    """
    half_k = min(top_k, num_keys)
    with torch.no_grad():
        half_scores, half_indices = router_logits.topk(half_k, dim=-1)  # (N, 2, half_k), sorted
        rows, cols = candidate_pairs(half_k, top_k, router_logits.device)
        candidate_scores = half_scores[:, 0, rows] + half_scores[:, 1, cols]
        position = candidate_scores.topk(top_k, dim=-1).indices
        first = half_indices[:, 0].gather(-1, rows[position])
        second = half_indices[:, 1].gather(-1, cols[position])
    scores = router_logits[:, 0].gather(-1, first) + router_logits[:, 1].gather(-1, second)
    return scores, first * num_keys + second


def compiling() -> bool:
    """Under ``torch.compile``: the sparse CPU kernels are swapped for gathers that compile without graph breaks."""
    return torch.compiler.is_compiling()


CHUNK_ELEMENTS = 1 << 18  # gathered (tokens, k, hidden) elements per step of row_dots (and of scatter_rows off CPU)


def bags(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, k)`` indices as flat indices and each one's token (``embedding_bag``'s ``offset2bag``)."""
    n, k = indices.shape
    return indices.reshape(-1), torch.arange(n, device=indices.device).repeat_interleave(k)


def row_dots(table: torch.Tensor, indices: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``out[n, j] = table[indices[n, j]] . states[n]`` for ``(N, k)`` indices and ``(N, hidden)`` states.

    fp32/fp64 on CPU :func:`sampled_dots`, otherwise :func:`chunked_dots`; no ``(N, k, hidden)`` tensor
    either way, and neither depends on the memory alignment of ``table`` or ``states`` (BLAS dot kernels would).
    """
    states = states.to(table.dtype)
    if use_triton(table):
        return triton_row_dots(table, indices, states)
    if table.device.type == "cpu" and table.dtype in (torch.float32, torch.float64) and not compiling():
        return sampled_dots(table, indices, states)
    return chunked_dots(table, indices, states)


def chunked_dots(table: torch.Tensor, indices: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """:func:`row_dots` gathering at most ``CHUNK_ELEMENTS`` (cache-sized) at a time, then reducing."""
    n, k = indices.shape
    out = torch.empty(n, k, dtype=table.dtype, device=table.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, k * table.shape[1]))
    for start in range(0, n, chunk):
        stop = start + chunk
        rows = F.embedding(indices[start:stop], table).mul_(states[start:stop].unsqueeze(1))
        torch.sum(rows, dim=-1, out=out[start:stop])
    return out


def sampled_dots(table: torch.Tensor, indices: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """:func:`row_dots` as ``states @ table.T`` sampled at the ``(token, expert)`` pairs (``sampled_addmm``)."""
    n, k = indices.shape
    experts, order = indices.sort(dim=-1)  # CSR wants each token's columns in order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's one-time notice that sparse CSR is in beta
        pattern = torch.sparse_csr_tensor(torch.arange(0, n * k + 1, k, device=indices.device), experts.reshape(-1),
                                          states.new_zeros(n * k), (n, table.shape[0]), check_invariants=False)
    dots = torch.sparse.sampled_addmm(pattern, states, table.t(), beta=0.0).values().view(n, k)
    return torch.empty_like(dots).scatter_(1, order, dots)


def scatter_rows(indices: torch.Tensor, weights: torch.Tensor, states: torch.Tensor, num_rows: int,
                 sparse: bool | None = None) -> torch.Tensor:
    """``out[e] = sum over (n, j) with indices[n, j] == e of weights[n, j] * states[n]``, shape ``(num_rows, hidden)``.

    The table gradient of both expert products, accumulated in fp32. ``sparse`` (default: on CPU) is one
    sparse-dense product with no ``(N * k, hidden)`` intermediate; otherwise ``index_add_`` over token chunks.
    """
    n, k = indices.shape
    weights, states = weights.float(), states.float()
    if sparse is None and use_triton(states):
        return triton_scatter_rows(indices, weights, states, num_rows)
    if sparse if sparse is not None else (indices.device.type == "cpu" and not compiling()):
        flat, offset2bag = bags(indices)
        matrix = torch.sparse_coo_tensor(torch.stack([flat, offset2bag]), weights.reshape(-1), (num_rows, n),
                                         check_invariants=False)
        return torch.sparse.mm(matrix, states)
    out = torch.zeros(num_rows, states.shape[1], dtype=torch.float32, device=states.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, k * states.shape[1]))
    for start in range(0, n, chunk):
        stop = start + chunk
        rows = weights[start:stop].unsqueeze(-1) * states[start:stop].unsqueeze(1)
        out.index_add_(0, indices[start:stop].reshape(-1), rows.reshape(-1, states.shape[1]))
    return out


def row_mix(table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[n] = sum_j weights[n, j] * table[indices[n, j]]``, shape ``(N, hidden)`` (``embedding_bag``)."""
    if use_triton(table):
        return triton_row_mix(table, indices, weights.to(table.dtype))
    return F.embedding_bag(indices, table, per_sample_weights=weights.to(table.dtype), mode="sum")


# ------------------------------------------------------------------ Triton kernels (GPU, opt-in)
# The three primitives above as Triton kernels: one program per token (and hidden block), rows gathered
# straight from the table, fp32 accumulation, table gradients by atomic adds. They run when
# UPCYCLE_TRITON=1 is set and Triton is installed: on CUDA tensors, or on CPU under TRITON_INTERPRET=1
# (Triton's interpreter, which the tests use). Kernels are compiled on first use.


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the expert primitives take the Triton kernels for ``tensor`` (see the section comment)."""
    if triton is None or os.environ.get("UPCYCLE_TRITON", "0") != "1" or tensor.dtype == torch.float64:
        return False  # fp64 (gradient checks) stays on the exact PyTorch path
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dots_kernel(table, indices, states, out, K: tl.constexpr, H: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """``out[n, j] = table[indices[n, j]] . states[n]`` for token ``n = program_id(0)``."""
    n = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    rows = tl.load(indices + n * K + ks, mask=k_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        hs = start + tl.arange(0, BLOCK_H)
        h_mask = hs < H
        x = tl.load(states + n * H + hs, mask=h_mask, other=0.0).to(tl.float32)
        t = tl.load(table + rows[:, None] * H + hs[None, :], mask=k_mask[:, None] & h_mask[None, :], other=0.0)
        acc += tl.sum(t.to(tl.float32) * x[None, :], axis=1)
    tl.store(out + n * K + ks, acc.to(out.dtype.element_ty), mask=k_mask)


def _mix_kernel(table, indices, weights, out, K: tl.constexpr, H: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """``out[n, h] = sum_j weights[n, j] * table[indices[n, j], h]`` for one token and hidden block."""
    n = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = hs < H
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    rows = tl.load(indices + n * K + ks, mask=k_mask, other=0).to(tl.int64)
    w = tl.load(weights + n * K + ks, mask=k_mask, other=0.0).to(tl.float32)
    t = tl.load(table + rows[:, None] * H + hs[None, :], mask=k_mask[:, None] & h_mask[None, :], other=0.0)
    acc = tl.sum(t.to(tl.float32) * w[:, None], axis=0)
    tl.store(out + n * H + hs, acc.to(out.dtype.element_ty), mask=h_mask)


def _scatter_kernel(grad, indices, weights, states, K: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr):
    """``grad[indices[n, j], h] += weights[n, j] * states[n, h]`` (fp32 atomics) for one token and hidden block."""
    n = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = hs < H
    x = tl.load(states + n * H + hs, mask=h_mask, other=0.0).to(tl.float32)
    for j in range(K):
        row = tl.load(indices + n * K + j).to(tl.int64)
        w = tl.load(weights + n * K + j).to(tl.float32)
        tl.atomic_add(grad + row * H + hs, w * x, mask=h_mask)


_COMPILED: dict[str, dict] = {}


def triton_kernels() -> dict:
    """The jitted kernels, made once per mode (Triton reads TRITON_INTERPRET when it wraps a function)."""
    mode = os.environ.get("TRITON_INTERPRET", "0")
    if mode not in _COMPILED:
        _COMPILED[mode] = {"dots": triton.jit(_dots_kernel), "mix": triton.jit(_mix_kernel),
                           "scatter": triton.jit(_scatter_kernel)}
    return _COMPILED[mode]


def _blocks(k: int, h: int) -> tuple[int, int]:
    """Power-of-two tile sizes: all ``k`` rows at once, and a hidden block keeping the tile near 4096 elements."""
    block_k = triton.next_power_of_2(max(k, 2))
    return block_k, max(16, min(triton.next_power_of_2(h), 4096 // block_k))


def triton_row_dots(table: torch.Tensor, indices: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """:func:`row_dots` as a Triton kernel."""
    (n, k), h = indices.shape, table.shape[1]
    out = torch.empty(n, k, dtype=table.dtype, device=table.device)
    if n:
        block_k, block_h = _blocks(k, h)
        triton_kernels()["dots"][(n,)](table.contiguous(), indices.contiguous(), states.contiguous(), out, k, h,
                                       block_k, block_h)
    return out


def triton_row_mix(table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`row_mix` as a Triton kernel."""
    (n, k), h = indices.shape, table.shape[1]
    out = torch.empty(n, h, dtype=table.dtype, device=table.device)
    if n:
        block_k, block_h = _blocks(k, h)
        triton_kernels()["mix"][(n, triton.cdiv(h, block_h))](table.contiguous(), indices.contiguous(),
                                                               weights.contiguous(), out, k, h, block_k, block_h)
    return out


def triton_scatter_rows(indices: torch.Tensor, weights: torch.Tensor, states: torch.Tensor,
                        num_rows: int) -> torch.Tensor:
    """:func:`scatter_rows` as a Triton kernel (fp32 output)."""
    (n, k), h = indices.shape, states.shape[1]
    out = torch.zeros(num_rows, h, dtype=torch.float32, device=states.device)
    if n:
        block_h = max(16, min(triton.next_power_of_2(h), 1024))
        triton_kernels()["scatter"][(n, triton.cdiv(h, block_h))](out, indices.contiguous(), weights.contiguous(),
                                                                  states.contiguous(), k, h, block_h)
    return out


class RowDot(torch.autograd.Function):
    """:func:`row_dots` with a backward that keeps only the indices (and the states, shared with the router)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, indices: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table, indices, states)
        return row_dots(table, indices, states)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        table, indices, states = ctx.saved_tensors
        grad_table = grad_states = None
        if ctx.needs_input_grad[0]:
            grad_table = scatter_rows(indices, grad, states, table.shape[0]).to(table.dtype)
        if ctx.needs_input_grad[2]:
            grad_states = row_mix(table, indices, grad).to(states.dtype)
        return grad_table, None, grad_states


class RowMix(torch.autograd.Function):
    """:func:`row_mix` whose table gradient is one sparse product and whose weight gradient is :func:`row_dots`."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table, indices, weights)
        return row_mix(table, indices, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        table, indices, weights = ctx.saved_tensors
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_table = scatter_rows(indices, weights, grad, table.shape[0]).to(table.dtype)
        if ctx.needs_input_grad[2]:
            grad_weights = row_dots(table, indices, grad).to(weights.dtype)
        return grad_table, None, grad_weights


def router_logits_fp32(module: "CausalCDMoE", flat_states: torch.Tensor) -> torch.Tensor:
    """``(N, 2, num_keys)`` router logits computed in fp32 (or fp64 for fp64 states), whatever autocast says."""
    dtype = torch.promote_types(flat_states.dtype, torch.float32)
    with torch.autocast(flat_states.device.type, enabled=False):
        logits = F.linear(flat_states.to(dtype), module.router_gate.weight.to(dtype))
    return logits.view(-1, 2, module.num_keys)


def routing_weights_of(module: "CausalCDMoE", flat_states: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 router logits ``(N, 2, keys)``, expert indices ``(N, k)`` and fp32 routing weights ``(N, k)``."""
    logits = router_logits_fp32(module, flat_states)
    scores, indices = route(logits, module.num_keys, module.top_k)
    weights = F.softmax(scores, dim=-1, dtype=logits.dtype)
    if module.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, indices, weights


def reference_routed_experts(module: "CausalCDMoE", flat_states: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert term written out plainly (gather, batched dot, weighted sum): what the fast path must equal.

    Written with einx, which upcycle installs; the fast path (all a remote-code user runs) does not need it.
    """
    try:  # in a try block so that transformers' remote-code import check does not require einx
        import einx
    except ImportError as error:
        raise ImportError("reference_routed_experts needs einx: pip install einx") from error

    with torch.autocast(flat_states.device.type, enabled=False):
        router_logits, indices, routing_weights = routing_weights_of(module, flat_states)
        down = F.embedding(indices, module.down_embed.weight)  # (N, k, hidden)
        expert_scores = einx.dot("n k h, n h -> n k", down, flat_states.to(down.dtype))
        weights = (module.act_fn(expert_scores) * routing_weights).to(module.up_embed.weight.dtype)
        up = F.embedding(indices, module.up_embed.weight)
        expert_states = einx.dot("n k, n k h -> n h", weights, up)
    return expert_states, router_logits


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
        """Expert term for ``(N, hidden)`` states; returns it (tables' dtype) and fp32 ``(N, 2, keys)`` logits.

        Runs outside autocast: the router in fp32, the gathers and products in the tables' dtype.
        """
        with torch.autocast(flat_states.device.type, enabled=False):
            router_logits, indices, routing_weights = routing_weights_of(self, flat_states)
            down, up = self.down_embed.weight, self.up_embed.weight
            states = flat_states.to(down.dtype)
            if torch.is_grad_enabled():
                expert_scores = RowDot.apply(down, indices, states)
                weights = (self.act_fn(expert_scores) * routing_weights).to(up.dtype)
                expert_states = RowMix.apply(up, indices, weights)
            else:
                weights = self.act_fn(row_dots(down, indices, states)) * routing_weights
                expert_states = row_mix(up, indices, weights)
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
