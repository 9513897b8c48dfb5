"""The retain set and the expert-off penalty: keep what the model knows while the experts learn.

Where the expert term of every CDMoE layer is zero, an upcycled model computes its base model
exactly, so forgetting on old-domain text is entirely the expert term's doing there. The
penalty targets it directly: for a pool of retain tokens, the inputs of every CDMoE layer are
recorded once from the base model (frozen, so they never change), and each step adds

    retain_coef * mean over layers of mean over sampled tokens of ||E_l(h) - E_l^base(h)||^2

where ``E_l`` is layer l's routed-expert output and ``E_l^base`` its value in the base model (zero
for a fresh graft, whose ``up_embed`` is zero). If the penalty is zero at every layer, layer inputs
equal the base model's by induction, so the whole model equals the base model on those tokens.
The cost is a routed-expert evaluation of ``retain_tokens`` states per layer: no attention and
no extra pass through the frozen network.

Retain text is the user's ``retain_data`` or, without it, blocks sampled from the base model
itself (self-synthesized rehearsal), written to ``RUN/retain.safetensors`` so a resume reuses them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from upcycle.modeling_upcycle_doge import CausalCDMoE

POOL_PER_STEP = 16  # the state pool holds this many steps' worth of retain tokens per layer
SAMPLE_LEN = 256  # tokens per self-synthesized block (capped by seq_len)


def cdmoe_layers(model: nn.Module) -> list[CausalCDMoE]:
    return [m for m in model.modules() if isinstance(m, CausalCDMoE) and m.routed]


@torch.no_grad()
def synthesize(model: nn.Module, tokenizer, n_blocks: int, seq_len: int, seed: int,
               batch_size: int = 64, progress: bool = False) -> torch.LongTensor:
    """``n_blocks`` blocks of text sampled from ``model`` (temperature 1), each started by EOS."""
    from tqdm.auto import tqdm

    length = min(seq_len, SAMPLE_LEN)
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    blocks = []
    was_training = model.training
    model.eval()
    # a fresh graft's experts are silent (zero up_embed): sample through the shared MLPs alone, faster
    silent = [m for m in cdmoe_layers(model) if not m.up_embed.weight.any()]
    if len(silent) == len(cdmoe_layers(model)):
        for layer in silent:
            layer.routed = False
    try:
        for start in tqdm(range(0, n_blocks, batch_size), desc="retain samples", disable=not progress,
                          dynamic_ncols=True):
            n = min(batch_size, n_blocks - start)
            prompt = torch.full((n, 1), tokenizer.eos_token_id, dtype=torch.long, device=device)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                                 pad_token_id=tokenizer.eos_token_id, eos_token_id=None)
            blocks.append(out[:, :length].cpu())
    finally:
        model.train(was_training)
        torch.random.set_rng_state(generator_state)
        for layer in silent:
            layer.routed = True
    return torch.cat(blocks)


@torch.no_grad()
def layer_inputs(model: nn.Module, blocks: torch.LongTensor, pool: int, seed: int,
                 batch_size: int = 8) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Inputs ``(pool, hidden)`` of every CDMoE layer at ``pool`` random retain positions, and the
    base expert term there (``None`` when it is zero everywhere, as after a fresh graft)."""
    layers = cdmoe_layers(model)
    device = next(model.parameters()).device
    captured: list[list[torch.Tensor]] = [[] for _ in layers]

    def capture(index: int):
        def hook(module, args):
            captured[index].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())
        return hook

    handles = [layer.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(blocks), batch_size):
            model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    states = [torch.cat(chunks) for chunks in captured]
    total = states[0].shape[0]
    picked = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: min(pool, total)]
    states = [s[picked].contiguous() for s in states]
    base = []
    for layer, state in zip(layers, states):
        weight = layer.up_embed.weight
        base.append(layer.routed_experts(state.to(device, weight.dtype))[0].float().cpu())
    return states, (base if any(b.abs().max() > 0 for b in base) else None)


class RetainPenalty:
    """``coef * mean_l mean_t ||E_l(h_t) - E_l^base(h_t)||^2`` over ``tokens`` sampled retain states per call."""

    def __init__(self, layers: list[CausalCDMoE], states: list[torch.Tensor], base: list[torch.Tensor] | None,
                 coef: float, tokens: int, seed: int):
        self.layers, self.states, self.base = layers, states, base
        self.coef, self.tokens, self.seed = coef, min(tokens, states[0].shape[0]), seed

    def __call__(self, step: int) -> torch.Tensor:
        """The penalty at optimizer step ``step``, the same on every micro-batch and process of the step.

        The tokens depend only on (seed, step): resume is exact, and the update does not depend on how
        the global batch is split over processes and micro-steps (the losses are averaged over them).
        """
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picked = torch.randperm(self.states[0].shape[0], generator=generator)[: self.tokens]
        weight = self.layers[0].up_embed.weight
        if self.states[0].device != weight.device:  # once, after the model moved (accelerate's prepare)
            self.states = [s.to(weight.device, weight.dtype) for s in self.states]
            self.base = None if self.base is None else [b.to(weight.device) for b in self.base]
        picked = picked.to(weight.device)
        terms = []
        for i, layer in enumerate(self.layers):
            expert = layer.routed_experts(self.states[i][picked])[0].float()
            if self.base is not None:
                expert = expert - self.base[i][picked]
            terms.append(expert.pow(2).sum(-1).mean())
        return self.coef * torch.stack(terms).mean()


def build_penalty(model: nn.Module, blocks: torch.LongTensor, coef: float, tokens: int,
                  seed: int) -> RetainPenalty:
    """Record the base model's layer inputs on ``blocks`` and return the penalty over them."""
    pool = max(tokens, POOL_PER_STEP * tokens)
    states, base = layer_inputs(model, blocks, pool, seed)
    return RetainPenalty(cdmoe_layers(model), states, base, coef, tokens, seed)


def retain_blocks_path(run: Path) -> Path:
    return run / "retain.safetensors"


def blocks_needed(seq_len: int, tokens: int, requested: int) -> int:
    """Retain blocks to read or sample: ``requested`` (``retain_samples``), at least one."""
    return max(1, requested)
