"""``upcycle continue-train``: train the new experts (or LoRA, or everything) of an upcycled model.

Every :class:`~upcycle.recipe.TrainConfig` field but ``model`` (the MODEL argument) is an option,
made from the field's type, default and help: ``--max-steps`` for ``max_steps``, a repeatable option
for a list, ``--x/--no-x`` for a bool, a choice for a key with a registry. An option not given stays
``None``, so the recipe's value (or the built-in default) applies.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable

import click

from upcycle import train
from upcycle.recipe import DECAY_SHAPES, TRAIN_MODES, TrainConfig, field_types, resolve_config

CHOICES = {"train": TRAIN_MODES, "decay_shape": DECAY_SHAPES}  # keys whose values come from a registry
SPELLINGS = {"output_dir": ("-o", "--output-dir"), "bf16": ("--bf16/--fp32",)}  # flags not named --key-name


def value_type(kind: object) -> object:
    """``float | None`` -> ``float``; other types as they are."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return kind


def help_text(setting: dataclasses.Field) -> str:
    """The field's help with its default; an empty-list or ``None`` default is described by the help itself."""
    text, value = setting.metadata["help"], setting.default
    if "[default" in text or value is dataclasses.MISSING or value is None:
        return text
    return f"{text}  [default: {str(value).lower() if isinstance(value, bool) else value}]"


def setting_option(setting: dataclasses.Field, kind: object) -> Callable:
    """The click option of one TrainConfig field."""
    kind = value_type(kind)
    flag = "--" + setting.name.replace("_", "-")
    options: dict = {"default": None, "help": help_text(setting)}
    if kind is bool:
        spelling = SPELLINGS.get(setting.name, (f"{flag}/--no-{flag[2:]}",))
    else:
        spelling = SPELLINGS.get(setting.name, (flag,))
        if typing.get_origin(kind) is list:
            options.update(multiple=True, metavar="PATH[:WEIGHT]")
        elif setting.name in CHOICES:
            options["type"] = click.Choice(CHOICES[setting.name])
        else:
            options["type"] = kind
    return click.option(setting.name, *spelling, **options)


def train_config_options(command: Callable) -> Callable:
    """Add an option for every TrainConfig field but ``model``, in the dataclass's order."""
    kinds = field_types()
    for setting in reversed(dataclasses.fields(TrainConfig)):
        if setting.name != "model":
            command = setting_option(setting, kinds[setting.name])(command)
    return command


@click.command("continue-train")
@click.argument("model")
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML recipe (see recipes/); flags override it.")
@train_config_options
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[CKPT]",
              help="Continue the run in --output-dir from its latest checkpoint, or from CKPT (--resume=PATH).")
@click.option("--force", is_flag=True, help="Start over in a run folder holding a previous run (only upcycle's "
              "files are replaced).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(model: str, recipe: str | None, resume: str | None, force: bool, no_progress: bool, **settings) -> None:
    """Continue training the upcycled Doge MODEL on --data; only the new experts train by default.

    \b
    Examples:
      upcycle continue-train Doge-20M-moe1024/ --recipe recipes/doge-20m-experts.yaml --data corpus/ -o runs/a
      upcycle continue-train Doge-20M-moe1024/ --data corpus/ -o runs/a --resume
      accelerate launch --config_file recipes/accelerate/ddp.yaml -m upcycle continue-train ...
    """
    config = resolve_config(recipe, model=model, **{k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in settings.items()})
    result = train.continue_train(config, resume=resume, force=force, progress=not no_progress)
    click.echo(result.summary())
