"""Regression tests of ``continue-train`` and ``merge`` driven end to end through the CLI.

* a golden loss curve for ``recipes/tiny-cpu.yaml`` (``tests/golden/tiny-cpu.json``);
* ``--keep-checkpoints``; ``--train all`` on a dense model; ``--resume=PATH`` into a new run folder
  (the source run stays byte-for-byte unchanged); resuming a 1-process checkpoint on 2 gloo processes;
  averaging LoRA checkpoints; ``merge RUN`` of a finished run takes its final tensors.

Regenerate the golden loss curve after an intended change of the trainer's numerics (defaults, recipe,
data order, model code) with::

    UPCYCLE_REGENERATE_GOLDEN=1 OMP_NUM_THREADS=1 python -m pytest tests/test_regression.py -k golden

and commit ``tests/golden/tiny-cpu.json`` together with the change that moved the curve.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import json_of

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-cpu.yaml"
GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny-cpu.json"
REGENERATE = os.environ.get("UPCYCLE_REGENERATE_GOLDEN") == "1"
REGENERATE_COMMAND = ("UPCYCLE_REGENERATE_GOLDEN=1 OMP_NUM_THREADS=1 python -m pytest tests/test_regression.py "
                      "-k golden")
GOLDEN_FLAGS = ["--max-steps", "20", "--eval-every", "5", "--save-every", "0"]
RTOL = 1e-4
QUICK = ("--eval-every", "0", "--eval-blocks", "2")


def args(model, data, run, *extra) -> list:
    return ["continue-train", model, "--recipe", RECIPE, "--data", data, "-o", run, "--no-progress",
            "--report-to", "none", *extra]


def train(run_cli, model, data, run, *extra) -> None:
    code, _, err = run_cli(*args(model, data, run, *extra))
    assert code == 0, err


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(train loss by step, eval loss by step) from metrics.jsonl; steps as strings (JSON keys)."""
    rows = metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert len({r["step"] for r in train_rows}) == len(train_rows), "a train step is logged twice"
    assert len({r["step"] for r in eval_rows}) == len(eval_rows), "an eval step is logged twice"
    return ({str(r["step"]): r["loss"] for r in train_rows}, {str(r["step"]): r["eval_loss"] for r in eval_rows})


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``folder`` (hidden files included)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))


# ---------------------------------------------------------------- 1. golden loss curve


def test_golden_loss_curve_of_the_tiny_recipe(run_cli, moe_folder, code_text_dir, tmp_path):
    """20 steps of recipes/tiny-cpu.yaml (eval every 5): every train loss and eval loss equals the golden file
    (rtol 1e-4). A missing golden file fails. Regenerate it after an intended change with
    ``UPCYCLE_REGENERATE_GOLDEN=1 OMP_NUM_THREADS=1 python -m pytest tests/test_regression.py -k golden``.
    """
    run = tmp_path / "run"
    train(run_cli, moe_folder, code_text_dir, run, *GOLDEN_FLAGS)
    train_loss, eval_loss = losses(run)
    assert sorted(map(int, train_loss)) == list(range(1, 21)) and sorted(map(int, eval_loss)) == [0, 5, 10, 15, 20]
    assert all(math.isfinite(v) for v in [*train_loss.values(), *eval_loss.values()])
    config = yaml.safe_load((run / "config.yaml").read_text())
    config = {k: v for k, v in config.items() if k not in ("model", "data", "output_dir")}  # paths of this machine
    if REGENERATE:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "about": "golden loss curve of tests/test_regression.py::test_golden_loss_curve_of_the_tiny_recipe; "
                     f"regenerate: {REGENERATE_COMMAND}",
            "recipe": "recipes/tiny-cpu.yaml", "flags": GOLDEN_FLAGS, "rtol": RTOL,
            "torch": torch.__version__, "config": config,
            "train_loss": train_loss, "eval_loss": eval_loss}, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN}; run again without UPCYCLE_REGENERATE_GOLDEN to check it")
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing: generate it with {REGENERATE_COMMAND}")
    golden = json_of(GOLDEN)
    changed = {k: (golden["config"].get(k), v) for k, v in config.items() if golden["config"].get(k) != v}
    hint = (f"resolved config differs from the golden run's (golden, now): {changed}; " if changed else "") + \
        f"if the change is intended, regenerate: {REGENERATE_COMMAND}"
    assert golden["flags"] == GOLDEN_FLAGS, hint
    for name, got, want in (("train loss", train_loss, golden["train_loss"]),
                            ("eval loss", eval_loss, golden["eval_loss"])):
        assert sorted(got, key=int) == sorted(want, key=int), f"{name} steps {sorted(got, key=int)}; {hint}"
        off = {s: (want[s], got[s]) for s in want if not math.isclose(got[s], want[s], rel_tol=RTOL, abs_tol=0.0)}
        assert not off, f"{name} off the golden curve at steps (golden, now) {off}; {hint}"


# ---------------------------------------------------------------- 2. --keep-checkpoints


def test_keep_checkpoints_keeps_the_newest_and_resumes(run_cli, moe_folder, code_text_dir, tmp_path):
    run = tmp_path / "run"
    flags = ("--save-every", "2", "--keep-checkpoints", "2", "--batch-size", "2", *QUICK)
    train(run_cli, moe_folder, code_text_dir, run, "--max-steps", "8", *flags)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == \
        ["checkpoint-6", "checkpoint-8"]
    written = json_of(run / ".upcycle-manifest.json")["files"]
    assert not [f for f in written if f.startswith(("checkpoint-2/", "checkpoint-4/"))], "pruned files in manifest"
    assert all((run / f).is_file() for f in written)

    train(run_cli, moe_folder, code_text_dir, run, "--max-steps", "10", *flags, "--resume")
    assert checkpoint_steps(run) == [8, 10]
    train_loss, _ = losses(run)
    assert sorted(map(int, train_loss)) == list(range(1, 11))
    summary = json_of(run / "training_summary.json")
    assert summary["steps"] == 10 and summary["resumed_from"]["step"] == 8
    assert summary["resumed_from"]["changed"]["max_steps"] == [8, 10]
    assert json_of(run / "checkpoint-10" / "state.json")["step"] == 10
    experts = load_file(run / "experts.safetensors")
    assert max_diff(experts, load_file(run / "checkpoint-10" / "trainable.safetensors")) == 0


# ---------------------------------------------------------------- 3. --train all


def test_train_all_on_a_dense_model(run_cli, dense_folder, code_text_dir, tmp_path):
    run = tmp_path / "run"
    train(run_cli, dense_folder, code_text_dir, run, "--train", "all", "--max-steps", "8", "--batch-size", "2",
          "--eval-every", "0", "--eval-blocks", "4", "--save-every", "4")
    before, after = model_tensors(dense_folder), model_tensors(run / "final")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"--train all left these tensors untouched: {unchanged}"
    trained = load_file(run / "checkpoint-8" / "trainable.safetensors")
    assert set(trained) == set(before), sorted(set(trained) ^ set(before))
    assert max_diff({k: trained[k] for k in before if k in trained},
                    {k: after[k] for k in before if k in trained}) <= 1e-6
    import upcycle

    model = upcycle.load_model(run / "final")
    assert not model.config.is_moe
    loaded = dict(model.state_dict())
    assert all(torch.equal(loaded[k], after[k]) for k in after)
    summary = json_of(run / "training_summary.json")
    assert summary["train"] == "all" and summary["steps"] == 8
    assert summary["trainable_params"] == summary["total_params"] == sum(p.numel() for p in model.parameters())
    assert not (run / "experts.safetensors").exists()  # a dense model has no experts to list
    _, eval_loss = losses(run)
    assert sorted(map(int, eval_loss)) == [0, 8]
    assert eval_loss["8"] < eval_loss["0"] - 0.05, eval_loss
    assert math.isclose(summary["final_eval_loss"], eval_loss["8"])
    print(f"--train all: eval loss {eval_loss['0']:.4f} -> {eval_loss['8']:.4f}")


# ---------------------------------------------------------------- 4. --resume=PATH into a new run folder


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, moe_folder, code_text_dir) -> Path:
    """An uninterrupted 1-process run: 4 steps at batch 4, checkpoints at 2 and 4 (read-only)."""
    from upcycle.cli import main

    run = tmp_path_factory.mktemp("regression") / "four"
    main([str(a) for a in args(moe_folder, code_text_dir, run, "--max-steps", "4", "--save-every", "2",
                                "--batch-size", "4", *QUICK)])  # returns only on success
    assert checkpoint_steps(run) == [2, 4] and (run / "final").is_dir()
    return run


def test_resume_from_another_run_writes_only_the_new_folder(run_cli, moe_folder, code_text_dir, four_steps,
                                                            tmp_path):
    digest = tree_digest(four_steps)
    branch = tmp_path / "branch"
    train(run_cli, moe_folder, code_text_dir, branch, "--max-steps", "4", "--save-every", "2", "--batch-size", "4",
          *QUICK, f"--resume={four_steps / 'checkpoint-2'}")
    assert tree_digest(four_steps) == digest  # every file, bytes and mtime; nothing added or removed
    assert checkpoint_steps(branch) == [4] and (branch / "final" / "model.safetensors").is_file()
    got, want = losses(branch)[0], losses(four_steps)[0]
    assert sorted(map(int, got)) == [3, 4]
    assert all(abs(got[s] - want[s]) <= 1e-6 for s in got), (got, want)
    assert max_diff(load_file(branch / "experts.safetensors"), load_file(four_steps / "experts.safetensors")) <= 1e-6
    summary = json_of(branch / "training_summary.json")
    assert summary["steps"] == 4 and summary["resumed_from"]["step"] == 2
    assert summary["resumed_from"]["checkpoint"] == str((four_steps / "checkpoint-2").resolve())
    written = json_of(branch / ".upcycle-manifest.json")["files"]
    assert all((branch / f).is_file() for f in written) and "config.yaml" in written


# ---------------------------------------------------------------- 5. resume on another world size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 13 s on an idle 2-core machine, over 20 s when it is busy (two interpreters start)
def test_one_process_checkpoint_resumes_on_two_processes(moe_folder, code_text_dir, four_steps, tmp_path):
    """checkpoint-2 of a 1-process batch-4 run, resumed by 2 gloo processes at batch 2 to step 4, equals the
    uninterrupted 1-process run (same global batch)."""
    digest = tree_digest(four_steps)
    two = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), "-m", "upcycle"]
    command = args(moe_folder, code_text_dir, two, "--max-steps", "4", "--save-every", "2", "--batch-size", "2",
                   *QUICK, f"--resume={four_steps / 'checkpoint-2'}")
    try:
        done = subprocess.run(launch + [str(a) for a in command], env=env, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process resume did not finish in 300 s")
    assert done.returncode == 0, done.stderr[-3000:]
    state = json_of(two / "checkpoint-4" / "state.json")
    assert state["world_size"] == 2 and state["step"] == 4 and state["blocks_consumed"] == 4 * 2 * 2
    assert (two / "checkpoint-4" / "rng-1.json").is_file()
    assert max_diff(load_file(two / "experts.safetensors"), load_file(four_steps / "experts.safetensors")) <= 3e-5
    start = load_file(four_steps / "checkpoint-2" / "trainable.safetensors")
    assert max_diff(load_file(two / "experts.safetensors"), start) > 1e-4  # steps 3-4 really ran
    got, want = losses(two)[0], losses(four_steps)[0]
    assert sorted(map(int, got)) == [3, 4] and all(abs(got[s] - want[s]) <= 1e-4 for s in got), (got, want)
    assert tree_digest(four_steps) == digest


# ---------------------------------------------------------------- 6. averaging LoRA checkpoints


def test_average_of_lora_checkpoints_is_the_mean_of_the_folded_ones(run_cli, dense_folder, code_text_dir,
                                                                    tmp_path):
    run = tmp_path / "run"
    train(run_cli, dense_folder, code_text_dir, run, "--train", "lora", "--lora-r", "4", "--save-every", "2",
          "--max-steps", "4", "--batch-size", "2", *QUICK)
    assert checkpoint_steps(run) == [2, 4]
    assert not (run / "checkpoint-2" / "trainable.safetensors").exists()  # LoRA only: the adapter
    for step in (2, 4):
        code, _, err = run_cli("merge", run / f"checkpoint-{step}", "-o", tmp_path / f"fold-{step}")
        assert code == 0, err
    code, _, err = run_cli("merge", "--average", run / "checkpoint-2", run / "checkpoint-4", "-o", tmp_path / "avg")
    assert code == 0, err
    a, b, avg = (model_tensors(tmp_path / name) for name in ("fold-2", "fold-4", "avg"))
    base = model_tensors(dense_folder)
    assert a.keys() == b.keys() == avg.keys() == base.keys()
    assert not any("lora" in k for k in avg)
    for name in avg:
        assert torch.allclose(avg[name], (a[name] + b[name]) / 2, atol=1e-6, rtol=0), name
    moved = [k for k in base if not torch.equal(a[k], b[k])]
    assert any("q_proj" in k for k in moved) and any("mlp.up_proj" in k for k in moved)  # LoRA trained in between
    assert all(torch.equal(a[k], base[k]) for k in base if k.endswith(("embed_tokens.weight", "norm.weight")))
    import upcycle

    upcycle.load_model(tmp_path / "avg")


# ---------------------------------------------------------------- merge RUN takes the final tensors


def test_merge_finished_run_takes_final_tensors_not_the_latest_checkpoint(tmp_path, moe_folder):
    """A finished run's experts.safetensors wins over its latest checkpoint, and its summary is carried over.

    (Replaces test_merge.py's test_merge_finished_run_uses_final_tensors, whose experts.safetensors was a copy
    of the latest checkpoint's tensors, so merging the checkpoint instead passed too.)
    """
    from safetensors.torch import save_file
    from test_merge import expected_model, logits, make_run, trained_tensors

    from upcycle.folder import load_model
    from upcycle.merging import merge

    run = make_run(tmp_path, moe_folder, steps=(10, 30), finished=True)
    final = trained_tensors(load_model(moe_folder), seed=999)
    save_file(final, run / "experts.safetensors")
    merge(run, tmp_path / "merged")
    merged = logits(load_model(tmp_path / "merged"))
    reference = load_model(moe_folder)
    reference.load_state_dict(final, strict=False)
    assert (merged - logits(reference.eval())).abs().max() <= 1e-5
    assert (merged - logits(expected_model(moe_folder, run / "checkpoint-30"))).abs().max() > 1e-3
    summary = json_of(tmp_path / "merged" / "training_summary.json")
    assert summary["trainable_params"] == 16640  # the run's own summary (a value only it holds)
