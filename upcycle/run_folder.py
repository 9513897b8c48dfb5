"""What a training run folder holds, answered in one place (layout: docs/run-layout.md).

A run folder (``continue-train -o RUN``) holds ``checkpoint-STEP/`` folders and, once finished,
``experts.safetensors`` / ``adapter/`` / ``final/`` / ``training_summary.json``. This module says which
checkpoint is the latest, what a finished run's trained state is, which base model a run trained,
and folds trained tensors onto that base (:func:`fold`, used by the trainer for ``final/`` and by
``upcycle merge``); :func:`training_summary` is the one summary schema.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import re
import shutil
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from upcycle.checkpoint import load_tensors, read_json
from upcycle.errors import DamagedCheckpoint, UpcycleError
from upcycle.folder import MANIFEST, SUMMARY, load_model, read_config, resolve_source, weight_files
from upcycle.manifest import Manifest
from upcycle.modeling_upcycle_doge import is_routed_tensor, routed_tensor_shapes
from upcycle.safetensors_stream import scan


OUR_NAMES = ("config.yaml", "metrics.jsonl", "experts.safetensors", SUMMARY, "adapter", "final",
             "logs", "retain.safetensors")
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
LOCK = ".upcycle-lock"  # held by the trainer writing RUN: {"pid", "host", "started"}
# unfinished writes of a killed trainer (stages, manifest and metrics temporaries), removed under the lock
STAGES = (".checkpoint-*.tmp", ".final.tmp-*", f"{MANIFEST}.*.tmp", f"final/{MANIFEST}.*.tmp", "metrics.jsonl.tmp")
CRASH_AT = "UPCYCLE_CRASH_AT"  # tests only: "POINT" or "POINT:STEP" kills the trainer there (crash_point)


def crash_point(name: str, step: int | None = None) -> None:
    """A named instant inside the run folder's writes; SIGKILLs this process when ``UPCYCLE_CRASH_AT``
    names it (how tests/test_sigkill.py dies mid-write). A no-op otherwise."""
    wanted = os.environ.get(CRASH_AT)
    if wanted and wanted in (name, f"{name}:{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


class RunFolder:
    """RUN and the manifest of the files this tool wrote there.

    Files already in RUN and not listed when the object is made (a user's) are never recorded by
    ``record`` of a folder, so they are never deleted later either.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = self.path / MANIFEST
        self.files = Manifest(self.path)
        listed = set(self.files.entries())
        self.foreign = {n for n in self.files.files_under(self.path) if n not in listed} if self.path.is_dir() else set()

    def written(self) -> set[str]:
        """The files the manifest lists, every entry checked (an unreadable manifest lists none)."""
        return self.files.read()

    def record(self, *paths: Path) -> None:
        """Add files this run wrote to the manifest: a file as named; a folder, every file under it
        except those that were there, unlisted, before this run."""
        found = []
        for path in paths:
            names = self.files.files_under(path)
            found += names if Path(path).is_file() and not Path(path).is_symlink() else \
                [n for n in names if n not in self.foreign]
        self.files.record(*(self.path / n for n in found))

    def forget(self, folder: Path) -> None:
        """Delete the files this run wrote under ``folder`` (a user's files there stay), the folders
        left empty, and their manifest entries."""
        self.files.remove_listed(folder)

    def ours(self, entry: Path) -> bool:
        return entry.name in OUR_NAMES or bool(CHECKPOINT.match(entry.name))

    def check_fresh(self, force: bool) -> None:
        """Refuse a RUN that holds another run, unless ``force`` (then only our own files may go)."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise UpcycleError(f"{self.path} is a file: choose another --output-dir")
        entries = sorted(e for e in self.path.iterdir() if not e.name.startswith(MANIFEST) and e.name != LOCK)
        if entries and not force:
            raise UpcycleError(f"{self.path} already holds a run ({entries[0].name}): pass --resume to continue it, "
                               "--force to start over, or choose another --output-dir")
        written = self.files.owned(ignore=[LOCK])  # every entry inside RUN, none behind a symlink; a damaged one refuses
        for entry in filter(self.ours, entries):
            if entry.is_symlink():
                raise UpcycleError(f"{entry} is a symlink: upcycle does not write through links in a run folder; "
                                   "remove it or choose another --output-dir")
            foreign = [n for n in self.files.files_under(entry) if n not in written]
            if foreign:
                raise UpcycleError(f"{self.path / foreign[0]} was not written by upcycle: --force only replaces "
                                   "upcycle's own files; move it away or choose another --output-dir")

    def clear(self) -> None:
        """Delete the files the manifest lists (``--force``), then the folders they leave empty."""
        self.files.remove_listed()
        self.manifest.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``RUN/.upcycle-lock`` (pid, host, start time) while a trainer writes RUN.

        Only the main process (``RANK`` 0) takes it. A lock held by anyone, live or dead, is reported
        (:func:`lock_error`) and never taken over. Released on any exit that runs Python's ``finally``
        (errors, Ctrl-C); a RUN this call created and left empty is removed.
        """
        if os.environ.get("RANK", "0") != "0":
            yield
            return
        created = [p for p in [self.path, *self.path.parents] if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UpcycleError(f"cannot create {self.path} ({error.strerror}): choose an --output-dir you can "
                               "write to") from None
        lock = self.path / LOCK
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            handle = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            raise lock_error(lock) from None
        except OSError as error:
            self.release(lock, created, mine=False)
            raise UpcycleError(f"cannot write {lock} ({error.strerror}): choose an --output-dir you can "
                               "write to") from None
        try:
            with os.fdopen(handle, "w") as out:
                out.write(json.dumps(holder) + "\n")
            self.remove_stages()
            yield
        finally:
            self.release(lock, created, mine=True)

    def check_unlocked(self) -> None:
        """Refuse early when RUN holds a lock (the same error :meth:`lock` gives)."""
        if os.environ.get("RANK", "0") == "0" and os.path.lexists(self.path / LOCK):
            raise lock_error(self.path / LOCK)

    def remove_stages(self) -> None:
        """Delete unfinished checkpoint and final/ stages left by a killed trainer (call holding the lock)."""
        for pattern in STAGES:
            for stage in self.path.glob(pattern):
                if stage.is_symlink() or stage.is_file():
                    stage.unlink(missing_ok=True)
                elif stage.is_dir():
                    shutil.rmtree(stage, ignore_errors=True)

    def release(self, lock: Path, created: list[Path], mine: bool) -> None:
        if mine:
            with contextlib.suppress(OSError):
                lock.unlink()
        for folder in created:  # innermost first, only when empty: a run that wrote nothing leaves nothing
            with contextlib.suppress(OSError):
                folder.rmdir()

    def stage_path(self, step: int) -> Path:
        """Where ``checkpoint-STEP`` is written before :meth:`publish_checkpoint` renames it into place."""
        return self.path / f".checkpoint-{step}.tmp"

    def checkpoint_stage(self, step: int) -> Path:
        """A fresh staging folder for ``checkpoint-STEP`` (the main process makes it; every process writes)."""
        stage = self.stage_path(step)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        return stage

    def publish_checkpoint(self, stage: Path, step: int, keep: int) -> Path:
        """Rename a complete stage to ``checkpoint-STEP`` (replacing ours), list it, keep the newest ``keep``."""
        target = self.path / f"checkpoint-{step}"
        if target.exists():
            self.forget(target)
        os.replace(stage, target)
        crash_point("checkpoint-publish", step)
        self.record(target)
        for old in self.checkpoints()[:-keep] if keep else []:
            self.forget(old)
        return target

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = [p for p in self.path.glob("checkpoint-*") if CHECKPOINT.match(p.name) and is_checkpoint(p)]
        return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def lock_error(lock: Path) -> UpcycleError:
    """Why ``lock`` stops this trainer: held by a live process, a dead one on this host, or another host."""
    try:
        holder = json.loads(lock.read_text())
        pid, host, started = int(holder["pid"]), str(holder["host"]), str(holder["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return UpcycleError(f"{lock.parent} is locked by another trainer ({lock} is unreadable): if no trainer "
                            f"uses {lock.parent}, delete {lock} and retry")
    who = f"pid {pid} on {host}, started {started}"
    if host != socket.gethostname():
        return UpcycleError(f"{lock.parent} is in use by a trainer on another machine ({who}): wait for it to "
                            f"finish, or, if it is gone, delete {lock} and retry")
    if pid_alive(pid):
        return UpcycleError(f"{lock.parent} is in use by another trainer ({who}): wait for it to finish or "
                            "choose another --output-dir")
    return UpcycleError(f"{lock.parent} has a stale lock from a trainer that died ({who}): if no trainer uses "
                        f"{lock.parent}, delete {lock} and resume with --resume")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as error:
        return error.errno == errno.EPERM  # exists, owned by someone else
    return True


def resume_checkpoint(run: Path, resume: str) -> Path:
    """The checkpoint to resume: ``latest`` in RUN, or the folder given."""
    if resume != "latest":
        path = Path(resume).expanduser()
        if not is_checkpoint(path):
            raise UpcycleError(f"{resume} is not a checkpoint folder (no state.json and trained tensors): "
                               "pass RUN/checkpoint-STEP")
        return path
    found = RunFolder(run).checkpoints()
    if not found:
        raise UpcycleError(f"{run} holds no checkpoint to resume: start without --resume (or pass --force)")
    return found[-1]


def read_state(checkpoint: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint, checked to hold a step (else :class:`DamagedCheckpoint`)."""
    path = checkpoint / "state.json"
    state = read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise DamagedCheckpoint(f"{path} holds no step count: the checkpoint is damaged", path)
    return state


def check_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """Read a checkpoint's state, data position, RNG states and tensor headers before anything is written
    (:class:`DamagedCheckpoint` names the first damaged file); returns the state."""
    state = read_state(checkpoint)
    for path in [checkpoint / "data.json", *(sorted(checkpoint.glob("rng-*.json")) or [checkpoint / "rng-0.json"])]:
        if not isinstance(read_json(path), dict):
            raise DamagedCheckpoint(f"{path} is not a JSON object: the checkpoint is damaged", path)
    tensors = checkpoint / "trainable.safetensors"
    if tensors.is_file():
        try:
            scan([tensors])  # its errors already name the file and say it is damaged
        except UpcycleError as error:
            raise DamagedCheckpoint(str(error), tensors) from None
    return state


def older_checkpoint(checkpoint: Path) -> Path | None:
    """The newest checkpoint of the same run before ``checkpoint`` whose state reads, if any."""
    match = CHECKPOINT.match(checkpoint.name)
    if not match:
        return None
    for candidate in reversed(RunFolder(checkpoint.parent).checkpoints()):
        if int(CHECKPOINT.match(candidate.name).group(1)) < int(match.group(1)):
            with contextlib.suppress(UpcycleError):
                check_checkpoint(candidate)
                return candidate
    return None


def damaged_hint(error: DamagedCheckpoint, checkpoint: Path) -> UpcycleError:
    """``error`` with what to do: resume the previous checkpoint by name, or start over."""
    older = older_checkpoint(checkpoint)
    if older is not None:
        return UpcycleError(f"{error}; resume from the previous checkpoint with --resume={older}")
    return UpcycleError(f"{error}; no older checkpoint of this run reads: start over with --force")


@dataclass
class Checkpoint:
    """The trained state to fold: tensors, optional LoRA adapter, and where they came from."""

    path: Path
    run: Path | None
    tensors: list[Path]
    adapter: Path | None
    state: dict = field(default_factory=dict)
    final: bool = False


def is_checkpoint(path: Path) -> bool:
    """The one definition: a ``checkpoint-STEP``-style folder with ``state.json`` and trained state
    (``trainable.safetensors`` and/or a LoRA ``adapter/``). A finished RUN holds adapter/ but no state.json."""
    trained = (path / "trainable.safetensors").is_file() or (path / "adapter" / "adapter_config.json").is_file()
    return (path / "state.json").is_file() and trained


def find_checkpoint(src: str | os.PathLike) -> Checkpoint:
    """A checkpoint folder as is; a RUN: its final tensors when it finished, else its latest checkpoint."""
    path = Path(src).expanduser()
    if not path.is_dir():
        raise UpcycleError(f"{src} does not exist: pass a run folder or one of its checkpoint-STEP folders")
    if is_checkpoint(path):
        state = read_json(path / "state.json") if (path / "state.json").is_file() else {}
        run = path.parent if CHECKPOINT.match(path.name) else None
        return Checkpoint(path, run, optional(path / "trainable.safetensors"), optional_adapter(path), state)
    if (path / "experts.safetensors").is_file():
        summary = read_json(path / SUMMARY) if (path / SUMMARY).is_file() else {}
        if summary.get("train") not in (None, "experts", "experts+lora", "lora") and (path / "final").is_dir():
            # dense tensors trained too: experts.safetensors is not enough, take every tensor of final/
            return Checkpoint(path, path, weight_files(path / "final"), None, summary, final=True)
        return Checkpoint(path, path, [path / "experts.safetensors"], optional_adapter(path), summary, final=True)
    found = RunFolder(path).checkpoints()
    if not found:
        if (path / "config.json").is_file():
            raise UpcycleError(f"{src} is a model folder, not a run: merge takes a run folder or checkpoint "
                               "(use --average to average model folders)")
        raise UpcycleError(f"{src} has no checkpoint-STEP folders and no experts.safetensors: train longer "
                           "than --save-every steps, or pass a checkpoint folder")
    latest = found[-1]
    state = read_json(latest / "state.json") if (latest / "state.json").is_file() else {}
    return Checkpoint(latest, path, optional(latest / "trainable.safetensors"), optional_adapter(latest), state)


def optional(path: Path) -> list[Path]:
    return [path] if path.is_file() else []


def optional_adapter(folder: Path) -> Path | None:
    return folder / "adapter" if (folder / "adapter" / "adapter_config.json").is_file() else None


def run_base(checkpoint: Checkpoint) -> str | None:
    """The base model recorded by the run: state.json, training_summary.json, then config.yaml."""
    records = [checkpoint.state]
    if checkpoint.run is not None:
        for name in (SUMMARY, "config.yaml"):
            file = checkpoint.run / name
            if file.is_file():
                records.append(read_json(file) if name.endswith(".json") else read_yaml(file))
    for record in records:
        path, given = record.get("base_model_path"), record.get("base_model") or record.get("model")
        if path and Path(path).exists():
            return str(path)
        if given:
            return str(given)
    return None


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UpcycleError(f"{path} is not valid YAML ({error}): the run folder is damaged") from None
    return data if isinstance(data, dict) else {}


def resolve_base(checkpoint: Checkpoint, base: str | os.PathLike | None) -> Path:
    """The base model folder: ``base`` if given, else the one the run recorded."""
    given = str(base) if base is not None else run_base(checkpoint)
    if given is None:
        raise UpcycleError(f"{checkpoint.path} does not name its base model (no state.json or config.yaml "
                           "base_model): pass --base MODEL")
    try:
        return resolve_source(given)
    except UpcycleError as error:
        where = "" if base is not None else f" (recorded by the run in {checkpoint.run or checkpoint.path})"
        raise UpcycleError(f"base model {given}{where} not found: pass --base MODEL ({error})") from None




def fold(base_folder: Path, tensors: dict[str, torch.Tensor], adapter: Path | None, origin: Path) -> torch.nn.Module:
    """The one fold: the base model in its own dtype, the trained tensors copied in, a LoRA adapter merged.

    Used by the trainer for ``RUN/final`` and by ``upcycle merge`` for any run or checkpoint.
    """
    check_experts_fit({n: tuple(t.shape) for n, t in tensors.items()}, read_config(base_folder), origin)
    model = load_model(base_folder)
    overlay(model, tensors, origin)
    return merge_lora(model, adapter) if adapter is not None else model


def fold_model(checkpoint: Checkpoint, base_folder: Path) -> torch.nn.Module:
    """:func:`fold` of a checkpoint's (or finished run's) files; expert shapes checked from headers first."""
    config = read_config(base_folder)
    for file in checkpoint.tensors:
        check_experts_fit({n: t.shape for n, t in scan([file]).items()}, config, file)
    tensors = {name: tensor for file in checkpoint.tensors for name, tensor in load_tensors(file).items()}
    return fold(base_folder, tensors, checkpoint.adapter, checkpoint.path)


def check_experts_fit(trained: dict[str, tuple[int, ...]], base_config, origin: Path) -> None:
    """Trained expert tensors (name -> shape) must be the base's experts: the same names and shapes.

    Checked from headers before anything loads, so a dense base, or one with another number of
    experts, is an error that says so.
    """
    experts = (routed_tensor_shapes(base_config.num_hidden_layers, base_config.num_experts, base_config.hidden_size)
               if base_config.is_moe else {})
    for name, shape in trained.items():
        if not is_routed_tensor(name):
            continue
        if not experts:
            raise UpcycleError(f"{origin} holds expert tensors ({name}) but the base model is dense: pass the "
                               "upcycled model the run trained (--base MODEL)")
        if experts.get(name) != tuple(shape):
            raise UpcycleError(f"{name} has shape {tuple(shape)} in {origin} but the base model's "
                               f"{base_config.num_experts} experts per layer need {experts.get(name)}: pass the base "
                               "the run trained (--base MODEL)")


def overlay(model: torch.nn.Module, tensors: dict[str, torch.Tensor], origin: Path) -> None:
    """Copy ``tensors`` into ``model``; every name and shape must match."""
    params = model.state_dict()
    for name, tensor in tensors.items():
        if name not in params:
            raise UpcycleError(f"{origin} holds {name}, which the base model lacks: pass the base the run "
                               "trained (--base MODEL)")
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise UpcycleError(f"{name} has shape {tuple(tensor.shape)} in {origin} but "
                               f"{tuple(params[name].shape)} in the base model: pass the base the run trained")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))


def merge_lora(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """Apply the PEFT adapter and fold it into the weights."""
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter))
    except Exception as error:
        raise UpcycleError(f"cannot apply the LoRA adapter {adapter} ({str(error).splitlines()[0]}): "
                           "pass the base the run trained (--base MODEL)") from None
    return wrapped.merge_and_unload()




def training_summary(model: torch.nn.Module, state: dict[str, Any], trainable: int, recipe: dict | None,
                     resumed_from: dict | None = None, checkpoint: str | None = None) -> dict[str, Any]:
    """The one ``training_summary.json`` schema (docs/run-layout.md), for ``RUN/`` and every folded folder.

    ``state`` is a checkpoint's ``state.json`` (or the trainer's live state); ``checkpoint`` names the
    checkpoint folded (None for a finished run).
    """
    config = model.config
    return {"base_model": state.get("base_model"), "base_model_path": state.get("base_model_path"),
            "num_experts": config.num_experts if config.is_moe else 0,
            "experts_per_token": config.num_experts_per_tok if config.is_moe else 0,
            "train": state.get("train"), "trainable_params": trainable,
            "total_params": sum(p.numel() for p in model.parameters()),
            "tokens_seen": state.get("tokens_seen"), "steps": state.get("step"),
            "final_train_loss": state.get("train_loss"), "final_eval_loss": state.get("eval_loss"),
            "recipe": recipe or None, "resumed_from": resumed_from, "checkpoint": checkpoint}


def run_summary(checkpoint: Checkpoint, model: torch.nn.Module, base: str | os.PathLike | None) -> dict:
    """training_summary.json for a merged folder: the run's own when final, else built from the checkpoint."""
    run = checkpoint.run
    if checkpoint.final and run is not None and (run / SUMMARY).is_file():
        return read_json(run / SUMMARY)
    lora = checkpoint.adapter / "adapter_model.safetensors" if checkpoint.adapter is not None else None
    trainable = stored_parameters([*checkpoint.tensors, *([lora] if lora and lora.is_file() else [])])
    recipe = read_yaml(run / "config.yaml") if run is not None and (run / "config.yaml").is_file() else {}
    state = {**checkpoint.state, "base_model": str(base) if base is not None else checkpoint.state.get("base_model")}
    return training_summary(model, state, trainable, recipe, checkpoint.state.get("resumed_from"),
                            checkpoint.path.name)




def stored_parameters(files: list[Path]) -> int:
    """Number of parameters stored in safetensors files (headers only)."""
    return sum(math.prod(t.shape) for t in scan(files).values())
