"""``upcycle quickstart`` end to end on the shipped assets, with 3 training steps."""

from __future__ import annotations

import math
import re

import torch

from upcycle import assets


def test_assets_are_complete():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.DENSE_MODEL)
    assert len(tokenizer) == 4096 and tokenizer.eos_token_id == 0
    assert assets.docs_documents("train") and assets.docs_documents("heldout")
    assert set(assets.stdlib_files("train")).isdisjoint(assets.stdlib_files("heldout"))
    total = sum(p.stat().st_size for p in assets.ASSETS.rglob("*") if p.is_file())
    assert total < 8.5e6


def test_quickstart_smoke(tmp_path, run_cli):
    out = tmp_path / "qs"
    code, stdout, _ = run_cli("quickstart", out, "--max-steps", "3", "--eval-blocks", "4", "--threads", "2")
    assert code == 0, stdout
    rows = {m[0]: (float(m[1]), float(m[2])) for m in re.findall(r"^([AB]):.*?\s(\S+)\s+(\S+)\s+\S+$", stdout, re.M)}
    assert set(rows) == {"A", "B"}
    assert all(math.isfinite(v) for pair in rows.values() for v in pair)
    assert rows["A"][0] < rows["B"][0]  # pretrained on A: the docs are easier than code at the start
    for name in ("model", "adapter", "run", "quickstart.json"):
        assert str(out / name) in stdout

    from transformers import AutoModelForCausalLM

    import upcycle

    exported = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    attached = upcycle.load_with_adapter(out / "adapter", base=assets.DENSE_MODEL)
    ids = torch.arange(3, 35).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, attached(ids).logits, atol=1e-4, rtol=1e-4)


def test_quickstart_refuses_non_empty_out(tmp_path, run_cli):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, stderr = run_cli("quickstart", tmp_path, "--max-steps", "1")
    assert code == 2 and "not empty" in stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_quickstart_force_keeps_what_it_did_not_write(tmp_path, run_cli):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").write_text("mine")
    code, _, stderr = run_cli("quickstart", tmp_path, "--max-steps", "1", "--force")
    assert code == 2 and "did not write" in stderr.strip().splitlines()[-1]
    assert (tmp_path / "data" / "corpus.txt").read_text() == "mine"
