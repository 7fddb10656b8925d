"""The ``wsi-prune`` command: thin click commands that parse options, build the config, call the
library and map errors to exit codes (see :mod:`wsi_prune.errors`). One module per command
group; heavy imports (torch, zarr, OpenSlide) happen inside command bodies, so ``wsi-prune -h``
and the cheap commands start fast."""

from __future__ import annotations

import click

from wsi_prune import __version__
from wsi_prune.cli.common import CONTEXT_SETTINGS, setup_logging
from wsi_prune.cli.distributed import merge, submit
from wsi_prune.cli.evaluate import evaluate
from wsi_prune.cli.models import models
from wsi_prune.cli.run import demo, run
from wsi_prune.cli.slides import doctor, heatmap, info, synth, tile
from wsi_prune.cli.train import distill_vit, train_mil, train_scorer, train_vit

__all__ = ["main"]


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="wsi-prune")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """wsi-prune: whole-slide images to slide predictions and heatmaps, fast.

    \b
    Examples:
      wsi-prune demo
      wsi-prune info slide.svs
      wsi-prune run slides/ --out results/ --config pipelines/camelyon16.yaml
      wsi-prune evaluate results/ --labels reference.csv --annotations lesions/
    """
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet
    ctx.obj["verbose"] = verbose
    setup_logging(verbose, quiet)


for _cmd in (info, doctor, tile, synth, run, heatmap, demo, evaluate, train_scorer, train_vit,
             distill_vit, train_mil, submit, merge, models):
    main.add_command(_cmd)
