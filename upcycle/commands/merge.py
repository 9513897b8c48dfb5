"""``upcycle merge``: fold a run into a standalone model, or average checkpoints."""

from __future__ import annotations

import click

from upcycle import merging
from upcycle.errors import UpcycleError


@click.command("merge")
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), required=True, help="Output model folder.")
@click.option("--base", default=None,
              help="Base model the run trained.  [default: base_model from the run's state.json/config.yaml]")
@click.option("--average", "do_average", is_flag=True,
              help="Average the given model folders or checkpoints instead of folding one run.")
@click.option("--method", type=click.Choice(["sma", "ema", "wma"]), default="sma", show_default=True,
              help="Averaging: simple, exponential (inputs oldest first) or weighted.")
@click.option("--weights", default=None, help="wma weights, one per input, comma-separated (e.g. 1,2,4).  "
              "[default: 1,2,...,n]")
@click.option("--ema-decay", type=float, default=0.5, show_default=True,
              help="ema: avg = decay * avg + (1 - decay) * next input.")
@click.option("--force", is_flag=True, help="Write into a non-empty OUT, replacing only files upcycle wrote there.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard, e.g. 500MB.")
def command(sources: tuple[str, ...], out: str, base: str | None, do_average: bool, method: str,
            weights: str | None, ema_decay: float, force: bool, max_shard_size: str) -> None:
    """Fold a training run into a standalone model folder, or average checkpoints.

    Given a RUN folder, merge takes its final tensors (experts.safetensors and
    adapter/) when training finished, else its latest checkpoint-STEP; given a
    checkpoint-STEP folder, that checkpoint. Trained tensors replace the base's
    and a LoRA adapter is merged into the weights. Inputs are never modified.

    \b
    Examples:
      upcycle merge runs/doge-moe/ -o doge-moe-merged/
      upcycle merge runs/doge-moe/checkpoint-2000 --base Doge-20M-moe1024/ -o merged-2000/
      upcycle merge --average ckpt-a/ ckpt-b/ ckpt-c/ --method ema --ema-decay 0.7 -o averaged/
      upcycle merge --average runs/x/checkpoint-{1000,2000,3000} --method wma --weights 1,2,4 -o avg/
    """
    if do_average:
        try:
            parsed = [float(w) for w in weights.split(",")] if weights else None
        except ValueError:
            raise UpcycleError(f"--weights {weights!r} must be comma-separated numbers, e.g. 1,2,4") from None
        result = merging.average(list(sources), out, method=method, weights=parsed, ema_decay=ema_decay, base=base,
                                 force=force, max_shard_size=max_shard_size)
    else:
        if len(sources) != 1:
            raise UpcycleError(f"merge takes one RUN or checkpoint (got {len(sources)}): pass --average to "
                               "average several")
        if weights or method != "sma":
            raise UpcycleError("--method and --weights need --average")
        result = merging.merge(sources[0], out, base=base, force=force, max_shard_size=max_shard_size)
    click.echo(result.summary())
