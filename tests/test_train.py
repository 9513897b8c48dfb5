"""``upcycle continue-train``: what trains, resume equivalence, outputs, bad input and faults."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import upcycle.train
from conftest import json_of

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"
EXPERT_SUFFIXES = ("mlp.router_gate.weight", "mlp.down_embed.weight", "mlp.up_embed.weight")


def args(model, data, run, *extra) -> list:
    return ["continue-train", model, "--recipe", RECIPE, "--data", data, "-o", run, "--no-progress",
            "--report-to", "none", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def fail_at(monkeypatch, call: int, error: BaseException | None) -> None:
    """Make the ``call``-th micro-batch raise ``error`` (or return a NaN loss when None)."""
    real, calls = upcycle.train.batch_loss, []

    def patched(*a, **k):
        calls.append(1)
        if len(calls) == call:
            if error is not None:
                raise error
            loss, _ = real(*a, **k)
            nan = loss * float("nan")
            return nan, nan
        return real(*a, **k)

    monkeypatch.setattr(upcycle.train, "batch_loss", patched)


def test_trains_experts_only_and_lowers_heldout_loss(run_cli, moe_folder, code_text_dir, tmp_path):
    """Acceptance: 40 steps on real code text; eval loss drops; every frozen tensor is bit-identical."""
    run = tmp_path / "run"
    code, out, err = run_cli(*args(moe_folder, code_text_dir, run, "--report-to", "auto"))
    assert code == 0, err
    rows = metrics(run)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 20, 40]
    assert evals[-1] < evals[0] - 0.02, evals
    before, after = weights(moe_folder), weights(run / "final")
    assert before.keys() == after.keys()
    frozen = [k for k in before if not k.endswith(EXPERT_SUFFIXES)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith(EXPERT_SUFFIXES))
    experts = load_file(run / "experts.safetensors")
    assert sorted(experts) == sorted(k for k in before if k.endswith(EXPERT_SUFFIXES))
    assert all(torch.equal(experts[k], after[k]) for k in experts)
    summary = json_of(run / "training_summary.json")
    assert summary["steps"] == 40 and summary["train"] == "experts" and summary["num_experts"] == 64
    assert summary["trainable_params"] == sum(before[k].numel() for k in experts)
    assert summary["tokens_seen"] == 40 * 4 * 64 and math.isclose(summary["final_eval_loss"], evals[-1])
    assert (run / "final" / "training_summary.json").is_file()
    optimizer = torch.load(run / "checkpoint-40" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(experts)  # state for trainable tensors only
    assert sorted(load_file(run / "checkpoint-20" / "trainable.safetensors")) == sorted(experts)
    assert "lr: 0.01" in (run / "config.yaml").read_text()
    assert list((run / "logs").rglob("events.out.tfevents*")) or not _has_tensorboard()
    print(f"eval loss {evals[0]:.4f} -> {evals[-1]:.4f}")


def _has_tensorboard() -> bool:
    from accelerate.utils import is_tensorboard_available

    return is_tensorboard_available()


def test_interrupt_then_resume_matches_uninterrupted(run_cli, moe_folder, code_text_dir, tmp_path, monkeypatch):
    """6 steps straight == Ctrl-C in step 4 (checkpoint-3 kept), then --resume: losses and tensors within 1e-6."""
    flags = ("--max-steps", 6, "--save-every", 3, "--eval-every", 0, "--batch-size", 2, "--grad-accum", 2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(*args(moe_folder, code_text_dir, straight, *flags))[0] == 0
    fail_at(monkeypatch, 2 * 3 + 1, KeyboardInterrupt())
    code, _, err = run_cli(*args(moe_folder, code_text_dir, split, *flags))
    assert code == 130 and "checkpoint-3" in err and "Traceback" not in err
    assert not (split / "checkpoint-6").exists() and not (split / "final").exists()
    monkeypatch.undo()
    code, _, err = run_cli(*args(moe_folder, code_text_dir, split, *flags, "--resume"))
    assert code == 0, err
    losses = [[r["loss"] for r in metrics(run) if "loss" in r] for run in (straight, split)]
    assert len(losses[0]) == len(losses[1]) == 6
    assert max(abs(a - b) for a, b in zip(*losses)) <= 1e-6
    a, b = load_file(straight / "experts.safetensors"), load_file(split / "experts.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(run_cli, moe_folder, code_text_dir, tmp_path,
                                                             monkeypatch):
    run = tmp_path / "run"
    fail_at(monkeypatch, 3, None)
    code, _, err = run_cli(*args(moe_folder, code_text_dir, run, "--max-steps", 6, "--save-every", 2,
                                 "--eval-every", 0, "--batch-size", 2, "--report-to", "auto"))
    assert code == 2 and "non-finite loss" in err and "checkpoint-2" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (run / "final").exists()
    saved = load_file(run / "checkpoint-2" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    monkeypatch.undo()
    code, _, err = run_cli(*args(moe_folder, code_text_dir, run, "--max-steps", 1, "--eval-every", 0, "--force",
                                 "--report-to", "auto"))
    assert code == 0, err  # every file the failed run left is in its manifest


def test_lora_modes(run_cli, moe_folder, dense_folder, code_text_dir, tmp_path):
    """experts+lora trains experts and LoRA, merges LoRA into final/; lora works on a dense model."""
    quick = ("--max-steps", 2, "--eval-every", 0, "--save-every", 0, "--batch-size", 2, "--eval-blocks", 2)
    run = tmp_path / "both"
    code, _, err = run_cli(*args(moe_folder, code_text_dir, run, *quick, "--train", "experts+lora"))
    assert code == 0, err
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoint-2" / "adapter" / "adapter_config.json").is_file()
    before, after = weights(moe_folder), weights(run / "final")
    assert before.keys() == after.keys()  # merged: no LoRA names left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith("self_attn.q_proj.weight") for k in changed)
    assert any(k.endswith("mlp.gate_proj.weight") for k in changed)
    assert any(k.endswith("mlp.up_embed.weight") for k in changed)
    assert not any(k.endswith(("embed_tokens.weight", "norm.weight")) for k in changed)
    run = tmp_path / "dense"
    code, _, err = run_cli(*args(dense_folder, code_text_dir, run, *quick, "--train", "lora"))
    assert code == 0, err
    assert not (run / "experts.safetensors").exists() and (run / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["empty", "seq_len", "dense", "recipe_key", "occupied", "resume_nothing"])
def test_bad_input_is_one_line_error(case, run_cli, moe_folder, dense_folder, code_text_dir, tmp_path):
    run, model, extra = tmp_path / "run", moe_folder, []
    data = code_text_dir
    if case == "empty":
        data = tmp_path / "empty"
        data.mkdir()
        (data / "a.txt").write_text("")
    elif case == "seq_len":
        extra = ["--seq-len", 4096]
    elif case == "dense":
        model = dense_folder
    elif case == "recipe_key":
        recipe = tmp_path / "r.yaml"
        recipe.write_text("lr: 1e-3\nlearning_rate: 0.1\n")
        extra = ["--recipe", recipe]
    elif case == "occupied":
        run.mkdir()
        (run / "config.yaml").write_text("someone else's run\n")
    elif case == "resume_nothing":
        extra = ["--resume"]
    code, out, err = run_cli(*args(model, data, run, *extra))
    expected = {"empty": "no text", "seq_len": "max_position_embeddings", "dense": "upcycle expand",
                "recipe_key": "'learning_rate'", "occupied": "--resume", "resume_nothing": "no checkpoint"}
    assert code == 2 and expected[case] in err and len(err.strip().splitlines()) == 1, err
    assert not (run / "metrics.jsonl").exists()
    if case == "occupied":
        assert (run / "config.yaml").read_text() == "someone else's run\n"


def test_force_replaces_only_its_own_files(run_cli, moe_folder, code_text_dir, tmp_path):
    run = tmp_path / "run"
    quick = ("--max-steps", 1, "--eval-every", 0, "--batch-size", 1, "--eval-blocks", 1)
    assert run_cli(*args(moe_folder, code_text_dir, run, *quick))[0] == 0
    (run / "notes.txt").write_text("mine")
    code, _, err = run_cli(*args(moe_folder, code_text_dir, run, *quick))
    assert code == 2 and "already holds a run" in err
    (run / "checkpoint-1" / "mine.txt").write_text("mine")
    code, _, err = run_cli(*args(moe_folder, code_text_dir, run, *quick, "--force"))
    assert code == 2 and "mine.txt" in err and (run / "checkpoint-1" / "mine.txt").is_file()
    (run / "checkpoint-1" / "mine.txt").unlink()
    code, _, err = run_cli(*args(moe_folder, code_text_dir, run, *quick, "--force", "--max-steps", 2,
                                 "--save-every", 2))
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "checkpoint-1").exists() and (run / "checkpoint-2").is_dir()
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2]


def test_gradient_checkpointing_gives_the_same_update_with_the_balance_loss(run_cli, moe_folder, code_text_dir,
                                                                           tmp_path):
    quick = ("--max-steps", 2, "--eval-every", 0, "--batch-size", 2, "--eval-blocks", 1, "--balance-coef", 0.1)
    plain, checkpointed = tmp_path / "plain", tmp_path / "ckpt"
    assert run_cli(*args(moe_folder, code_text_dir, plain, *quick))[0] == 0
    assert run_cli(*args(moe_folder, code_text_dir, checkpointed, *quick, "--gradient-checkpointing"))[0] == 0
    a, b = load_file(plain / "experts.safetensors"), load_file(checkpointed / "experts.safetensors")
    # recomputation changes gradients by ~1e-9, which Adam rescales on near-zero entries: compare at the lr
    # scale; counting the balance loss twice (recomputed router logits) moves them by ~2e-2
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-3
    assert [r["loss"] for r in metrics(plain) if "loss" in r] == pytest.approx(
        [r["loss"] for r in metrics(checkpointed) if "loss" in r], abs=1e-6)


def test_compile_compiles_every_cdmoe_layer_in_place(run_cli, moe_folder, code_text_dir, tmp_path, monkeypatch):
    """--compile calls ``compile()`` on each CDMoE layer (tests/test_compile.py checks what compiling computes)."""
    from upcycle.modeling_upcycle_doge import CausalCDMoE

    compiled = []
    monkeypatch.setattr(CausalCDMoE, "compile", lambda self, *a, **k: compiled.append(self))
    run = tmp_path / "run"
    assert run_cli(*args(moe_folder, code_text_dir, run, "--max-steps", 1, "--eval-every", 0, "--batch-size", 1,
                         "--eval-blocks", 1, "--compile"))[0] == 0
    layers = json_of(moe_folder / "config.json")["num_hidden_layers"]
    assert len(compiled) == layers and len({id(m) for m in compiled}) == layers
    assert (run / "experts.safetensors").is_file()

def test_model_without_tokenizer_is_a_one_line_error(moe_folder, code_text_dir, tmp_path, run_cli):
    bare = tmp_path / "bare"
    shutil.copytree(moe_folder, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    code, _, err = run_cli("continue-train", bare, "--data", code_text_dir, "-o", tmp_path / "run",
                           "--recipe", RECIPE, "--no-progress")
    last = err.strip().splitlines()[-1]
    assert code == 2 and "has no usable tokenizer" in last and "Traceback" not in err
    assert not (tmp_path / "run").exists()
