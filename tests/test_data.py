"""Data pipeline: packing, mixtures, resume, eval hold-out, streaming, bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from upcycle.data import DataSource, build_data, parse_source
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


DOCS = ["def alpha(x):\n    return x + 1\n", "class Beta:\n    pass\n", "import os\nprint(os.sep)\n",
        "# gamma\nvalue = [1, 2, 3]\n", "while True:\n    break\n"]


def test_packing_exact_blocks(tok, tmp_path):
    folder = write_docs(tmp_path / "docs", DOCS)
    stream, evals = build_data([DataSource(str(folder))], tok, 7, eval_blocks=0, cache_dir=str(tmp_path / "c"))
    assert evals.shape == (0, 7)
    blocks = take(stream, 40)
    assert blocks.dtype == torch.int64 and blocks.shape == (40, 7)
    flat = blocks.flatten().tolist()
    eos = tok.eos_token_id
    want = sorted(encode(tok, d) for d in DOCS)
    assert all(eos not in w for w in want)
    runs = segments(flat, eos)
    assert len(runs) >= 3 * len(DOCS)
    for epoch in range(3):  # every epoch is a permutation of the documents, EOS after each
        assert sorted(runs[epoch * 5:(epoch + 1) * 5]) == want
    # the blocks are exactly the documents back to back, no padding, no gaps
    expected = [t for run in runs for t in (*run, eos)]
    assert flat[: len(expected)] == expected
    assert [tuple(runs[i * 5:(i + 1) * 5]) for i in range(3)] != [tuple(runs[:5])] * 3  # epochs reshuffled


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
    stream, _ = build_data(sources, tok, 6, **kwargs)
    take(stream, 23)
    state = json.loads(json.dumps(stream.state_dict()))  # plain, serializable
    expected = take(stream, 60)  # crosses several epochs of both sources
    fresh, _ = build_data(sources, tok, 6, **kwargs)
    fresh.load_state_dict(state)
    assert torch.equal(take(fresh, 60), expected)
    with pytest.raises(UpcycleError):
        build_data(sources, tok, 7, **kwargs)[0].load_state_dict(state)


def test_eval_held_out_disjoint(tok, code_text_dir, tmp_path):
    docs = {encode(tok, p.read_text(encoding="utf-8")) for p in code_text_dir.iterdir()}
    stream, evals = build_data([DataSource(str(code_text_dir))], tok, 256, eval_blocks=3,
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


def test_streaming_matches_and_formats(tok, code_text_dir, tmp_path):
    jl = tmp_path / "rows.jsonl"
    jl.write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(DOCS * 20)))
    pq = tmp_path / "pq" / "rows.parquet"
    pq.parent.mkdir()
    import datasets

    datasets.Dataset.from_dict({"text": DOCS[::-1] * 10}).to_parquet(str(pq))
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": d} for d in DOCS * 10]))
    sources = [DataSource(str(code_text_dir), 2.0), DataSource(str(jl), 1.0, text_field="content"),
               DataSource(str(pq.parent), 0.5), DataSource(str(arr), 0.5)]
    out = [build_data(sources, tok, 64, eval_blocks=4, seed=1, streaming=s, cache_dir=str(tmp_path / "c"),
                      shuffle_buffer=3) for s in (False, True)]
    assert torch.equal(out[0][1], out[1][1])
    assert torch.equal(take(out[0][0], 300), take(out[1][0], 300))


def test_parse_source():
    assert parse_source("docs/:0.7") == DataSource("docs/", 0.7)
    assert parse_source("docs/") == DataSource("docs/", 1.0)
    assert parse_source("hf:org/name:0.3") == DataSource("hf:org/name", 0.3)
    assert parse_source("hf:org/name") == DataSource("hf:org/name", 1.0)


@pytest.mark.parametrize("spec", ["docs/:abc", "docs/:0", "docs/:-1", "docs/:nan"])
def test_bad_weight_spec(spec):
    with pytest.raises(UpcycleError, match="weight"):
        parse_source(spec)


def test_bad_inputs(tok, tmp_path, code_text_dir, monkeypatch):
    def fails(sources, match, seq_len=16, **kw):
        with pytest.raises(UpcycleError, match=match) as err:
            build_data(sources, tok, seq_len, cache_dir=str(tmp_path / "c"), **kw)
        assert "\n" not in str(err.value)

    fails([], "no data sources")
    fails([DataSource(str(tmp_path / "missing"))], "does not exist")
    (tmp_path / "t.csv").write_text("text\nhello\n")
    fails([DataSource(str(tmp_path / "t.csv"))], "unknown file type")
    (tmp_path / "empty_dir").mkdir()
    fails([DataSource(str(tmp_path / "empty_dir"))], "no data files")
    fails([DataSource(str(write_docs(tmp_path / "blank", ["", ""])))], "no text")
    (tmp_path / "r.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    fails([DataSource(str(tmp_path / "r.jsonl"))], "no text field 'text'")
    fails([DataSource(str(code_text_dir), weight=0.0)], "weight")
    fails([DataSource(str(write_docs(tmp_path / "one", ["tiny doc\n"])))], "too small", eval_blocks=2)
    fails([DataSource(str(write_docs(tmp_path / "two", ["x", "y"])))], "no documents left",
          eval_blocks=1, seq_len=4)
    import datasets
    import huggingface_hub

    # conftest's HF_HUB_OFFLINE may be set after huggingface_hub read it: force offline mode here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    fails([DataSource("hf:no-such-org/no-such-dataset")], "Hub dataset")
