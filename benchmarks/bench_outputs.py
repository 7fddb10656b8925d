"""Outputs stage: the whole of ``write_outputs`` and each viewer file alone, on one synthetic
slide run with ``pipelines/demo.yaml`` (results in docs/benchmarks.md, "Outputs stage").

    python benchmarks/bench_outputs.py --out bench-out/outputs --size 4096 --repeat 5
    python benchmarks/bench_outputs.py --out bench-out/outputs --store RUN/<id>.zarr \
        --slide SLIDE --baseline 4c7a777 --rounds 5

``--store`` times a finished store of another run (a fidelity test slide, say) instead of
running the demo config; ``--baseline REV`` also times ``write_outputs`` as it was at git
revision REV (``wsi_prune/outputs/writer.py`` loaded from git), interleaved with this tree's
in ``--rounds`` rounds, and prints the ratio of the medians.

The first ``write_outputs`` call in a process also pays the imports (scipy, skimage, shapely,
tifffile); the run's ``sec_outputs`` includes them, the medians below do not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import zarr

from wsi_prune.config import RunConfig
from wsi_prune.outputs.candidates import candidates, write_froc_export
from wsi_prune.outputs.frame import ViewerFrame
from wsi_prune.outputs.geojson import regions_geojson, tiles_geojson_text, tissue_geojson
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


def writer_at(rev: str) -> types.ModuleType:
    """``wsi_prune.outputs.writer`` as it was at git revision ``rev``."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:wsi_prune/outputs/writer.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(f"writer_at_{rev}")
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:wsi_prune/outputs/writer.py", "exec"), mod.__dict__)  # noqa: S102
    return mod


def interleaved(fns: dict[str, object], rounds: int, repeat: int) -> dict[str, list[float]]:
    """name -> per-call seconds, the callables taking turns ``repeat`` calls at a time for
    ``rounds`` rounds (after one warm-up call each), so a neighbour's load hits both alike."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeat):
                t = time.perf_counter()
                fn()
                out[name].append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--store", type=Path, help="a finished slide store to time instead")
    ap.add_argument("--slide", type=Path, help="the slide file of --store")
    ap.add_argument("--baseline", help="git revision whose write_outputs is timed too")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.from_yaml(REPO / "pipelines" / "demo.yaml")
    if args.store is not None:
        g = zarr.open_group(str(args.store), mode="r")
        slide = args.slide
        sid = args.store.name.removesuffix(".zarr")
        run = args.out / "store-run"
        run.mkdir(exist_ok=True)
        cfg = RunConfig.from_dict(g.attrs["run_config"])
        res = g.attrs["result"]
        row = {"tissue_tiles": res["tissue_tiles"], "kept_tiles": res["kept_tiles"],
               "sec_outputs": res["seconds"]["outputs"]}
    else:
        slide = args.out / f"s{args.size}.svs"
        if not slide.exists():
            write_slide(slide, SynthSpec(width=args.size, height=args.size, mpp=0.5, seed=1,
                                         tumour=True))
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
        "tiles.geojson": lambda: tiles_geojson_text(g, p, frame),
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
    if args.baseline:
        old = writer_at(args.baseline)
        fns = {f"write_outputs @{args.baseline}":
               lambda: old.write_outputs(g, run / sid, sid, p, cfg, slide),
               "write_outputs (this tree)": lambda: write_outputs(g, run / sid, sid, p, cfg, slide)}
        got = interleaved(fns, args.rounds, args.repeat)
        meds = {k: statistics.median(v) for k, v in got.items()}
        for k, v in got.items():
            print(f"{k:32s} median {meds[k] * 1000:7.1f} ms  min {min(v) * 1000:7.1f} ms  "
                  f"max {max(v) * 1000:7.1f} ms  ({len(v)} calls)")
        a, b = meds.values()
        print(f"before / after (medians): {a / b:.2f}x")


if __name__ == "__main__":
    main()
