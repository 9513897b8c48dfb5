"""One trainer per run folder: ``RUN/.upcycle-lock`` (pid, host, start time), never taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_safety import QUICK, assert_refused, listed
from test_train import args as train_args

from upcycle import train
from upcycle.run_folder import LOCK, RunFolder


def write_lock(run: Path, pid: int, host: str | None = None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2025-01-01T00:00:00"}))
    return lock


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def live_pid():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


@pytest.mark.parametrize("holder, words", [
    ("live", ("in use by another trainer", "pid", "wait for it")),
    ("dead", ("stale lock", "died", "delete", LOCK)),
    ("other-host", ("another machine", "elsewhere.example", "delete")),
    ("unreadable", ("unreadable", "delete")),
])
def test_a_locked_run_is_refused_naming_the_holder(holder, words, moe_folder, code_text_dir, tmp_path, run_cli,
                                                   live_pid):
    run = tmp_path / "run"
    assert run_cli(*train_args(moe_folder, code_text_dir, run, *QUICK))[0] == 0
    pid = {"live": live_pid, "dead": dead_pid(), "other-host": live_pid, "unreadable": 0}[holder]
    lock = write_lock(run, pid, "elsewhere.example" if holder == "other-host" else None)
    if holder == "unreadable":
        lock.write_text('{"pid": 1')
    before = snapshot(run)
    for extra in (("--force",), ("--max-steps", 2, "--resume")):
        message = assert_refused(run_cli(*train_args(moe_folder, code_text_dir, run, *QUICK, *extra)), *words)
        if holder != "unreadable":
            assert str(pid) in message
        assert snapshot(run) == before  # the lock is never stolen, nothing is written


def test_the_lock_is_held_while_training_and_released_after(moe_folder, code_text_dir, tmp_path, run_cli,
                                                             monkeypatch):
    run, seen = tmp_path / "run", []
    original = train.train_session

    def spy(session, checkpoint, progress):
        holder = json.loads((run / LOCK).read_text())
        seen.append(holder)
        assert LOCK not in listed(run)
        return original(session, checkpoint, progress)

    monkeypatch.setattr(train, "train_session", spy)
    code, _, err = run_cli(*train_args(moe_folder, code_text_dir, run, *QUICK))
    assert code == 0, err
    import os

    assert seen and seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname() and seen[0]["started"]
    assert not (run / LOCK).exists() and LOCK not in listed(run)


def test_the_lock_is_released_on_errors_and_ctrl_c(moe_folder, code_text_dir, tmp_path, run_cli, monkeypatch):
    run = tmp_path / "run"

    def interrupted(session, checkpoint, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_session", interrupted)
    code, _, err = run_cli(*train_args(moe_folder, code_text_dir, run, *QUICK))
    assert code == 130 and not (run / LOCK).exists(), err
    monkeypatch.undo()
    # an error after the lock is taken (a data path that does not exist): released, and no RUN left behind
    fresh = tmp_path / "fresh"
    assert_refused(run_cli(*train_args(moe_folder, tmp_path / "no-data", fresh, *QUICK)), "does not exist")
    assert not fresh.exists()


def test_only_the_main_process_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "0")
    with folder.lock():
        with pytest.raises(Exception, match="in use by another trainer"):
            with RunFolder(tmp_path / "run").lock():
                pass
        assert (tmp_path / "run" / LOCK).is_file()
    assert not (tmp_path / "run").exists()


def test_sigterm_saves_unlocks_and_resumes(moe_folder, code_text_dir, tmp_path):
    """A scheduler's SIGTERM stops the trainer like Ctrl-C: a checkpoint is saved, the lock released."""
    import multiprocessing
    import os
    import signal
    import time

    import torch
    from test_sigkill import argv, rows, trainer

    torch.set_num_threads(1)  # a forked child must not inherit a multi-threaded OpenMP pool
    run = tmp_path / "run"
    child = multiprocessing.get_context("fork").Process(target=trainer, args=(argv(moe_folder, code_text_dir, run,
                                                                                    False), None))
    child.start()
    deadline = time.monotonic() + 60
    while child.is_alive() and rows(run) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert child.is_alive(), "the trainer finished before it could be stopped"
    os.kill(child.pid, signal.SIGTERM)
    child.join(60)
    assert not child.is_alive() and not (run / LOCK).exists()
    saved = sorted(run.glob("checkpoint-*"))
    assert saved, "no checkpoint saved on SIGTERM"
    from upcycle.cli import main

    main(argv(moe_folder, code_text_dir, run, True))  # resumes to the end
    assert (run / "final").is_dir() and not (run / LOCK).exists()
