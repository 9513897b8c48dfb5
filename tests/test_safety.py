"""Only delete what we wrote: the manifest every verb uses, and ``--force`` never escaping OUT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_merge import make_run
from test_train import args as train_args

from upcycle.errors import UpcycleError
from upcycle.manifest import NAME, Manifest

QUICK = ("--max-steps", 1, "--eval-every", 0, "--batch-size", 1, "--eval-blocks", 1)
QUICKSTART = ("--max-steps", 1, "--eval-blocks", 1, "--experts", 16, "--experts-per-token", 2, "--threads", 1)


def assert_refused(result, *words: str) -> str:
    code, stdout, stderr = result
    assert code == 2, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stdout + stderr
    for word in words:
        assert word in stderr, stderr
    return stderr


def listed(folder: Path) -> set[str]:
    return set(json.loads((folder / NAME).read_text())["files"])


@pytest.fixture
def escaping_out(tmp_path) -> tuple[Path, Path]:
    """OUT whose manifest lists a file beside it, relatively and absolutely."""
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("keep\n")
    (out / NAME).write_text(json.dumps({"files": ["../victim.txt", str(victim)]}))
    return out, victim


VERBS = {
    "expand": lambda d: ["expand", "--experts", 16, "--experts-per-token", 2, d["dense"]],
    "merge": lambda d: ["merge", make_run(d["tmp"], d["moe"])],
    "merge --average": lambda d: ["merge", "--average", d["moe"], d["moe"]],
    "export": lambda d: ["export", d["moe"]],
    "export --adapter-only": lambda d: ["export", d["moe"], "--adapter-only", "--base", d["dense"]],
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_force_never_deletes_outside_out(verb, escaping_out, dense_folder, moe_folder, tmp_path, run_cli):
    out, victim = escaping_out
    command = VERBS[verb]({"dense": dense_folder, "moe": moe_folder, "tmp": tmp_path / "src"})
    assert_refused(run_cli(*command, "-o", out, "--force"), "../victim.txt", "inside")
    assert victim.read_text() == "keep\n"
    assert [p.name for p in out.iterdir()] == [NAME]  # nothing written either
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_continue_train_force_never_deletes_outside_run(escaping_out, moe_folder, code_text_dir, run_cli):
    run, victim = escaping_out
    assert_refused(run_cli(*train_args(moe_folder, code_text_dir, run, *QUICK, "--force")), "../victim.txt")
    assert victim.read_text() == "keep\n"
    assert [p.name for p in run.iterdir()] == [NAME]


def test_symlinked_subfolder_is_refused(tmp_path, dense_folder, run_cli):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "config.json").write_text("theirs")
    (out / "sub").symlink_to(outside, target_is_directory=True)
    (out / NAME).write_text(json.dumps({"files": ["sub/config.json"]}))
    assert_refused(run_cli("expand", "--experts", 16, dense_folder, "-o", out, "--force"), "symlink")
    assert (outside / "config.json").read_text() == "theirs"
    with pytest.raises(UpcycleError, match="symlink"):
        Manifest(out).remove_listed()
    assert (outside / "config.json").read_text() == "theirs"


def test_a_listed_symlink_is_removed_as_a_link(tmp_path):
    root, target = tmp_path / "root", tmp_path / "target.txt"
    (root / "a").mkdir(parents=True)
    target.write_text("theirs")
    (root / "a" / "link.txt").symlink_to(target)
    (root / "a" / "ours.bin").write_text("ours")
    (root / "mine.txt").write_text("mine")
    manifest = Manifest(root)
    manifest.record(root / "a")  # the link is not recorded: only regular files are ours
    assert manifest.read() == {"a/ours.bin"}
    manifest.write(["a/ours.bin", "a/link.txt"])
    assert sorted(manifest.remove_listed()) == ["a/link.txt", "a/ours.bin"]
    assert target.read_text() == "theirs" and (root / "mine.txt").read_text() == "mine"
    assert not (root / "a").exists() and root.is_dir()  # emptied folders go, never the root
    manifest.write(["a/x", "a/y/z", "b"])
    manifest.forget(root / "a")  # drops entries only
    assert manifest.read() == {"b"}


@pytest.mark.parametrize("entry", ["..", "a/../../x", "/etc/passwd", "./a", "a//b", "", "a/", "c:\\x"])
def test_entries_outside_the_folder_are_refused_before_anything_is_deleted(tmp_path, entry):
    (tmp_path / "ours.txt").write_text("ours")
    manifest = Manifest(tmp_path)
    manifest.write(["ours.txt", entry])
    with pytest.raises(UpcycleError, match="inside"):
        manifest.remove_listed()
    assert (tmp_path / "ours.txt").is_file()


def test_continue_train_twice_with_force_keeps_the_users_notes(moe_folder, code_text_dir, tmp_path, run_cli):
    run = tmp_path / "run"
    assert run_cli(*train_args(moe_folder, code_text_dir, run, *QUICK))[0] == 0
    (run / "notes.txt").write_text("mine")
    for _ in range(2):
        code, _, err = run_cli(*train_args(moe_folder, code_text_dir, run, *QUICK, "--force"))
        assert code == 0, err
        assert (run / "notes.txt").read_text() == "mine"
        assert "notes.txt" not in listed(run)
    assert {"config.yaml", "metrics.jsonl", "training_summary.json", "final/config.json",
            "final/.upcycle-manifest.json", "checkpoint-1/state.json"} <= listed(run)


def test_resume_keeps_a_users_file_in_final(moe_folder, code_text_dir, tmp_path, run_cli):
    run = tmp_path / "run"
    assert run_cli(*train_args(moe_folder, code_text_dir, run, *QUICK))[0] == 0
    (run / "final" / "NOTES.md").write_text("mine")
    code, _, err = run_cli(*train_args(moe_folder, code_text_dir, run, *QUICK, "--max-steps", 2, "--resume"))
    assert code == 0, err
    assert (run / "final" / "NOTES.md").read_text() == "mine"
    assert json.loads((run / "final" / "training_summary.json").read_text())["steps"] == 2
    assert "final/NOTES.md" not in listed(run) and "NOTES.md" not in listed(run / "final")


def test_torn_manifest_is_a_one_line_error(tmp_path, dense_folder, run_cli):
    out = tmp_path / "out"
    expand = ("expand", "--experts", 16, dense_folder, "-o", out)
    assert run_cli(*expand)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != NAME}
    for torn in (b'{"files": ["config.j', b"\xff\xfe", b"[1, 2]", b'{"files": 5}', b'{"files": [1]}'):
        (out / NAME).write_bytes(torn)
        assert_refused(run_cli(*expand, "--force"), "unreadable", "remove")
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != NAME} == before
    for name in before:  # a folder holding only the torn manifest is not refused forever
        (out / name).unlink()
    code, _, err = run_cli(*expand, "--force")
    assert code == 0, err
    assert "config.json" in listed(out)


def test_torn_run_manifest_is_a_one_line_error(tmp_path, moe_folder, code_text_dir, run_cli):
    run = tmp_path / "run"
    assert run_cli(*train_args(moe_folder, code_text_dir, run, *QUICK))[0] == 0
    (run / NAME).write_text('{"files": ["config.ya')
    assert_refused(run_cli(*train_args(moe_folder, code_text_dir, run, *QUICK, "--force")), "unreadable")
    assert (run / "final" / "config.json").is_file()


def test_manifest_is_written_atomically(tmp_path, monkeypatch):
    manifest = Manifest(tmp_path)
    manifest.write(["a.txt"])

    def broken(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        manifest.write(["b.txt"])
    assert manifest.read() == {"a.txt"}
    assert [p.name for p in tmp_path.iterdir()] == [NAME]  # no temporary file left


def test_quickstart_checks_its_options_before_writing(tmp_path, run_cli):
    out = tmp_path / "qs"
    assert_refused(run_cli("quickstart", out, "--experts", 15), "perfect square")
    assert_refused(run_cli("quickstart", out, "--experts", 16, "--experts-per-token", 17), "--experts-per-token")
    assert_refused(run_cli("quickstart", out, "--max-steps", 0), "max_steps")
    assert not out.exists()


def test_quickstart_force_keeps_a_users_file(tmp_path, run_cli):
    out = tmp_path / "qs"
    code, stdout, err = run_cli("quickstart", out, *QUICKSTART)
    assert code == 0, stdout + err
    assert {"quickstart.json", "data/stdlib-train.jsonl", "moe/config.json", "run/final/config.json",
            "model/config.json", "adapter/experts.safetensors"} <= listed(out)
    (out / "model" / "NOTES.md").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    code, stdout, err = run_cli("quickstart", out, *QUICKSTART, "--force")
    assert code == 0, stdout + err
    assert (out / "model" / "NOTES.md").read_text() == "mine" and (out / "notes.txt").read_text() == "mine too"
    assert "model/NOTES.md" not in listed(out) and (out / "model" / "config.json").is_file()
