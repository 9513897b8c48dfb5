"""--slot-fraction: only the experts the new text uses far more than the retain text train; resume keeps them."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.test_resume import args, rows
from upcycle.folder import load_model
from upcycle.retain import cdmoe_layers
from upcycle.slots import expert_hits, select_slots


def test_selection_prefers_experts_the_new_text_uses_and_the_old_does_not(moe_folder):
    layer = cdmoe_layers(load_model(moe_folder, dtype=torch.float32))[0]
    g = torch.Generator().manual_seed(0)
    old = torch.randn(2000, layer.router_gate.in_features, generator=g)
    new = torch.cat([old[:1000], old[:1000] * -1])  # half like the old text, half elsewhere
    (mask,) = select_slots([layer], [new], [old], fraction=0.25)
    assert mask.sum() == round(0.25 * mask.numel())
    hits_new, hits_old = expert_hits(layer, new), expert_hits(layer, old)
    rate = lambda h: (h + 1) / (h.sum() + h.numel())  # noqa: E731
    ratio = rate(hits_new) / rate(hits_old)
    assert ratio[mask].min() >= ratio[~mask].max() - 1e-6  # the top of the ranking, nothing else
    (alone,) = select_slots([layer], [new], None, fraction=0.25)
    assert hits_new[alone].min() >= hits_new[~alone].max()  # without retain text: the most used experts


def test_unselected_experts_stay_bitwise_frozen_and_resume_keeps_the_choice(run_cli, moe_folder, code_text_dir,
                                                                           tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # --expert-init graft: the frozen rows must then equal the graft's
    code, _, err = run_cli(*args(moe_folder, code_text_dir, straight, "--max-steps", 6, "--slot-fraction", "0.25",
                                 "--expert-init", "graft"))
    assert code == 0, err
    slots = load_file(straight / "slots.safetensors")
    graft, trained = load_file(moe_folder / "model.safetensors"), load_file(straight / "experts.safetensors")
    layers = sorted({n.rsplit(".mlp.", 1)[0] for n in trained if "up_embed" in n}, key=lambda n: int(n.split(".")[2]))
    for i, layer in enumerate(layers):
        mask = slots[f"layer{i}"].bool()
        assert 0 < mask.sum() < mask.numel()
        for table in ("up_embed", "down_embed"):
            name = f"{layer}.mlp.{table}.weight"
            before, after = graft[name], trained[name]
            assert torch.equal(before[~mask], after[~mask])  # frozen rows: bitwise unchanged
            if table == "up_embed":
                assert not torch.equal(before[mask], after[mask])  # the chosen rows learned
    code, _, err = run_cli(*args(moe_folder, code_text_dir, resumed, "--max-steps", 6, "--slot-fraction", "0.25",
                                 "--expert-init", "graft", f"--resume={straight / 'checkpoint-3'}"))
    assert code == 0, err
    a, b = rows(straight, "loss"), rows(resumed, "loss")
    assert sorted(b) == [4, 5, 6] and max(abs(a[s] - b[s]) for s in b) <= 1e-6
    assert all(torch.equal(x, y) for x, y in zip(load_file(straight / "experts.safetensors").values(),
                                                load_file(resumed / "experts.safetensors").values()))
    assert load_file(resumed / "slots.safetensors").keys() == slots.keys()


def test_slot_fraction_out_of_range_is_refused(run_cli, moe_folder, code_text_dir, tmp_path):
    code, _, err = run_cli(*args(moe_folder, code_text_dir, tmp_path / "run", "--max-steps", 2, "--slot-fraction", 0))
    assert code == 2 and "slot" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_slot_fraction_needs_the_rowwise_optimizer(run_cli, moe_folder, code_text_dir, tmp_path):
    code, _, err = run_cli(*args(moe_folder, code_text_dir, tmp_path / "run", "--max-steps", 2, "--slot-fraction",
                                 "0.5", "--expert-optimizer", "adamw"))
    assert code == 2 and "--slot-fraction" in err and "rowwise" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
