"""The causal CDMoE: routing is per token, exact, and interchangeable with the stock module."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers.models.doge.modeling_doge import DogeCDMoE

from upcycle.modeling_upcycle_doge import (ROUTED_PARAMETER_NAMES, CausalCDMoE, UpcycleDogeForCausalLM, num_keys_for,
                                           route, routed_parameter_shapes, routed_tensor_shapes)


def moe_model(seed: int = 0, **overrides) -> UpcycleDogeForCausalLM:
    """A tiny MoE model whose experts are all non-zero (so routing matters)."""
    torch.manual_seed(seed)
    config = tiny_config(is_moe=True, num_experts=64, num_experts_per_tok=4, **overrides)
    model = UpcycleDogeForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_embed.weight.normal_(0, 0.5)
            layer.mlp.down_embed.weight.normal_(0, 0.5)
    return model


def test_later_token_never_changes_earlier_logits():
    model = moe_model()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 7) % 512
    changed_last_four = ids.clone()
    changed_last_four[:, -4:] = (ids[:, -4:] + 3) % 512
    with torch.no_grad():
        base = model(ids).logits
        assert (base[:, :-1] - model(changed).logits[:, :-1]).abs().max() <= 1e-6
        assert (base[:, :-4] - model(changed_last_four).logits[:, :-4]).abs().max() <= 1e-6
        assert (base[:, -1] - model(changed).logits[:, -1]).abs().max() > 1e-3  # the change is visible


def test_full_forward_equals_cached_decoding():
    model = moe_model(1)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :1], use_cache=True)
        steps = [out.logits]
        for t in range(1, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_batch_rows_are_independent():
    model = moe_model(2)
    ids = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = model(ids).logits
        single = torch.cat([model(ids[i : i + 1]).logits for i in range(3)])
    assert (batched - single).abs().max() <= 1e-5


@pytest.mark.parametrize("num_experts", [16, 64, 1024])
def test_expert_tensor_spec_matches_the_modules(num_experts):
    config = tiny_config(is_moe=True, num_experts=num_experts, num_experts_per_tok=4)
    module = CausalCDMoE(config)
    spec = routed_parameter_shapes(num_experts, config.hidden_size)
    assert tuple(spec) == ROUTED_PARAMETER_NAMES
    assert {name: tuple(getattr(module, name).weight.shape) for name in spec} == spec
    model = UpcycleDogeForCausalLM(config)
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    full = routed_tensor_shapes(config.num_hidden_layers, num_experts, config.hidden_size)
    assert {name: state[name] for name in full} == full
    assert {n for n in state if n.split(".")[-2] in ROUTED_PARAMETER_NAMES} == set(full)


@pytest.mark.parametrize("num_experts,top_k", [(64, 4), (64, 8), (16, 12), (1024, 8), (256, 1), (4096, 64),
                                               (16384, 64), (16384, 7)])
def test_product_key_topk_equals_brute_force(num_experts, top_k):
    keys = num_keys_for(num_experts)
    logits = torch.randn(300, 2, keys, generator=torch.Generator().manual_seed(num_experts + top_k))
    scores, indices = route(logits, keys, top_k)
    every = (logits[:, 0, :, None] + logits[:, 1, None, :]).reshape(300, -1)
    want_scores, want_indices = every.topk(top_k, dim=-1)
    assert torch.equal(indices, want_indices)
    assert torch.allclose(scores, want_scores)
    assert torch.allclose(every.gather(-1, indices), scores)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_matches_stock_module_token_by_token(norm_topk_prob):
    """On a single token the stock view is correct, so both modules must agree there."""
    config = tiny_config(is_moe=True, num_experts=64, num_experts_per_tok=4, norm_topk_prob=norm_topk_prob)
    torch.manual_seed(0)
    ours = CausalCDMoE(config)
    stock = DogeCDMoE(config)
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, config.hidden_size)
    with torch.no_grad():
        got, router_logits = ours(x)
        want = torch.stack([torch.stack([stock(x[b : b + 1, t : t + 1])[0][0, 0] for t in range(6)]) for b in range(2)])
    assert (got - want).abs().max() <= 1e-5
    assert router_logits.shape == (2, 12, 8)


def test_stock_module_is_not_causal():
    """Documents the defect our module fixes: stock routing mixes tokens (README, routing note)."""
    config = tiny_config(is_moe=True, num_experts=64, num_experts_per_tok=4)
    torch.manual_seed(0)
    stock = DogeCDMoE(config)
    with torch.no_grad():
        stock.up_embed.weight.normal_(0, 0.5)
    x = torch.randn(1, 16, config.hidden_size)
    y = x.clone()
    y[:, -1] += 1.0
    with torch.no_grad():
        diff = (stock(x)[0][:, :-1] - stock(y)[0][:, :-1]).abs().max()
    assert diff > 1e-3


def test_zero_up_embed_is_exactly_the_shared_expert_and_trainable():
    config = tiny_config(is_moe=True, num_experts=64, num_experts_per_tok=4)
    torch.manual_seed(0)
    module = CausalCDMoE(config)
    with torch.no_grad():
        module.up_embed.weight.zero_()
    x = torch.randn(2, 5, config.hidden_size)
    out, _ = module(x)
    shared = module.down_proj(module.act_fn(module.gate_proj(x)) * module.up_proj(x))
    assert torch.equal(out, shared)
    out.square().sum().backward()
    assert module.up_embed.weight.grad.abs().sum() > 0


def test_router_logits_feed_the_aux_loss():
    model = moe_model(3)
    ids = torch.randint(0, 512, (2, 12))
    out = model(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (2, 24, 8)
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0


def test_bfloat16_forward_and_backward():
    model = moe_model(4).to(torch.bfloat16).train()
    ids = torch.randint(0, 512, (2, 10))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.layers[0].mlp.up_embed.weight.grad.dtype == torch.bfloat16


def test_rejects_non_square_expert_count():
    with pytest.raises(ValueError, match="perfect square"):
        CausalCDMoE(tiny_config(is_moe=True, num_experts=1000, num_experts_per_tok=4))
