"""Sparse slot selection (``--slot-fraction``): train only the experts the new text uses far more than old text.

As in Sparse Memory Finetuning (arXiv 2510.15103), per run: each routed layer's experts are
ranked by how much more often the training text picks them than the retain text does, a smoothed
ratio of pick rates (TF-IDF-like: frequent on the new domain, rare on the old), and only the top
``slot_fraction`` of them train. The rows of the others get a zero gradient, so the rowwise optimizer
never touches them. The choice is made once, at the start of a fresh run, and saved to
``RUN/slots.safetensors``, so a resume trains the same experts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from upcycle.modeling_upcycle_doge import CausalCDMoE, route, router_logits_fp32

SLOTS_FILE = "slots.safetensors"


@torch.no_grad()
def expert_hits(layer: CausalCDMoE, states: torch.Tensor) -> torch.Tensor:
    """How often each expert of ``layer`` is picked for ``states`` ``(N, hidden)``: ``(num_experts,)`` float."""
    logits = router_logits_fp32(layer, states.to(layer.router_gate.weight.device))
    _, indices = route(logits, layer.num_keys, layer.top_k)
    return torch.bincount(indices.flatten(), minlength=layer.num_experts).float().cpu()


def select_slots(layers: list[CausalCDMoE], train_states: list[torch.Tensor],
                 retain_states: list[torch.Tensor] | None, fraction: float) -> list[torch.Tensor]:
    """Per layer, a bool mask of the ``fraction`` of experts with the highest smoothed pick-rate ratio
    (training text over retain text; the training rate alone without retain text)."""
    masks = []
    for i, layer in enumerate(layers):
        new = expert_hits(layer, train_states[i])
        score = torch.log((new + 1) / (new.sum() + new.numel()))
        if retain_states is not None:
            old = expert_hits(layer, retain_states[i])
            score = score - torch.log((old + 1) / (old.sum() + old.numel()))
        keep = max(1, round(fraction * new.numel()))
        mask = torch.zeros(new.numel(), dtype=torch.bool)
        mask[score.argsort(descending=True, stable=True)[:keep]] = True
        masks.append(mask)
    return masks


def freeze_unselected(layers: list[CausalCDMoE], masks: list[torch.Tensor]) -> None:
    """Zero the gradient rows of the experts outside ``masks`` (both tables), every step."""
    for layer, mask in zip(layers, masks):
        for table in (layer.down_embed.weight, layer.up_embed.weight):
            rows = mask.to(table.device, table.dtype)[:, None]
            table.register_hook(lambda grad, rows=rows: grad * rows.to(grad.device, grad.dtype))


def slots_path(run: Path) -> Path:
    return run / SLOTS_FILE


def masks_to_tensors(masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"layer{i}": m.to(torch.uint8) for i, m in enumerate(masks)}


def masks_from_tensors(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[f"layer{i}"].bool() for i in range(len(tensors))]
