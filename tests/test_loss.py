"""The one-pass next-token loss equals transformers' causal-LM loss, value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from upcycle import loss as loss_module
from upcycle.loss import next_token_loss


def stock(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("batch, seq, vocab, chunk", [(2, 7, 11, 2048), (3, 16, 300, 5), (1, 2, 4, 1)])
def test_value_and_gradient_equal_cross_entropy(batch, seq, vocab, chunk, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", chunk)
    torch.manual_seed(0)
    logits = (3 * torch.randn(batch, seq, vocab)).requires_grad_()
    ids = torch.randint(0, vocab, (batch, seq))
    ours = next_token_loss(logits, ids)
    (grad_ours,) = torch.autograd.grad(2.5 * ours, logits)
    want = stock(logits, ids)
    (grad_want,) = torch.autograd.grad(2.5 * want, logits)
    assert torch.allclose(ours, want, atol=1e-6, rtol=1e-6)
    assert torch.allclose(grad_ours, grad_want, atol=1e-7, rtol=1e-5)
    assert grad_ours[:, -1].abs().max() == 0  # the last position has no target


def test_matches_the_models_own_loss(moe_folder):
    from upcycle.folder import load_model

    model = load_model(moe_folder, dtype=torch.float32)
    ids = torch.randint(3, 500, (2, 24))
    out = model(input_ids=ids, labels=ids)
    assert torch.allclose(next_token_loss(out.logits, ids), out.loss, atol=1e-6)


def test_bfloat16_logits_keep_their_dtype_and_agree():
    torch.manual_seed(1)
    logits = torch.randn(2, 9, 50).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, 50, (2, 9))
    ours = next_token_loss(logits, ids)
    (grad,) = torch.autograd.grad(ours, logits)
    assert grad.dtype == torch.bfloat16
    want = stock(logits.detach().float().requires_grad_(), ids)
    assert abs(ours.item() - want.item()) < 1e-5


def test_gradcheck_float64():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 5))
    assert torch.autograd.gradcheck(lambda x: next_token_loss(x, ids), (logits,))
