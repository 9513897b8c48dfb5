"""Shared fixtures: tiny Doge checkpoints built from ``DogeConfig`` and real local text.

Session-scoped folders are shared between tests: treat them as read-only (copy
them with ``shutil.copytree`` before changing anything).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton (when installed) runs tests/test_triton.py's kernels on CPU in its
    os.environ.setdefault("TRITON_INTERPRET", "1")  # interpreter, which it reads once, at its first import
from transformers import DogeConfig, DogeForCausalLM, GenerationConfig, PreTrainedTokenizerFast  # noqa: E402
torch.set_num_threads(min(2, torch.get_num_threads()))

STDLIB = Path(os.__file__).parent
CODE_SOURCES = ["argparse.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "csv.py", "string.py",
                "shlex.py", "fractions.py", "difflib.py", "heapq.py"]
VOCAB = 512
EOS, PAD, BOS = "<|endoftext|>", "<|pad|>", "<|bos|>"


def read_code_documents() -> list[str]:
    """Real Python source from the interpreter's standard library, one document per file."""
    return [(STDLIB / name).read_text(encoding="utf-8") for name in CODE_SOURCES]


def build_tokenizer(texts: list[str], out: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``VOCAB`` entries, trained in about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS, PAD, BOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=BOS)
    fast.save_pretrained(out)
    return fast


def tiny_config(**overrides) -> DogeConfig:
    """A Doge config small enough for CPU tests (about 80k parameters)."""
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                  tie_word_embeddings=True, eos_token_id=0, pad_token_id=1, bos_token_id=2)
    values.update(overrides)
    return DogeConfig(**values)


def save_dense(folder: Path, tokenizer_dir: Path | None, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialized dense Doge (plus tokenizer) as a checkpoint folder."""
    torch.manual_seed(seed)
    model = DogeForCausalLM(tiny_config(**overrides))
    model.save_pretrained(folder)
    GenerationConfig(eos_token_id=0, pad_token_id=1, bos_token_id=2).save_pretrained(folder)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_dir / name).is_file():
                (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(read_code_documents(), out)
    return out


@pytest.fixture(scope="session")
def dense_folder(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny dense Doge checkpoint with a tokenizer (read-only)."""
    return save_dense(tmp_path_factory.mktemp("dense"), tokenizer_dir)


@pytest.fixture(scope="session")
def moe_folder(tmp_path_factory, dense_folder) -> Path:
    """``dense_folder`` upcycled to 64 experts, 4 per token (read-only)."""
    from upcycle.expansion import expand

    out = tmp_path_factory.mktemp("moe") / "model"
    expand(dense_folder, num_experts=64, experts_per_token=4, out=out, seed=0, progress=False, layers="all")
    return out


@pytest.fixture(scope="session")
def code_text_dir(tmp_path_factory) -> Path:
    """A folder of real text files (standard-library sources saved as .txt)."""
    out = tmp_path_factory.mktemp("code_text")
    for i, text in enumerate(read_code_documents()):
        (out / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return out


@pytest.fixture
def run_cli(monkeypatch):
    """Run ``upcycle ...`` in-process; returns (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from upcycle.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        runner = CliRunner()
        result = runner.invoke(_as_command(main), list(map(str, args)), catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return run


def _as_command(main):
    import click

    @click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                     "help_option_names": []})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def wrapper(args):
        main(list(args))

    return wrapper


def json_of(path: Path) -> dict:
    return json.loads(Path(path).read_text())


sys.path.insert(0, str(Path(__file__).parent))
