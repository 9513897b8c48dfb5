"""SIGKILL at any instant: the trainer dies inside checkpoint writes, while writing final/ and at seeded
random instants; each time the stale lock is reported, removed as the message says, and the run resumed.
The final trainable tensors equal an uninterrupted run's.

The trainer runs in a forked copy of this process (no re-import, so the test stays fast); the instants
inside writes come from ``UPCYCLE_CRASH_AT`` (:func:`upcycle.run_folder.crash_point`).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from upcycle.run_folder import CRASH_AT, LOCK

STEPS = 10
ARGS = ("--max-steps", STEPS, "--save-every", 2, "--eval-every", 0, "--eval-blocks", 1, "--batch-size", 1,
        "--seq-len", 32, "--log-every", 1, "--no-progress", "--report-to", "none")
# (crash point or None for a seeded random instant, whether to resume with --resume)
KILLS = [("checkpoint-write:4", False), ("checkpoint-publish:6", True), (None, True), ("checkpoint-write:8", True),
         (None, True), ("final-write", True), ("final-written", True)]


def argv(model: Path, data: Path, run: Path, resume: bool) -> list[str]:
    return [str(a) for a in ("continue-train", model, "--data", data, "-o", run, *ARGS)] + (["--resume"] if resume else [])


def trainer(args: list[str], crash: str | None) -> None:
    from upcycle.cli import main

    if crash:
        os.environ[CRASH_AT] = crash
    try:
        main(args)
    finally:
        os._exit(0)


def rows(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def kill_once(args: list[str], run: Path, crash: str | None, rng: random.Random) -> int:
    """Start the trainer; it dies at ``crash``, or is killed after a seeded random number of logged rows."""
    child = multiprocessing.get_context("fork").Process(target=trainer, args=(args, crash))
    child.start()
    if crash is None:
        target, deadline = rows(run) + rng.randint(1, 3), time.monotonic() + 60
        while child.is_alive() and rows(run) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    assert not child.is_alive(), "the trainer did not stop"
    return child.exitcode


def trained(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "experts.safetensors")


@pytest.mark.slow
def test_sigkill_at_any_instant_then_resume_matches_an_uninterrupted_run(moe_folder, code_text_dir, tmp_path,
                                                                          run_cli):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the forked trainers and the reference reduce in the same order
    try:
        reference = tmp_path / "reference"
        code, _, err = run_cli(*argv(moe_folder, code_text_dir, reference, resume=False))
        assert code == 0, err
        run, rng, killed = tmp_path / "run", random.Random(9), 0
        for crash, resume in KILLS:
            code = kill_once(argv(moe_folder, code_text_dir, run, resume), run, crash, rng)
            killed += code == -signal.SIGKILL
            if (run / LOCK).exists():  # a dead trainer's lock is reported, never taken over
                code, _, err = run_cli(*argv(moe_folder, code_text_dir, run, resume=True))
                assert code == 2 and "stale lock" in err and str(run / LOCK) in err, err
                (run / LOCK).unlink()  # what the message says to do
        assert killed >= 5
        code, _, err = run_cli(*argv(moe_folder, code_text_dir, run, resume=True))
        assert code == 0, err
    finally:
        torch.set_num_threads(threads)
    want, got = trained(reference), trained(run)
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    last = load_file(run / f"checkpoint-{STEPS}" / "trainable.safetensors")
    assert all(torch.allclose(last[k], got[k], atol=1e-6) for k in got)
    assert not list(run.glob("**/.*.tmp*")) and not (run / LOCK).exists()  # no stage or temporary file left
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, STEPS + 1))  # every step logged once, none torn or repeated
