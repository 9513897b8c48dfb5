"""Training data for ``upcycle continue-train``: load, mix, tokenize and pack text.

Two orders, chosen by ``streaming``:

* Default (``streaming=False``): each source is tokenized once (batched tokenizer calls;
  documents joined with EOS; a .txt/.md/.rst/.py file is one document) into one token
  array in stored order, cached on disk and memory-mapped. The array is cut into blocks
  of ``seq_len`` tokens (the last partial block is dropped). The held-out eval blocks are a
  seeded stratified sample of block indices (one from each equal stretch of the source),
  so they come from every part of it; they never train, and neither do the blocks right
  before and after them when those share a document with them. Each epoch visits the
  remaining blocks in a fresh seeded permutation. A source's position is ``(epoch, index
  into the permutation)``: resuming is O(1) and re-reads nothing.
* ``streaming=True``: each source is a stream of documents (``datasets`` IterableDataset),
  every epoch shuffled with a seeded buffer and packed back to back; the held-out eval
  blocks are the first documents of an eval-seeded pass. A plain-text file is split into
  documents of at most ``DOC_CHARS`` characters, cut after a blank line (else a newline), so
  one .txt file has documents to hold out. Resuming re-reads, without tokenizing, up to the
  saved position.

In both, each block comes from one source, chosen per block by a seeded weighted draw.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from upcycle.errors import UpcycleError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}
BUILDERS = {**{s: "text" for s in TEXT_SUFFIXES}, ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PIECE_CHARS = 1 << 20  # longer documents are tokenized in pieces cut after a newline
BATCH_CHARS, BATCH_DOCS = 1 << 22, 2048  # one tokenizer call
CACHE_FORMAT = 1  # bump when the token arrays change meaning
DOC_CHARS = 1 << 14  # with streaming, a plain-text file is read as documents of at most this many characters


@dataclass
class DataSource:
    path: str  # local file/folder or "hf:org/name"
    weight: float = 1.0
    text_field: str = "text"
    split: str = "train"
    name: str | None = None  # Hub config name


def parse_source(spec: str) -> DataSource:
    """Parse ``PATH[:WEIGHT]`` (``docs/:0.7``, ``hf:org/name:0.3``)."""
    prefix, rest = ("hf:", spec[3:]) if spec.startswith("hf:") else ("", spec)
    if ":" not in rest or (not prefix and Path(spec).expanduser().exists()):  # a local path may hold ":"
        return DataSource(spec)
    path, weight = rest.rsplit(":", 1)
    try:
        value = float(weight)
    except ValueError:
        raise UpcycleError(f"bad weight {weight!r} in data source {spec!r}: write PATH or PATH:WEIGHT, e.g. docs/:0.7") from None
    return DataSource(prefix + path, _check_weight(value, spec))


def _check_weight(weight: float, spec: str) -> float:
    if not (math.isfinite(weight) and weight > 0):
        raise UpcycleError(f"bad weight {weight} for data source {spec!r}: use a positive number")
    return float(weight)


# ---------------------------------------------------------------- loading


def _files(source: DataSource) -> list[Path]:
    """The data files of a local source, sorted, hidden ones left out."""
    root = Path(source.path)
    if not root.exists():
        raise UpcycleError(f"data path {source.path} does not exist: pass an existing file or folder")
    if root.is_file() and root.suffix.lower() not in BUILDERS:
        raise UpcycleError(f"unknown file type {root.suffix or '(none)'} for {root}: use one of "
                           + " ".join(sorted(BUILDERS)))
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS
        and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise UpcycleError(f"no data files under {root}: expected " + " ".join(sorted(BUILDERS)))
    return files


def _groups(files: list[Path]) -> dict[str, list[str]]:
    """Files by ``datasets`` builder, in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for p in files:
        groups.setdefault(BUILDERS[p.suffix.lower()], []).append(str(p))
    return groups


def _hub(source: DataSource, streaming: bool, cache_dir: str | None):
    import datasets

    try:
        return datasets.load_dataset(source.path[3:], source.name, split=source.split, streaming=streaming,
                                     cache_dir=cache_dir)
    except Exception as e:  # hub, network, auth and format failures all end here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UpcycleError(f"cannot load Hub dataset {source.path[3:]!r} ({type(e).__name__}: {msg[:200]}); "
                           "check the name and network access, or download it and pass a local path") from None


def _local(builder: str, paths: list[str], streaming: bool, cache_dir: str | None):
    import datasets

    kwargs = {"sample_by": "document"} if builder == "text" else {}
    with _readable(paths):
        return datasets.load_dataset(builder, data_files=paths, split="train", streaming=streaming,
                                     cache_dir=cache_dir, **kwargs)


@contextlib.contextmanager
def _readable(paths: list[str]):
    """Turn ``datasets``' failures to parse a local file into one line naming it (its own log lines muted)."""
    from datasets.exceptions import DatasetGenerationError
    from pyarrow.lib import ArrowException

    library = logging.getLogger("datasets")
    level = library.level
    library.setLevel(logging.CRITICAL)
    try:
        yield
    except (DatasetGenerationError, ArrowException, UnicodeDecodeError) as error:
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        named = paths[0] if len(paths) == 1 else f"one of {paths[0]} ... ({len(paths)} files)"
        raise UpcycleError(f"cannot read {named} ({type(cause).__name__}: {first[:200]}): fix or remove the "
                           "malformed file (JSON Lines: one JSON object per line; text: UTF-8)") from None
    finally:
        library.setLevel(level)


def _column(ds, field: str, source: DataSource):
    """``ds`` reduced to its text column (checked to exist)."""
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds), {}))
    if columns and field not in columns:
        raise UpcycleError(f"data source {source.path} has no text field {field!r} (fields: "
                           f"{', '.join(columns)}): pass the right text field")
    return ds.select_columns([field]) if columns else ds


def _load(source: DataSource, streaming: bool, cache_dir: str | None) -> list[Iterable[str]]:
    """The source's document collections (one per file type), reduced to their text column."""
    if source.path.startswith("hf:"):
        return [_Texts(_column(_hub(source, streaming, cache_dir), source.text_field, source), source.text_field)]
    out = []
    for builder, paths in _groups(_files(source)).items():
        field = "text" if builder == "text" else source.text_field
        with _readable(paths):
            ds = _column(_local(builder, paths, streaming, cache_dir), field, source)
        out.append(_Texts(ds, field, paths, split=builder == "text"))
    return out


@dataclass
class _Texts:
    """The documents of one collection; ``split``: plain-text files, cut with :func:`text_documents`."""

    dataset: Iterable[dict]
    field: str
    paths: list[str] | None = None  # local files, named when one cannot be parsed
    split: bool = False

    def __iter__(self) -> Iterator[str]:
        rows = iter(self.dataset)
        while True:
            with _readable(self.paths) if self.paths else contextlib.nullcontext():
                row = next(rows, None)
            if row is None:
                return
            if self.split and isinstance(row[self.field], str):
                yield from text_documents(row[self.field])
            else:
                yield row[self.field]


def text_documents(text: str) -> list[str]:
    """A plain-text file's documents under streaming: pieces of at most ``DOC_CHARS`` characters, each cut
    after the last blank line of its window, else after the last newline, else at the limit."""
    pieces, start = [], 0
    while len(text) - start > DOC_CHARS:
        window = text[start:start + DOC_CHARS]
        blank = window.rfind("\n\n")
        cut = blank + 2 if blank > 0 else window.rfind("\n") + 1
        cut = cut if cut > 0 else DOC_CHARS
        pieces.append(text[start:start + cut])
        start += cut
    return pieces + [text[start:]]


# ---------------------------------------------------------------- tokenizing (non-streaming)


def _split_long(text: str) -> list[str]:
    """``text`` in pieces of at most ``PIECE_CHARS``, cut after a newline where there is one."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = text.rfind("\n", start, start + PIECE_CHARS) + 1
        cut = cut if cut > start else start + PIECE_CHARS
        pieces.append(text[start:cut])
        start = cut
    return pieces + [text[start:]]


def _file_pieces(path: str, bar) -> Iterator[tuple[str, bool]]:
    """A text file as one document: ``(piece, ends_document)``, read ``PIECE_CHARS`` at a time."""
    started, carry, base = False, "", bar.n
    try:
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(PIECE_CHARS):
                bar.update(base + f.buffer.tell() - bar.n)
                text = carry + chunk
                cut = text.rfind("\n") + 1 or len(text)
                if cut:
                    started = True
                    yield text[:cut], False
                carry = text[cut:]
    except UnicodeDecodeError as e:
        raise UpcycleError(f"{path} is not UTF-8 text ({e.reason}): convert it to UTF-8") from None
    if started or carry:
        yield carry, True


def _row_pieces(ds, field: str, source: DataSource, bar) -> Iterator[tuple[str, bool]]:
    """The documents of a ``datasets`` Dataset: ``(piece, ends_document)``; empty ones skipped."""
    for batch in ds.iter(batch_size=1000):
        for text in batch[field]:
            if not text:
                continue
            if not isinstance(text, str):
                raise UpcycleError(f"field {field!r} of data source {source.path} holds {type(text).__name__}, "
                                   "not text: pass the field that holds the text")
            *head, last = _split_long(text)
            yield from ((p, False) for p in head)
            yield last, True
        bar.update(len(batch[field]))


def _encode(pieces: Iterable[tuple[str, bool]], tokenizer, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Token arrays of batches of pieces, EOS after each document's last piece."""
    eos = tokenizer.eos_token_id
    batch: list[str] = []
    ends: list[bool] = []
    size = 0
    for text, end in itertools.chain(pieces, [(None, False)]):
        if text is not None:
            batch.append(text)
            ends.append(end)
            size += len(text)
        if batch and (text is None or size >= BATCH_CHARS or len(batch) >= BATCH_DOCS):
            ids = tokenizer(batch, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]
            count = sum(map(len, ids)) + sum(ends)
            flat = itertools.chain.from_iterable(itertools.chain(x, (eos,) * e) for x, e in zip(ids, ends))
            yield np.fromiter(flat, dtype=dtype, count=count)
            batch, ends, size = [], [], 0


def _progress(progress: bool | None) -> bool:
    """Progress bars on the first process, unless turned off (``None``: follow ``datasets``)."""
    if progress is None:
        from datasets.utils import are_progress_bars_disabled

        progress = not are_progress_bars_disabled()
    return progress and os.environ.get("RANK", "0") == "0"


def _tokenizer_key(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else None


def _cache_file(cache_dir: str | None, key: dict) -> Path | None:
    """Where the token array for ``key`` is cached (``None``: not cacheable or no usable folder)."""
    if any(v is None for v in key.values()):
        return None
    import datasets

    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "upcycle-tokens"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return folder / f"{digest}.{key['dtype']}.bin"


def _store(arrays: Iterable[np.ndarray], path: Path | None, dtype: np.dtype) -> np.ndarray:
    """Concatenate ``arrays``: in memory, or written to ``path`` and memory-mapped."""
    if path is None:
        return np.concatenate([np.zeros(0, dtype), *arrays])
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        f = open(tmp, "wb")
    except OSError:  # a read-only cache: keep the tokens in memory
        return _store(arrays, None, dtype)
    try:
        size = 0
        with f:
            for a in arrays:
                try:
                    f.write(a.tobytes())
                except OSError as e:
                    raise UpcycleError(f"cannot write the token cache {tmp} ({e.strerror or e}): free disk space "
                                       "or set HF_DATASETS_CACHE to another folder") from None
                size += a.size
        if not size:
            return np.zeros(0, dtype)
        os.replace(tmp, path)  # atomic; concurrent processes write the same bytes
    finally:
        tmp.unlink(missing_ok=True)
    return np.memmap(path, dtype=dtype, mode="r")


def _tokens(source: DataSource, tokenizer, cache_dir: str | None, progress: bool) -> np.ndarray:
    """The whole source tokenized in stored order, documents joined with EOS (cached)."""
    from tqdm.auto import tqdm

    _check_weight(source.weight, source.path)
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.int32)
    key: dict = {"format": CACHE_FORMAT, "tokenizer": _tokenizer_key(tokenizer), "eos": tokenizer.eos_token_id,
                 "dtype": dtype.name, "field": source.text_field}
    hub = source.path.startswith("hf:")
    if hub:
        ds = _column(_hub(source, False, cache_dir), source.text_field, source)
        key.update(hub=[source.path, source.name, source.split], fingerprint=getattr(ds, "_fingerprint", None))
    else:
        files = _files(source)
        key["files"] = [[str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns] for p in files]
    path = _cache_file(cache_dir, key)
    if path is not None and path.is_file() and path.stat().st_size:
        return np.memmap(path, dtype=dtype, mode="r")

    def pieces() -> Iterator[tuple[str, bool]]:
        label = f"tokenizing {source.path}"
        if hub:
            with tqdm(total=len(ds), desc=label, unit="doc", disable=not progress) as bar:
                yield from _row_pieces(ds, source.text_field, source, bar)
            return
        for builder, paths in _groups(files).items():
            if builder == "text":
                with tqdm(total=sum(Path(p).stat().st_size for p in paths), desc=label, unit="B", unit_scale=True,
                          disable=not progress) as bar:
                    for p in paths:
                        yield from _file_pieces(p, bar)
            else:
                rows = _column(_local(builder, paths, False, cache_dir), source.text_field, source)
                with tqdm(total=len(rows), desc=label, unit="doc", disable=not progress) as bar:
                    yield from _row_pieces(rows, source.text_field, source, bar)

    tokens = _store(_encode(pieces(), tokenizer, dtype), path, dtype)
    if not len(tokens):
        raise UpcycleError(f"data source {source.path} has no text: pass a source with non-empty documents")
    return tokens


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:16],
                                                "little"))


def _spread(count: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct indices below ``count``: one uniformly from each of ``n`` equal stretches."""
    edges = np.arange(n + 1, dtype=np.int64) * count // n
    return rng.integers(edges[:-1], edges[1:]) if n else edges[:0]


class _Blocks:
    """One source cut into blocks; each epoch visits the training blocks in a seeded permutation."""

    kind = "blocks"

    def __init__(self, name: str, tokens: np.ndarray, seq_len: int, seed: str):
        self.name, self.tokens, self.seq_len, self.seed = name, tokens, seq_len, seed
        self.count = len(tokens) // seq_len
        if not self.count:
            raise UpcycleError(f"data source {name} is too small: {len(tokens)} tokens, fewer than one block of "
                               f"{seq_len}: add data or lower seq_len")
        self.train = np.arange(self.count, dtype=np.int64)
        self.epoch, self.pos = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def block(self, i: int) -> np.ndarray:
        return self.tokens[i * self.seq_len:(i + 1) * self.seq_len]

    def sample(self, n: int) -> list[np.ndarray]:
        """Up to ``n`` blocks spread over the source (for eval data that is not held out)."""
        return [self.block(i) for i in _spread(self.count, min(n, self.count), _rng(self.seed, "eval"))]

    def hold_out(self, n: int, eos: int) -> list[np.ndarray]:
        """``n`` eval blocks spread over the source, taken out of training with their neighbours."""
        if self.count < n:
            raise UpcycleError(f"data source {self.name} is too small to hold out {n} eval blocks of {self.seq_len} "
                               f"tokens (it has {self.count}): pass eval data or lower the eval block count")
        if self.count == n:
            raise UpcycleError(f"data source {self.name} has no training blocks left after holding out {n} eval "
                               "blocks: pass eval data or lower the eval block count")
        held = _spread(self.count, n, _rng(self.seed, "eval"))
        keep = np.ones(self.count, dtype=bool)
        keep[held] = False
        starts = held * self.seq_len
        shares_before = (held > 0) & (np.asarray(self.tokens[np.maximum(starts - 1, 0)]) != eos)
        shares_after = (held + 1 < self.count) & (np.asarray(self.tokens[starts + self.seq_len - 1]) != eos)
        guard = np.zeros(self.count, dtype=bool)
        guard[held[shares_before] - 1] = True
        guard[held[shares_after] + 1] = True
        guard &= keep
        if (keep & ~guard).sum() * 2 >= self.count - n:  # a small source keeps its neighbours
            keep &= ~guard
        self.train = np.flatnonzero(keep)
        return [self.block(i) for i in held]

    def order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            perm = _rng(self.seed, "epoch", self.epoch).permutation(len(self.train))
            self._order = (self.epoch, self.train[perm])
        return self._order[1]

    def next_block(self) -> torch.LongTensor:
        if self.pos >= len(self.train):
            self.epoch, self.pos = self.epoch + 1, 0
        i = int(self.order()[self.pos])
        self.pos += 1
        return torch.from_numpy(self.block(i).astype(np.int64))

    def state(self) -> dict:
        return {"kind": self.kind, "name": self.name, "tokens": len(self.tokens), "train_blocks": len(self.train),
                "epoch": self.epoch, "pos": self.pos}

    def mismatch(self, s: dict) -> str | None:
        if s.get("kind") != self.kind:
            return "other sources, seq_len or seed"
        if (s["tokens"], s["train_blocks"]) != (len(self.tokens), len(self.train)):
            return f"other data in source {self.name} ({s['tokens']} tokens then, {len(self.tokens)} now)"
        if not (isinstance(s["epoch"], int) and isinstance(s["pos"], int) and s["epoch"] >= 0
                and 0 <= s["pos"] <= len(self.train)):
            return "other sources, seq_len or seed"
        return None

    def load(self, s: dict) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]


# ---------------------------------------------------------------- streaming


def _shuffled(items: Iterable, rng: random.Random, buffer: int) -> Iterator:
    """Seeded buffer shuffle; a full uniform shuffle when everything fits in the buffer."""
    pool: list = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = item
    rng.shuffle(pool)
    yield from pool


class _Stream:
    """One source's documents, epoch after epoch, as a resumable token stream."""

    kind = "stream"

    def __init__(self, name: str, texts: list[Iterable[str]], tokenizer, seed: str, buffer: int, seq_len: int):
        self.name, self.texts, self.tokenizer, self.seed, self.buffer = name, texts, tokenizer, seed, buffer
        self.seq_len = seq_len
        self.exclude: set[int] = set()
        self.epoch, self.docs, self.offset = 0, 0, 0
        self._docs: Iterator[str] | None = None
        self._tokens: list[int] = []

    def numbered(self) -> Iterator[tuple[int, str]]:
        """``(index, text)`` of the non-empty documents in stored order."""
        return ((i, t) for i, t in enumerate(t for texts in self.texts for t in texts) if t)

    def documents(self, epoch: int) -> Iterator[tuple[int, str]]:
        """Documents of ``epoch`` in shuffled order, held-out ones left out."""
        kept = ((i, t) for i, t in self.numbered() if i not in self.exclude)
        return _shuffled(kept, random.Random(f"{self.seed}/{epoch}"), self.buffer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def take(self, n: int) -> list[int]:
        if self._docs is None:  # (re)start at the saved position: skip documents without tokenizing
            self._docs = (t for _, t in self.documents(self.epoch))
            skipped = [next(self._docs, None) for _ in range(self.docs)]
            self._tokens = self.encode(skipped[-1]) if self.docs else []
        out: list[int] = []
        while len(out) < n:
            if self.offset == len(self._tokens):
                text = next(self._docs, None)
                if text is None:
                    if self.docs == 0:  # unreachable after build_data's checks, unless files changed
                        raise UpcycleError(f"data source {self.name} has no training documents: add data")
                    self.epoch, self.docs = self.epoch + 1, 0
                    self._docs = (t for _, t in self.documents(self.epoch))
                    continue
                self._tokens, self.docs, self.offset = self.encode(text), self.docs + 1, 0
            chunk = self._tokens[self.offset:self.offset + n - len(out)]
            out += chunk
            self.offset += len(chunk)
        return out

    def next_block(self) -> torch.LongTensor:
        return torch.tensor(self.take(self.seq_len), dtype=torch.long)

    def state(self) -> dict:
        return {"kind": self.kind, "name": self.name, "epoch": self.epoch, "docs": self.docs, "offset": self.offset}

    def mismatch(self, s: dict) -> str | None:
        ok = s.get("kind") == self.kind and all(isinstance(s[k], int) and s[k] >= 0
                                                for k in ("epoch", "docs", "offset"))
        return None if ok else "other sources, seq_len or seed"

    def load(self, s: dict) -> None:
        self.epoch, self.docs, self.offset, self._docs = s["epoch"], s["docs"], s["offset"], None


def _stream_eval(src: _Stream, n: int, seq_len: int, hold_out: bool) -> list[list[int]]:
    """First ``n`` packed blocks of one (eval-seeded) pass; with ``hold_out`` their documents leave training."""
    tokens: list[int] = []
    docs = src.documents(epoch=-1)
    while len(tokens) < n * seq_len:
        item = next(docs, None)
        if item is None:
            if hold_out:
                raise UpcycleError(f"data source {src.name} is too small to hold out {n} eval blocks of "
                                   f"{seq_len} tokens: pass eval data or lower the eval block count")
            break
        index, text = item
        tokens += src.encode(text)
        if hold_out:
            src.exclude.add(index)
    if hold_out and all(i in src.exclude for i, _ in itertools.islice(src.numbered(), len(src.exclude) + 1)):
        raise UpcycleError(f"data source {src.name} has no training blocks left after holding out {n} eval blocks: "
                           "pass eval data or lower the eval block count")
    whole = len(tokens) // seq_len
    return [tokens[i * seq_len:(i + 1) * seq_len] for i in range(min(n, whole))]


def _streams(specs: list[DataSource], tokenizer, seed: int, cache_dir: str | None, buffer: int,
             seq_len: int) -> list[_Stream]:
    out = []
    for i, spec in enumerate(specs):
        _check_weight(spec.weight, spec.path)
        texts = _load(spec, True, cache_dir)
        if not any(t for collection in texts for t in collection):
            raise UpcycleError(f"data source {spec.path} has no text: pass a source with non-empty documents")
        out.append(_Stream(spec.path, texts, tokenizer, f"{seed}/{i}", buffer, seq_len))
    return out


# ---------------------------------------------------------------- the mixed stream


class PackedStream:
    """Infinite, deterministic, resumable stream of ``(seq_len,)`` int64 token blocks.

    Each block comes from one source, drawn with probability proportional to its weight.
    Iterating continues from the current position; ``state_dict`` after receiving block
    ``k`` resumes at block ``k + 1``.
    """

    def __init__(self, sources: list, weights: list[float], seq_len: int, seed: int):
        self.sources, self.seq_len, self.seed, self.blocks = sources, seq_len, seed, 0
        total = sum(weights)
        self.cdf = [sum(weights[: i + 1]) / total for i in range(len(weights))]

    def _pick(self, block: int) -> int:
        u = random.Random(f"{self.seed}/mix/{block}").random()
        return next((i for i, c in enumerate(self.cdf) if u < c), len(self.cdf) - 1)

    def __iter__(self) -> Iterator[torch.LongTensor]:
        while True:
            block = self.sources[self._pick(self.blocks)].next_block()
            self.blocks += 1
            yield block

    def peek(self, n: int) -> torch.LongTensor:
        """The next ``n`` blocks ``(n, seq_len)``, leaving the position where it was."""
        state = self.state_dict()
        blocks = iter(self)
        try:
            return torch.stack([next(blocks) for _ in range(n)])
        finally:
            self.load_state_dict(state)

    def state_dict(self) -> dict:
        """The position as plain JSON-serializable values."""
        return {"seq_len": self.seq_len, "seed": self.seed, "blocks": self.blocks,
                "sources": [src.state() for src in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        try:
            same = (state["seq_len"], state["seed"], len(state["sources"])) == (self.seq_len, self.seed,
                                                                               len(self.sources))
            why = next((m for src, s in zip(self.sources, state["sources"]) if (m := src.mismatch(s))), None) \
                if same else "other sources, seq_len or seed"
            blocks = state["blocks"]
            if not (isinstance(blocks, int) and blocks >= 0):
                why = why or "other sources, seq_len or seed"
        except (KeyError, TypeError, AttributeError):
            why = "other sources, seq_len or seed"
        if why:
            raise UpcycleError(f"the saved data position is for {why}: resume with the same data, seq_len and seed")
        self.blocks = blocks
        for src, s in zip(self.sources, state["sources"]):
            src.load(s)


def _split_blocks(total: int, weights: list[float]) -> list[int]:
    """``total`` blocks split by weight (largest remainder)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _check(tokenizer, seq_len: int, count: int, what: str) -> None:
    if tokenizer.eos_token_id is None:
        raise UpcycleError("the tokenizer has no EOS token: set eos_token in its tokenizer_config.json")
    if seq_len < 1 or count < 0:
        raise UpcycleError(f"bad seq_len {seq_len} or {what} {count}: use positive numbers")


def build_data(sources: list[DataSource], tokenizer, seq_len: int, *, eval_sources: list[DataSource] | None = None,
               eval_blocks: int = 32, seed: int = 0, streaming: bool = False, cache_dir: str | None = None,
               shuffle_buffer: int = 10_000, progress: bool | None = None) -> tuple[PackedStream, torch.LongTensor]:
    """Train stream and eval blocks ``(n, seq_len)``.

    Without ``eval_sources`` the eval blocks are held out of the training data (spread
    over it, or with ``streaming`` its first documents) and never train; with them they
    are a seeded sample of those sources and all training data trains. ``shuffle_buffer``
    is the streaming shuffle buffer (documents). ``progress``: tokenizer progress bars
    (``None``: unless ``datasets`` progress bars are off).
    """
    _check(tokenizer, seq_len, eval_blocks, "eval_blocks")
    if not sources:
        raise UpcycleError("no data sources given: pass at least one file, folder or hf:org/name")
    counts = _split_blocks(eval_blocks, [_check_weight(s.weight, s.path) for s in (eval_sources or sources)])
    if streaming:
        train = _streams(sources, tokenizer, seed, cache_dir, shuffle_buffer, seq_len)
        held = _streams(eval_sources, tokenizer, seed, cache_dir, shuffle_buffer, seq_len) if eval_sources else train
        blocks = [torch.tensor(b, dtype=torch.long) for src, n in zip(held, counts) if n
                  for b in _stream_eval(src, n, seq_len, hold_out=not eval_sources)]
    else:
        show = _progress(progress)
        train = [_Blocks(s.path, _tokens(s, tokenizer, cache_dir, show), seq_len, f"{seed}/{i}")
                 for i, s in enumerate(sources)]
        if eval_sources:  # a source shorter than one block gives none
            held = [(i, s, _tokens(s, tokenizer, cache_dir, show)) for i, s in enumerate(eval_sources)
                    if eval_blocks]
            picked = [b for (i, s, tokens), n in zip(held, counts) if n and len(tokens) >= seq_len
                      for b in _Blocks(s.path, tokens, seq_len, f"{seed}/eval{i}").sample(n)]
        else:
            picked = [b for src, n in zip(train, counts) if n for b in src.hold_out(n, tokenizer.eos_token_id)]
        blocks = [torch.from_numpy(b.astype(np.int64)) for b in picked]
    if eval_blocks and not blocks:
        raise UpcycleError(f"the eval data has fewer than {seq_len} tokens: add eval data or lower seq_len")
    evals = torch.stack(blocks) if blocks else torch.zeros(0, seq_len, dtype=torch.long)
    return PackedStream(train, [s.weight for s in sources], seq_len, seed), evals


def build_retain(sources: list[DataSource], tokenizer, seq_len: int, n_blocks: int, seed: int, *,
                 cache_dir: str | None = None, progress: bool | None = None) -> torch.LongTensor:
    """Up to ``n_blocks`` blocks ``(n, seq_len)`` drawn uniformly (seeded, without repeats) from all of ``sources``.

    The sources are tokenized whole and joined in order (weights are ignored); blocks are
    cut on a ``seq_len`` grid over the joined tokens.
    """
    _check(tokenizer, seq_len, n_blocks, "retain blocks")
    if not sources:
        raise UpcycleError("no retain data sources given: pass at least one file, folder or hf:org/name")
    show = _progress(progress)
    arrays = [_tokens(s, tokenizer, cache_dir, show) for s in sources]
    offsets = np.cumsum([0] + [len(a) for a in arrays])
    if offsets[-1] < seq_len:
        raise UpcycleError(f"the retain data has {offsets[-1]} tokens, fewer than one block of {seq_len}: "
                           "add retain data or lower seq_len")
    count = int(offsets[-1]) // seq_len
    picks = _rng(seed, "retain").choice(count, size=min(n_blocks, count), replace=False)
    out = torch.zeros(len(picks), seq_len, dtype=torch.long)
    for row, block in enumerate(picks):
        start, filled = int(block) * seq_len, 0
        i = int(np.searchsorted(offsets, start, side="right")) - 1
        while filled < seq_len:
            piece = arrays[i][start - offsets[i]:start - offsets[i] + seq_len - filled]
            out[row, filled:filled + len(piece)] = torch.from_numpy(piece.astype(np.int64))
            filled, start, i = filled + len(piece), start + len(piece), i + 1
    return out
