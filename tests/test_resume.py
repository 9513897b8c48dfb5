"""Resume follows the current config: schedule, lr, hyper-parameters; consistent steps under Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from upcycle.recipe import resolve_config
from upcycle.trainable import WarmupStableDecay

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"
QUICK = ("--save-every", 3, "--eval-every", 0, "--batch-size", 2, "--eval-blocks", 2)


def args(model, data, run, *extra) -> list:
    return ["continue-train", model, "--recipe", RECIPE, "--data", data, "-o", run, "--no-progress",
            "--report-to", "none", *QUICK, *extra]


def rows(run: Path, key: str) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def planned_lr(steps: int, lr: float = 1e-2) -> dict[int, float]:
    config = resolve_config(RECIPE, model="m", data=["d"], max_steps=steps, lr=lr)
    schedule = WarmupStableDecay.from_config(config)
    return {s + 1: lr * schedule(s) for s in range(steps)}


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, moe_folder, code_text_dir):
    from upcycle.cli import main

    run = tmp_path_factory.mktemp("resume") / "six"
    main([str(a) for a in args(moe_folder, code_text_dir, run, "--max-steps", 6)])  # exits only on error
    assert (run / "final").is_dir()
    return run


def test_resume_with_more_steps_follows_the_new_schedule(run_cli, moe_folder, code_text_dir, six_steps, tmp_path):
    """checkpoint-3 of a 6-step run, resumed with --max-steps 12: steps 4-12 at a fresh 12-step plan's lr."""
    run = tmp_path / "twelve"
    code, _, err = run_cli(*args(moe_folder, code_text_dir, run, "--max-steps", 12,
                                 f"--resume={six_steps / 'checkpoint-3'}"))
    assert code == 0, err
    got, want = rows(run, "lr"), planned_lr(12)
    assert sorted(got) == list(range(4, 13))
    assert all(abs(got[s] - want[s]) <= 1e-12 for s in got), (got, want)
    assert all(v > 0 for v in got.values()) and got[12] < got[8]  # decays at the end, not at step 6
    assert "max_steps: 12" in (run / "config.yaml").read_text()
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["steps"] == 12 and summary["recipe"]["max_steps"] == 12
    assert summary["resumed_from"]["step"] == 3 and summary["resumed_from"]["changed"]["max_steps"] == [6, 12]


def test_resume_with_another_lr_uses_it(run_cli, moe_folder, code_text_dir, six_steps, tmp_path):
    run = tmp_path / "lr"
    code, _, err = run_cli(*args(moe_folder, code_text_dir, run, "--max-steps", 6, "--lr", 5e-3,
                                 "--weight-decay", 0.1, f"--resume={six_steps / 'checkpoint-3'}"))
    assert code == 0, err
    got, want = rows(run, "lr"), planned_lr(6, lr=5e-3)
    assert sorted(got) == [4, 5, 6] and all(abs(got[s] - want[s]) <= 1e-12 for s in got)
    optimizer = torch.load(run / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert {g["weight_decay"] for g in optimizer["param_groups"]} == {0.1}
    assert all(g["lr"] == pytest.approx(want[6]) for g in optimizer["param_groups"])


@pytest.mark.parametrize("flag, value", [("--seq-len", 32), ("--train", "all"), ("--seed", 3)])
def test_resume_refuses_changes_it_cannot_honour(run_cli, moe_folder, code_text_dir, six_steps, tmp_path, flag,
                                                 value):
    run = tmp_path / "other"
    code, _, err = run_cli(*args(moe_folder, code_text_dir, run, "--max-steps", 6, flag, value,
                                 f"--resume={six_steps / 'checkpoint-3'}"))
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_ctrl_c_during_the_update_saves_a_consistent_step(run_cli, moe_folder, code_text_dir, six_steps, tmp_path,
                                                          monkeypatch):
    """SIGINT arriving inside optimizer.step of step 4 is held until the step is counted: resume == straight."""
    from upcycle.rowwise import RowwiseAdamW  # the default experts optimizer

    real, calls = RowwiseAdamW.step, []

    def step(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # delivered while the update is half-way through its bookkeeping
        return out

    monkeypatch.setattr(RowwiseAdamW, "step", step)
    run = tmp_path / "split"
    code, _, err = run_cli(*args(moe_folder, code_text_dir, run, "--max-steps", 6))
    assert code == 130 and "after step 4" in err, err
    assert (run / "checkpoint-4").is_dir()
    monkeypatch.undo()
    code, _, err = run_cli(*args(moe_folder, code_text_dir, run, "--max-steps", 6, "--resume"))
    assert code == 0, err
    a, b = rows(six_steps, "loss"), rows(run, "loss")
    assert sorted(a) == sorted(b) == list(range(1, 7)) and max(abs(a[s] - b[s]) for s in a) <= 1e-6
    x, y = load_file(six_steps / "experts.safetensors"), load_file(run / "experts.safetensors")
    assert max((x[k] - y[k]).abs().max().item() for k in x) <= 1e-6


def test_checkpoints_hold_no_pickles(six_steps):
    """Every checkpoint file is JSON, safetensors or a weights-only torch file."""
    checkpoint = six_steps / "checkpoint-3"
    for path in checkpoint.rglob("*"):
        if path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.is_file():
            assert path.suffix in (".json", ".safetensors"), path


def test_resume_tolerates_a_torn_metrics_line(run_cli, moe_folder, code_text_dir, six_steps, tmp_path):
    """A crash while appending leaves a half line: resume drops it (and says so) instead of failing."""
    import shutil

    run = tmp_path / "torn"
    shutil.copytree(six_steps, run)
    with (run / "metrics.jsonl").open("a") as out:
        out.write('{"step": 7, "loss": 1.2')
    code, _, err = run_cli(*args(moe_folder, code_text_dir, run, "--max-steps", 8, "--resume"))
    assert code == 0, err
    assert "dropped 1 unreadable line" in err
    assert sorted(rows(run, "loss")) == list(range(1, 9))



def test_rowwise_expert_optimizer_trains_and_resumes_exactly(run_cli, moe_folder, code_text_dir, tmp_path):
    """--expert-optimizer rowwise: the eval loss goes down, checkpoint-6 resumed equals the straight run, and a
    resume with another --expert-optimizer is refused naming the flag."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, _, err = run_cli(*args(moe_folder, code_text_dir, straight, "--max-steps", 12, "--expert-optimizer",
                                 "rowwise"))
    assert code == 0, err
    evals = rows(straight, "eval_loss")
    assert evals[12] < evals[0] - 0.02, evals
    optimizer = torch.load(straight / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert sorted(g.get("rowwise") for g in optimizer["param_groups"]) == [False, True]
    code, _, err = run_cli(*args(moe_folder, code_text_dir, resumed, "--max-steps", 12, "--expert-optimizer",
                                 "rowwise", f"--resume={straight / 'checkpoint-6'}"))
    assert code == 0, err
    a, b = rows(straight, "loss"), rows(resumed, "loss")
    assert sorted(b) == list(range(7, 13)) and max(abs(a[s] - b[s]) for s in b) <= 1e-6
    x, y = load_file(straight / "experts.safetensors"), load_file(resumed / "experts.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)
    code, _, err = run_cli(*args(moe_folder, code_text_dir, tmp_path / "other", "--max-steps", 12,
                                 "--expert-optimizer", "adamw", f"--resume={straight / 'checkpoint-6'}"))
    assert code == 2 and "--expert-optimizer" in err and len(err.strip().splitlines()) == 1, err
