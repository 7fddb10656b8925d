"""Outputs stage: the whole of ``write_outputs`` and each viewer file alone, on one synthetic
slide run with ``pipelines/demo.yaml`` (results in docs/benchmarks.md, "Outputs stage").

    python benchmarks/bench_outputs.py --out bench-out/outputs --size 4096 --repeat 5

The first ``write_outputs`` call in a process also pays the imports (scipy, skimage, shapely,
tifffile); the run's ``sec_outputs`` includes them, the medians below do not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import zarr

from wsi_prune.config import RunConfig
from wsi_prune.outputs.candidates import candidates, write_froc_export
from wsi_prune.outputs.frame import ViewerFrame
from wsi_prune.outputs.geojson import regions_geojson, tiles_geojson, tissue_geojson
from wsi_prune.outputs.heat import heat_map
from wsi_prune.outputs.heat_tiff import write_heatmap_tiff
from wsi_prune.outputs.pictures import render_heatmap, render_tokens, resize_mask, thumbnail
from wsi_prune.outputs.top_tiles import write_top_tiles
from wsi_prune.outputs.writer import write_outputs
from wsi_prune.pipeline.batch import run_batch
from wsi_prune.synth import SynthSpec, write_slide

REPO = Path(__file__).resolve().parents[1]


def _time(fn, repeat: int) -> tuple[float, float]:
    fn()  # warm: imports, caches
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slide = args.out / f"s{args.size}.svs"
    if not slide.exists():
        write_slide(slide, SynthSpec(width=args.size, height=args.size, mpp=0.5, seed=1,
                                     tumour=True))
    cfg = RunConfig.from_yaml(REPO / "pipelines" / "demo.yaml")
    run = args.out / "run"
    (row,) = run_batch([slide], run, cfg, progress=False, force=True)
    sid = slide.stem
    g = zarr.open_group(str(run / f"{sid}.zarr"), mode="r")
    p = g.attrs["result"]["probability"]
    info, mpp = g.attrs["slide"], float(g.attrs["mpp"])
    frame = ViewerFrame.of(info)
    heat, px0 = heat_map(g)
    mask = np.asarray(g["mask/tissue"][:])
    scratch = args.out / "scratch"
    scratch.mkdir(exist_ok=True)
    thumb, thumb_px0 = thumbnail(g, slide, None)
    tissue = resize_mask(mask, thumb.shape[:2])
    parts = {
        "write_outputs (all)": lambda: write_outputs(g, run / sid, sid, p, cfg, slide),
        "heat_map": lambda: heat_map(g),
        "thumbnail": lambda: thumbnail(g, slide, None),
        "heatmap.png": lambda: render_heatmap(scratch / "heatmap.png", thumb, thumb_px0, heat,
                                              px0, tissue, sid),
        "tokens.png": lambda: render_tokens(scratch / "tokens.png", thumb, thumb_px0, g, sid),
        "heatmap.tif": lambda: write_heatmap_tiff(scratch / "h.tif", heat, px0, mpp, frame),
        "regions.geojson": lambda: json.dumps(regions_geojson(heat * p, px0, frame=frame)),
        "tiles.geojson": lambda: json.dumps(tiles_geojson(g, p, frame), separators=(",", ":")),
        "tissue.geojson": lambda: json.dumps(
            tissue_geojson(mask, info["width"] / mask.shape[1], frame, mpp)),
        "top_tiles/": lambda: write_top_tiles(scratch, g, slide, None),
        "froc/<id>.csv": lambda: write_froc_export(scratch, sid, candidates(g, p)),
    }
    print(f"{sid}: {row['tissue_tiles']} tissue tiles, {row['kept_tiles']} kept; "
          f"run's sec_outputs {row['sec_outputs']}; picture {thumb.shape[1]}x{thumb.shape[0]} "
          f"px")
    for name, fn in parts.items():
        med, best = _time(fn, args.repeat)
        print(f"{name:22s} median {med * 1000:8.1f} ms   min {best * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
