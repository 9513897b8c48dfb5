"""The rowwise expert optimizer: small state, lazy rows, exact checkpoint round-trip, AdamW for the rest."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import tiny_config

from upcycle.modeling_upcycle_doge import CausalCDMoE
from upcycle.recipe import resolve_config
from upcycle.rowwise import RowwiseAdamW, state_bytes
from upcycle.trainable import build_optimizer


def layer_and_optimizer(momentum: str, seed: int = 0) -> tuple[CausalCDMoE, RowwiseAdamW]:
    torch.manual_seed(seed)
    layer = CausalCDMoE(tiny_config(is_moe=True, num_experts=256, num_experts_per_tok=4))
    with torch.no_grad():
        layer.up_embed.weight.normal_(0, 0.5)
    for name, p in layer.named_parameters():
        p.requires_grad_(name.split(".")[0] in ("router_gate", "down_embed", "up_embed"))
    groups = [{"params": [layer.router_gate.weight], "rowwise": False},
              {"params": [layer.down_embed.weight, layer.up_embed.weight], "rowwise": True}]
    return layer, RowwiseAdamW(groups, lr=1e-2, weight_decay=0.1, momentum=momentum)


def train_step(layer: CausalCDMoE, optimizer: torch.optim.Optimizer, tokens: int, seed: int) -> torch.Tensor:
    """One step on random states; returns the experts the step used."""
    x = torch.randn(1, tokens, layer.hidden_size, generator=torch.Generator().manual_seed(seed))
    out, logits = layer(x)
    out.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    from upcycle.modeling_upcycle_doge import route

    return route(logits.transpose(0, 1), layer.num_keys, layer.top_k)[1].unique()


@pytest.mark.parametrize("momentum, ratio", [("none", 0.5), ("bf16", 0.5 + 1 / 64)])
def test_state_is_small(momentum, ratio):
    layer, optimizer = layer_and_optimizer(momentum)
    train_step(layer, optimizer, 64, seed=1)
    tables = [layer.down_embed.weight, layer.up_embed.weight]
    table_bytes = sum(p.numel() * p.element_size() for p in tables)
    assert 0 < state_bytes(optimizer, tables) <= ratio * table_bytes
    if momentum == "none":
        assert state_bytes(optimizer, tables) == 2 * 256 * 4  # one fp32 per row


@pytest.mark.parametrize("momentum", ["none", "bf16"])
def test_rows_no_token_picked_are_bitwise_unchanged(momentum):
    layer, optimizer = layer_and_optimizer(momentum)
    first = train_step(layer, optimizer, 8, seed=2)
    before = {n: getattr(layer, n).weight.detach().clone() for n in ("down_embed", "up_embed")}
    second = train_step(layer, optimizer, 8, seed=3)
    untouched = torch.ones(256, dtype=torch.bool)
    untouched[second] = False
    assert untouched.sum() > 200 and untouched[first].any()  # rows with momentum from step 1 sit out step 2
    for name, old in before.items():
        new = getattr(layer, name).weight.detach()
        assert torch.equal(new[untouched], old[untouched]), name
        assert (new[~untouched] != old[~untouched]).any(-1).all(), name


@pytest.mark.parametrize("momentum", ["none", "bf16"])
def test_state_dict_round_trips_through_a_weights_only_file(momentum):
    """Save after 2 steps, load into a fresh optimizer (weights_only): 2 more steps equal the straight run."""
    straight, optimizer = layer_and_optimizer(momentum)
    for seed in range(4):
        train_step(straight, optimizer, 32, seed)
    resumed, optimizer = layer_and_optimizer(momentum)
    for seed in range(2):
        train_step(resumed, optimizer, 32, seed)
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, optimizer = layer_and_optimizer(momentum, seed=5)
    resumed.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    state = optimizer.state[resumed.up_embed.weight]
    assert state["row_sq"].dtype == torch.float32
    assert ("exp_avg" in state) == (momentum == "bf16") and state.get("exp_avg", torch.ones(1).bfloat16()).dtype \
        == torch.bfloat16
    for seed in (2, 3):
        train_step(resumed, optimizer, 32, seed)
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_other_groups_follow_adamw():
    gen = torch.Generator().manual_seed(6)
    start = torch.randn(8, 5, generator=gen)
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    mine = RowwiseAdamW([{"params": [ours]}], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    reference = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(8, 5, generator=gen)
        for p, opt in ((ours, mine), (theirs, reference)):
            p.grad = grad.clone()
            opt.step()
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_build_optimizer_puts_the_tables_in_rowwise_groups():
    from upcycle.modeling_upcycle_doge import UpcycleDogeForCausalLM
    from upcycle.trainable import select_trainable

    model = UpcycleDogeForCausalLM(tiny_config(is_moe=True, num_experts=64, num_experts_per_tok=4))
    for choice, momentum in (("rowwise", "none"), ("rowwise-bf16", "bf16")):
        config = resolve_config(None, model="m", data=["d"], expert_optimizer=choice)
        optimizer = build_optimizer(select_trainable(model, config), config)
        assert isinstance(optimizer, RowwiseAdamW)
        shapes = {(g["rowwise"], g["momentum"], tuple(p.shape)) for g in optimizer.param_groups for p in g["params"]}
        assert shapes == {(True, momentum, (64, 64)), (False, momentum, (16, 64))}
    assert isinstance(build_optimizer(model, resolve_config(None, model="m", data=["d"])), RowwiseAdamW)  # default
    plain = build_optimizer(model, resolve_config(None, model="m", data=["d"], expert_optimizer="adamw"))
    assert isinstance(plain, torch.optim.AdamW) and not isinstance(plain, RowwiseAdamW)


def test_unknown_expert_optimizer_names_the_flag():
    from upcycle.errors import UpcycleError

    with pytest.raises(UpcycleError, match="--expert-optimizer 'sgd' is not one of adamw, rowwise, rowwise-bf16"):
        resolve_config(None, model="m", data=["d"], expert_optimizer="sgd")


def test_a_16384_expert_checkpoint_keeps_optimizer_state_under_half_the_trainable_bytes(run_cli, dense_folder,
                                                                                         code_text_dir, tmp_path):
    """Default settings, 16384 experts in every layer: optimizer.pt holds at most 0.5x the trainable tensors."""
    from safetensors import safe_open

    moe, run = tmp_path / "moe", tmp_path / "run"
    assert run_cli("expand", dense_folder, "--experts", 16384, "--layers", "all", "-o", moe)[0] == 0
    assert run_cli("continue-train", moe, "--data", code_text_dir, "-o", run, "--max-steps", 1, "--batch-size", 2,
                   "--seq-len", 64, "--eval-every", 0, "--eval-blocks", 1, "--save-every", 1, "--retain-samples", 1,
                   "--no-progress", "--report-to", "none")[0] == 0
    checkpoint = run / "checkpoint-1"
    with safe_open(checkpoint / "trainable.safetensors", "pt") as tensors:
        trainable = sum(tensors.get_slice(n).get_shape()[0] * tensors.get_slice(n).get_shape()[1] * 4
                        for n in tensors.keys())
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    state_bytes = sum(t.numel() * t.element_size() for s in state.values() for t in s.values()
                      if isinstance(t, torch.Tensor))
    assert trainable > 16384 * 64 * 2 * 2 * 4  # both tables of both layers
    assert 0 < state_bytes <= 0.5 * trainable
