"""``upcycle export``: Hub-ready folders, the model card, the expert adapter and round trips."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_merge import IDS, assert_failed_cleanly, logits, make_run

from upcycle.folder import load_model

TOL = 1e-5


@pytest.fixture(scope="module")
def merged(tmp_path_factory, moe_folder) -> Path:
    """A run (2 checkpoints, LoRA) folded into a model folder with a training_summary.json (read-only)."""
    from upcycle.merging import merge

    root = tmp_path_factory.mktemp("merged")
    run = make_run(root, moe_folder, steps=(4, 8), lora=True)
    return merge(run, root / "model").out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, merged) -> Path:
    from upcycle.exporting import export

    out = tmp_path_factory.mktemp("export") / "hub"
    export(merged, out, repo_id="me/Doge-tiny-MoE", base_model_id="SmallDoge/Doge-20M", max_shard_size="150KB",
           progress=False)
    return out


def card_parts(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_export_folder_layout(exported):
    names = {p.name for p in exported.iterdir()}
    shards = sorted(n for n in names if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n))
    assert len(shards) >= 2 and "model.safetensors.index.json" in names
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_upcycle_doge.UpcycleDogeForCausalLM"
    assert {"modeling_upcycle_doge.py", "tokenizer.json", "generation_config.json", "README.md",
            "training_summary.json"} <= names


def test_model_card_metadata_and_summary(exported):
    meta, body = card_parts(exported)
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "SmallDoge/Doge-20M"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"doge", "moe", "sparse-upcycling"} <= set(meta["tags"])
    summary = json.loads((exported / "training_summary.json").read_text())
    assert summary["tokens_seen"] == 8 * 512
    for row in ("| experts per layer | 64 |", "| experts per token | 4 |", "| tokens seen | 4,096 |",
                f"| final eval loss | {summary['final_eval_loss']:.4f} |",
                "| recipe | `recipe=test-recipe, train=experts, lr=0.01` |",
                f"| trainable parameters | {summary['trainable_params']:,} |",
                f"| total parameters | {summary['total_params']:,} |"):
        assert row in body, row


def test_card_usage_snippet_runs(exported, capsys):
    _, body = card_parts(exported)
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    assert '"me/Doge-tiny-MoE"' in code
    exec(compile(code.replace("me/Doge-tiny-MoE", str(exported)), "card", "exec"), {})
    assert "def fibonacci" in capsys.readouterr().out


def test_round_trip_with_and_without_remote_code(exported, merged):
    from transformers import AutoModelForCausalLM, DogeForCausalLM

    reference = logits(load_model(merged))
    remote = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    assert type(remote).__name__ == "UpcycleDogeForCausalLM"
    assert (logits(remote) - reference).abs().max() <= TOL
    assert (logits(load_model(exported)) - reference).abs().max() == 0
    out = remote.generate(IDS[:, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    stock, info = DogeForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(stock.model.layers[0].mlp).__name__ == "DogeCDMoE"


def test_expert_adapter_attaches_to_dense_base(tmp_path, merged, dense_folder, run_cli):
    out = tmp_path / "adapter"
    code, stdout, stderr = run_cli("export", merged, "--adapter-only", "-o", out, "--base", dense_folder)
    assert code == 0, stderr
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["adapter_type"] == "upcycle-experts" and meta["base_model_name_or_path"] == str(dense_folder)
    assert meta["num_experts"] == 64 and meta["num_experts_per_tok"] == 4
    assert any("q_proj" in n for n in meta["replaced_tensors"])  # the merged LoRA
    assert not any("mlp.gate_proj" in n for n in meta["replaced_tensors"])
    from upcycle.adapter import load_with_adapter

    attached = load_with_adapter(out)
    assert (logits(attached) - logits(load_model(merged))).abs().max() <= TOL
    # the documented lines, without upcycle: the class comes from the adapter folder's own code
    _, body = card_parts(out)
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    scope: dict = {}
    exec(compile(code.replace(str(out.absolute()), str(out)), "card", "exec"), scope)
    assert type(scope["model"]).__module__.startswith("transformers_modules")
    assert (logits(scope["model"]) - logits(attached)).abs().max() <= TOL


def test_export_run_folder_and_dry_run(tmp_path, moe_folder, run_cli):
    run = make_run(tmp_path, moe_folder, steps=(6,))
    code, stdout, stderr = run_cli("export", run, "--dry-run", "--repo-id", "me/x", "--push",
                                   "--max-shard-size", "100KB")
    assert code == 0, stderr
    assert "would upload to me/x" in stdout and "model.safetensors.index.json" in stdout and "README.md" in stdout
    assert not any(p.name != "run" for p in tmp_path.iterdir())  # nothing written
    code, stdout, stderr = run_cli("export", run, "-o", tmp_path / "out")
    assert code == 0, stderr
    _, body = card_parts(tmp_path / "out")
    assert "| steps | 6 |" in body and "| tokens seen | 3,072 |" in body


def test_export_bad_repo_id(tmp_path, merged, run_cli):
    out = tmp_path / "out"
    assert_failed_cleanly(run_cli("export", merged, "-o", out, "--repo-id", "not a repo"), out, "USER/NAME")
    assert_failed_cleanly(run_cli("export", merged, "-o", out, "--repo-id", "a/b/c"), out, "repo id")


def test_export_out_exists_and_missing_base(tmp_path, merged, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, stderr = run_cli("export", merged, "-o", out)
    assert code == 2 and stderr.startswith("error: ") and "--force" in stderr and stderr.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    missing = tmp_path / "adapter"
    result = run_cli("export", merged, "--adapter-only", "-o", missing, "--base", tmp_path / "no-such-dense")
    assert_failed_cleanly(result, missing, "--base")
