"""The main jobs: ``run`` (slides in, predictions, heatmaps and a run report out) and
``demo`` (the main job on a built-in default)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from wsi_prune.cli.common import (
    CONTEXT_SETTINGS,
    DEVICE,
    command_logging,
    config_options,
    device_for_gpus,
    exit_code,
    exit_on_sigterm,
    handle_errors,
    print_table,
)
from wsi_prune.cli.distributed import cluster_options
from wsi_prune.config import load_config
from wsi_prune.distributed.clients import ClusterRequest
from wsi_prune.distributed.shards import shard_suffix

__all__ = ["default_device", "demo", "run"]


def default_device(request: ClusterRequest) -> str:
    """``--device`` when not given: that of SLURM worker jobs (``--cluster slurm --gpus G``,
    :func:`~wsi_prune.cli.common.device_for_gpus`), else ``cpu``."""
    return device_for_gpus(request.slurm.gpus if request.cluster == "slurm" else 0)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@config_options
@click.option("--device", type=DEVICE, default=None,
              help="Where the models run: cpu, cuda, cuda:N (the N-th GPU) or mps. "
                   "[default: cuda with --cluster slurm --gpus, else cpu]")
@click.option("--on-corrupt-tile", type=click.Choice(["skip", "fail"]), default=None,
              help="A tile that fails to decode inside a readable slide: skip it (recorded "
                   "as unreadable in the store and predictions.csv; the slide still fails "
                   "when more than tiling.max_unreadable_fraction of its tiles are bad) or "
                   "fail the slide. Default: the config's tiling.on_corrupt_tile (skip).")
@cluster_options
@click.option("--dense", is_flag=True,
              help="Prune nothing: every tissue tile and token reaches the ViT (the reference "
                   "for `evaluate --compare`, and what `train-mil` trains on).")
@click.option("--force", is_flag=True, help="Recompute slides whose outputs are complete.")
@click.option("--audit-fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="After the run, run the dense path too on this random fraction of the slides "
                   "(at least one) into OUT/.audit/dense and write OUT/audit.md and audit.json: "
                   "how far pruning moved the answers, without labels. [default: off]")
@click.option("--audit-seed", type=int, default=0, show_default=True,
              help="Seed of the audit's slide draw.")
@click.option("--tile-ahead/--no-tile-ahead", default=None,
              help="Without Dask workers: tile the next slide in a background thread while "
                   "this one runs its ViT and outputs (same results; one more slide's tiling "
                   "in memory at a time). [default: on with a GPU device, or when torch "
                   "leaves a core free (OMP_NUM_THREADS); off when torch uses every core]")
@click.option("--read-workers", type=click.IntRange(min=1), default=None,
              help="Threads reading each slide's kept tiles at full resolution for the ViT, "
                   "each with its own slide handle (same results for any number). "
                   "[default: 1 on the CPU; with a GPU device a quarter of the cores, at most "
                   "4: there the reads, not the ViT, set the pace]")
@click.option("--quiet", is_flag=True, help="No progress bars, warnings only.")
@click.pass_context
@handle_errors
def run(ctx: click.Context, inputs: tuple[str, ...], out: str, config_path: str | None,
        mpp: float | None, device: str | None, on_corrupt_tile: str | None,
        cluster_request: ClusterRequest, shard: tuple[int, int] | None, dense: bool,
        force: bool, audit_fraction: float | None, audit_seed: int, tile_ahead: bool | None,
        read_workers: int | None, quiet: bool) -> None:
    """Slides in, predictions, heatmaps and a run report out.

    INPUT is a slide file, a folder (searched recursively for slide files) or a CSV slide list
    with columns path[,id,mpp,label]. Writes OUT/<id>.zarr, OUT/<id>/ (heatmap.png,
    tokens.png, heatmap.tif, regions.geojson, tiles.geojson, tissue.geojson, candidates.csv,
    top_tiles/), OUT/froc/<id>.csv, OUT/predictions.csv, OUT/manifest.json and OUT/run.log
    (with --shard i/K: predictions, manifest and log named .shard-i-of-K).

    A run holds OUT/.run.lock (a shard: OUT/.run.shard-i-of-K.lock) while it runs: a second
    run on the same OUT stops at once with an error naming the holder's pid (exit code 1). A
    lock left by a killed run is taken over: at once on this host, after its 120 s lease (no
    heartbeat) when its holder ran on another host sharing the filesystem. SIGTERM (scancel,
    a SLURM time limit) stops the run like Ctrl-C: locks are released and finished slides are
    kept; the next run resumes with the unfinished ones.

    Before the first slide it checks what does not depend on a slide: OUT is writable, the
    models build with their weights files, OUT's device has room for the first slide. Any of
    these stops the run with one message (exit code 1) instead of failing every slide.

    Exit codes: 0 all slides ok (or skipped), 3 some slides failed (see predictions.csv),
    1 the run itself failed (bad config or weights, OUT read-only or full, another run holds
    OUT), 2 bad usage.

    \b
    Examples:
      wsi-prune run slides/ --out results/ --config pipelines/camelyon16.yaml
      wsi-prune run slides.csv --out results/ --mpp 0.25 --workers 2 --memory-limit 6GB
      wsi-prune run slides/ --out results/ --scheduler tcp://10.0.0.5:8786
      wsi-prune run slides/ --out /scratch/res --cluster slurm --queue cpu --max-jobs 8
      wsi-prune run slides/ --out results/ --shard 0/4
      wsi-prune run slides/ --out dense/ --config pipelines/camelyon16.yaml --dense
      wsi-prune run slides/ --out results/ --audit-fraction 0.1    # + OUT/audit.md
      wsi-prune -vv run slides/ --out results/ --device cuda:1 --on-corrupt-tile fail
    """
    from wsi_prune.pipeline.batch import run_batch
    from wsi_prune.pipeline.checks import check_out

    # before the log file is opened in it: a read-only OUT is one line, not a traceback
    outp = check_out(out)
    # a shard logs to its own file: array tasks never write the same path
    log = f"run{shard_suffix(*shard)}.log" if shard else "run.log"
    quiet = command_logging(ctx, quiet, outp / log)
    if audit_fraction is not None and (shard or dense):
        raise click.UsageError("--audit-fraction needs a whole pruned run (no --shard, --dense)")
    cfg = load_config(config_path)
    if dense:
        cfg = cfg.dense()
    if on_corrupt_tile is not None:
        cfg = cfg.replace(tiling={"on_corrupt_tile": on_corrupt_tile})
    audit = None if audit_fraction is None else (audit_fraction, audit_seed)
    device = device or default_device(cluster_request)
    with exit_on_sigterm(), cluster_request.client(device=device) as client:
        rows = run_batch(list(inputs), outp, cfg, mpp=mpp, device=device, client=client,
                         force=force, shard=shard, progress=not quiet, audit=audit,
                         tile_ahead=tile_ahead, read_workers=read_workers)
    if not quiet:
        print_table(rows)
        click.echo(f"outputs: {outp}/  (predictions.csv, manifest.json, <id>/heatmap.png)")
        if audit is not None and (outp / "audit.md").is_file():
            click.echo(f"audit: {outp / 'audit.md'}")
    sys.exit(exit_code(rows))

@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--n-train", type=int, default=6, show_default=True, help="Training slides.")
@click.option("--n-test", type=int, default=4, show_default=True, help="Test slides.")
@click.option("--size", type=int, default=4096, show_default=True, help="Synthetic slide side.")
@click.option("--train/--no-train", default=True, show_default=True,
              help="Train the scorer and MIL head on the training slides first.")
@click.option("--real/--no-real", default=True, show_default=True,
              help="Also run the real slide in ../shared/data when present.")
@click.option("--quiet", is_flag=True)
@click.pass_context
@handle_errors
def demo(ctx: click.Context, out: str, n_train: int, n_test: int, size: int, train: bool,
         real: bool, quiet: bool) -> None:
    """The main job on a built-in default: synthetic CAMELYON-like slides with tumour regions;
    trains the tiny demo scorer and MIL head on a training set (the ViT stays random-init, and
    the output says which models are trained), runs the whole pipeline (pipelines/demo.yaml)
    on a separate test set, evaluates it, and runs the real slide in ../shared/data when
    present.

    \b
    Example:
      wsi-prune demo --out demo-out
    """
    from wsi_prune.pipeline.demo import run_demo

    quiet = command_logging(ctx, quiet, Path(out) / "demo.log")
    rows = run_demo(Path(out), n_train=n_train, n_test=n_test, size=size, real=real,
                    quiet=quiet, train=train)
    print_table(rows)
    sys.exit(exit_code(rows))
