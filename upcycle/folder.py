"""The model-folder format every upcycle verb reads and writes.

A folder is a standard transformers checkpoint: ``config.json`` (model_type
``doge``), safetensors weights (sharded with an index when large), the source's
tokenizer and generation config, and for MoE models the remote code
``modeling_upcycle_doge.py`` registered through ``auto_map``. Stock transformers
loads it without remote code too (same parameter names as ``DogeCDMoE``).

Writes go to a hidden staging folder beside OUT and are moved into place at the
end, so a failed run leaves nothing half-written. ``force`` overwrites only files
upcycle wrote before (listed in ``.upcycle-manifest.json``, see ``upcycle.manifest``),
never anything else, and never anything outside OUT.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import DogeConfig

from upcycle.errors import UpcycleError
from upcycle.manifest import NAME as MANIFEST
from upcycle.manifest import Manifest, current_umask
from upcycle.modeling_upcycle_doge import UpcycleDogeForCausalLM
from upcycle.safetensors_stream import human_bytes

MODELING_FILE = Path(__file__).with_name("modeling_upcycle_doge.py")
AUTO_MAP = {"AutoModelForCausalLM": "modeling_upcycle_doge.UpcycleDogeForCausalLM"}
SUMMARY = "training_summary.json"  # a run's training summary, carried by the model folders it produces
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"`` -> ``torch.bfloat16``; ``None`` stays ``None``."""
    if name is None:
        return None
    if name not in DTYPES:
        raise UpcycleError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16")
    return DTYPES[name]


def is_repo_id(text: str) -> bool:
    """``text`` is a Hub repo id of the form ``USER/NAME`` (huggingface_hub's rules)."""
    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_source(src: str | os.PathLike) -> Path:
    """A local folder as is, or a Hub id downloaded to the local cache."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UpcycleError(f"{src} is a file: pass the checkpoint folder that holds config.json")
        return path
    text = str(src)
    if not is_repo_id(text):
        raise UpcycleError(f"{src} does not exist: pass a local checkpoint folder or a Hub id like SmallDoge/Doge-20M")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as error:  # network, auth, missing repo: all end the same way for the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UpcycleError(f"could not fetch {text} from the Hub ({reason}): check the id, your network "
                           "and HF_TOKEN, or pass a local folder") from None


def read_config(folder: Path) -> DogeConfig:
    """The folder's ``DogeConfig``; a clear error for anything that is not Doge."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UpcycleError(f"{folder} has no config.json: pass a Doge checkpoint folder")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UpcycleError(f"{config_file} is not valid JSON ({error}): re-download or re-save the checkpoint") from None
    if raw.get("model_type") != "doge":
        raise UpcycleError(f"{folder} is a {raw.get('model_type', 'unknown')!r} checkpoint, not Doge: "
                           "upcycle only works on Doge models (model_type 'doge')")
    try:
        config = DogeConfig.from_dict({k: v for k, v in raw.items() if k != "transformers_version"})
    except Exception as error:
        raise UpcycleError(f"{config_file} is not a valid Doge config ({error})") from None
    if config.is_moe and math.isqrt(config.num_experts) ** 2 != config.num_experts:
        raise UpcycleError(f"{config_file}: num_experts={config.num_experts} is not a perfect square")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files, from the index when sharded."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as error:
            raise UpcycleError(f"{index} is malformed ({error}): re-save the checkpoint") from None
        files = [folder / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UpcycleError(f"{folder} is missing shard(s) {', '.join(missing)}: re-download the checkpoint")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if list(folder.glob("*.bin")):
        raise UpcycleError(f"{folder} has only .bin weights: re-save it with save_pretrained(safe_serialization=True)")
    raise UpcycleError(f"{folder} has no safetensors weights (model.safetensors or an index)")


def load_model(src: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None) -> torch.nn.Module:
    """Load any Doge folder (dense or MoE) as ``UpcycleDogeForCausalLM`` (causal CDMoE)."""
    folder = resolve_source(src)
    read_config(folder)
    weight_files(folder)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    try:
        model = UpcycleDogeForCausalLM.from_pretrained(folder, dtype=dtype or "auto")
    except Exception as error:
        raise UpcycleError(f"could not load {folder}: {str(error).splitlines()[0]}") from None
    return model.to(device) if device is not None else model


def load_config(src: str | os.PathLike) -> DogeConfig:
    """The Doge config of a local folder or Hub id."""
    return read_config(resolve_source(src))


def copy_companions(source: Path | None, out: Path) -> list[str]:
    """Copy tokenizer and generation-config files that exist in ``source``."""
    copied = []
    for name in COMPANION_FILES if source else ():
        if (source / name).is_file() and not (out / name).exists():
            shutil.copy2(source / name, out / name)
            copied.append(name)
    return copied


def finish_config(config: dict, is_moe: bool) -> dict:
    """Add ``auto_map``/``architectures`` so remote code and stock both load."""
    config = dict(config)
    if is_moe:
        config["auto_map"] = dict(AUTO_MAP)
        config["architectures"] = ["UpcycleDogeForCausalLM"]
    else:
        config.pop("auto_map", None)
        config["architectures"] = ["DogeForCausalLM"]
    return config


def write_folder_extras(out: Path, config: dict, source: Path | None = None) -> None:
    """Write ``config.json``, the remote code and the source's companion files into ``out``."""
    config = finish_config(config, bool(config.get("is_moe")))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if config.get("is_moe"):
        shutil.copy2(MODELING_FILE, out / MODELING_FILE.name)
    copy_companions(source, out)


def save_model(model: torch.nn.Module, out: str | os.PathLike, source: str | os.PathLike | None = None,
               force: bool = False, max_shard_size: str | int = "2GB", summary: dict | None = None) -> Path:
    """Save ``model`` as an upcycle model folder (atomically), with ``training_summary.json`` if given."""
    with staged_output(out, force=force) as stage:
        model.save_pretrained(stage, max_shard_size=max_shard_size)
        config = json.loads((stage / "config.json").read_text())
        write_folder_extras(stage, config, Path(source) if source else None)
        if summary is not None:
            (stage / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    return Path(out)


def available_memory() -> int | None:
    """Bytes of memory the system can still give this process (Linux MemAvailable), None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_room(out: Path, disk_bytes: int, memory_bytes: int, what: str) -> None:
    """Refuse, before anything is written, an output larger than the free disk at OUT or than free memory."""
    existing = Path(out).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if disk_bytes > free:
        raise UpcycleError(f"{what} writes {human_bytes(disk_bytes)} but {existing} has {human_bytes(free)} free: "
                           "choose a smaller setting or an output folder on a larger disk")
    memory = available_memory()
    if memory is not None and memory_bytes > memory:
        raise UpcycleError(f"{what} needs about {human_bytes(memory_bytes)} of memory for its largest tensor but "
                           f"{human_bytes(memory)} is available: choose a smaller setting")


def check_output(out: Path, force: bool) -> None:
    """Refuse a non-empty OUT unless ``force`` (then its manifest must be sound); check its parent is writable."""
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"{out} exists and is a file: choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UpcycleError(f"{out} exists and is not empty: choose another output folder or pass --force")
        Manifest(out).owned()  # every entry inside OUT, none behind a symlink; before anything is written
    parent = out.parent if not out.exists() else out
    parent_existing = parent
    while not parent_existing.exists():
        parent_existing = parent_existing.parent
    if not os.access(parent_existing, os.W_OK | os.X_OK):
        raise UpcycleError(f"cannot write to {parent_existing}: choose an output folder you can write to")


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success move its files into ``out``.

    On any error the staging folder is removed and ``out`` is untouched.
    """
    out = Path(out).expanduser().absolute()
    check_output(out, force)
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp makes it private; OUT follows the umask
    except OSError as error:
        raise UpcycleError(f"cannot write to {out.parent} ({error.strerror}): choose an output folder "
                           "you can write to") from None
    try:
        yield stage
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # innermost first; only the empty folders this call made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out: Path) -> None:
    """Move the staged files into ``out``, replacing only files upcycle wrote (its manifest's entries).

    Everything is checked before anything in ``out`` changes; the manifest always lists every file of
    ours that is there (old and new while the files move), so an interruption leaves nothing unlisted.
    """
    written = [name for name in Manifest(stage).files_under(stage) if name != MANIFEST]
    if not out.exists():
        Manifest(stage).write(written)
        os.replace(stage, out)
        return
    previous = Manifest(out)
    ours = previous.owned()
    for name in written:
        check_target(out, name, ours)
    previous.write(ours | set(written))
    previous.remove_listed(keep=written)
    for name in written:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / name, target)
    previous.write(written)


def check_target(out: Path, name: str, ours: set[str]) -> None:
    """``out/name`` may be written: no symlink on the way, and nothing there that upcycle did not write."""
    path = out
    parts = Path(name).parts
    for i, part in enumerate(parts):
        path = path / part
        if not os.path.lexists(path):
            return
        last = i == len(parts) - 1
        if path.is_symlink() and not last:
            raise UpcycleError(f"{path} is a symlink: upcycle does not write through links inside its output "
                               "folder; remove it or choose another output folder")
        if (last and name not in ours) or (not last and not path.is_dir()):
            raise UpcycleError(f"{out} already holds {path.relative_to(out)}, which upcycle did not write: "
                               "choose an empty output folder (--force only replaces upcycle's own files)")
