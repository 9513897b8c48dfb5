"""``upcycle expand``: same function as the dense model, bit-exact dense tensors, safe writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import json_of, save_dense, tiny_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DogeForCausalLM, LlamaConfig, LlamaForCausalLM

import upcycle
from upcycle.expansion import expand

IDS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def test_upcycled_model_reproduces_dense_logits(dense_folder, moe_folder):
    dense = DogeForCausalLM.from_pretrained(dense_folder)
    moe = upcycle.load_model(moe_folder)
    assert type(moe.model.layers[0].mlp).__name__ == "CausalCDMoE"
    assert (logits(dense) - logits(moe)).abs().max() <= 1e-5


def test_dense_tensors_copied_bit_exact_and_new_ones_initialized(dense_folder, moe_folder):
    before, after = tensors(dense_folder), tensors(moe_folder)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor) and after[name].dtype == tensor.dtype, name
    new = sorted(set(after) - set(before))
    assert len(new) == 3 * 2
    for name in new:
        if name.endswith("up_embed.weight"):
            assert not after[name].any()
        else:
            assert after[name].std() == pytest.approx(0.02, rel=0.2)
    assert after["model.layers.0.mlp.router_gate.weight"].shape == (16, 64)
    assert after["model.layers.1.mlp.down_embed.weight"].shape == (64, 64)


def test_folder_format(moe_folder):
    config = json_of(moe_folder / "config.json")
    assert config["model_type"] == "doge" and config["is_moe"] is True
    assert (config["num_experts"], config["num_experts_per_tok"]) == (64, 4)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_upcycle_doge.UpcycleDogeForCausalLM"
    for name in ("modeling_upcycle_doge.py", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (moe_folder / name).is_file(), name
    shipped = (moe_folder / "modeling_upcycle_doge.py").read_text()
    assert shipped == Path(upcycle.__file__).with_name("modeling_upcycle_doge.py").read_text()


def test_stock_transformers_loads_without_remote_code(moe_folder):
    model, info = AutoModelForCausalLM.from_pretrained(moe_folder, output_loading_info=True)
    assert type(model.model.layers[0].mlp).__name__ == "DogeCDMoE"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_remote_code_runs_where_upcycle_is_not_installed(dense_folder, moe_folder, tmp_path):
    """A fresh interpreter that cannot import upcycle loads our causal CDMoE from the folder."""
    copy = shutil.copytree(moe_folder, tmp_path / "model")
    torch.save(IDS, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["upcycle"] = None  # importing upcycle now fails, as on a machine without it
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(copy)!r}, trust_remote_code=True).eval()
        mlp = model.model.layers[0].mlp
        assert type(mlp).__name__ == "CausalCDMoE", type(mlp)
        assert not type(mlp).__module__.startswith("upcycle"), type(mlp).__module__
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
    """)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    dense = DogeForCausalLM.from_pretrained(dense_folder)
    assert (torch.load(tmp_path / "out.pt") - logits(dense)).abs().max() <= 1e-5


def test_input_is_never_modified(tmp_path, tokenizer_dir):
    src = save_dense(tmp_path / "dense", tokenizer_dir)
    digest = tree_digest(src)
    mtime = os.stat(src).st_mtime_ns
    expand(src, num_experts=16, experts_per_token=2, out=tmp_path / "out", progress=False)
    assert tree_digest(src) == digest and os.stat(src).st_mtime_ns == mtime


def test_default_output_is_a_new_sibling(tmp_path, tokenizer_dir, run_cli):
    src = save_dense(tmp_path / "ckpt", tokenizer_dir)
    code, out, err = run_cli("expand", "--experts", "16", str(src) + "/")
    assert code == 0, err
    assert (tmp_path / "ckpt-moe16" / "config.json").is_file()
    assert str(tmp_path / "ckpt-moe16") in out
    for label in ("parameters before", "parameters after", "added", "trainable", "size on disk"):
        assert label in out


@pytest.mark.parametrize("layers, routed", [("all", 2), (None, 1)])  # None: the default, the top half
def test_summary_counts(dense_folder, tmp_path, layers, routed):
    kwargs = {} if layers is None else {"layers": layers}
    result = expand(dense_folder, num_experts=64, experts_per_token=4, out=tmp_path / "o", progress=False, **kwargs)
    dense_params = sum(p.numel() for p in DogeForCausalLM.from_pretrained(dense_folder).parameters())
    per_layer = 2 * 8 * 64 + 2 * 64 * 64
    added = 2 * per_layer
    assert (result.params_before, result.params_added) == (dense_params, added)
    assert result.params_after == dense_params + added == sum(p.numel() for p in upcycle.load_model(result.out).parameters())
    assert result.trainable == routed * per_layer
    assert result.bytes_on_disk == sum(f.stat().st_size for f in result.out.iterdir() if f.is_file())


def test_sharded_output_and_determinism(dense_folder, tmp_path):
    a = expand(dense_folder, num_experts=64, out=tmp_path / "a", seed=3, max_shard_size="60KB", progress=False).out
    b = expand(dense_folder, num_experts=64, out=tmp_path / "b", seed=3, progress=False).out
    c = expand(dense_folder, num_experts=64, out=tmp_path / "c", seed=4, progress=False).out
    index = json_of(a / "model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) > 2
    ta, tb, tc = tensors(a), tensors(b), tensors(c)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["model.layers.0.mlp.router_gate.weight"], tc["model.layers.0.mlp.router_gate.weight"])
    dense = DogeForCausalLM.from_pretrained(dense_folder)
    assert (logits(upcycle.load_model(a)) - logits(dense)).abs().max() <= 1e-5


def test_dtype_cast(dense_folder, tmp_path):
    out = expand(dense_folder, num_experts=16, out=tmp_path / "bf16", dtype="bfloat16", progress=False).out
    assert {t.dtype for t in tensors(out).values()} == {torch.bfloat16}
    assert upcycle.load_model(out).dtype == torch.bfloat16


def test_doge_20m_shape_reproduces_dense(tmp_path):
    """The acceptance shape: 8 layers, hidden 256, ff 512, vocab 32768, 1024 experts."""
    torch.manual_seed(0)
    config = tiny_config(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=2, num_key_value_heads=1)
    DogeForCausalLM(config).save_pretrained(tmp_path / "doge20m")
    out = expand(tmp_path / "doge20m", num_experts=1024, out=tmp_path / "moe", progress=False).out
    ids = torch.randint(0, 32768, (1, 64))
    dense = DogeForCausalLM.from_pretrained(tmp_path / "doge20m")
    assert (logits(upcycle.load_model(out), ids) - logits(dense, ids)).abs().max() <= 1e-5
    assert json_of(out / "config.json")["num_experts_per_tok"] == 8


# --- bad input: one line, non-zero exit, nothing written -------------------------------------------


def llama_folder(path: Path) -> Path:
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(path)
    return path


def truncated_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    return dst


def corrupt_header_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    data = bytearray((dst / "model.safetensors").read_bytes())
    data[8:40] = b"\x00" * 32
    (dst / "model.safetensors").write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("case,make_src,args,message", [
    ("not square", None, ["--experts", "1000"], "not a perfect square"),
    ("k too big", None, ["--experts", "16", "--experts-per-token", "17"], "between 1 and"),
    ("k zero", None, ["--experts", "16", "--experts-per-token", "0"], "between 1 and"),
    ("shard size", None, ["--experts", "16", "--max-shard-size", "lots"], "cannot read size"),
    ("missing", lambda d, t: t / "nope", ["--experts", "16"], "does not exist"),
    ("llama", lambda d, t: llama_folder(t / "llama"), ["--experts", "16"], "not Doge"),
    ("truncated", lambda d, t: truncated_copy(d, t / "trunc"), ["--experts", "16"], "truncated"),
    ("corrupt", lambda d, t: corrupt_header_copy(d, t / "corrupt"), ["--experts", "16"], "corrupt"),
    ("moe source", "moe", ["--experts", "16"], "already has 64 experts"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, make_src, args, message, dense_folder, moe_folder,
                                                  tmp_path, run_cli):
    work = tmp_path / "work"
    work.mkdir()
    src = moe_folder if make_src == "moe" else (make_src(dense_folder, work) if make_src else dense_folder)
    before = sorted(p.name for p in work.iterdir())
    code, out, err = run_cli("expand", *args, str(src), "-o", str(work / "out"))
    assert code != 0
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err + out
    assert sorted(p.name for p in work.iterdir()) == before  # no OUT, no staging leftovers


def test_refuses_non_empty_output_and_force_keeps_foreign_files(dense_folder, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli("expand", "--experts", "16", str(dense_folder), "-o", str(out))
    assert code != 0 and "not empty" in err and "--force" in err
    code, _, err = run_cli("expand", "--experts", "16", str(dense_folder), "-o", str(out), "--force")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()
    # a second forced run replaces upcycle's own files (here: one shard -> several) and removes its stale ones
    code, _, err = run_cli("expand", "--experts", "16", str(dense_folder), "-o", str(out), "--force",
                           "--max-shard-size", "60KB")
    assert code == 0, err
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").is_file()
    assert (out / "notes.txt").read_text() == "mine"


def test_force_refuses_to_overwrite_a_file_it_did_not_write(dense_folder, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, _, err = run_cli("expand", "--experts", "16", str(dense_folder), "-o", str(out), "--force")
    assert code != 0 and "did not write" in err
    assert (out / "config.json").read_text() == "{}" and sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_unwritable_output(dense_folder, tmp_path, run_cli):
    if os.geteuid() == 0:
        target = Path("/proc/upcycle-test/out")  # not writable even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    code, out, err = run_cli("expand", "--experts", "16", str(dense_folder), "-o", str(target))
    assert code != 0 and err.startswith("error: ") and "write" in err and "Traceback" not in err


def test_hub_id_failure_is_one_line(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("expand", "--experts", "16", "SmallDoge/Doge-20M")
    assert code != 0 and "could not fetch SmallDoge/Doge-20M" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
