"""The ``wsi-prune`` command: thin click commands that parse options, build the config, call the
library and map errors to exit codes (see :mod:`wsi_prune.errors`)."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import RunConfig
from .errors import EXIT_ERROR, WsiPruneError

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


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our exceptions into a one-line message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WsiPruneError as exc:
            click.echo(f"error: {exc.one_line()}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper


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
      wsi-prune info slide.svs
      wsi-prune tile slide.svs --out out/
      wsi-prune synth --n 4 --out synth/
    """
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet
    _setup_logging(verbose, quiet)


@main.command()
@click.argument("slide", type=click.Path(exists=True, dir_okay=False))
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def info(slide: str, config_path: str | None, mpp: float | None, as_json: bool) -> None:
    """Metadata, levels, MPP and its source, and the estimated number of tissue tiles.

    \b
    Example:
      wsi-prune info CAMELYON16/tumor_001.tif
    """
    from .preflight import inspect_slide

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
@_errors
def tile(slide: str, out: str, config_path: str | None, mpp: float | None, workers: int,
         store_tiles: bool, force: bool) -> None:
    """Tissue mask and tile store of one slide (OUT/<name>.zarr), without models.

    \b
    Example:
      wsi-prune tile slide.svs --out out/ --workers 2
    """
    from .tiling import tile_slide

    cfg = load_config(config_path)
    if store_tiles:
        cfg = cfg.replace(tiling={"store_tiles": True})
    dest = Path(out) / f"{Path(slide).stem}.zarr"
    with _scheduler(workers) as sched:
        res = tile_slide(slide, dest, cfg, mpp=mpp, scheduler=sched, force=force)
    state = "already complete" if res.skipped else f"{res.seconds:.1f} s"
    click.echo(f"{dest}: {res.n_tiles} tissue tiles of {res.n_grid} ({state})")


class _scheduler:
    """``threads`` in-process, or a LocalCluster of ``workers`` processes."""

    def __init__(self, workers: int) -> None:
        self.workers, self._cluster, self._client = workers, None, None

    def __enter__(self) -> Any:
        if self.workers <= 0:
            return "threads"
        from distributed import Client, LocalCluster

        self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                     processes=True, dashboard_address=":0")
        self._client = Client(self._cluster)
        click.echo(f"Dask dashboard: {self._client.dashboard_link}", err=True)
        return self._client

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()
            self._cluster.close()


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--n", "n", type=int, default=4, show_default=True, help="Number of slides.")
@click.option("--size", type=int, default=8192, show_default=True, help="Slide side, px.")
@click.option("--seed", type=int, default=0, show_default=True)
@_errors
def synth(out: str, n: int, size: int, seed: int) -> None:
    """Write a CAMELYON-like synthetic set: pyramidal slides with and without tumour, and a
    labels CSV.

    \b
    Example:
      wsi-prune synth --n 8 --size 8192 --out synth/
    """
    from .synth import write_dataset

    slides = write_dataset(out, n=n, seed=seed, size=size)
    for s in slides:
        click.echo(f"{s.path}  label={s.label}")
