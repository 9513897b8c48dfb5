"""Training data for ``upcycle continue-train``: load, mix, tokenize and pack text.

Every source is a stream of documents (``datasets`` Dataset or IterableDataset). Each
epoch of a source is shuffled with a seeded shuffle buffer, so streaming and
non-streaming loading give the same blocks. A block (``seq_len`` tokens) is cut from one
source, chosen per block by a seeded weighted draw; documents are joined with EOS.
The stream's position (per source: epoch, documents taken, offset in the current
document) is a few integers; resuming re-reads, without tokenizing, up to that point.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle.errors import UpcycleError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}
BUILDERS = {**{s: "text" for s in TEXT_SUFFIXES}, ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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


def _load(source: DataSource, streaming: bool, cache_dir: str | None) -> list[Iterable[str]]:
    """The source's document collections (one per file type), reduced to their text column."""
    import datasets

    if source.path.startswith("hf:"):
        try:
            sets = [(datasets.load_dataset(source.path[3:], source.name, split=source.split,
                                           streaming=streaming, cache_dir=cache_dir), source.text_field)]
        except Exception as e:  # hub, network, auth and format failures all end here
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UpcycleError(f"cannot load Hub dataset {source.path[3:]!r} ({type(e).__name__}: {msg[:200]}); "
                               "check the name and network access, or download it and pass a local path") from None
    else:
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
        groups: dict[str, list[str]] = {}
        for p in files:
            groups.setdefault(BUILDERS[p.suffix.lower()], []).append(str(p))
        sets = []
        for builder, paths in groups.items():
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=paths, split="train", streaming=streaming,
                                       cache_dir=cache_dir, **kwargs)
            sets.append((ds, "text" if builder == "text" else source.text_field))
    out = []
    for ds, field in sets:
        columns = ds.column_names if ds.column_names is not None else list(next(iter(ds), {}))
        if columns and field not in columns:
            raise UpcycleError(f"data source {source.path} has no text field {field!r} (fields: "
                               f"{', '.join(columns)}): pass the right text field")
        out.append(_Texts(ds.select_columns([field]) if columns else ds, field))
    return out


@dataclass
class _Texts:
    dataset: Iterable[dict]
    field: str

    def __iter__(self) -> Iterator[str]:
        return (row[self.field] for row in self.dataset)


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


class _Source:
    """One source's documents, epoch after epoch, as a resumable token stream."""

    def __init__(self, name: str, texts: list[Iterable[str]], tokenizer, seed: str, buffer: int):
        self.name, self.texts, self.tokenizer, self.seed, self.buffer = name, texts, tokenizer, seed, buffer
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


class PackedStream:
    """Infinite, deterministic, resumable stream of ``(seq_len,)`` int64 token blocks.

    Each block comes from one source, drawn with probability proportional to its weight.
    Iterating continues from the current position; ``state_dict`` after receiving block
    ``k`` resumes at block ``k + 1``.
    """

    def __init__(self, sources: list[_Source], weights: list[float], seq_len: int, seed: int):
        self.sources, self.seq_len, self.seed, self.blocks = sources, seq_len, seed, 0
        total = sum(weights)
        self.cdf = [sum(weights[: i + 1]) / total for i in range(len(weights))]

    def _pick(self, block: int) -> int:
        u = random.Random(f"{self.seed}/mix/{block}").random()
        return next((i for i, c in enumerate(self.cdf) if u < c), len(self.cdf) - 1)

    def __iter__(self) -> Iterator[torch.LongTensor]:
        while True:
            tokens = self.sources[self._pick(self.blocks)].take(self.seq_len)
            self.blocks += 1
            yield torch.tensor(tokens, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"seq_len": self.seq_len, "seed": self.seed, "blocks": self.blocks,
                "sources": [{"name": s.name, "epoch": s.epoch, "docs": s.docs, "offset": s.offset}
                            for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        if (state["seq_len"], state["seed"], len(state["sources"])) != (self.seq_len, self.seed, len(self.sources)):
            raise UpcycleError("the saved data position is for other sources, seq_len or seed: resume with the same ones")
        self.blocks = state["blocks"]
        for src, s in zip(self.sources, state["sources"]):
            src.epoch, src.docs, src.offset, src._docs = s["epoch"], s["docs"], s["offset"], None


def _split_blocks(total: int, weights: list[float]) -> list[int]:
    """``total`` blocks split by weight (largest remainder)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _eval_blocks(src: _Source, n: int, seq_len: int, hold_out: bool) -> list[list[int]]:
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
        raise UpcycleError(f"data source {src.name} has no documents left after holding out {n} eval blocks: "
                           "pass eval data or lower the eval block count")
    whole = len(tokens) // seq_len
    return [tokens[i * seq_len:(i + 1) * seq_len] for i in range(min(n, whole))]


def _sources(specs: list[DataSource], tokenizer, seed: int, streaming: bool, cache_dir: str | None,
             buffer: int) -> list[_Source]:
    if not specs:
        raise UpcycleError("no data sources given: pass at least one file, folder or hf:org/name")
    out = []
    for i, spec in enumerate(specs):
        _check_weight(spec.weight, spec.path)
        texts = _load(spec, streaming, cache_dir)
        if not any(t for collection in texts for t in collection):
            raise UpcycleError(f"data source {spec.path} has no text: pass a source with non-empty documents")
        out.append(_Source(spec.path, texts, tokenizer, f"{seed}/{i}", buffer))
    return out


def build_data(sources: list[DataSource], tokenizer, seq_len: int, *, eval_sources: list[DataSource] | None = None,
               eval_blocks: int = 32, seed: int = 0, streaming: bool = False, cache_dir: str | None = None,
               shuffle_buffer: int = 10_000) -> tuple[PackedStream, torch.LongTensor]:
    """Train stream and held-out eval blocks ``(n, seq_len)``.

    Without ``eval_sources`` the eval blocks come from held-out training documents.
    """
    if tokenizer.eos_token_id is None:
        raise UpcycleError("the tokenizer has no EOS token: set eos_token in its tokenizer_config.json")
    if seq_len < 1 or eval_blocks < 0:
        raise UpcycleError(f"bad seq_len {seq_len} or eval_blocks {eval_blocks}: use positive numbers")
    train = _sources(sources, tokenizer, seed, streaming, cache_dir, shuffle_buffer)
    held = _sources(eval_sources, tokenizer, seed, streaming, cache_dir, shuffle_buffer) if eval_sources else train
    weights = [s.weight for s in (eval_sources or sources)]
    blocks = [b for src, n in zip(held, _split_blocks(eval_blocks, weights)) if n
              for b in _eval_blocks(src, n, seq_len, hold_out=not eval_sources)]
    if eval_blocks and not blocks:
        raise UpcycleError(f"the eval data has fewer than {seq_len} tokens: add eval data or lower seq_len")
    evals = torch.tensor(blocks, dtype=torch.long).view(-1, seq_len)
    return PackedStream(train, [s.weight for s in sources], seq_len, seed), evals
