"""The expert-off penalty on retain tokens, self-synthesized retain text, and routing health in the logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from upcycle import assets
from upcycle.folder import load_model
from upcycle.retain import build_penalty, cdmoe_layers, layer_inputs, synthesize
from upcycle.trainable import is_expert

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory) -> Path:
    """Text of another domain (Python documentation prose) to retain."""
    path = tmp_path_factory.mktemp("retain") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in assets.docs_documents("train")[:40]))
    return path


def test_penalty_is_zero_on_a_fresh_graft_and_trains_only_experts(moe_folder):
    model = load_model(moe_folder, dtype=torch.float32)
    blocks = torch.randint(3, 500, (4, 32))
    penalty = build_penalty(model, blocks, coef=1.0, tokens=64, seed=0)
    assert penalty(0).item() == 0.0  # zero up_embed: the expert term vanishes everywhere
    with torch.no_grad():
        for layer in cdmoe_layers(model):
            layer.up_embed.weight.normal_(std=0.1)
    value = penalty(0)
    assert value.item() > 0
    value.backward()
    touched = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and all(is_expert(n) for n in touched)
    assert any("up_embed" in n for n in touched) and any("down_embed" in n for n in touched)


def test_recorded_inputs_are_the_base_models(moe_folder, dense_folder):
    """The states the penalty uses are the dense model's MLP inputs at those tokens, exactly."""
    moe, dense = load_model(moe_folder, dtype=torch.float32), load_model(dense_folder, dtype=torch.float32)
    blocks = torch.randint(3, 500, (2, 16))
    states, base = layer_inputs(moe, blocks, pool=10_000, seed=0)
    assert base is None and states[0].shape == (32, moe.config.hidden_size)
    seen = []
    handle = dense.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        dense(input_ids=blocks)
    handle.remove()
    assert torch.allclose(torch.sort(states[1], dim=0).values, torch.sort(seen[0], dim=0).values, atol=1e-6)


def test_synthesized_blocks_are_deterministic(moe_folder, tokenizer_dir):
    from transformers import AutoTokenizer

    model, tokenizer = load_model(moe_folder, dtype=torch.float32), AutoTokenizer.from_pretrained(tokenizer_dir)
    a, b = (synthesize(model, tokenizer, 5, 24, seed=3) for _ in range(2))
    assert a.shape == (5, 24) and torch.equal(a, b) and (a[:, 0] == tokenizer.eos_token_id).all()
    assert not torch.equal(a, synthesize(model, tokenizer, 5, 24, seed=4))


def train(run_cli, moe_folder, data, run, *extra) -> list[dict]:
    code, _, err = run_cli("continue-train", moe_folder, "--recipe", RECIPE, "--data", data, "-o", run,
                           "--no-progress", "--report-to", "none", "--max-steps", 30, "--eval-every", 15,
                           "--save-every", 0, *extra)
    assert code == 0, err
    return rows(run)


def test_penalty_on_retain_data_cuts_forgetting(run_cli, moe_folder, code_text_dir, docs_file, tmp_path):
    """Same run with and without the penalty: retain-text loss moves less, the new domain still improves.

    AdamW on the tables, so the comparison isolates the penalty (the rowwise default moves rows faster).
    """
    runs = {}
    for coef in (0.0, 100.0):
        runs[coef] = [r for r in train(run_cli, moe_folder, code_text_dir, tmp_path / f"c{coef}", "--retain-data",
                                       docs_file, "--retain-coef", coef, "--expert-optimizer", "adamw")
                      if "eval_loss" in r]
    drift = {c: abs(r[-1]["retain_loss"] - r[0]["retain_loss"]) for c, r in runs.items()}
    gain = {c: r[0]["eval_loss"] - r[-1]["eval_loss"] for c, r in runs.items()}
    assert drift[100.0] < 0.5 * drift[0.0], drift
    assert gain[100.0] > 0.02, gain
    ratio = {c: r[-1]["retain_routing/expert_ratio"] for c, r in runs.items()}
    assert ratio[100.0] < ratio[0.0], ratio


def test_routing_health_and_synthesized_retain_in_the_run(run_cli, moe_folder, code_text_dir, tmp_path):
    run = tmp_path / "run"
    evals = [r for r in train(run_cli, moe_folder, code_text_dir, run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 15, 30]
    first, last = evals[0], evals[-1]
    for key in ("used", "usage_entropy", "router_entropy", "expert_ratio"):
        assert f"routing/{key}" in last and f"routing/layer1/{key}" in last and f"retain_routing/{key}" in last
    assert 0 < last["routing/used"] <= 1 and 0 < last["routing/usage_entropy"] <= 1
    assert first["routing/expert_ratio"] == 0.0 < last["routing/expert_ratio"]
    blocks = load_file(run / "retain.safetensors")["input_ids"]
    assert blocks.ndim == 2 and blocks.shape[1] == 64
    assert "retain.safetensors" in (run / ".upcycle-manifest.json").read_text()
