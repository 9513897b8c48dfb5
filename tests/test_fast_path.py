"""The fast expert path equals the plain reference (forward and every gradient) and keeps no gathered rows."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from upcycle.modeling_upcycle_doge import (CausalCDMoE, RowDot, RowMix, chunked_dots, reference_routed_experts,
                                           row_dots, sampled_dots, scatter_rows)

SHAPES = [  # hidden, experts, per token, tokens
    (16, 16, 1, 1), (16, 16, 4, 7), (16, 256, 8, 1), (64, 64, 2, 33), (64, 64, 4, 1), (64, 256, 8, 300),
    (16, 1024, 4, 40), (64, 64, 8, 129), (16, 16, 8, 5)]  # the last: more per token than keys per half


def module(hidden: int, experts: int, k: int, norm: bool = False, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> CausalCDMoE:
    torch.manual_seed(seed)
    config = tiny_config(hidden_size=hidden, intermediate_size=2 * hidden, is_moe=True, num_experts=experts,
                         num_experts_per_tok=k, norm_topk_prob=norm)
    layer = CausalCDMoE(config)
    with torch.no_grad():
        layer.up_embed.weight.normal_(0, 0.5)
        layer.down_embed.weight.normal_(0, 0.5)
    return layer.to(dtype)


def expert_pass(layer: CausalCDMoE, x: torch.Tensor, grad: torch.Tensor, reference: bool
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Expert term and the gradients of ``<term, grad>`` for the router, both tables and the input."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.requires_grad)
    out, logits = (reference_routed_experts(layer, x) if reference else layer.routed_experts(x))
    (out.float() * grad).sum().backward()
    grads = {name: getattr(layer, name).weight.grad for name in ("router_gate", "down_embed", "up_embed")}
    grads["input"] = x.grad
    return out, grads


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return (got.float() - want.float()).abs().max().item() <= tol * max(1.0, want.float().abs().max().item())


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("hidden, experts, k, tokens", SHAPES)
def test_fast_path_equals_reference(hidden, experts, k, tokens, norm):
    layer = module(hidden, experts, k, norm)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).requires_grad_()
    grad = torch.randn(tokens, hidden, generator=gen)
    fast, fast_grads = expert_pass(layer, x, grad, reference=False)
    ref, ref_grads = expert_pass(layer, x, grad, reference=True)
    assert close(fast, ref, 1e-5)
    for name, want in ref_grads.items():
        assert want is not None and (want.abs().max() > 0 or (name == "router_gate" and k == 1)), name  # k=1: weight 1
        assert close(fast_grads[name], want, 1e-5), name


@pytest.mark.parametrize("frozen", [("router_gate",), ("down_embed", "up_embed"), ("up_embed",), ("input",),
                                    ("router_gate", "down_embed", "up_embed")])
def test_frozen_tensors_get_no_gradient_and_the_rest_match(frozen):
    layer = module(32, 64, 4)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(20, 32, generator=gen).requires_grad_("input" not in frozen)
    grad = torch.randn(20, 32, generator=gen)
    for name in frozen:
        if name != "input":
            getattr(layer, name).weight.requires_grad_(False)
    _, fast = expert_pass(layer, x, grad, reference=False)
    _, ref = expert_pass(layer, x, grad, reference=True)
    for name in fast:
        assert (fast[name] is None) == (name in frozen), name
        if name not in frozen:
            assert close(fast[name], ref[name], 1e-5), name


def test_no_grad_forward_equals_the_training_forward():
    layer = module(64, 256, 8, seed=3)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        inference, logits = layer(x)
    training, _ = layer(x)
    assert training.requires_grad and torch.equal(inference, training.detach())
    assert logits.dtype == torch.float32


def test_bfloat16_fast_path_matches_the_reference():
    layer = module(64, 256, 8, seed=4, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(50, 64, generator=gen).bfloat16().requires_grad_()
    grad = torch.randn(50, 64, generator=gen)
    fast, fast_grads = expert_pass(layer, x, grad, reference=False)
    ref, ref_grads = expert_pass(layer, x, grad, reference=True)
    assert fast.dtype == torch.bfloat16 and close(fast, ref, 2e-2)
    for name, want in ref_grads.items():
        assert fast_grads[name].dtype == torch.bfloat16
        assert close(fast_grads[name], want, 3e-2), name


def test_no_gathered_rows_are_kept_for_backward():
    """The reference keeps (tokens, k, hidden) gathers for backward; the fast path keeps (tokens, k) at most."""
    layer = module(64, 256, 8)
    x = torch.randn(100, 64).requires_grad_()
    for reference, wanted in ((True, True), (False, False)):
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            reference_routed_experts(layer, x) if reference else layer.routed_experts(x)
        gathered = 100 * 8 * 64
        assert (max(saved) >= gathered) == wanted, saved


def test_chunked_dots_and_scattered_rows_helpers():
    gen = torch.Generator().manual_seed(7)
    table, states = torch.randn(50, 16, generator=gen), torch.randn(3000, 16, generator=gen)
    indices, weights = torch.randint(0, 50, (3000, 4), generator=gen), torch.randn(3000, 4, generator=gen)
    gathered = table[indices]  # (N, k, hidden)
    for dots in (row_dots, sampled_dots, chunked_dots):
        assert torch.allclose(dots(table, indices, states), (gathered * states[:, None]).sum(-1), atol=1e-5)
    want = torch.zeros(50, 16).index_add_(0, indices.flatten(), (weights[..., None] * states[:, None]).flatten(0, 1))
    for sparse in (True, False):
        assert torch.allclose(scatter_rows(indices, weights, states, 50, sparse=sparse), want, atol=1e-4)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(8)
    table = torch.randn(9, 5, dtype=torch.float64, generator=gen).requires_grad_()
    states = torch.randn(6, 5, dtype=torch.float64, generator=gen).requires_grad_()
    weights = torch.randn(6, 3, dtype=torch.float64, generator=gen).requires_grad_()
    indices = torch.stack([torch.randperm(9, generator=gen)[:3] for _ in range(6)])
    assert torch.autograd.gradcheck(lambda t, s: RowDot.apply(t, indices, s), (table, states))
    assert torch.autograd.gradcheck(lambda t, w: RowMix.apply(t, indices, w), (table, weights))
    layer = module(8, 16, 4, norm=True, seed=9, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64, generator=gen).requires_grad_()
    params = [layer.router_gate.weight, layer.down_embed.weight, layer.up_embed.weight]

    def term(x, router, down, up):
        with torch.nn.utils.stateless._reparametrize_module(
                layer, {"router_gate.weight": router, "down_embed.weight": down, "up_embed.weight": up}):
            return layer.routed_experts(x)[0]

    assert torch.autograd.gradcheck(term, (x, *params))



def test_router_stays_fp32_under_bf16_autocast():
    """CPU bf16 autocast on fp32 layer inputs (as a Doge residual stream is): >= 99% of tokens pick the fp32
    run's experts and the expert-table gradients have cosine >= 0.99 (a bf16 router flips ~3% of the sets)."""
    from upcycle.modeling_upcycle_doge import route

    layer = module(64, 256, 8, seed=11)
    gen = torch.Generator().manual_seed(12)
    x, grad = torch.randn(1, 512, 64, generator=gen), torch.randn(1, 512, 64, generator=gen)
    runs = []
    for autocast in (False, True):
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, logits = layer(x)
        (out.float() * grad).sum().backward()
        assert logits.dtype == torch.float32
        experts = route(logits.transpose(0, 1), layer.num_keys, layer.top_k)[1].sort(-1).values
        runs.append((experts, {n: getattr(layer, n).weight.grad.flatten() for n in ("down_embed", "up_embed")}))
    (want_sets, want_grads), (got_sets, got_grads) = runs
    assert (got_sets == want_sets).all(-1).float().mean() >= 0.99
    for name, want in want_grads.items():
        assert torch.nn.functional.cosine_similarity(got_grads[name], want, dim=0) >= 0.99, name


def misaligned(tensor: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """A copy of ``tensor`` starting ``offset`` elements into a fresh buffer (as a loader's mmap may place it)."""
    buffer = torch.empty(tensor.numel() + offset, dtype=tensor.dtype)
    out = buffer[offset:].view(tensor.shape)
    out.copy_(tensor)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bits_do_not_depend_on_memory_alignment(dtype):
    """The same weights and states at other addresses give bitwise the same term and gradients."""
    layer = module(64, 256, 8, seed=13, dtype=dtype)
    gen = torch.Generator().manual_seed(14)
    x, grad = torch.randn(40, 64, generator=gen).to(dtype), torch.randn(40, 64, generator=gen)
    want, want_grads = expert_pass(layer, x.requires_grad_(), grad, reference=False)
    with torch.no_grad():
        for name in ("router_gate", "down_embed", "up_embed"):
            getattr(layer, name).weight = torch.nn.Parameter(misaligned(getattr(layer, name).weight))
    got, got_grads = expert_pass(layer, misaligned(x.detach()).requires_grad_(), misaligned(grad), reference=False)
    assert torch.equal(got, want)
    assert all(torch.equal(got_grads[name], value) for name, value in want_grads.items())
