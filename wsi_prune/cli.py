"""The ``wsi-prune`` command: thin click commands that parse options, build the config, call the
library and map errors to exit codes (see :mod:`wsi_prune.errors`)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from wsi_prune import __version__
from wsi_prune.cli_cluster import cluster_options, merge, submit
from wsi_prune.cli_common import handle_errors
from wsi_prune.config import RunConfig
from wsi_prune.distributed.clients import ClusterRequest, make_client
from wsi_prune.distributed.shards import shard_suffix
from wsi_prune.errors import WsiPruneError

_logger = logging.getLogger("wsi_prune")


def _setup_logging(verbose: int, quiet: bool, logfile: Path | None = None) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    root = logging.getLogger("wsi_prune")
    root.setLevel(min(level, logging.INFO) if logfile else level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(logfile, encoding="utf-8")
        fh.setLevel(logging.INFO)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config and --mpp, shared by every command that reads slides."""
    fn = click.option("--mpp", type=float, default=None,
                      help="µm/px for slides whose metadata has none (and for plain images).")(fn)
    fn = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                      default=None, help="Pipeline YAML (see pipelines/).")(fn)
    return fn


def load_config(config_path: str | None) -> RunConfig:
    return RunConfig.from_yaml(config_path) if config_path else RunConfig()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    _setup_logging(verbose, quiet)


@main.command()
@click.argument("slide", type=click.Path(exists=True, dir_okay=False))
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def info(slide: str, config_path: str | None, mpp: float | None, as_json: bool) -> None:
    """Metadata, levels, MPP and its source, and the estimated number of tissue tiles.

    \b
    Example:
      wsi-prune info CAMELYON16/tumor_001.tif
    """
    from wsi_prune.pipeline.preflight import inspect_slide

    report = inspect_slide(slide, load_config(config_path), mpp)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        click.echo(f"{key:>22}: {value}")


@main.command()
@click.argument("slide", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@config_options
@click.option("--workers", type=int, default=0,
              help="Dask LocalCluster worker processes (0: threads in this process).")
@click.option("--store-tiles", is_flag=True, help="Also store full-resolution tiles.")
@click.option("--force", is_flag=True, help="Rebuild even if a complete store exists.")
@handle_errors
def tile(slide: str, out: str, config_path: str | None, mpp: float | None, workers: int,
         store_tiles: bool, force: bool) -> None:
    """Tissue mask and tile store of one slide (OUT/<name>.zarr), without models.

    \b
    Example:
      wsi-prune tile slide.svs --out out/ --workers 2
    """
    from wsi_prune.io.tiling import tile_slide

    cfg = load_config(config_path)
    if store_tiles:
        cfg = cfg.replace(tiling={"store_tiles": True})
    dest = Path(out) / f"{Path(slide).stem}.zarr"
    with make_client(workers=workers or None) as client:
        res = tile_slide(slide, dest, cfg, mpp=mpp, scheduler=client or "threads", force=force)
    state = "already complete" if res.skipped else f"{res.seconds:.1f} s"
    click.echo(f"{dest}: {res.n_tiles} tissue tiles of {res.n_grid} ({state})")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--n", "n", type=int, default=4, show_default=True, help="Number of slides.")
@click.option("--size", type=int, default=8192, show_default=True, help="Slide side, px.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def synth(out: str, n: int, size: int, seed: int) -> None:
    """Write a CAMELYON-like synthetic set: pyramidal slides with and without tumour, and a
    labels CSV.

    \b
    Example:
      wsi-prune synth --n 8 --size 8192 --out synth/
    """
    from wsi_prune.synth import write_dataset

    slides = write_dataset(out, n=n, seed=seed, size=size)
    for s in slides:
        click.echo(f"{s.path}  label={s.label}")


def _print_table(rows: list[dict[str, Any]]) -> None:
    cols = ("id", "status", "probability", "kept_tiles", "tissue_tiles", "token_fraction",
            "gmacs", "gmacs_dense", "sec_total")
    fmt = {"probability": "{:.3f}", "token_fraction": "{:.1%}", "gmacs": "{:.2f}",
           "gmacs_dense": "{:.2f}", "sec_total": "{:.1f}"}
    table = [[("" if r.get(c) is None else fmt.get(c, "{}").format(r[c])) for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c)
              for i, c in enumerate(cols)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for t in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)))
    for r in rows:
        if r.get("status") == "failed":
            click.echo(f"failed: {r['id']}: {r['error']}", err=True)


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(143) in the main thread: Python's
    default dies on the spot and no ``finally`` runs, leaving the run and slide locks behind
    (the next run takes them over, but only on the same host)."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (an embedding application): leave it alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_code(rows: list[dict[str, Any]]) -> int:
    from wsi_prune.errors import EXIT_OK, EXIT_SOME_FAILED

    return EXIT_SOME_FAILED if any(r["status"] == "failed" for r in rows) else EXIT_OK


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@config_options
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@cluster_options
@click.option("--dense", is_flag=True,
              help="Prune nothing: every tissue tile and token reaches the ViT (the reference "
                   "for `evaluate --compare`, and what `train-mil` trains on).")
@click.option("--force", is_flag=True, help="Recompute slides whose outputs are complete.")
@click.option("--quiet", is_flag=True, help="No progress bars, warnings only.")
@click.pass_context
@handle_errors
def run(ctx: click.Context, inputs: tuple[str, ...], out: str, config_path: str | None,
        mpp: float | None, device: str, cluster_request: ClusterRequest,
        shard: tuple[int, int] | None, dense: bool, force: bool, quiet: bool) -> None:
    """Slides in, predictions, heatmaps and a run report out.

    INPUT is a slide file, a folder (searched recursively for slide files) or a CSV slide list
    with columns path[,id,mpp,label]. Writes OUT/<id>.zarr, OUT/<id>/heatmap.png, tokens.png,
    regions.geojson, candidates.csv, OUT/predictions.csv, OUT/manifest.json and OUT/run.log
    (with --shard i/K: predictions, manifest and log named .shard-i-of-K).

    A run holds OUT/.run.lock (a shard: OUT/.run.shard-i-of-K.lock) while it runs: a second
    run on the same OUT stops at once with an error naming the holder's pid (exit code 1). A
    lock left by a killed run on this host is taken over. SIGTERM (scancel, a SLURM time
    limit) stops the run like Ctrl-C: locks are released and finished slides are kept; the
    next run resumes with the unfinished ones.

    Exit codes: 0 all slides ok (or skipped), 3 some slides failed (see predictions.csv),
    1 the run itself failed (bad config, another run holds OUT), 2 bad usage.

    \b
    Examples:
      wsi-prune run slides/ --out results/ --config pipelines/camelyon16.yaml
      wsi-prune run slides.csv --out results/ --mpp 0.25 --workers 2 --memory-limit 6GB
      wsi-prune run slides/ --out results/ --scheduler tcp://10.0.0.5:8786
      wsi-prune run slides/ --out /scratch/res --cluster slurm --queue cpu --max-jobs 8
      wsi-prune run slides/ --out results/ --shard 0/4
      wsi-prune run slides/ --out dense/ --config pipelines/camelyon16.yaml --dense
    """
    from wsi_prune.pipeline.batch import run_batch

    quiet = quiet or ctx.obj.get("quiet", False)
    outp = Path(out)
    # a shard logs to its own file: array tasks never write the same path
    log = f"run{shard_suffix(*shard)}.log" if shard else "run.log"
    _setup_logging(0, quiet, outp / log)
    cfg = load_config(config_path)
    if dense:
        cfg = cfg.dense()
    with _exit_on_sigterm(), cluster_request.client() as client:
        rows = run_batch(list(inputs), outp, cfg, mpp=mpp, device=device, client=client,
                         force=force, shard=shard, progress=not quiet)
    if not quiet:
        _print_table(rows)
        click.echo(f"outputs: {outp}/  (predictions.csv, manifest.json, <id>/heatmap.png)")
    sys.exit(_exit_code(rows))


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@handle_errors
def doctor(inputs: tuple[str, ...], config_path: str | None, mpp: float | None,
           as_json: bool) -> None:
    """Preflight a batch without running models: can each slide be opened, its MPP and
    source, size, estimated tissue tiles and time.

    The time is a rough estimate: the demo config's speed on 2 CPU cores (see
    wsi_prune/preflight.py for the measurement); real models run several times slower.

    \b
    Example:
      wsi-prune doctor slides/ --mpp 0.25
    """
    from wsi_prune.errors import EXIT_SOME_FAILED
    from wsi_prune.pipeline.inputs import discover
    from wsi_prune.pipeline.preflight import inspect_slide

    cfg = load_config(config_path)
    bad = 0
    for entry in discover(inputs, mpp):
        try:
            rep = inspect_slide(entry.path, cfg, entry.mpp)
            rep = {"id": entry.id, "status": "ok", **rep}
        except WsiPruneError as exc:
            rep = {"id": entry.id, "path": str(entry.path), "status": "error",
                   "error": exc.one_line()}
            bad += 1
        if as_json:
            click.echo(json.dumps(rep))
        elif rep["status"] == "ok":
            click.echo(f"ok     {entry.id}: {rep['size_px']} px, {rep['mpp']} µm/px "
                       f"({rep['mpp_source']}), {rep['tissue_tiles']} tissue tiles, "
                       f"~{rep['estimated_seconds']:.0f} s (rough estimate)")
        else:
            click.echo(f"error  {entry.id}: {rep['error']}")
    sys.exit(EXIT_SOME_FAILED if bad else 0)


@main.command()
@click.argument("store_path", type=click.Path(exists=True, file_okay=False))
@click.option("--slide", "slide_path", default=None, type=click.Path(exists=True),
              help="The slide file, if it moved since the run.")
@click.option("--mpp", type=float, default=None, help="MPP override used for the run.")
@handle_errors
def heatmap(store_path: str, slide_path: str | None, mpp: float | None) -> None:
    """Re-render heatmap.png, tokens.png, regions.geojson and candidates.csv from a store,
    without recomputing.

    \b
    Example:
      wsi-prune heatmap results/tumor_001.zarr
    """
    from wsi_prune.outputs.writer import rerender

    dest = rerender(store_path, slide_path, mpp)
    click.echo(f"{dest}/heatmap.png")


@main.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--n-train", type=int, default=6, show_default=True, help="Training slides.")
@click.option("--n-test", type=int, default=4, show_default=True, help="Test slides.")
@click.option("--size", type=int, default=4096, show_default=True, help="Synthetic slide side.")
@click.option("--train/--no-train", default=True, show_default=True,
              help="Train the scorer and MIL head on the training slides first.")
@click.option("--real/--no-real", default=True, show_default=True,
              help="Also run the real slide in ../shared/data when present.")
@click.option("--quiet", is_flag=True)
@handle_errors
def demo(out: str, n_train: int, n_test: int, size: int, train: bool, real: bool,
         quiet: bool) -> None:
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

    _setup_logging(0, quiet, Path(out) / "demo.log")
    rows = run_demo(Path(out), n_train=n_train, n_test=n_test, size=size, real=real,
                    quiet=quiet, train=train)
    _print_table(rows)
    sys.exit(_exit_code(rows))


# Commands that live in their own modules (kept out of this file's imports until used).
from wsi_prune.cli_eval import evaluate  # noqa: E402
from wsi_prune.cli_train import train_mil, train_scorer  # noqa: E402

for _cmd in (evaluate, train_scorer, train_mil, submit, merge):
    main.add_command(_cmd)
