"""Data pipeline: packing, global shuffle, mixtures, resume, eval hold-out, streaming, retain data, bad input."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from upcycle import data as data_module
from upcycle.data import DOC_CHARS, DataSource, build_data, build_retain, parse_source, text_documents
from upcycle.errors import UpcycleError


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_docs(folder: Path, docs: list[str], suffix: str = ".txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (folder / f"d{i}{suffix}").write_text(text, encoding="utf-8")
    return folder


def take(stream, n: int) -> torch.Tensor:
    return torch.stack(list(itertools.islice(stream, n)))


def segments(tokens: list[int], eos: int) -> list[tuple[int, ...]]:
    """Token runs ending in EOS (a trailing unfinished run is dropped)."""
    out, run = [], []
    for t in tokens:
        if t == eos:
            out.append(tuple(run))
            run = []
        else:
            run.append(t)
    return out


def encode(tok, text: str) -> tuple[int, ...]:
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def joined(tok, docs: list[str]) -> list[int]:
    """Documents tokenized one by one and joined with EOS, as a source's token array."""
    return [t for d in docs for t in (*encode(tok, d), tok.eos_token_id)]


def grid(tokens: list[int], seq_len: int) -> list[tuple[int, ...]]:
    """The source's blocks: consecutive ``seq_len`` slices, the partial last one dropped."""
    return [tuple(tokens[i * seq_len:(i + 1) * seq_len]) for i in range(len(tokens) // seq_len)]


def rows(blocks: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(b) for b in blocks.tolist()]


def letters(i: int, alphabet: str) -> str:
    out = ""
    for _ in range(4):
        i, r = divmod(i, len(alphabet))
        out += alphabet[r]
    return out


DOCS = ["def alpha(x):\n    return x + 1\n", "class Beta:\n    pass\n", "import os\nprint(os.sep)\n",
        "# gamma\nvalue = [1, 2, 3]\n", "while True:\n    break\n"]


def test_blocks_are_a_fresh_permutation_each_epoch(tok, tmp_path):
    folder = write_docs(tmp_path / "docs", DOCS)
    stream, evals = build_data([DataSource(str(folder))], tok, 7, eval_blocks=0, cache_dir=str(tmp_path / "c"))
    assert evals.shape == (0, 7) and evals.dtype == torch.int64
    want = grid(joined(tok, DOCS), 7)  # files in sorted order, documents joined with EOS
    assert len(want) >= 5
    blocks = take(stream, 3 * len(want))
    assert blocks.dtype == torch.int64 and blocks.shape == (3 * len(want), 7)
    epochs = [rows(blocks[e * len(want):(e + 1) * len(want)]) for e in range(3)]
    for epoch in epochs:  # every block exactly once per epoch
        assert sorted(epoch) == sorted(want)
    assert len({tuple(e) for e in epochs}) == 3 and epochs[0] != want  # shuffled, and differently each epoch


def test_mixture_ratios(tok, tmp_path):
    a = write_docs(tmp_path / "a", ["x" * 200])
    b = write_docs(tmp_path / "b", ["Q" * 200])
    ta, tb = set(encode(tok, "x" * 200)), set(encode(tok, "Q" * 200))
    assert not ta & tb
    stream, _ = build_data([parse_source(f"{a}:0.7"), parse_source(f"{b}:0.3")], tok, 8, eval_blocks=0,
                           seed=3, cache_dir=str(tmp_path / "c"))
    blocks = take(stream, 3000)
    from_a = [bool(set(blk.tolist()) & ta) for blk in blocks]
    assert all(bool(set(blk.tolist()) & ta) != bool(set(blk.tolist()) & tb) for blk in blocks)
    assert sum(from_a) / len(from_a) == pytest.approx(0.7, abs=0.03)
    again, _ = build_data([DataSource(str(a), 0.7), DataSource(str(b), 0.3)], tok, 8, eval_blocks=0, seed=3,
                          cache_dir=str(tmp_path / "c"))
    assert torch.equal(take(again, 3000), blocks)  # deterministic given the seed


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_same_continuation(tok, tmp_path, streaming):
    small = write_docs(tmp_path / "small", DOCS)
    sources = [DataSource(str(small), 1.0), DataSource(str(small), 2.0)]
    kwargs = dict(eval_blocks=1, seed=5, streaming=streaming, cache_dir=str(tmp_path / "c"))
    reference = take(build_data(sources, tok, 6, **kwargs)[0], 100)  # uninterrupted
    for k in (1, 23, 40):  # 60 blocks after each cut cross several epochs of both sources
        stream, _ = build_data(sources, tok, 6, **kwargs)
        assert torch.equal(take(stream, k), reference[:k])
        state = json.loads(json.dumps(stream.state_dict()))  # plain, serializable
        fresh, _ = build_data(sources, tok, 6, **kwargs)
        fresh.load_state_dict(state)
        assert torch.equal(take(fresh, 60), reference[k:k + 60])
    with pytest.raises(UpcycleError, match="seq_len"):
        build_data(sources, tok, 7, **kwargs)[0].load_state_dict(state)
    with pytest.raises(UpcycleError, match="seq_len"):
        build_data(sources, tok, 6, **{**kwargs, "seed": 6})[0].load_state_dict(state)
    with pytest.raises(UpcycleError, match="seq_len"):
        build_data(sources[:1], tok, 6, **kwargs)[0].load_state_dict(state)
    with pytest.raises(UpcycleError) as err:
        build_data(sources, tok, 6, **{**kwargs, "streaming": not streaming})[0].load_state_dict(state)
    assert "\n" not in str(err.value)


def test_resume_at_epoch_boundary(tok, tmp_path):
    folder = write_docs(tmp_path / "docs", DOCS)
    kwargs = dict(eval_blocks=0, seed=2, cache_dir=str(tmp_path / "c"))
    per_epoch = len(grid(joined(tok, DOCS), 5))
    reference = take(build_data([DataSource(str(folder))], tok, 5, **kwargs)[0], 4 * per_epoch)
    for k in (per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch):
        stream, _ = build_data([DataSource(str(folder))], tok, 5, **kwargs)
        take(stream, k)
        state = json.loads(json.dumps(stream.state_dict()))
        assert all(isinstance(v, (int, str)) for s in state["sources"] for v in s.values())
        fresh, _ = build_data([DataSource(str(folder))], tok, 5, **kwargs)
        fresh.load_state_dict(state)
        assert torch.equal(take(fresh, per_epoch + 2), reference[k:k + per_epoch + 2])


def test_eval_held_out_spread_and_never_trained(tok, code_text_dir, tmp_path):
    files = sorted(code_text_dir.iterdir())
    tokens = joined(tok, [p.read_text(encoding="utf-8") for p in files])
    eos, seq_len = tok.eos_token_id, 256
    blocks = grid(tokens, seq_len)
    stream, evals = build_data([DataSource(str(code_text_dir))], tok, seq_len, eval_blocks=4,
                               cache_dir=str(tmp_path / "c"))
    assert evals.shape == (4, seq_len)
    held = [blocks.index(b) for b in rows(evals)]  # each eval block is a block of the source
    for j, i in enumerate(held):  # one from each quarter of the source
        assert j * len(blocks) // 4 <= i < (j + 1) * len(blocks) // 4
    guards = {i - 1 for i in held if tokens[i * seq_len - 1] != eos} \
        | {i + 1 for i in held if tokens[(i + 1) * seq_len - 1] != eos}  # share a document with a held-out block
    trained = set(range(len(blocks))) - set(held) - guards
    epoch = rows(take(stream, len(trained)))
    assert sorted(epoch) == sorted(blocks[i] for i in trained)  # every other block trains, once per epoch
    assert not set(epoch) & set(rows(evals))
    again = build_data([DataSource(str(code_text_dir))], tok, seq_len, eval_blocks=4, cache_dir=str(tmp_path / "c"))
    assert torch.equal(again[1], evals)
    other = build_data([DataSource(str(code_text_dir))], tok, seq_len, eval_blocks=4, seed=1,
                       cache_dir=str(tmp_path / "c"))
    assert not torch.equal(other[1], evals)


def test_two_large_files_mix_in_eval_and_early_training(tok, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, alphabet in (("a.jsonl", "abcdefghijklm"), ("b.jsonl", "NOPQRSTUVWXYZ")):
        with open(folder / name, "w") as f:
            f.writelines(json.dumps({"text": letters(i, alphabet)}) + "\n" for i in range(20_000))

    def origin(block) -> str:  # the files share no characters, hence no tokens but EOS
        chars = set(tok.decode([t for t in block.tolist() if t != tok.eos_token_id]))
        return "a" if chars <= set("abcdefghijklm") else "b" if chars <= set("NOPQRSTUVWXYZ") else "both"

    stream, evals = build_data([DataSource(str(folder))], tok, 16, eval_blocks=32, cache_dir=str(tmp_path / "c"))
    held = [origin(b) for b in evals]
    assert 14 <= held.count("a") <= 18 and 14 <= held.count("b") <= 18  # in proportion to the files
    per_epoch = stream.state_dict()["sources"][0]["train_blocks"]
    assert per_epoch >= 40_000 * 2 // 16 - 32 * 3
    first = [origin(b) for b in take(stream, per_epoch // 10)]
    assert 0.4 <= first.count("a") / len(first) <= 0.6 and 0.4 <= first.count("b") / len(first) <= 0.6


def test_large_text_file_is_read_in_random_order(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "PIECE_CHARS", 4096)  # exercise reading and tokenizing in pieces
    monkeypatch.setattr(data_module, "BATCH_DOCS", 3)
    lines = [f"line {i:05d} {letters(i, 'abcdefghijklmnopqrstuvwxyz')}\n" for i in range(5000)]
    path = tmp_path / "book.txt"
    path.write_text("".join(lines), encoding="utf-8")
    stream, evals = build_data([DataSource(str(path))], tok, 32, eval_blocks=8, cache_dir=str(tmp_path / "c"))
    epoch = take(stream, 50)

    def line(block) -> int:
        found = re.search(r"line (\d{5})", tok.decode(block.tolist()))
        return int(found.group(1)) if found else -1

    first = [line(b) for b in epoch[:50]]
    assert min(first) < 1000 and max(first) > 4000 and first != sorted(first)  # from all over the file
    assert {n // 1250 for n in first} == {0, 1, 2, 3}
    held = [line(b) for b in evals]
    assert held == sorted(held) and held[0] < 625 and held[-1] > 4375  # one from each eighth


def test_pieces_decode_to_the_text(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "PIECE_CHARS", 1000)
    monkeypatch.setattr(data_module, "BATCH_CHARS", 3000)
    text = "".join(f"word{i} " * (1 + i % 7) + ("\n" if i % 5 else "") for i in range(3000))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "long.txt").write_text(text, encoding="utf-8")
    (tmp_path / "docs" / "rows.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "tail"}))
    stream, _ = build_data([DataSource(str(tmp_path / "docs"))], tok, 1, eval_blocks=0, cache_dir=str(tmp_path / "c"))
    array = np.asarray(stream.sources[0].tokens)
    assert array.dtype == np.uint16
    docs = [tok.decode(s) for s in segments(array.tolist(), tok.eos_token_id)]
    assert docs == [text, text, "tail"]  # the text file first (sorted builders by first file), then the rows


def test_eval_sources_are_sampled_and_training_keeps_everything(tok, tmp_path):
    train = write_docs(tmp_path / "train", DOCS)
    held = tmp_path / "held.jsonl"
    texts = [f"QQ {i} QQ" for i in range(200)]
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stream, evals = build_data([DataSource(str(train))], tok, 8, eval_sources=[DataSource(str(held))],
                               eval_blocks=5, cache_dir=str(tmp_path / "c"))
    want = grid(joined(tok, DOCS), 8)
    assert sorted(rows(take(stream, len(want)))) == sorted(want)  # nothing held out of training
    q_blocks = set(grid(joined(tok, texts), 8))
    assert evals.shape == (5, 8) and set(rows(evals)) <= q_blocks and len(set(rows(evals))) == 5
    small = build_data([DataSource(str(train))], tok, 8, eval_sources=[DataSource(str(write_docs(
        tmp_path / "small", ["Q" * 20])))], eval_blocks=5, cache_dir=str(tmp_path / "c"))[1]
    assert 1 <= len(small) < 5  # a small eval source gives what it has
    with pytest.raises(UpcycleError, match="eval data has fewer than 8 tokens"):
        build_data([DataSource(str(train))], tok, 8, eval_sources=[DataSource(str(write_docs(
            tmp_path / "tiny", ["Q"])))], eval_blocks=5, cache_dir=str(tmp_path / "c"))


def test_streaming_formats_and_hold_out(tok, code_text_dir, tmp_path):
    jl = tmp_path / "rows.jsonl"
    jl.write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(DOCS * 20)))
    pq = tmp_path / "pq" / "rows.parquet"
    pq.parent.mkdir()
    import datasets

    datasets.Dataset.from_dict({"text": DOCS[::-1] * 10}).to_parquet(str(pq))
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": d} for d in DOCS * 10]))
    for source, docs in ((DataSource(str(jl), text_field="content"), DOCS * 20),
                         (DataSource(str(pq.parent)), DOCS[::-1] * 10), (DataSource(str(arr)), DOCS * 10)):  # non-streaming: stored order, then shuffled blocks
        stream, _ = build_data([source], tok, 64, eval_blocks=0, cache_dir=str(tmp_path / "c"))
        want = grid(joined(tok, docs), 64)
        assert sorted(rows(take(stream, len(want)))) == sorted(want)
    sources = [DataSource(str(code_text_dir), 2.0), DataSource(str(jl), 1.0, text_field="content"),
               DataSource(str(pq.parent), 0.5), DataSource(str(arr), 0.5)]
    out = [build_data(sources, tok, 64, eval_blocks=4, seed=1, streaming=True, cache_dir=str(tmp_path / "c"),
                      shuffle_buffer=3) for _ in range(2)]
    assert torch.equal(out[0][1], out[1][1]) and out[0][1].shape == (4, 64)
    assert torch.equal(take(out[0][0], 300), take(out[1][0], 300))

    # streaming hold-out: whole documents (plain-text files cut by text_documents) leave training
    docs = {encode(tok, d) for p in code_text_dir.iterdir() for d in text_documents(p.read_text(encoding="utf-8"))}
    stream, evals = build_data([DataSource(str(code_text_dir))], tok, 256, eval_blocks=3, streaming=True,
                               cache_dir=str(tmp_path / "c"))
    assert evals.shape == (3, 256)
    eval_flat = evals.flatten().tolist()
    held = set(segments(eval_flat, tok.eos_token_id))
    tail = tuple(eval_flat[len(eval_flat) - eval_flat[::-1].index(tok.eos_token_id):]) \
        if tok.eos_token_id in eval_flat else tuple(eval_flat)
    held |= {d for d in docs if d[: len(tail)] == tail}  # the partly used last document
    assert held and held < docs
    train = segments(take(stream, 2000).flatten().tolist(), tok.eos_token_id)
    assert set(train) == docs - held  # every other document trains; held-out ones never do


def test_token_cache_follows_the_files(tok, tmp_path):
    folder = write_docs(tmp_path / "docs", DOCS)
    cache = tmp_path / "c"
    stream, _ = build_data([DataSource(str(folder))], tok, 4, eval_blocks=1, cache_dir=str(cache))
    take(stream, 3)
    state = stream.state_dict()
    assert len(list((cache / "upcycle-tokens").glob("*.bin"))) == 1
    again, _ = build_data([DataSource(str(folder))], tok, 4, eval_blocks=1, cache_dir=str(cache))
    again.load_state_dict(state)
    assert torch.equal(take(again, 10), take(stream, 10))
    (folder / "d9.txt").write_text("a new document\n", encoding="utf-8")
    changed, _ = build_data([DataSource(str(folder))], tok, 4, eval_blocks=1, cache_dir=str(cache))
    assert len(list((cache / "upcycle-tokens").glob("*.bin"))) == 2
    with pytest.raises(UpcycleError, match="other data in source"):
        changed.load_state_dict(state)


def test_build_retain(tok, tmp_path):
    docs_a = ["".join(f"x{i} " for i in range(100)), "".join(f"y{i} " for i in range(100))]
    docs_b = ["".join(f"Q{i} " for i in range(100))]
    a, b = write_docs(tmp_path / "a", docs_a), write_docs(tmp_path / "b", docs_b)
    kwargs = dict(cache_dir=str(tmp_path / "c"))
    sources = [DataSource(str(a)), DataSource(str(b), 0.1)]
    blocks = build_retain(sources, tok, 8, 20, seed=0, **kwargs)
    assert blocks.shape == (20, 8) and blocks.dtype == torch.int64
    whole = grid(joined(tok, docs_a) + joined(tok, docs_b), 8)
    assert len(set(whole)) == len(whole)
    assert set(rows(blocks)) <= set(whole) and len(set(rows(blocks))) == 20  # distinct blocks of the sources
    picked = [whole.index(r) for r in rows(blocks)]
    assert max(picked) - min(picked) > len(whole) // 2 and picked != sorted(picked)
    assert torch.equal(build_retain(sources, tok, 8, 20, seed=0, **kwargs), blocks)
    assert not torch.equal(build_retain(sources, tok, 8, 20, seed=1, **kwargs), blocks)
    every = build_retain(sources, tok, 8, 10_000, seed=0, **kwargs)
    assert sorted(rows(every)) == sorted(whole)  # all of it, once, when fewer blocks exist
    assert build_retain(sources, tok, 8, 0, seed=0, **kwargs).shape == (0, 8)
    with pytest.raises(UpcycleError, match="fewer than one block") as err:
        build_retain([DataSource(str(write_docs(tmp_path / "tiny", ["hi"])))], tok, 64, 4, seed=0, **kwargs)
    assert "\n" not in str(err.value)


def test_parse_source():
    assert parse_source("docs/:0.7") == DataSource("docs/", 0.7)
    assert parse_source("docs/") == DataSource("docs/", 1.0)
    assert parse_source("hf:org/name:0.3") == DataSource("hf:org/name", 0.3)
    assert parse_source("hf:org/name") == DataSource("hf:org/name", 1.0)


@pytest.mark.parametrize("spec", ["docs/:abc", "docs/:0", "docs/:-1", "docs/:nan"])
def test_bad_weight_spec(spec):
    with pytest.raises(UpcycleError, match="weight"):
        parse_source(spec)


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_inputs(tok, tmp_path, code_text_dir, monkeypatch, streaming):
    def fails(sources, match, seq_len=16, **kw):
        with pytest.raises(UpcycleError, match=match) as err:
            build_data(sources, tok, seq_len, cache_dir=str(tmp_path / "c"), streaming=streaming, **kw)
        assert "\n" not in str(err.value)

    fails([], "no data sources")
    fails([DataSource(str(tmp_path / "missing"))], "does not exist")
    (tmp_path / "t.csv").write_text("text\nhello\n")
    fails([DataSource(str(tmp_path / "t.csv"))], "unknown file type")
    (tmp_path / "empty_dir").mkdir(exist_ok=True)
    fails([DataSource(str(tmp_path / "empty_dir"))], "no data files")
    fails([DataSource(str(write_docs(tmp_path / "blank", ["", ""])))], "no text")
    (tmp_path / "r.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    fails([DataSource(str(tmp_path / "r.jsonl"))], "no text field 'text'")
    fails([DataSource(str(code_text_dir), weight=0.0)], "weight")
    fails([DataSource(str(write_docs(tmp_path / "one", ["tiny doc\n"])))], "too small", eval_blocks=2)
    fails([DataSource(str(write_docs(tmp_path / "two", ["x", "y"])))], "no training blocks left",
          eval_blocks=1, seq_len=4)
    if not streaming:
        fails([DataSource(str(write_docs(tmp_path / "one", ["tiny doc\n"])))], "too small", eval_blocks=0)
        (tmp_path / "n.jsonl").write_text(json.dumps({"text": [1, 2]}) + "\n")
        fails([DataSource(str(tmp_path / "n.jsonl"))], "not text")
        (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
        fails([DataSource(str(tmp_path / "latin.txt"))], "not UTF-8")
    import datasets
    import huggingface_hub

    # conftest's HF_HUB_OFFLINE may be set after huggingface_hub read it: force offline mode here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    fails([DataSource("hf:no-such-org/no-such-dataset")], "Hub dataset")


def test_text_documents_cut_after_blank_lines():
    text = "".join(f"paragraph {i}\n" + "x" * 300 + "\n\n" for i in range(200))
    pieces = text_documents(text)
    assert "".join(pieces) == text and len(pieces) > 2
    assert all(len(p) <= DOC_CHARS for p in pieces) and all(p.endswith("\n\n") for p in pieces[:-1])
    lines = "a line\n" * 5000  # no blank line: cut after a newline
    assert all(p.endswith("\n") for p in text_documents(lines)) and "".join(text_documents(lines)) == lines
    assert text_documents("y" * (DOC_CHARS + 5)) == ["y" * DOC_CHARS, "y" * 5]


@pytest.mark.parametrize("streaming", [False, True])
def test_one_text_file_trains_without_eval_data(tok, code_text_dir, tmp_path, streaming):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in sorted(code_text_dir.iterdir())))
    stream, evals = build_data([DataSource(str(corpus))], tok, 64, eval_blocks=4, streaming=streaming,
                               cache_dir=str(tmp_path / "c"))
    assert evals.shape == (4, 64)
    held = set(rows(evals))
    assert not held & set(rows(take(stream, 200)))


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("name, content", [("bad.jsonl", b'{"text": "a"}\n{bad\n'), ("binary.txt", bytes(range(256)) * 8)])
def test_malformed_files_are_one_line_errors(tok, tmp_path, capfd, streaming, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UpcycleError, match="cannot read|not UTF-8") as error:
        build_data([DataSource(str(path))], tok, 16, eval_blocks=1, streaming=streaming, cache_dir=str(tmp_path / "c"))
    assert name in str(error.value) and "\n" not in str(error.value)
    assert "Failed to load" not in capfd.readouterr().err  # datasets' own log line is muted


def test_peek_returns_the_next_blocks_and_keeps_the_position(tok, tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(f"word{i}" for i in range(4000)))
    stream, _ = build_data([parse_source(str(tmp_path / "a.txt"))], tok, 16, eval_blocks=2, seed=0)
    peeked = stream.peek(5)
    state = stream.state_dict()
    blocks = iter(stream)
    assert torch.equal(peeked, torch.stack([next(blocks) for _ in range(5)]))
    assert state != stream.state_dict()  # iterating moved on; peeking had not
