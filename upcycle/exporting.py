"""Write a Hub-ready folder and optionally upload it (``upcycle export``).

The folder holds sharded safetensors with an index, ``config.json`` with ``auto_map``
and the remote code, the tokenizer, a generation config, ``training_summary.json``
when known and a ``README.md`` model card. ``adapter_only`` writes the expert adapter
instead (:mod:`upcycle.adapter`). ``push`` uploads with huggingface_hub (token from
``HF_TOKEN`` or ``hf auth login``; ``HF_ENDPOINT`` honoured) exactly the files export wrote,
the set ``--dry-run`` lists (never other files kept in OUT); the token is never printed or
written, even when the Hub echoes it. Nothing local is deleted when an upload fails.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from tqdm.auto import tqdm
from transformers import GenerationConfig

from upcycle.adapter import write_adapter
from upcycle.errors import UpcycleError
from upcycle.folder import (SUMMARY, check_output, copy_companions, is_repo_id, read_config, staged_output,
                            weight_files, write_folder_extras)
from upcycle.merging import merge
from upcycle.model_card import CardInfo, build_card
from upcycle.safetensors_stream import human_bytes, scan, write_sharded

RETRIES = 3
RETRY_WAIT = 2.0  # seconds, doubled after each failed attempt


@dataclass
class ExportResult:
    """What export wrote (or would write) and where it went."""

    out: Path | None
    files: list[tuple[str, int]] = field(default_factory=list)
    repo_id: str | None = None
    url: str | None = None
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = "would upload" if self.dry_run else f"wrote {self.out}"
        if self.dry_run and self.repo_id:
            head += f" to {self.repo_id}"
        rows = [f"  {size:>10}  {name}" for name, size in ((n, human_bytes(s)) for n, s in self.files)]
        total = human_bytes(sum(s for _, s in self.files))
        lines = [f"{head} ({len(self.files)} files, {total})", *rows, *self.notes]
        if self.url:
            lines.append(f"uploaded: {self.url}")
        return "\n".join(lines)


def check_repo_id(repo_id: str) -> None:
    if not is_repo_id(repo_id):
        raise UpcycleError(f"--repo-id {repo_id!r} is not a valid Hub repo id: write it as USER/NAME "
                           "(letters, digits, '-', '_', '.')")


def hub_id(name: object) -> str | None:
    """``name`` if it looks like a Hub id rather than a local path."""
    text = str(name or "").rstrip("/")
    if not text or Path(text).expanduser().exists() or not is_repo_id(text):
        return None
    return text


def resolve_model(src: str | os.PathLike, base: str | os.PathLike | None, tmp: Path) -> tuple[Path, dict]:
    """The model folder to export and its training summary (a RUN: final/ or its latest state, folded)."""
    path = Path(src).expanduser()
    if not path.is_dir():
        raise UpcycleError(f"{src} does not exist: pass a model folder or a run folder")
    if (path / "config.json").is_file():
        summary = path / SUMMARY
        return path, json.loads(summary.read_text()) if summary.is_file() else {}
    if (path / "final" / "config.json").is_file():
        for summary in (path / SUMMARY, path / "final" / SUMMARY):
            if summary.is_file():
                return path / "final", json.loads(summary.read_text())
        return path / "final", {}
    merge(path, tmp / "merged", base=base)
    return resolve_model(tmp / "merged", None, tmp)


def card_info(folder: Path, summary: dict, name: str, repo: str, base_model_id: str | None, license: str,
              adapter: bool, total: int) -> tuple[CardInfo, list[str]]:
    config = read_config(folder)
    raw = json.loads((folder / "config.json").read_text())
    base = base_model_id or hub_id(summary.get("base_model")) or hub_id((raw.get("upcycle") or {}).get("base_model"))
    notes = [] if base else ["note: the card has no base_model (the base is a local folder): pass --base-model-id "
                             "USER/NAME to name it"]
    info = CardInfo(name=name, repo=repo, base_model=base, num_experts=config.num_experts if config.is_moe else None,
                    experts_per_token=config.num_experts_per_tok if config.is_moe else None, total_params=total,
                    summary=summary, license=license, adapter=adapter)
    return info, notes


def build(stage: Path, folder: Path, summary: dict, max_shard_size: str | int, progress: bool) -> int:
    """Write weights (re-sharded, streamed), config, remote code, tokenizer and generation config."""
    plans = [tensor.plan() for tensor in scan(weight_files(folder)).values()]
    with tqdm(total=sum(p.nbytes for p in plans), unit="B", unit_scale=True, desc="export",
              disable=not progress) as bar:
        write_sharded(stage, plans, max_shard_size, on_bytes=bar.update)
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("transformers_version", None)
    write_folder_extras(stage, raw, folder)
    if not (stage / "generation_config.json").is_file():
        GenerationConfig(**{k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in raw}
                         ).save_pretrained(stage)
    if summary:
        (stage / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return sum(math.prod(p.shape) for p in plans)


def export(model: str | os.PathLike, out: str | os.PathLike | None = None, repo_id: str | None = None,
           push: bool = False, private: bool = False, revision: str | None = None, dry_run: bool = False,
           max_shard_size: str | int = "2GB", adapter_only: bool = False, force: bool = False,
           base: str | os.PathLike | None = None, base_model_id: str | None = None, license: str = "apache-2.0",
           progress: bool = True) -> ExportResult:
    """Write a Hub-ready copy of ``model`` to ``out`` and, with ``push``, upload it to ``repo_id``."""
    for given in (repo_id, base_model_id):
        if given is not None:
            check_repo_id(given)
    if push and not repo_id and not dry_run:
        raise UpcycleError("--push needs --repo-id USER/NAME")
    if out is None and not dry_run:
        raise UpcycleError("pass -o OUT (the folder to write), or --dry-run to only list the files")
    if out is not None and not dry_run:
        check_output(Path(out).expanduser().absolute(), force)
    if push and not dry_run:
        check_can_push()
    with tempfile.TemporaryDirectory(prefix="upcycle-export-") as tmp:
        folder, summary = resolve_model(model, None if adapter_only else base, Path(tmp))
        read_config(folder)  # a non-Doge folder is refused before anything is written
        name = (repo_id or str(out or folder.name)).rstrip("/").split("/")[-1]
        target = Path(tmp) / "dry-run" if dry_run else Path(out)
        with staged_output(target, force=force) as stage:
            if adapter_only:
                meta = write_adapter(stage, folder, base, base_model_id)
                copy_companions(folder, stage)
                total = sum(math.prod(t.shape) for t in scan([stage / "experts.safetensors"]).values())
                base_model_id = base_model_id or hub_id(meta["base_model_name_or_path"])
            else:
                total = build(stage, folder, summary, max_shard_size, progress)
            repo = repo_id or str(Path(out).absolute() if out else target)
            info, notes = card_info(folder, summary, name, repo, base_model_id, license, adapter_only, total)
            build_card(info).save(stage / "README.md")
            files = sorted((str(p.relative_to(stage)), p.stat().st_size) for p in stage.rglob("*") if p.is_file())
        result = ExportResult(None if dry_run else Path(out), files, repo_id, dry_run=dry_run, notes=notes)
    if push and not dry_run:
        result.url = push_folder(Path(out), repo_id, [name for name, _ in files], private=private, revision=revision)
    return result


def export_adapter(model: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None,
                   **kwargs) -> ExportResult:
    """``export(model, out, adapter_only=True)``: write the expert adapter folder with its card."""
    return export(model, out, adapter_only=True, base=base, **kwargs)


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception classes of whichever HTTP client huggingface_hub uses."""
    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            classes.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def check_can_push() -> None:
    """Fail before writing anything when an upload cannot work: offline mode or no token."""
    if constants.HF_HUB_OFFLINE:
        raise UpcycleError("HF_HUB_OFFLINE is set: unset it to --push")
    if not get_token():
        raise UpcycleError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)")


def redact(text: str, token: str) -> str:
    """``text`` with the token blanked out (a Hub or proxy error may echo the request's headers)."""
    return text.replace(token, "hf_***") if token else text


def push_folder(folder: Path, repo_id: str, names: list[str], private: bool = False,
                revision: str | None = None) -> str:
    """Create the repo (and branch) and upload ``names`` (paths in ``folder``, what export wrote) in one
    commit; retry dropped connections. Error messages never hold the token."""
    later = f"{folder} is kept: upload it later with `hf upload {repo_id} {folder}`"
    token = get_token()
    if not token:
        raise UpcycleError(f"no Hugging Face token: run `hf auth login` or set HF_TOKEN; {later}")
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    api = HfApi(endpoint=endpoint, token=token)
    reason = ""
    for attempt in range(1, RETRIES + 1):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in names]
            commit = api.create_commit(repo_id=repo_id, operations=operations, revision=revision,
                                       commit_message="Upload upcycled Doge model with upcycle")
            return str(commit.commit_url)
        except OfflineModeIsEnabled:
            raise UpcycleError(f"HF_HUB_OFFLINE is set: unset it to push; {later}") from None
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status in (401, 403):
                raise UpcycleError(f"the Hub refused the token ({status}) for {repo_id}: run `hf auth login` or set "
                                   f"HF_TOKEN to a token with write access; {later}") from None
            if status is None or status < 500:
                first = redact(str(error).splitlines()[0], token) if str(error) else type(error).__name__
                raise UpcycleError(f"the Hub rejected the upload ({first}); {later}") from None
            reason = f"HTTP {status}"
        except transport_errors() as error:
            reason = f"{type(error).__name__}: {redact(str(error).splitlines()[0], token) if str(error) else 'connection lost'}"
        if attempt < RETRIES:
            time.sleep(RETRY_WAIT * 2 ** (attempt - 1))
    where = endpoint or "the Hugging Face Hub"
    raise UpcycleError(f"could not upload to {where} after {RETRIES} attempts ({reason}): check your network and "
                       f"HF_ENDPOINT; {later}")
