"""``upcycle continue-train``: train the new experts (or LoRA, or everything) of an upcycled model."""

from __future__ import annotations

import dataclasses

import click

from upcycle.recipe import TRAIN_MODES, TrainConfig


@click.command("continue-train")
@click.argument("model")
@click.option("--data", multiple=True, help="Training text: a file, folder or hf:org/name, optionally PATH:WEIGHT. "
              "Repeat to mix sources.")
@click.option("--eval-data", multiple=True, help="Held-out text (same syntax).  [default: a split of --data]")
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML recipe (see recipes/); flags override it.")
@click.option("-o", "--output-dir", help="Run folder.  [default: runs/MODELNAME-TRAIN]")
@click.option("--max-steps", type=int, help="Optimizer steps.")
@click.option("--batch-size", type=int, help="Blocks per process per micro-step.")
@click.option("--grad-accum", type=int, help="Micro-steps per optimizer step.")
@click.option("--seq-len", type=int, help="Tokens per block.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--warmup", type=float, help="Warmup, as a fraction of --max-steps.")
@click.option("--decay", type=float, help="Decay over the last fraction of --max-steps.")
@click.option("--decay-shape", type=click.Choice(["linear", "cosine"]), help="Shape of the decay.")
@click.option("--weight-decay", type=float, help="AdamW weight decay.")
@click.option("--clip", type=float, help="Gradient-norm clip (0 disables).")
@click.option("--balance-coef", type=float, help="Router load-balancing loss coefficient (0 disables).")
@click.option("--train", "train", type=click.Choice(TRAIN_MODES), help="What trains.  [default: experts]")
@click.option("--lora-r", type=int, help="LoRA rank.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None, help="Recompute activations.")
@click.option("--bf16/--fp32", "bf16", default=None, help="bf16 autocast on GPU (CPU always trains in fp32).")
@click.option("--streaming/--no-streaming", default=None, help="Stream Hub datasets.")
@click.option("--save-every", type=int, help="Steps between checkpoints.")
@click.option("--eval-every", type=int, help="Steps between eval losses.")
@click.option("--eval-blocks", type=int, help="Held-out blocks to evaluate.")
@click.option("--keep-checkpoints", type=int, help="Keep only the newest N checkpoints (0 keeps all).")
@click.option("--report-to", help="auto | none | tensorboard | wandb (comma-separated).")
@click.option("--seed", type=int, help="Seed for data order, eval split and LoRA init.")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[CKPT]",
              help="Continue the run in --output-dir from its latest checkpoint, or from CKPT (--resume=PATH).")
@click.option("--force", is_flag=True, help="Start over in a run folder holding a previous run (only upcycle's "
              "files are replaced).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(model: str, recipe: str | None, resume: str | None, force: bool, no_progress: bool, **flags) -> None:
    """Continue training the upcycled Doge MODEL on --data; only the new experts train by default.

    \b
    Examples:
      upcycle continue-train Doge-20M-moe1024/ --recipe recipes/doge-20m-experts.yaml --data corpus/ -o runs/a
      upcycle continue-train Doge-20M-moe1024/ --data corpus/ -o runs/a --resume
      accelerate launch --config_file recipes/accelerate/ddp.yaml -m upcycle continue-train ...
    """
    from upcycle.recipe import resolve_config
    from upcycle.train import continue_train

    config = resolve_config(recipe, model=model, **{k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in flags.items()})
    result = continue_train(config, resume=resume, force=force, progress=not no_progress)
    click.echo(result.summary())


def show_recipe_defaults(cmd: click.Command) -> None:
    """Append each option's built-in default (what applies when neither recipe nor flag sets it)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    for param in cmd.params:
        if isinstance(param, click.Option) and param.name in defaults and "[default" not in (param.help or ""):
            value = defaults[param.name]
            param.help = f"{param.help}  [default: {str(value).lower() if isinstance(value, bool) else value}]"


show_recipe_defaults(command)
