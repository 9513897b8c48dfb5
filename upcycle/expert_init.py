"""Data-driven init of a fresh graft's router keys and ``down_embed`` (``--expert-init data``).

A fresh graft routes by random keys: on real text a few experts take most picks (the shipped
model's layer 0 uses 465 of 1024 at init). Here each product-key half is fitted to the layer's
inputs on training text instead, by spherical k-means of the centred inputs: the first half's keys
are the centroids, the second half's the centroids of what the first leaves over (residual
quantization), so the pairs ``(i, j)`` tile the data. Expert ``(i, j)``'s ``down_embed`` row points
along its cell. Keys and rows keep the random init's scale (the root-mean-square logit and
expert score over the data are matched), and are made orthogonal to the inputs' mean, so they
score the centred input. ``up_embed`` stays zero: the model still computes the dense model exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.retain import cdmoe_layers, layer_inputs

KMEANS_ITERS = 20
MAX_STATES = 16384  # inputs per layer the k-means sees (tokens of training text read)


def spherical_kmeans(points: torch.Tensor, k: int, generator: torch.Generator,
                     iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit centroids ``(k, d)`` and assignments ``(n,)`` of unit rows ``points`` by cosine k-means."""
    n = points.shape[0]
    centers = [points[torch.randint(n, (1,), generator=generator)].squeeze(0)]
    closest = (points @ centers[0]).clamp(max=1)
    for _ in range(1, k):  # k-means++ seeding: far from the chosen centroids, by cosine distance
        weights = (1 - closest).clamp(min=0) + 1e-12
        centers.append(points[torch.multinomial(weights, 1, generator=generator)].squeeze(0))
        closest = torch.maximum(closest, points @ centers[-1])
    centers = torch.stack(centers)
    for _ in range(iters):
        assign = (points @ centers.T).argmax(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, points)
        empty = sums.norm(dim=1) == 0
        if empty.any():  # re-seed an empty cluster at the point worst served by its centroid
            worst = (points * centers[assign]).sum(1).argsort()[: int(empty.sum())]
            sums[empty] = points[worst]
        centers = F.normalize(sums, dim=1)
    return centers, (points @ centers.T).argmax(1)


def _orthogonal(rows: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(direction, dim=0)
    return F.normalize(rows - (rows @ unit)[:, None] * unit, dim=1)


SPREAD = 1e-3  # inputs whose spread around their mean is below this fraction of their norm: nothing to fit


def fitted_tables(states: torch.Tensor, num_keys: int, std: float, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Router weight ``(2 * num_keys, h)`` and ``down_embed`` ``(num_keys ** 2, h)`` fitted to ``states``, or
    ``None`` when they are too few (under ``2 * num_keys``) or (nearly) all equal."""
    generator = torch.Generator().manual_seed(seed)
    states = states.double()
    mean = states.mean(0)
    if states.shape[0] < 2 * num_keys:
        return None  # fewer inputs than a k-means of num_keys clusters can use
    if (states - mean).norm(dim=1).pow(2).mean().sqrt() <= SPREAD * states.norm(dim=1).pow(2).mean().sqrt():
        return None
    points = F.normalize(states - mean, dim=1)
    first, assign = spherical_kmeans(points, num_keys, generator)
    rest = points - (points * first[assign]).sum(1, keepdim=True) * first[assign]
    second, _ = spherical_kmeans(F.normalize(rest, dim=1), num_keys, generator)
    keys = _orthogonal(torch.cat([first, second]), mean)
    down = _orthogonal((first[:, None, :] + second[None, :, :]).reshape(-1, states.shape[1]), mean)
    # the random init's scale: std per entry, so a logit or score of root-mean-square std * rms(|x|)
    target = std * states.norm(dim=1).pow(2).mean().sqrt()
    keys = keys * target / (states @ keys.T).pow(2).mean().sqrt()
    sample = states[torch.randperm(states.shape[0], generator=generator)[:4096]]
    down = down * target / (sample @ down.T).pow(2).mean().sqrt()
    return keys.float(), down.float()


@torch.no_grad()
def fit_from_states(model: nn.Module, states: list[torch.Tensor], seed: int) -> int:
    """Fit the keys and ``down_embed`` of every routed layer whose ``up_embed`` is zero, from ``states`` (the inputs
    of every routed layer, as :func:`upcycle.retain.layer_inputs` returns them); returns how many were fitted (a
    layer with too few or nearly equal inputs keeps its keys)."""
    std, fitted = model.config.initializer_range, 0
    for index, (layer, inputs) in enumerate(zip(cdmoe_layers(model), states)):
        if layer.up_embed.weight.any():
            continue  # its experts already learned
        tables = fitted_tables(inputs, layer.num_keys, std, seed * 1_000_003 + index)
        if tables is not None:
            layer.router_gate.weight.copy_(tables[0])
            layer.down_embed.weight.copy_(tables[1])
            fitted += 1
    return fitted


def init_from_data(model: nn.Module, blocks: torch.LongTensor, seed: int) -> int:
    """:func:`fit_from_states` on the layer inputs of up to ``MAX_STATES`` positions of ``blocks``."""
    return fit_from_states(model, layer_inputs(model, blocks, min(blocks.numel(), MAX_STATES), seed)[0], seed)


def init_blocks_needed(seq_len: int) -> int:
    """Blocks of training text to fit on: about ``MAX_STATES`` tokens, at least 4 blocks."""
    return max(4, math.ceil(MAX_STATES / seq_len))
