"""``expand --layers``: experts routed in some layers only; the rest stay dense, frozen and uncrossed by backward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import DogeForCausalLM

from conftest import save_dense
from upcycle.errors import UpcycleError
from upcycle.expansion import expand, parse_layers
from upcycle.folder import load_model

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"


@pytest.mark.parametrize("spec, want", [("all", None), ("top-half", [2, 3]), ("top:1", [3]), ("0,2-3", [0, 2, 3]),
                                        ("0-3", None)])
def test_parse_layers(spec, want):
    assert parse_layers(spec, 4) == want


@pytest.mark.parametrize("spec", ["top:0", "5", "a-b", "2-9", ""])
def test_bad_layers_are_one_line_errors(spec):
    with pytest.raises(UpcycleError, match="--layers"):
        parse_layers(spec, 4)


@pytest.fixture(scope="module")
def top_moe(tmp_path_factory, tokenizer_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("layers")
    dense = save_dense(root / "dense", tokenizer_dir, num_hidden_layers=4)
    out = root / "moe"
    result = expand(dense, num_experts=64, experts_per_token=4, out=out, layers="top-half", progress=False)
    assert result.trainable == result.params_added // 2
    return dense, out


def test_partial_graft_reproduces_dense_in_ours_and_in_stock(top_moe):
    dense, moe = top_moe
    assert json.loads((moe / "config.json").read_text())["upcycle_expert_layers"] == [2, 3]
    ids = torch.randint(3, 500, (2, 24))
    with torch.no_grad():
        want = DogeForCausalLM.from_pretrained(dense)(input_ids=ids).logits
        ours = load_model(moe, dtype=torch.float32)
        assert [layer.mlp.routed for layer in ours.model.layers] == [False, False, True, True]
        assert (ours(input_ids=ids).logits - want).abs().max().item() == 0.0
        stock = DogeForCausalLM.from_pretrained(moe)  # no remote code: every layer has (zero) experts
        assert (stock(input_ids=ids).logits - want).abs().max().item() <= 1e-5


def test_training_touches_only_the_chosen_layers(run_cli, top_moe, code_text_dir, tmp_path, monkeypatch):
    _, moe = top_moe

    run = tmp_path / "run"
    code, _, err = run_cli("continue-train", moe, "--recipe", RECIPE, "--data", code_text_dir, "-o", run,
                           "--max-steps", 4, "--eval-every", 0, "--save-every", 0, "--no-progress",
                           "--report-to", "none")
    assert code == 0, err
    before, after = load_file(moe / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.split(".")[2] in ("2", "3") and ".mlp." in k for k in changed), changed
    assert any("up_embed" in k for k in changed)
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["trainable_params"] == sum(before[k].numel() for k in before
                                              if k.split(".")[2] in ("2", "3") and k.endswith(
                                                  ("router_gate.weight", "down_embed.weight", "up_embed.weight")))


def test_backward_stops_at_the_lowest_routed_layer(top_moe):
    from upcycle.recipe import resolve_config
    from upcycle.trainable import select_trainable

    _, moe = top_moe
    model = select_trainable(load_model(moe, dtype=torch.float32), resolve_config(None, model="m", data=["d"]))
    seen = []
    for index, layer in enumerate(model.model.layers):
        layer.register_full_backward_hook(lambda m, gi, go, i=index: seen.append(i))
    ids = torch.randint(3, 500, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert sorted(set(seen)) == [2, 3]


def test_gradient_checkpointing_does_not_run_the_frozen_layers_backward(top_moe):
    from upcycle.recipe import resolve_config
    from upcycle.trainable import enable_activation_checkpointing, select_trainable

    _, moe = top_moe
    model = select_trainable(load_model(moe, dtype=torch.float32), resolve_config(None, model="m", data=["d"]))
    enable_activation_checkpointing(model)
    calls = []
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(lambda m, i, o, index=index: calls.append(index))
    model.train()
    ids = torch.randint(3, 500, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [0, 1, 2, 3, 3, 2]  # forward, then only the routed layers are recomputed
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
