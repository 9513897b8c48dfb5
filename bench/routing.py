"""Measure causality of stock ``DogeCDMoE`` routing against upcycle's ``CausalCDMoE``.

Same weights in both (a tiny random Doge with non-zero experts). Two numbers each:
how much earlier positions' logits move when only the last token changes, and how far
a full forward is from token-by-token decoding with the KV cache. Both are 0 (up to
float rounding) for a causal model.

    python bench/routing.py
"""

from __future__ import annotations

import torch
from transformers import DogeConfig, DogeForCausalLM

from upcycle.modeling_upcycle_doge import UpcycleDogeForCausalLM


def build(cls, seed: int = 0):
    config = DogeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, is_moe=True, num_experts=64,
                        num_experts_per_tok=4, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = UpcycleDogeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_embed.weight.normal_(0, 0.5)
    if cls is UpcycleDogeForCausalLM:
        return model.eval()
    stock = DogeForCausalLM(config)
    stock.load_state_dict(model.state_dict())
    return stock.eval()


@torch.no_grad()
def measure(model, ids: torch.Tensor) -> tuple[float, float]:
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 512
    full = model(ids).logits
    later_token = (full[:, :-1] - model(changed).logits[:, :-1]).abs().max().item()
    out = model(ids[:, :1], use_cache=True)
    steps = [out.logits]
    for t in range(1, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    decode = (torch.cat(steps, 1) - full).abs().max().item()
    return later_token, decode


def main() -> None:
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    print("| module | max change of earlier logits when only the last token changes | full forward vs cached decoding |")
    print("|---|---|---|")
    for name, cls in (("transformers DogeCDMoE", DogeForCausalLM), ("upcycle CausalCDMoE", UpcycleDogeForCausalLM)):
        later, decode = measure(build(cls), ids)
        print(f"| {name} | {later:.3g} | {decode:.3g} |")


if __name__ == "__main__":
    main()
