"""Next-token cross-entropy in one pass over the logits, with a hand-written backward.

The stock path (``log_softmax`` then ``nll_loss``) writes a full log-probability tensor forward and,
backward, a zero-filled gradient for ``nll_loss`` plus another full tensor for ``log_softmax``: at a
32k vocabulary that is most of a small model's non-matmul time. Here the forward keeps only the
per-row log-sum-exp, and the backward writes ``softmax - onehot`` once, in row chunks computed in fp32
(no full fp32 copy of bf16 logits).
"""

from __future__ import annotations

import torch

IGNORE = -100
CHUNK_ROWS = 2048


class NextTokenLoss(torch.autograd.Function):
    """Mean of ``logsumexp(logits[n]) - logits[n, targets[n]]`` over rows whose target is not ignored."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != IGNORE
        safe = targets.clamp_min(0)
        compute = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=compute, device=logits.device)
        for start in range(0, logits.shape[0], CHUNK_ROWS):
            lse[start:start + CHUNK_ROWS] = torch.logsumexp(logits[start:start + CHUNK_ROWS].to(compute), dim=-1)
        picked = logits.gather(1, safe[:, None]).squeeze(1).to(compute)
        count = valid.sum().clamp_min(1)
        ctx.save_for_backward(logits, lse, safe, valid, count)
        return ((lse - picked) * valid).sum() / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse, safe, valid, count = ctx.saved_tensors
        compute = lse.dtype
        scale = valid.to(compute) * (grad.to(compute) / count)  # (N,)
        out = torch.empty_like(logits)
        in_place = logits.dtype == compute  # else each chunk is computed in fp32 and cast on the way out
        for start in range(0, logits.shape[0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            chunk = logits[rows]
            part = out[rows] if in_place else torch.empty(chunk.shape, dtype=compute, device=logits.device)
            torch.sub(chunk.to(compute), lse[rows, None], out=part)
            part.exp_().mul_(scale[rows, None])
            part[torch.arange(len(chunk), device=logits.device), safe[rows]] -= scale[rows]
            if not in_place:
                out[rows] = part
        return out, None


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of ``(B, T, V)`` logits for ``(B, T)`` ids (each position predicts the next).

    Equals transformers' causal-LM loss with ``labels=input_ids``; the last position of each row has no
    target and is ignored, so the logits are used in place (no shifted copy).
    """
    targets = torch.full_like(input_ids, IGNORE)
    targets[:, :-1] = input_ids[:, 1:]
    return NextTokenLoss.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
