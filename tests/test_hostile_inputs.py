"""A catalogue of hostile and broken inputs, for every verb.

Each case builds its inputs under ``IN/`` (or uses the shared tiny checkpoints) and runs the CLI in
process. Every case must: exit non-zero, print exactly one ``error: ...`` line on stderr and no
traceback, leave the inputs byte-identical (hashed before and after), and leave nothing half-written
(no OUT, or OUT as it was, and no staging folders beside it). No code from an input is ever run: the
payloads below create ``PWNED`` when executed, and it must never appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_merge import make_run

MARKER = "PWNED"
QUICK = ("--max-steps", 1, "--eval-every", 0, "--batch-size", 1, "--eval-blocks", 1, "--seq-len", 32,
         "--no-progress", "--report-to", "none")


class Payload:
    """Unpickling this creates ``MARKER`` beside the file (it must never happen)."""

    def __init__(self, where: Path):
        self.where = str(where)

    def __reduce__(self):
        return (Path.touch, (Path(self.where),))


@dataclass
class World:
    """What a case may use: the shared checkpoints, its own input folder and where OUT goes."""

    tmp: Path
    dense: Path
    moe: Path
    data: Path
    run: Path  # a finished run with checkpoint-1 and checkpoint-2 (copy it before changing it)

    @property
    def inputs(self) -> Path:
        path = self.tmp / "IN"
        path.mkdir(exist_ok=True)
        return path

    @property
    def out(self) -> Path:
        return self.tmp / "out dir ü" / "OUT"

    @property
    def marker(self) -> Path:
        return self.inputs / MARKER

    def copy(self, folder: Path, name: str) -> Path:
        return Path(shutil.copytree(folder, self.inputs / name))

    def train(self, model: Path, *extra, out: Path | None = None) -> list:
        return ["continue-train", model, "--data", self.data, "-o", out or self.out, *QUICK, *extra]


def non_doge(w: World) -> Path:
    folder = w.copy(w.dense, "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    return folder


def bad_json_config(w: World) -> Path:
    folder = w.copy(w.dense, "badjson")
    (folder / "config.json").write_text('{"model_type": "doge", ')
    return folder


def truncated_weights(w: World) -> Path:
    folder = w.copy(w.dense, "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def absurd_header(w: World) -> Path:
    folder = w.copy(w.dense, "absurd")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    return folder


def pickle_only(w: World) -> Path:
    folder = w.copy(w.dense, "pickles")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(w.marker)))
    return folder


def evil_moe(w: World) -> Path:
    """The MoE checkpoint with remote code that creates MARKER on import (auto_map points at it)."""
    folder = w.copy(w.moe, "evil")
    (folder / "modeling_upcycle_doge.py").write_text(f"from pathlib import Path\nPath({str(w.marker)!r}).touch()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_upcycle_doge.X", "AutoModelForCausalLM": "modeling_upcycle_doge.X"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def file_named(w: World, name: str, content: bytes) -> Path:
    path = w.inputs / name
    path.write_bytes(content)
    return path


def recipe(w: World, text: str) -> Path:
    return file_named(w, "recipe.yaml", text.encode())


def run_copy(w: World, damage: Callable[[Path], None] | None = None) -> Path:
    run = w.copy(w.run, "run")
    if damage is not None:
        damage(run)
    return run


def resume_args(w: World, run: Path, *extra) -> list:
    return ["continue-train", w.moe, "--data", w.data, "-o", run, *QUICK, "--max-steps", 3, *extra]


def locked(run: Path) -> None:
    import socket

    (run / ".upcycle-lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "started": "now"}))


def pickled_rng(run: Path) -> None:
    (run / "checkpoint-2" / "rng-0.json").unlink()
    (run / "checkpoint-2" / "rng-0.pt").write_bytes(pickle.dumps(Payload(run.parent / MARKER)))


def damaged(name: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / "checkpoint-2" / name).write_bytes(b"\x00garbage" * 8)
    return damage


def existing_out(w: World) -> Path:
    w.out.mkdir(parents=True)
    (w.out / "notes.txt").write_text("mine")
    return w.out


def read_only_parent(w: World) -> Path:
    parent = w.out.parent
    parent.mkdir(parents=True)
    parent.chmod(0o555)
    return parent


# id -> (argv built from the world, words the one error line must hold)
CASES: dict[str, tuple[Callable[[World], list], tuple[str, ...]]] = {
    # expand
    "expand non-square experts": (lambda w: ["expand", w.dense, "--experts", 15, "-o", w.out], ("perfect square",)),
    "expand zero experts": (lambda w: ["expand", w.dense, "--experts", 0, "-o", w.out], ("positive",)),
    "expand negative experts": (lambda w: ["expand", w.dense, "--experts", -16, "-o", w.out], ("positive",)),
    "expand absurd experts": (lambda w: ["expand", w.dense, "--experts", 100_000_000, "-o", w.out],
                              ("--experts 100000000", "GB")),
    "expand k > N": (lambda w: ["expand", w.dense, "--experts", 16, "--experts-per-token", 17, "-o", w.out],
                     ("--experts-per-token",)),
    "expand experts not a number": (lambda w: ["expand", w.dense, "--experts", "lots", "-o", w.out],
                                    ("--experts", "--help")),
    "expand missing SRC": (lambda w: ["expand", w.inputs / "no such model", "--experts", 16, "-o", w.out],
                           ("does not exist",)),
    "expand SRC is a file": (lambda w: ["expand", file_named(w, "model.txt", b"hi"), "--experts", 16, "-o", w.out],
                             ("is a file",)),
    "expand non-Doge SRC": (lambda w: ["expand", non_doge(w), "--experts", 16, "-o", w.out], ("not Doge",)),
    "expand non-JSON config": (lambda w: ["expand", bad_json_config(w), "--experts", 16, "-o", w.out],
                               ("not valid JSON",)),
    "expand truncated safetensors": (lambda w: ["expand", truncated_weights(w), "--experts", 16, "-o", w.out],
                                     ("safetensors",)),
    "expand absurd safetensors header": (lambda w: ["expand", absurd_header(w), "--experts", 16, "-o", w.out],
                                         ("safetensors",)),
    "expand pickle-only folder": (lambda w: ["expand", pickle_only(w), "--experts", 16, "-o", w.out],
                                  (".bin", "safe_serialization")),
    "expand an MoE with remote code": (lambda w: ["expand", evil_moe(w), "--experts", 16, "-o", w.out],
                                       ("already has",)),
    "expand bad --layers": (lambda w: ["expand", w.dense, "--experts", 16, "--layers", "7-9", "-o", w.out],
                            ("--layers",)),
    "expand OUT inside SRC": (lambda w: ["expand", w.copy(w.dense, "d"), "--experts", 16, "-o", w.inputs / "d" / "o"],
                              ("inside the source",)),
    "expand OUT is a file": (lambda w: ["expand", w.dense, "--experts", 16, "-o", file_named(w, "f", b"x")],
                             ("is a file",)),
    "expand OUT not empty": (lambda w: ["expand", w.dense, "--experts", 16, "-o", existing_out(w)], ("not empty",)),
    "expand read-only OUT": (lambda w: ["expand", w.dense, "--experts", 16, "-o", read_only_parent(w) / "OUT"],
                             ("cannot write",)),
    # continue-train
    "train lr inf": (lambda w: w.train(w.moe, "--lr", "inf"), ("--lr", "finite")),
    "train negative weight decay": (lambda w: w.train(w.moe, "--weight-decay", -1), ("weight",)),
    "train zero steps": (lambda w: w.train(w.moe, "--max-steps", 0), ("max_steps",)),
    "train dense model, experts mode": (lambda w: w.train(w.dense), ("dense model",)),
    "train non-Doge model": (lambda w: w.train(non_doge(w)), ("not Doge",)),
    "train seq-len too long": (lambda w: w.train(w.moe, "--seq-len", 100_000), ("max_position_embeddings",)),
    "train missing data": (lambda w: ["continue-train", w.moe, "--data", w.inputs / "nope", "-o", w.out, *QUICK],
                           ("does not exist",)),
    "train empty data": (lambda w: ["continue-train", w.moe, "--data", file_named(w, "empty.txt", b""), "-o", w.out,
                                    *QUICK], ("no text",)),
    "train binary .txt": (lambda w: ["continue-train", w.moe, "--data", file_named(w, "bin ü.txt", bytes(range(256)) * 64),
                                     "-o", w.out, *QUICK], ("UTF-8",)),
    "train binary .txt streaming": (lambda w: ["continue-train", w.moe, "--data",
                                               file_named(w, "bin.txt", bytes(range(256)) * 64), "-o", w.out, *QUICK,
                                               "--streaming"], ("bin.txt", "UTF-8")),
    "train malformed jsonl": (lambda w: ["continue-train", w.moe, "--data",
                                         file_named(w, "rows.jsonl", b'{"text": "a"}\n{oops\n'), "-o", w.out, *QUICK],
                              ("rows.jsonl", "malformed")),
    "train recipe YAML tag": (lambda w: w.train(w.moe, "--recipe", recipe(
        w, f"max_steps: !!python/object/apply:pathlib.Path.touch [{str(w.marker)!r}]\n")), ("recipe",)),
    "train recipe type error": (lambda w: w.train(w.moe, "--recipe", recipe(w, "lr: fast\n")), ("lr",)),
    "train recipe unknown key": (lambda w: w.train(w.moe, "--recipe", recipe(w, "max_stepz: 3\n")), ("max_stepz",)),
    "train recipe not a mapping": (lambda w: w.train(w.moe, "--recipe", recipe(w, "- 1\n- 2\n")), ("recipe",)),
    "train remote-code model, bad flag": (lambda w: w.train(evil_moe(w), "--lr", "-1"), ("--lr",)),
    "resume corrupt optimizer.pt": (lambda w: resume_args(w, run_copy(w, damaged("optimizer.pt")), "--resume"),
                                    ("optimizer.pt", "--resume=", "checkpoint-1")),
    "resume corrupt state.json": (lambda w: resume_args(w, run_copy(w, damaged("state.json")), "--resume"),
                                  ("state.json", "--resume=", "checkpoint-1")),
    "resume corrupt trainable tensors": (lambda w: resume_args(w, run_copy(w, damaged("trainable.safetensors")),
                                                               "--resume"), ("trainable.safetensors", "checkpoint-1")),
    "resume pickled rng": (lambda w: resume_args(w, run_copy(w, pickled_rng), "--resume"),
                           ("rng-0.json", "checkpoint-1")),
    "resume a locked run": (lambda w: resume_args(w, run_copy(w, locked), "--resume"), ("in use", str(os.getpid()))),
    "resume not a checkpoint": (lambda w: w.train(w.moe, f"--resume={w.inputs}"), ("not a checkpoint",)),
    "train into a run without --force": (lambda w: resume_args(w, run_copy(w)), ("already holds a run",)),
    # merge
    "merge missing run": (lambda w: ["merge", w.inputs / "no run", "-o", w.out], ("does not exist",)),
    "merge a model folder": (lambda w: ["merge", w.moe, "-o", w.out], ("not a run",)),
    "merge damaged checkpoint": (lambda w: ["merge", run_copy(w, damaged("trainable.safetensors")) / "checkpoint-2",
                                            "-o", w.out], ("trainable.safetensors",)),
    "merge onto a non-Doge base": (lambda w: ["merge", w.run, "--base", non_doge(w), "-o", w.out], ("not Doge",)),
    "merge --average dense with MoE": (lambda w: ["merge", "--average", w.dense, w.moe, "-o", w.out], ("not in",)),
    "merge --average NaN weights": (lambda w: ["merge", "--average", w.moe, w.moe, "--method", "wma", "--weights",
                                               "nan,1", "-o", w.out], ("weights",)),
    "merge --average pickle-only": (lambda w: ["merge", "--average", pickle_only(w), w.dense, "-o", w.out], (".bin",)),
    "merge --average truncated": (lambda w: ["merge", "--average", truncated_weights(w), w.dense, "-o", w.out],
                                  ("safetensors",)),
    # export
    "export missing model": (lambda w: ["export", w.inputs / "nothing", "-o", w.out], ("does not exist",)),
    "export --push without --repo-id": (lambda w: ["export", w.moe, "-o", w.out, "--push"], ("--repo-id",)),
    "export bad repo id": (lambda w: ["export", w.moe, "-o", w.out, "--repo-id", "not a repo!"], ("--repo-id",)),
    "export no OUT": (lambda w: ["export", w.moe], ("-o OUT",)),
    "export non-Doge": (lambda w: ["export", non_doge(w), "-o", w.out], ("not Doge",)),
    "export absurd header": (lambda w: ["export", absurd_header(w), "-o", w.out], ("safetensors",)),
    "export --adapter-only of a dense model": (lambda w: ["export", w.dense, "--adapter-only", "--base", w.dense,
                                                          "-o", w.out], ("dense",)),
    "export --adapter-only pickle base": (lambda w: ["export", w.moe, "--adapter-only", "--base", pickle_only(w),
                                                     "-o", w.out], (".bin",)),
    # quickstart
    "quickstart non-square experts": (lambda w: ["quickstart", w.out, "--experts", 15], ("perfect square",)),
    "quickstart negative experts": (lambda w: ["quickstart", w.out, "--experts", -16], ("positive",)),
    "quickstart absurd experts": (lambda w: ["quickstart", w.out, "--experts", 100_000_000],
                                  ("--experts 100000000", "GB")),
    "quickstart k > N": (lambda w: ["quickstart", w.out, "--experts", 16, "--experts-per-token", 17],
                         ("--experts-per-token",)),
    "quickstart zero steps": (lambda w: ["quickstart", w.out, "--max-steps", 0], ("max_steps",)),
    "quickstart lr nan": (lambda w: ["quickstart", w.out, "--lr", "nan"], ("lr",)),
    "quickstart OUT is a file": (lambda w: ["quickstart", file_named(w, "qs", b"x")], ("file",)),
    # the CLI itself
    "unknown verb": (lambda w: ["upcycle-everything"], ("No such command",)),
    "unknown option": (lambda w: ["expand", w.dense, "--experts", 16, "--frobnicate"], ("--frobnicate",)),
}


def tree_hash(*roots: Path) -> dict[str, str]:
    """Every file and symlink under ``roots`` -> sha256 of its bytes (or its link target)."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted([root, *root.rglob("*")]):
            key = str(path)
            if path.is_symlink():
                out[key] = "link:" + os.readlink(path)
            elif path.is_file():
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                out[key] = "dir"
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, moe_folder, code_text_dir) -> Path:
    from upcycle.cli import main

    run = tmp_path_factory.mktemp("hostile") / "run"
    try:
        main(["continue-train", str(moe_folder), "--data", str(code_text_dir), "-o", str(run),
              *map(str, QUICK), "--max-steps", "2", "--save-every", "1"])
    except SystemExit as done:
        assert done.code in (0, None)
    assert (run / "checkpoint-1").is_dir() and (run / "checkpoint-2").is_dir()
    return run


@pytest.fixture
def world(tmp_path, dense_folder, moe_folder, code_text_dir, finished_run, monkeypatch) -> World:
    from tqdm.auto import tqdm

    for module in ("expansion", "merging", "exporting"):  # progress bars are not errors: stderr holds only the error
        monkeypatch.setattr(f"upcycle.{module}.tqdm", lambda *args, **kwargs: tqdm(*args, **{**kwargs, "disable": True}))
    return World(tmp_path, dense_folder, moe_folder, code_text_dir, finished_run)


def assert_one_error_line(code: int, stdout: str, stderr: str, words: tuple[str, ...]) -> str:
    assert code != 0, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stdout + stderr and "please report" not in stderr, stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input(case, world, run_cli, monkeypatch):
    build, words = CASES[case]
    if case == "expand read-only OUT" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the case needs an unprivileged user")
    argv = build(world)
    shared = (world.dense, world.moe, world.data, world.run)
    before, out_before = tree_hash(world.inputs, *shared), tree_hash(world.out.parent)
    try:
        code, stdout, stderr = run_cli(*argv)
    finally:
        if world.out.parent.exists():
            world.out.parent.chmod(0o755)
    assert_one_error_line(code, stdout, stderr, words)
    assert tree_hash(world.inputs, *shared) == before  # inputs byte-identical
    assert tree_hash(world.out.parent) == out_before  # nothing (half-)written beside or in OUT
    assert not (world.inputs / MARKER).exists() and not (world.tmp / MARKER).exists()  # no input code ran
    assert not list(world.inputs.rglob(".upcycle-lock")) or case == "resume a locked run"


def test_the_catalogue_is_large():
    verbs = {argv.split()[0] for argv in CASES}
    assert len(CASES) >= 40 and {"expand", "train", "resume", "merge", "export", "quickstart"} <= verbs


# ---------------------------------------------------------------- full disks


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KB tmpfs (needs root and mount); skipped with the reason elsewhere."""
    mount = tmp_path / "small disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a full disk is a small tmpfs, which only root can mount here")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()[:100]}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def filler(disk: Path, leave: int) -> None:
    """Fill ``disk`` until about ``leave`` bytes are free."""
    free = shutil.disk_usage(disk).free
    (disk / "filler.bin").write_bytes(b"\0" * max(free - leave, 0))


@pytest.mark.parametrize("verb", ["expand", "merge --average", "merge", "export", "continue-train"])
def test_a_full_disk_is_one_line_and_leaves_nothing(verb, small_disk, world, run_cli):
    out = small_disk / "OUT"
    argv = {"expand": ["expand", world.dense, "--experts", 16, "-o", out],
            "merge --average": ["merge", "--average", world.moe, world.moe, "-o", out],
            "merge": ["merge", world.run, "-o", out],
            "export": ["export", world.moe, "-o", out],
            "continue-train": world.train(world.moe, out=out)}[verb]
    filler(small_disk, 96 * 1024)  # too little for any model folder (expand refuses up front)
    before = tree_hash(world.dense, world.moe, world.run)
    code, stdout, stderr = run_cli(*argv)
    line = assert_one_error_line(code, stdout, stderr, ())
    assert "no space left" in line or "free" in line, line
    assert tree_hash(world.dense, world.moe, world.run) == before
    leftovers = sorted(p.name for p in small_disk.iterdir() if p.name != "filler.bin")
    if verb == "continue-train":  # the run folder keeps its config and manifest; never an unfinished checkpoint
        assert not list(out.glob(".checkpoint-*")) and not list(out.glob("checkpoint-*")), list(out.iterdir())
    else:
        assert leftovers == [], leftovers


def test_a_read_only_disk_is_one_line(small_disk, world, run_cli):
    """As root (where chmod does not stop writes), a read-only mount: expand and train refuse in one line."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        for argv in (["expand", world.dense, "--experts", 16, "-o", small_disk / "OUT"],
                     world.train(world.moe, out=small_disk / "RUN")):
            line = assert_one_error_line(*run_cli(*argv), ())
            assert "write" in line or "Read-only" in line, line
        assert list(small_disk.iterdir()) == []
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=False)


def test_disk_full_while_writing_safetensors_is_one_line(world, run_cli, monkeypatch):
    """Where no tmpfs can be mounted: safetensors' own ENOSPC error (no errno) still becomes one line."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr("upcycle.checkpoint.save_file", full)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    for argv in (["merge", world.run, "-o", world.out], world.train(world.moe)):
        code, stdout, stderr = run_cli(*argv)
        assert "no space left" in assert_one_error_line(code, stdout, stderr, ())
    assert not world.out.parent.exists() or not list(world.out.parent.glob(".*tmp*"))


# ---------------------------------------------------------------- code in inputs, umask


def test_remote_code_in_inputs_is_never_imported(world, run_cli):
    evil = evil_moe(world)
    for argv in (["export", evil, "-o", world.tmp / "exported"],
                 ["merge", "--average", evil, world.moe, "-o", world.tmp / "averaged"]):
        code, stdout, stderr = run_cli(*argv)
        assert code == 0, stderr
    assert not world.marker.exists()


def test_outputs_follow_the_umask(world, run_cli):
    previous = os.umask(0o022)
    try:
        code, _, stderr = run_cli("expand", world.dense, "--experts", 16, "-o", world.out)
    finally:
        os.umask(previous)
    assert code == 0, stderr
    assert world.out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in world.out.iterdir()} == {0o644}
