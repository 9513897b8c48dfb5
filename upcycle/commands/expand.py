"""``upcycle expand``: graft CDMoE experts onto a dense Doge checkpoint."""

from __future__ import annotations

import click

from upcycle import expansion


@click.command("expand")
@click.argument("src")
@click.option("--experts", "num_experts", type=int, required=True,
              help="Experts per layer; a perfect square (product-key routing), e.g. 1024 or 16384.")
@click.option("--experts-per-token", "experts_per_token", type=int, default=None,
              help="Experts each token uses (top-k).  [default: sqrt(experts)/4, so 8 for 1024]")
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), default=None,
              help="Output folder.  [default: a new sibling folder SRC-moeN]")
@click.option("--force", is_flag=True, help="Write into a non-empty OUT, replacing only files upcycle wrote there.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the new router and down_embed weights.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast floating tensors to this dtype.  [default: keep the source's dtype, bit-exact]")
@click.option("--layers", default=expansion.DEFAULT_LAYERS, show_default=True,
              help="Layers that route experts: all, top-half, top:N or 0-based indices like 4-7. Experts only in "
                   "the top layers make a training step cheaper (the backward pass stops at the lowest one) and "
                   "forget less; `all` gains a little more on the new domain.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard, e.g. 500MB.")
def command(src: str, num_experts: int, experts_per_token: int | None, out: str | None, force: bool,
            seed: int, dtype: str | None, max_shard_size: str, layers: str) -> None:
    """Upcycle the dense Doge checkpoint SRC (a folder or Hub id) into a CDMoE model.

    The new checkpoint computes the same function as SRC (up_embed starts at zero)
    and is ready for `upcycle continue-train`. SRC is never modified.

    \b
    Example:
      upcycle expand --experts 1024 Doge-20M/ -o Doge-20M-moe1024/
    """
    result = expansion.expand(src, num_experts=num_experts, experts_per_token=experts_per_token, out=out, force=force,
                              seed=seed, dtype=dtype, max_shard_size=max_shard_size, layers=layers)
    click.echo(result.summary())
