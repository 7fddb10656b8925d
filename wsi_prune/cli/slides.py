"""Commands about slides and their stores, no models: ``info``, ``doctor``, ``tile``,
``synth`` and ``heatmap`` (re-rendering a store's outputs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from wsi_prune.cli.common import CONTEXT_SETTINGS, config_options, handle_errors
from wsi_prune.config import load_config
from wsi_prune.errors import EXIT_SOME_FAILED, WsiPruneError

__all__ = ["doctor", "heatmap", "info", "synth", "tile"]


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("slide", type=click.Path(exists=True))
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def info(slide: str, config_path: str | None, mpp: float | None, as_json: bool) -> None:
    """Metadata, levels, MPP and its source, and the estimated number of tissue tiles.
    SLIDE is a slide file, or a folder holding one slide (a DICOM series).

    \b
    Example:
      wsi-prune info CAMELYON16/tumor_001.tif
    """
    from wsi_prune.pipeline.inputs import one_slide
    from wsi_prune.pipeline.preflight import inspect_slide

    report = inspect_slide(one_slide(slide).path, load_config(config_path), mpp)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        click.echo(f"{key:>22}: {value}")

@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("inputs", nargs=-1)
@config_options
@click.option("--env", "env", is_flag=True,
              help="Check the machine: OpenSlide and libvips versions, torch with CUDA/MPS, "
                   "free disk in --out, Hugging Face cache and offline mode, writable temp.")
@click.option("--out", default=".", show_default=True, type=click.Path(file_okay=False),
              help="With --env: the output folder whose free disk to check.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@handle_errors
def doctor(inputs: tuple[str, ...], config_path: str | None, mpp: float | None, env: bool,
           out: str, as_json: bool) -> None:
    """Preflight a batch without running models: can each slide be opened, its MPP and
    source, size, estimated tissue tiles and time; with --env, the machine too.

    The time is a rough estimate: the demo config's speed on 2 CPU cores (see
    wsi_prune/preflight.py for the measurement); real models run several times slower.
    Exit code 3 when a slide cannot be used or --env finds a problem.

    \b
    Examples:
      wsi-prune doctor slides/ --mpp 0.25
      wsi-prune doctor --env --out /scratch/results
    """
    from wsi_prune.pipeline.inputs import discover
    from wsi_prune.pipeline.preflight import environment_report, inspect_slide

    if not inputs and not env:
        raise click.UsageError("give slides to check, or --env")
    bad = 0
    if env:
        rep = environment_report(out)
        bad += len(rep["problems"])
        if as_json:
            click.echo(json.dumps({"env": rep}))
        else:
            for key, value in rep.items():
                if key != "problems":
                    click.echo(f"{key:>18}: {value}")
            for p in rep["problems"]:
                click.echo(f"problem: {p}")
    cfg = load_config(config_path)
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

@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("slide", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@config_options
@click.option("--workers", type=int, default=0,
              help="Dask LocalCluster worker processes (0: threads in this process).")
@click.option("--store-tiles", is_flag=True, help="Also store full-resolution tiles.")
@click.option("--force", is_flag=True, help="Rebuild even if a complete store exists.")
@handle_errors
def tile(slide: str, out: str, config_path: str | None, mpp: float | None, workers: int,
         store_tiles: bool, force: bool) -> None:
    """Tissue mask and tile store of one slide (OUT/<id>.zarr), without models. SLIDE is a
    slide file, or a folder holding one slide (a DICOM series).

    \b
    Example:
      wsi-prune tile slide.svs --out out/ --workers 2
    """
    from wsi_prune.distributed.clients import make_client
    from wsi_prune.io.tiling import tile_slide
    from wsi_prune.pipeline.inputs import one_slide

    cfg = load_config(config_path)
    if store_tiles:
        cfg = cfg.replace(tiling={"store_tiles": True})
    entry = one_slide(slide)
    dest = Path(out) / f"{entry.id}.zarr"
    with make_client(workers=workers or None) as client:
        res = tile_slide(entry.path, dest, cfg, mpp=mpp, scheduler=client or "threads",
                         force=force)
    state = "already complete" if res.skipped else f"{res.seconds:.1f} s"
    click.echo(f"{dest}: {res.n_tiles} tissue tiles of {res.n_grid} ({state})")

@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--preset", type=click.Choice(["procedural", "texture"]), default="procedural",
              show_default=True,
              help="procedural: drawn shapes and nuclei (fast, easy). texture: real H&E texture "
                   "from ../shared/data with subtle tumour, CAMELYON16-sized lesions and "
                   "hard negatives (the benchmark set).")
@click.option("--n", "n", type=int, default=4, show_default=True,
              help="Number of slides (texture: half tumour, rounded up).")
@click.option("--size", type=int, default=None,
              help="Slide side, px at 0.5 µm/px [default: 8192 procedural, 12288 texture].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Set seed; use different seeds for training and test sets.")
@click.option("--difficulty", type=click.FloatRange(0.0, 1.0), default=None,
              help="texture only: 0 (tumour obvious) to 1 (tumour barely differs from normal "
                   "tissue and its mimics) [default: 0.5].")
@click.option("--workers", type=int, default=1, show_default=True,
              help="texture only: threads rendering tiles.")
@click.option("--source", type=click.Path(dir_okay=False), default=None,
              help="texture only: the real H&E slide to cut texture from [default: "
                   "../shared/data/cmu-1-small-region.svs next to the repository].")
@handle_errors
def synth(out: str, preset: str, n: int, size: int | None, seed: int,
          difficulty: float | None, workers: int, source: str | None) -> None:
    """Write a CAMELYON-like synthetic set: pyramidal slides with and without tumour, a
    labels CSV and ASAP XML lesion outlines. The texture preset also writes lesions.csv (every
    lesion's diameter, size class and whether the FROC counts it) and dataset.json (counts).

    \b
    Examples:
      wsi-prune synth --n 8 --size 8192 --out synth/
      wsi-prune synth --preset texture --n 32 --seed 1 --difficulty 0.5 --out train/
      wsi-prune synth --preset texture --n 32 --seed 2 --difficulty 0.5 --out test/
    """
    if preset == "procedural":
        if difficulty is not None or source is not None:
            raise click.UsageError("--difficulty and --source apply to --preset texture only")
        from wsi_prune.synth import write_dataset

        slides = write_dataset(out, n=n, seed=seed, size=size or 8192)
        for s in slides:
            click.echo(f"{s.path}  label={s.label}")
        return
    from wsi_prune.synth import DEFAULT_SOURCE, write_texture_dataset

    if n < 1:
        raise click.UsageError("--n must be >= 1")
    slides = write_texture_dataset(out, n_tumour=(n + 1) // 2, n_normal=n // 2,
                                   size=size or 12288, seed=seed,
                                   difficulty=0.5 if difficulty is None else difficulty,
                                   workers=workers, source=source or DEFAULT_SOURCE)  # fmt: skip
    for s in slides:
        kinds = ", ".join(f"{r.kind} {r.diameter_um:.0f} µm" for r in s.lesions)
        click.echo(f"{s.path}  label={s.label}" + (f"  lesions: {kinds}" if kinds else ""))
    counts = json.loads((Path(out) / "dataset.json").read_text())["counts"]
    click.echo(f"{counts['slides']} slides ({counts['tumour_slides']} tumour), "
               f"{counts['lesions']} lesions: {counts['macro']} macro, {counts['micro']} micro, "
               f"{counts['ITC']} ITC; {counts['countable']} FROC-countable; "
               f"{counts['mimics']} mimics")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("store_path", type=click.Path(exists=True, file_okay=False))
@click.option("--slide", "slide_path", default=None, type=click.Path(exists=True),
              help="The slide file, if it moved since the run.")
@click.option("--mpp", type=float, default=None, help="MPP override used for the run.")
@click.option("--raw", is_flag=True,
              help="Also write heatmap_raw.tif: the heat as one float32 channel.")
@handle_errors
def heatmap(store_path: str, slide_path: str | None, mpp: float | None, raw: bool) -> None:
    """Re-render the slide's outputs from its store without recomputing: heatmap.png,
    tokens.png, heatmap.tif, regions.geojson, tiles.geojson, tissue.geojson, candidates.csv,
    top_tiles/ and OUT/froc/<id>.csv.

    \b
    Example:
      wsi-prune heatmap results/tumor_001.zarr
    """
    from wsi_prune.outputs.writer import rerender

    dest = rerender(store_path, slide_path, mpp, raw_heat=raw)
    click.echo(f"{dest}/heatmap.png")
