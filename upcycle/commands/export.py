"""``upcycle export``: a Hub-ready model folder (or expert adapter), optionally uploaded."""

from __future__ import annotations

import click

from upcycle import exporting


@click.command("export")
@click.argument("model")
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), default=None,
              help="Folder to write (required unless --dry-run).")
@click.option("--repo-id", default=None, help="Hub repo USER/NAME, used in the model card and by --push.")
@click.option("--push", is_flag=True, help="Upload OUT to --repo-id (token: HF_TOKEN or `hf auth login`).")
@click.option("--private", is_flag=True, help="Create the repo as private when it does not exist yet.")
@click.option("--revision", default=None, help="Branch to upload to (created if missing).  [default: main]")
@click.option("--dry-run", is_flag=True, help="Only list the files and sizes that would be written/uploaded.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard, e.g. 500MB.")
@click.option("--adapter-only", is_flag=True,
              help="Write only the trained tensors as an expert adapter for the dense base model.")
@click.option("--base", default=None,
              help="--adapter-only: the dense base.  [default: upcycle.base_model in MODEL's config.json]; "
                   "a RUN: the base it trained.")
@click.option("--base-model-id", default=None,
              help="Hub id of the base model for the card's base_model (when the base is a local folder).")
@click.option("--license", "license_", default="apache-2.0", show_default=True, help="License in the model card.")
@click.option("--force", is_flag=True, help="Write into a non-empty OUT, replacing only files upcycle wrote there.")
def command(model: str, out: str | None, repo_id: str | None, push: bool, private: bool, revision: str | None,
            dry_run: bool, max_shard_size: str, adapter_only: bool, base: str | None, base_model_id: str | None,
            license_: str, force: bool) -> None:
    """Write MODEL (a model folder, or a RUN: its final/ model or latest checkpoint) as a Hub-ready folder.

    OUT gets sharded safetensors with an index, config.json with auto_map and the
    remote code, the tokenizer, generation_config.json and a README.md model card
    (metadata, training summary, usage). The token is never printed or written; a
    failed upload keeps OUT.

    \b
    Examples:
      upcycle export doge-moe-merged/ -o hub/doge-moe --repo-id me/Doge-20M-MoE --base-model-id SmallDoge/Doge-20M
      upcycle export doge-moe-merged/ -o hub/doge-moe --repo-id me/Doge-20M-MoE --push --private
      upcycle export runs/doge-moe/ --dry-run --max-shard-size 500MB
      upcycle export doge-moe-merged/ --adapter-only -o hub/doge-moe-experts --repo-id me/Doge-20M-experts
    """
    result = exporting.export(model, out, repo_id=repo_id, push=push, private=private, revision=revision,
                              dry_run=dry_run, max_shard_size=max_shard_size, adapter_only=adapter_only, force=force,
                              base=base, base_model_id=base_model_id, license=license_)
    click.echo(result.summary())
