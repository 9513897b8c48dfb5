"""Streaming safetensors I/O: write shards one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once.
Since the header only needs names, dtypes and shapes, we write it first and then
stream each tensor's bytes, so peak memory is about the largest tensor.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import safe_open

from upcycle.errors import UpcycleError

DTYPE_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
WEIGHTS_PATTERN = "model{suffix}.safetensors"  # model.safetensors, or model-00001-of-00003.safetensors ...
INDEX = "model.safetensors.index.json"


@dataclass
class TensorPlan:
    """One output tensor: its name, dtype, shape and a function that makes it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def parse_size(size: str | int) -> int:
    """``"2GB"`` -> bytes (decimal units, like transformers' ``max_shard_size``)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    raise UpcycleError(f"cannot read size {size!r}: write it like 500MB or 2GB")


def human_bytes(n: int) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, like :func:`parse_size`)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:.1f} GB"


def write_safetensors(path: Path, plans: Iterable[TensorPlan], on_bytes: Callable[[int], None] | None = None,
                      metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file, materializing one tensor at a time."""
    plans = list(plans)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for plan in plans:
        header[plan.name] = {"dtype": DTYPE_CODES[plan.dtype], "shape": list(plan.shape),
                             "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for plan in plans:
            tensor = plan.make().to(plan.dtype).contiguous()
            if tuple(tensor.shape) != plan.shape:
                raise UpcycleError(f"internal: {plan.name} has shape {tuple(tensor.shape)}, planned {plan.shape}")
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            if on_bytes:
                on_bytes(plan.nbytes)
            del tensor


def write_sharded(folder: Path, plans: list[TensorPlan], max_shard_size: str | int = "2GB",
                  on_bytes: Callable[[int], None] | None = None) -> list[str]:
    """Write ``model.safetensors`` or numbered shards plus an index; return file names.

    huggingface_hub splits the tensors (in order, a tensor bigger than a shard gets its own) and
    names the files; the tensors themselves stream through :func:`write_safetensors`.
    """
    by_name = {plan.name: plan for plan in plans}
    split = split_state_dict_into_shards_factory(by_name, get_storage_size=lambda plan: plan.nbytes,
                                                 filename_pattern=WEIGHTS_PATTERN,
                                                 max_shard_size=parse_size(max_shard_size))
    for filename, names in split.filename_to_tensors.items():
        write_safetensors(folder / filename, [by_name[name] for name in names], on_bytes)
    if not split.is_sharded:
        return list(split.filename_to_tensors)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*split.filename_to_tensors, INDEX]


@dataclass
class SourceTensor:
    """A tensor in a source safetensors file, read lazily."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def plan(self, dtype: torch.dtype | None = None) -> TensorPlan:
        """Copy this tensor (cast to ``dtype`` if given) into an output file."""
        return TensorPlan(self.name, dtype or self.dtype, self.shape, self.read)

    def read(self) -> torch.Tensor:
        try:
            with safe_open(self.file, framework="pt") as handle:
                return handle.get_tensor(self.name)
        except Exception as error:
            raise UpcycleError(f"cannot read {self.name} from {self.file} ({error}): the file is corrupt or "
                               "truncated; re-download the checkpoint") from None


def scan(files: list[Path]) -> dict[str, SourceTensor]:
    """Names, dtypes and shapes of every tensor in ``files`` (headers only)."""
    tensors: dict[str, SourceTensor] = {}
    for file in files:
        try:
            size = file.stat().st_size
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    code = view.get_dtype()
                    if code not in CODE_DTYPES:
                        raise UpcycleError(f"{file.name}: tensor {name} has unsupported dtype {code}")
                    tensors[name] = SourceTensor(file, name, CODE_DTYPES[code], tuple(view.get_shape()))
        except UpcycleError:
            raise
        except Exception as error:
            raise UpcycleError(f"{file} is not a readable safetensors file ({str(error).splitlines()[0]}): "
                               "it is corrupt or truncated; re-download or re-save the checkpoint") from None
        check_length(file, size)
    return tensors


def check_length(file: Path, size: int) -> None:
    """Raise if the data section is shorter than the header promises (a truncated download)."""
    with open(file, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise UpcycleError(f"{file} is truncated ({size} bytes, header promises {8 + header_len + end}): "
                           "re-download or re-save the checkpoint")
