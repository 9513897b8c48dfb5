"""``upcycle quickstart``: expand, train, merge and export the embedded default, offline."""

from __future__ import annotations

import click
import torch

from upcycle import demo
from upcycle.recipe import DEFAULT_LR


@click.command("quickstart")
@click.argument("out", type=click.Path(file_okay=False), default="upcycle-quickstart")
@click.option("--force", is_flag=True, help="Reuse a non-empty OUT, replacing only what quickstart writes there.")
@click.option("--max-steps", type=int, default=300, show_default=True, help="Training steps (3 for a smoke test).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Blocks of 256 tokens per step.")
@click.option("--lr", type=float, default=DEFAULT_LR["experts"], show_default=True,
              help="Peak learning rate of the experts (the experts recipe's default).")
@click.option("--replay", type=float, default=0.0, show_default=True,
              help="Fraction of training blocks taken from the docs (domain A) to limit forgetting, e.g. 0.1.")
@click.option("--experts", "num_experts", type=int, default=1024, show_default=True,
              help="Experts per layer (a perfect square).")
@click.option("--experts-per-token", type=int, default=8, show_default=True, help="Experts each token uses.")
@click.option("--eval-blocks", type=int, default=64, show_default=True,
              help="Held-out blocks of 256 tokens per domain for the before/after losses.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads.  [default: torch's choice]")
def command(out: str, force: bool, max_steps: int, batch_size: int, lr: float, replay: float,
            num_experts: int, experts_per_token: int, eval_blocks: int, seed: int, threads: int | None) -> None:
    """Run the whole upcycling loop on the shipped tiny model, offline, in a few minutes on a CPU.

    The shipped dense Doge (pretrained on Python documentation, domain A) grows experts;
    only the experts train on this interpreter's standard-library sources (domain B);
    the run is merged and exported into OUT (default ./upcycle-quickstart/). Prints the
    held-out loss on both domains before and after, and the paths it wrote.
    """
    if threads:
        torch.set_num_threads(threads)
    result = demo.quickstart(out, force=force, num_experts=num_experts, experts_per_token=experts_per_token,
                             max_steps=max_steps, batch_size=batch_size, lr=lr, replay=replay,
                             eval_blocks=eval_blocks, seed=seed, echo=click.echo)
    click.echo(result.summary())
