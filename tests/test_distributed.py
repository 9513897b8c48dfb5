"""Two gloo processes on CPU train the same experts as one process at the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import json_of

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"


def common(model: Path, data: Path, run: Path, batch: int) -> list[str]:
    return ["continue-train", str(model), "--recipe", str(RECIPE), "--data", str(data), "-o", str(run),
            "--max-steps", "3", "--batch-size", str(batch), "--eval-every", "0", "--eval-blocks", "2",
            "--no-progress", "--report-to", "none"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "experts.safetensors"), load_file(b / "experts.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def test_two_processes_match_one_at_the_same_global_batch(run_cli, moe_folder, code_text_dir, tmp_path):
    two = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), "-m", "upcycle"]
    try:
        done = subprocess.run(launch + common(moe_folder, code_text_dir, two, batch=2), env=env,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process run did not finish in 300 s")
    assert done.returncode == 0, done.stderr[-3000:]
    state = json_of(two / "checkpoint-3" / "state.json")
    assert state["world_size"] == 2 and state["blocks_consumed"] == 3 * 2 * 2
    assert (two / "checkpoint-3" / "rng-1.json").is_file()

    one = tmp_path / "one"
    assert run_cli(*common(moe_folder, code_text_dir, one, batch=4))[0] == 0
    small = tmp_path / "small"
    assert run_cli(*common(moe_folder, code_text_dir, small, batch=2))[0] == 0

    assert max_diff(two, one) <= 3e-5  # float noise of a different reduction order
    assert max_diff(two, small) > 1e-4  # a run that silently used one process would match this one
    trained = load_file(one / "experts.safetensors")
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in trained.items() if "up_embed" in k)
