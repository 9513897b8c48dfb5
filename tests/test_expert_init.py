"""--expert-init data: keys fitted to the layer inputs spread the picks, keep the dense function, resume exactly."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.test_resume import args, rows
from upcycle.expert_init import fitted_tables, init_from_data, spherical_kmeans
from upcycle.folder import load_model
from upcycle.modeling_upcycle_doge import route
from upcycle.retain import cdmoe_layers, layer_inputs


def clustered(n: int, dim: int, clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=g) * 3
    labels = torch.randint(clusters, (n,), generator=g)
    return centers[labels] + torch.randn(n, dim, generator=g) * 0.3 + 5.0, labels  # + a shared mean


def picks(router: torch.Tensor, states: torch.Tensor, num_keys: int, top_k: int) -> torch.Tensor:
    logits = (states @ router.T).view(-1, 2, num_keys)
    return torch.bincount(route(logits, num_keys, top_k)[1].flatten(), minlength=num_keys ** 2).float()


def test_spherical_kmeans_recovers_separated_clusters():
    points, labels = clustered(2000, 16, 8, seed=0)
    unit = torch.nn.functional.normalize(points - points.mean(0), dim=1)
    _, assign = spherical_kmeans(unit, 8, torch.Generator().manual_seed(1))
    # each found cluster is (nearly) one true cluster
    purity = sum(torch.bincount(labels[assign == c], minlength=8).max().item() for c in assign.unique())
    assert purity / len(labels) > 0.95


def test_fitted_keys_spread_the_picks_at_the_random_init_scale():
    num_keys, dim, std = 8, 32, 0.02
    states, _ = clustered(4000, dim, 64, seed=2)
    keys, down = fitted_tables(states, num_keys, std, seed=0)
    assert keys.shape == (2 * num_keys, dim) and down.shape == (num_keys ** 2, dim)
    random_keys = torch.randn(2 * num_keys, dim, generator=torch.Generator().manual_seed(3)) * std
    fitted, random = picks(keys, states, num_keys, 4), picks(random_keys, states, num_keys, 4)
    share = lambda c: c.sort(descending=True).values[: len(c) // 10].sum() / c.sum()  # noqa: E731
    assert (fitted > 0).sum() > (random > 0).sum() and share(fitted) < share(random) - 0.1
    # the scale of the random init: root-mean-square logit and expert score
    target = std * states.norm(dim=1).pow(2).mean().sqrt()
    assert abs((states @ keys.T).pow(2).mean().sqrt() / target - 1) < 1e-3
    assert abs((states @ down.T).pow(2).mean().sqrt() / target - 1) < 0.1
    # orthogonal to the mean input: they score the centred input
    mean = torch.nn.functional.normalize(states.mean(0), dim=0)
    assert (keys @ mean).abs().max() < 1e-4 * keys.norm(dim=1).max()


def test_init_from_data_keeps_the_dense_function_and_spares_trained_layers(moe_folder, code_text_dir):
    torch.manual_seed(0)
    model = load_model(moe_folder, dtype=torch.float32).eval()
    blocks = torch.randint(3, model.config.vocab_size, (8, 32))
    layers = cdmoe_layers(model)
    with torch.no_grad():
        layers[1].up_embed.weight.normal_(0, 0.01)  # layer 1's experts already learned: left alone
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        reference = model(input_ids=blocks).logits
    assert init_from_data(model, blocks, seed=0) == 1
    with torch.no_grad():
        assert torch.equal(model(input_ids=blocks).logits, reference)  # up_embed is zero where keys changed
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.layers.0.mlp.router_gate.weight", "model.layers.0.mlp.down_embed.weight"}
    again = load_model(moe_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        again.model.layers[1].mlp.up_embed.weight.copy_(layers[1].up_embed.weight)
    init_from_data(again, blocks, seed=0)
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in model.named_parameters())  # seeded
    states, _ = layer_inputs(model, blocks, blocks.numel(), seed=0)
    assert states[0].shape == (blocks.numel(), model.config.hidden_size)


def test_expert_init_data_trains_and_resumes_exactly(run_cli, moe_folder, code_text_dir, tmp_path):
    """The fitted keys are written to the run (config.yaml says so), a resume does not refit them, and the
    resumed run equals the straight one."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, _, err = run_cli(*args(moe_folder, code_text_dir, straight, "--max-steps", 6, "--expert-init", "data"))
    assert code == 0, err
    assert "expert_init: data" in (straight / "config.yaml").read_text()
    code, _, err = run_cli(*args(moe_folder, code_text_dir, tmp_path / "graft", "--max-steps", 6, "--expert-init",
                                 "graft"))
    assert code == 0, err
    fitted, kept = load_file(straight / "experts.safetensors"), load_file(tmp_path / "graft" / "experts.safetensors")
    name = next(n for n in fitted if n.endswith("router_gate.weight"))
    # the same run from the graft's random keys ends elsewhere, farther than training alone moves the keys
    moved = (kept[name] - load_file(moe_folder / "model.safetensors")[name]).abs().max()
    assert (fitted[name] - kept[name]).abs().max() > 2 * moved  # (without the fit the two runs are identical)
    code, _, err = run_cli(*args(moe_folder, code_text_dir, resumed, "--max-steps", 6, "--expert-init", "data",
                                 f"--resume={straight / 'checkpoint-3'}"))
    assert code == 0, err
    a, b = rows(straight, "loss"), rows(resumed, "loss")
    assert sorted(b) == [4, 5, 6] and max(abs(a[s] - b[s]) for s in b) <= 1e-6
    x, y = load_file(straight / "experts.safetensors"), load_file(resumed / "experts.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)
    summary = json.loads((straight / "training_summary.json").read_text())
    assert summary["trainable_params"] > 0


def test_expert_init_rejects_an_unknown_value(run_cli, moe_folder, code_text_dir, tmp_path):
    code, _, err = run_cli(*args(moe_folder, code_text_dir, tmp_path / "run", "--max-steps", 2, "--expert-init",
                                 "kmeans"))
    assert code == 2 and "--expert-init" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_degenerate_inputs_keep_the_graft_keys(moe_folder):
    model = load_model(moe_folder, dtype=torch.float32).eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert fitted_tables(torch.ones(64, model.config.hidden_size), 8, 0.02, seed=0) is None  # nothing to fit on
    blocks = torch.full((4, 16), 5)  # one token repeated: every position sees the same input in every layer
    assert init_from_data(model, blocks, seed=0) == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_too_few_inputs_keep_the_graft_keys():
    assert fitted_tables(torch.randn(10, 16), 8, 0.02, seed=0) is None  # fewer than 2 x 8 inputs
    assert fitted_tables(torch.randn(400, 16), 8, 0.02, seed=0) is not None
