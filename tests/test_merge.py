"""``upcycle merge``: folding runs (expert tensors, LoRA) and averaging checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from upcycle.folder import load_model, save_model
from upcycle.modeling_upcycle_doge import is_routed_tensor

TOL = 1e-5


def trained_tensors(model, seed: int) -> dict[str, torch.Tensor]:
    """The model's expert tensors, perturbed as if trained (up_embed no longer zero)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in model.state_dict().items():
        if is_routed_tensor(name):
            out[name] = (tensor + 0.05 * torch.randn(tensor.shape, generator=generator)).contiguous()
    return out


def make_run(root: Path, base: Path, steps=(10, 20), lora: bool = False, finished: bool = False,
             record_base: str | None = None) -> Path:
    """A run folder laid out per docs/run-layout.md, written by hand (no trainer needed)."""
    run = root / "run"
    run.mkdir(parents=True)
    recorded = record_base or str(base)
    (run / "config.yaml").write_text(f"base_model: {recorded}\nrecipe: test-recipe\ntrain: experts\nlr: 0.01\n")
    rows = []
    for i, step in enumerate(steps):
        ckpt = run / f"checkpoint-{step}"
        ckpt.mkdir()
        model = load_model(base)
        save_file(trained_tensors(model, seed=step), ckpt / "trainable.safetensors")
        if lora:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(step)
            peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
            peft.save_pretrained(ckpt / "adapter")
        state = {"step": step, "tokens_seen": step * 512, "blocks_consumed": step * 2, "train": "experts",
                 "base_model": recorded, "base_model_path": str(Path(recorded).absolute()),
                 "train_loss": 3.0 - 0.01 * step, "eval_loss": 3.1 - 0.01 * step}
        (ckpt / "state.json").write_text(json.dumps(state))
        rows += [{"step": step, "loss": state["train_loss"], "lr": 1e-3, "tokens": step * 512, "tokens_per_s": 1.0},
                 {"step": step, "eval_loss": state["eval_loss"]}]
        if finished and i == len(steps) - 1:
            shutil.copy(ckpt / "trainable.safetensors", run / "experts.safetensors")
            summary = {"base_model": recorded, "base_model_path": str(Path(recorded).absolute()), "num_experts": 64,
                       "experts_per_token": 4, "train": "experts", "trainable_params": 16640,
                       "total_params": 123456, "tokens_seen": step * 512, "steps": step,
                       "final_train_loss": state["train_loss"], "final_eval_loss": state["eval_loss"],
                       "recipe": "test-recipe"}
            (run / "training_summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 300, 11, 64, 128, 9]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def expected_model(base: Path, ckpt: Path):
    """Base + trained tensors (+ the unmerged LoRA adapter), the reference for merge."""
    model = load_model(base)
    model.load_state_dict(load_file(ckpt / "trainable.safetensors"), strict=False)
    if (ckpt / "adapter").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(ckpt / "adapter"))
    return model.eval()


def assert_failed_cleanly(result, out: Path, *words: str) -> None:
    code, stdout, stderr = result
    assert code != 0
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stdout + stderr
    for word in words:
        assert word in stderr, stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_merge_run_uses_latest_checkpoint(tmp_path, moe_folder, run_cli):
    run = make_run(tmp_path, moe_folder)
    code, stdout, stderr = run_cli("merge", run, "-o", tmp_path / "merged")
    assert code == 0, stderr
    merged = load_model(tmp_path / "merged")
    reference = expected_model(moe_folder, run / "checkpoint-20")
    assert (logits(merged) - logits(reference)).abs().max() <= TOL
    older = expected_model(moe_folder, run / "checkpoint-10")
    assert (logits(merged) - logits(older)).abs().max() > 1e-3
    summary = json.loads((tmp_path / "merged" / "training_summary.json").read_text())
    assert summary["tokens_seen"] == 20 * 512 and summary["final_eval_loss"] == pytest.approx(2.9)
    assert summary["num_experts"] == 64 and summary["recipe"]["lr"] == 0.01
    assert (tmp_path / "merged" / "modeling_upcycle_doge.py").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_merge_checkpoint_with_lora_and_explicit_base(tmp_path, moe_folder, run_cli):
    run = make_run(tmp_path, moe_folder, steps=(5,), lora=True, record_base=str(tmp_path / "gone"))
    ckpt = run / "checkpoint-5"
    code, _, stderr = run_cli("merge", ckpt, "--base", moe_folder, "-o", tmp_path / "merged")
    assert code == 0, stderr
    merged = load_model(tmp_path / "merged")
    reference = expected_model(moe_folder, ckpt)
    assert (logits(merged) - logits(reference)).abs().max() <= TOL
    plain = load_model(moe_folder)
    plain.load_state_dict(load_file(ckpt / "trainable.safetensors"), strict=False)
    assert (logits(merged) - logits(plain)).abs().max() > 1e-4  # the LoRA really is in there
    assert not any("lora" in name for name in merged.state_dict())


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    from upcycle.folder import weight_files

    tensors = {}
    for file in weight_files(folder):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("method,extra,coeffs", [
    ("sma", [], [1 / 3, 1 / 3, 1 / 3]),
    ("ema", ["--ema-decay", "0.6"], [0.36, 0.4 * 0.6, 0.4]),
    ("wma", ["--weights", "1,1,2"], [0.25, 0.25, 0.5]),
])
def test_average_matches_hand_computed(tmp_path, moe_folder, run_cli, method, extra, coeffs):
    models = []
    for i in range(3):
        model = load_model(moe_folder)
        model.load_state_dict(trained_tensors(model, seed=100 + i), strict=False)
        models.append(save_model(model, tmp_path / f"m{i}", source=moe_folder))
    out = tmp_path / "avg"
    code, stdout, stderr = run_cli("merge", "--average", *models, "--method", method, *extra, "-o", out,
                                   "--max-shard-size", "100KB")
    assert code == 0, stderr
    assert (out / "model.safetensors.index.json").is_file()
    inputs = [read_all(m) for m in models]
    result = read_all(out)
    assert set(result) == set(inputs[0])
    name = "model.layers.1.mlp.up_embed.weight"
    by_hand = inputs[0][name] * coeffs[0] + inputs[1][name] * coeffs[1] + inputs[2][name] * coeffs[2]
    if method == "ema":  # the recurrence itself, oldest first
        running = inputs[0][name]
        for nxt in inputs[1:]:
            running = 0.6 * running + 0.4 * nxt[name]
        assert torch.allclose(by_hand, running, atol=1e-7)
    assert torch.allclose(result[name], by_hand, atol=1e-6)
    for key in result:
        hand = sum(c * t[key] for c, t in zip(coeffs, inputs))
        assert torch.allclose(result[key], hand.to(result[key].dtype), atol=1e-6), key
    load_model(out)  # a loadable model folder


def test_average_checkpoints_of_a_run(tmp_path, moe_folder):
    from upcycle.merging import average

    run = make_run(tmp_path, moe_folder, steps=(1, 2))
    average([run / "checkpoint-1", run / "checkpoint-2"], tmp_path / "avg", progress=False)
    a = load_file(run / "checkpoint-1" / "trainable.safetensors")
    b = load_file(run / "checkpoint-2" / "trainable.safetensors")
    result, base = read_all(tmp_path / "avg"), read_all(moe_folder)
    for name in result:
        expected = (a[name] + b[name]) / 2 if name in a else base[name]
        assert torch.allclose(result[name], expected, atol=1e-6), name


def test_average_different_shapes_names_the_tensor(tmp_path, moe_folder, dense_folder, run_cli):
    from upcycle.expansion import expand

    other = tmp_path / "moe16"
    expand(dense_folder, num_experts=16, experts_per_token=2, out=other, progress=False)
    out = tmp_path / "avg"
    result = run_cli("merge", "--average", moe_folder, other, "-o", out)
    assert_failed_cleanly(result, out, "down_embed", "shape")


def test_dense_base_is_named_as_such(tmp_path, moe_folder, dense_folder, run_cli):
    run = make_run(tmp_path, moe_folder, steps=(3,))
    out = tmp_path / "merged"
    assert_failed_cleanly(run_cli("merge", run, "--base", dense_folder, "-o", out), out, "dense", "--base")
    assert_failed_cleanly(run_cli("merge", "--average", run / "checkpoint-3", moe_folder, "--base", dense_folder,
                                  "-o", out), out, "dense", "--base")


def test_run_without_checkpoints(tmp_path, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("base_model: x\n")
    out = tmp_path / "merged"
    assert_failed_cleanly(run_cli("merge", run, "-o", out), out, "checkpoint")


def test_missing_base(tmp_path, moe_folder, run_cli):
    run = make_run(tmp_path, moe_folder, steps=(3,), record_base=str(tmp_path / "deleted-base"))
    out = tmp_path / "merged"
    assert_failed_cleanly(run_cli("merge", run, "-o", out), out, "--base")


def test_out_exists_without_force(tmp_path, moe_folder, run_cli):
    run = make_run(tmp_path, moe_folder, steps=(3,))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run_cli("merge", run, "-o", out)
    assert code != 0 and stderr.startswith("error: ") and "--force" in stderr and stderr.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_end_to_end_through_the_trainer(tmp_path, moe_folder, code_text_dir, run_cli):
    """continue-train (experts + LoRA) -> merge RUN equals the trainer's own final/ model."""
    recipe = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"
    run = tmp_path / "run"
    code, _, stderr = run_cli("continue-train", moe_folder, "--recipe", recipe, "--data", code_text_dir, "-o", run,
                              "--no-progress", "--max-steps", "4", "--save-every", "2", "--eval-every", "2",
                              "--train", "experts+lora", "--lora-r", "4")
    assert code == 0, stderr
    code, _, stderr = run_cli("merge", run, "-o", tmp_path / "merged")
    assert code == 0, stderr
    final, merged = load_model(run / "final"), load_model(tmp_path / "merged")
    assert (logits(merged) - logits(final)).abs().max() <= TOL
    assert (logits(merged) - logits(load_model(moe_folder))).abs().max() > 1e-4
    code, _, stderr = run_cli("merge", run / "checkpoint-2", "-o", tmp_path / "merged-2")
    assert code == 0, stderr
