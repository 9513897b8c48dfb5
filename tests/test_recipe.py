"""Recipes, config resolution, the WSD schedule and the balance loss (no training)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml

from upcycle.errors import UpcycleError
from upcycle.recipe import KEYS, TrainConfig, resolve_config, save_config
from upcycle.trainable import WarmupStableDecay

RECIPES = Path(__file__).parents[1] / "recipes"
PUBLISHED_LR = {"20m": 8e-3, "60m": 6e-3, "160m": 4e-3, "320m": 2e-3}


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_resolves_and_starts_with_a_comment(path):
    assert path.read_text().startswith("# ")
    assert "continue-train" in path.read_text().split("\n\n")[0]
    config = resolve_config(path, model="m", data=["d/"])
    assert config.model == "m" and config.data == ["d/"]


@pytest.mark.parametrize("size", sorted(PUBLISHED_LR))
def test_doge_recipes_use_published_hyperparameters(size):
    config = resolve_config(RECIPES / f"doge-{size}-experts.yaml", model="m", data=["d"])
    assert config.lr == PUBLISHED_LR[size] and config.beta2 == 0.95 and config.weight_decay == 0.01
    assert config.seq_len == 2048 and config.bf16 and config.train == "experts"
    assert "1024 experts" in (RECIPES / f"doge-{size}-experts.yaml").read_text()


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(RECIPES / "accelerate" / f"{name}.yaml")).distributed_type
             for name in ("single_gpu", "ddp", "fsdp", "deepspeed_zero2")}
    assert [str(k).split(".")[-1] for k in kinds.values()] == ["NO", "MULTI_GPU", "FSDP", "DEEPSPEED"]
    fsdp = load_config_from_file(str(RECIPES / "accelerate" / "fsdp.yaml"))
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is True


def test_flags_override_recipe_and_values_coerce(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-3\nmax_steps: '20'\nbf16: no\ndata: [a/]\n")
    config = resolve_config(recipe, model="m", max_steps=7, data=["b/:0.5"])
    assert config.lr == 1e-3 and config.max_steps == 7 and config.bf16 is False and config.data == ["b/:0.5"]
    assert resolve_config(recipe, model="m").data == ["a/"]


@pytest.mark.parametrize("text, message", [("lr_max: 1\n", "'lr_max'"), ("max_steps: 2.5\n", "'max_steps'"),
                                           ("train: everything\n", "--train"), ("warmup: 0.8\ndecay: 0.5\n", "warmup"),
                                           ("- a\n", "mapping")])
def test_bad_recipe_is_an_error_naming_the_problem(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(UpcycleError, match=message):
        resolve_config(recipe, model="m", data=["d"])


def test_saved_config_round_trips(tmp_path):
    config = resolve_config(RECIPES / "tiny-cpu.yaml", model="m", data=["d", {"path": "hf:o/n", "weight": 0.3}])
    save_config(config, tmp_path / "config.yaml")
    assert set(yaml.safe_load((tmp_path / "config.yaml").read_text())) == set(KEYS)
    assert resolve_config(tmp_path / "config.yaml") == config
    assert set(KEYS) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_warmup_stable_decay_shape():
    linear = WarmupStableDecay(100, warmup=0.1, decay=0.2, shape="linear", min_ratio=0.1)
    factors = [linear(s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert all(f == 1.0 for f in factors[10:80])
    assert all(a > b for a, b in zip(factors[80:], factors[81:])) and 0.1 < factors[-1] < 0.2
    cosine = WarmupStableDecay(100, warmup=0.0, decay=0.5, shape="cosine", min_ratio=0.0)
    assert cosine(0) == 1.0 and cosine(75) == pytest.approx(0.5 * (1 + math.cos(math.pi * 26 / 51)))


def test_balance_loss_prefers_spread_routing(moe_folder):
    from upcycle.folder import load_model
    from upcycle.trainable import RouterLogits

    router = RouterLogits(load_model(moe_folder))
    keys = router.layers[0].num_keys
    router.logits = [torch.randn(2, 256, keys) * 0.01]
    spread = router.balance_loss().item()
    collapsed = torch.zeros(2, 256, keys)
    collapsed[:, :, 0] = 10.0
    router.logits = [collapsed]
    assert spread == pytest.approx(1.0, abs=0.1) and router.balance_loss().item() > 1.5


def continue_train_config(run_cli, *args: str) -> TrainConfig:
    """The config ``upcycle continue-train ARGS`` would train with (the trainer itself is replaced)."""
    from unittest import mock

    with mock.patch("upcycle.train.continue_train") as trainer:
        code, _, stderr = run_cli("continue-train", *args)
    assert code == 0, stderr
    return trainer.call_args.args[0]


def test_continue_train_has_a_flag_for_every_key():
    import click

    from upcycle.commands.continue_train import command

    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    assert set(KEYS) - {"model"} <= set(options)
    assert all(options[k].default is None for k in KEYS if k != "model")  # unset flags leave the recipe alone
    assert all(options[k].multiple for k in ("data", "eval_data", "retain_data"))
    assert options["bf16"].opts == ["--bf16"] and options["bf16"].secondary_opts == ["--fp32"]
    assert options["output_dir"].opts == ["-o", "--output-dir"]
    assert list(options["train"].type.choices) == ["experts", "experts+lora", "lora", "all"]
    assert list(options["decay_shape"].type.choices) == ["linear", "cosine"]
    help_text = {k: options[k].help for k in KEYS if k not in ("model", "data")}  # --data has no default
    assert all("[default:" in text for text in help_text.values()), help_text
    assert "[default: 0.95]" in help_text["beta2"] and "[default: false]" in help_text["streaming"]


def test_unset_flags_keep_the_recipe_and_set_flags_override_it(tmp_path, run_cli):
    recipe = RECIPES / "tiny-cpu.yaml"
    config = continue_train_config(run_cli, "m", "--recipe", recipe, "--data", "d/")
    assert config == resolve_config(recipe, model="m", data=["d/"])
    config = continue_train_config(run_cli, "m", "--recipe", recipe, "--data", "a/", "--data", "b/:0.5",
                                   "--retain-data", "r/", "--retain-data", "s/", "--beta1", "0.8", "--eps", "1e-6",
                                   "--min-lr-ratio", "0.1", "--lora-alpha", "8", "--lora-dropout", "0.05",
                                   "--log-every", "5", "--retain-coef", "0", "--retain-tokens", "16",
                                   "--retain-samples", "0", "--expert-lr-scale", "2", "--fp32", "--streaming",
                                   "--decay-shape", "cosine", "-o", tmp_path / "run")
    assert config.data == ["a/", "b/:0.5"] and config.retain_data == ["r/", "s/"]
    assert (config.beta1, config.eps, config.min_lr_ratio, config.lora_alpha, config.lora_dropout) == (
        0.8, 1e-6, 0.1, 8.0, 0.05)
    assert (config.log_every, config.retain_coef, config.retain_tokens, config.retain_samples) == (5, 0.0, 16, 0)
    assert config.expert_lr_scale == 2.0 and config.bf16 is False and config.streaming is True
    assert config.decay_shape == "cosine" and config.output_dir == str(tmp_path / "run")
    assert config.seq_len == 64  # still the recipe's


@pytest.mark.parametrize("key, value", [("lr", float("inf")), ("lr", float("nan")), ("weight_decay", -1.0),
                                        ("beta2", 1.0), ("retain_coef", -1e-3), ("min_lr_ratio", 1.5),
                                        ("clip", float("nan")), ("expert_lr_scale", 0.0), ("eps", 0.0)])
def test_nonsense_numbers_are_refused_naming_the_flag(key, value):
    from upcycle.errors import UpcycleError
    from upcycle.recipe import resolve_config

    with pytest.raises(UpcycleError, match="--" + key.replace("_", "-")):
        resolve_config(None, model="m", data=["d"], **{key: value})


def test_nan_average_weights_are_refused():
    from upcycle.errors import UpcycleError
    from upcycle.merging import coefficients

    with pytest.raises(UpcycleError, match="--weights"):
        coefficients("wma", 2, [float("nan"), 1.0])
