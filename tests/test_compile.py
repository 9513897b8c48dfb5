"""``torch.compile`` traces the CDMoE expert path in one graph and computes what eager mode computes."""

from __future__ import annotations

import pytest
import torch
from test_fast_path import close, module


def frozen_dense(layer: torch.nn.Module) -> torch.nn.Module:
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(layer, name).weight.requires_grad_(False)
    return layer


def test_the_expert_path_has_no_graph_break():
    layer = frozen_dense(module(32, 256, 8, norm=True))
    explanation = torch._dynamo.explain(lambda x: layer(x)[0].sum())(torch.randn(2, 5, 32, requires_grad=True))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("norm", [False, True])
def test_compiled_forward_and_gradients_equal_eager(norm):
    torch._dynamo.reset()
    layer = frozen_dense(module(32, 256, 8, norm=norm))
    compiled = torch.compile(layer)
    gen = torch.Generator().manual_seed(0)
    x, grad = torch.randn(2, 9, 32, generator=gen), torch.randn(2, 9, 32, generator=gen)
    results = []
    for run in (layer, compiled):
        layer.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        out = run(inputs)[0]
        out.backward(grad)
        results.append([out, inputs.grad] + [getattr(layer, n).weight.grad for n in
                                             ("router_gate", "down_embed", "up_embed")])
    for got, want in zip(results[1], results[0]):
        assert want.abs().max() > 0 and close(got, want, 1e-5)
