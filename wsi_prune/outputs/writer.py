"""A slide's output folder ``OUT/<id>/``: pictures, GeoJSON, the slide-scale heat TIFF,
top-attended tiles and candidates written together and published atomically, from the slide's
store alone (so ``wsi-prune heatmap`` re-renders them without recomputing anything); and the
slide's CAMELYON16 file in ``OUT/froc/``.

Frames: the QuPath files and ``heatmap.tif`` are in the viewer frame, the candidates in
OpenSlide's level-0 px (:mod:`wsi_prune.outputs.frame`).
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from wsi_prune.config import RunConfig
from wsi_prune.errors import StoreError
from wsi_prune.io import store
from wsi_prune.outputs import PICTURES
from wsi_prune.outputs.candidates import candidates, write_candidates, write_froc_export
from wsi_prune.outputs.frame import ViewerFrame
from wsi_prune.outputs.geojson import regions_geojson, tiles_geojson_text, tissue_geojson
from wsi_prune.outputs.heat import heat_map
from wsi_prune.outputs.heat_tiff import write_heatmap_tiff
from wsi_prune.outputs.pictures import render_heatmap, render_tokens, resize_mask, thumbnail
from wsi_prune.outputs.top_tiles import write_top_tiles

#: threads writing one slide's outputs (slide reads, PNG and TIFF encoding side by side)
OUTPUT_THREADS = 3

#: the files of ``OUT/<id>/`` (``top_tiles/`` holds up to TOP_K PNGs)
OUTPUT_FILES = (*PICTURES, "regions.geojson", "tiles.geojson", "tissue.geojson",
                "candidates.csv", "top_tiles.csv")


def _dump(path: Path, obj: dict) -> None:
    # compact: tiles.geojson has one feature per tissue tile (tens of thousands on a slide)
    path.write_text(json.dumps(obj, separators=(",", ":")), encoding="utf-8")


def write_outputs(group: zarr.Group, dest: Path, slide_id: str, probability: float,
                  config: RunConfig | None = None, slide_path: str | os.PathLike | None = None,
                  mpp: float | None = None, raw_heat: bool = False,
                  heat: tuple[np.ndarray, float] | None = None) -> Path:
    """Write :data:`OUTPUT_FILES` and ``top_tiles/`` into ``dest`` atomically (built in a
    temporary folder, then renamed), then ``dest.parent/froc/<slide_id>.csv``.

    Args:
        raw_heat: also write ``heatmap_raw.tif`` (float32 heat).
        heat: :func:`~wsi_prune.outputs.heat.heat_map` of ``group``, when the caller has just
            built it (the run does, for the store's multiscale map); None: built here.
    """
    dest = Path(dest)
    tmp = store.tmp_path_for(dest)
    tmp.mkdir(parents=True)
    try:
        # The slide reads (thumbnail, top tiles), the TIFF and the PNG encoders spend most of
        # their time in C without the GIL (OpenSlide, zlib, numpy), the GeoJSON in Python: run
        # side by side they take about the longest of them instead of their sum. The pool is
        # left (all its work finished or failed) before the folder is published or removed.
        with ThreadPoolExecutor(max_workers=OUTPUT_THREADS,
                                thread_name_prefix="wsi-prune-outputs") as pool:
            info = group.attrs["slide"]
            frame = ViewerFrame.of(info)
            level0_mpp = float(group.attrs["mpp"])
            thumb_job = pool.submit(thumbnail, group, slide_path, mpp)
            jobs = [pool.submit(write_top_tiles, tmp, group, slide_path, mpp)]
            heat, heat_px0 = heat_map(group) if heat is None else heat
            jobs.append(pool.submit(write_heatmap_tiff, tmp / "heatmap.tif", heat, heat_px0,
                                    level0_mpp, frame, raw=raw_heat))
            mask = np.asarray(group["mask/tissue"][:])
            thr = config.mil.threshold if config is not None else 0.5
            call = "tumour" if probability >= thr else "normal"
            title = f"{slide_id}: p(tumour) = {probability:.3f} ({call})"
            _dump(tmp / "regions.geojson",
                  regions_geojson(heat * float(probability), heat_px0, frame=frame,
                                  mpp=level0_mpp))
            thumb, thumb_px0 = thumb_job.result()
            tissue = resize_mask(mask, thumb.shape[:2])
            jobs.append(pool.submit(render_heatmap, tmp / "heatmap.png", thumb, thumb_px0,
                                    heat, heat_px0, tissue, title))
            jobs.append(pool.submit(render_tokens, tmp / "tokens.png", thumb, thumb_px0,
                                    group, f"{slide_id}: token QC"))
            (tmp / "tiles.geojson").write_text(
                tiles_geojson_text(group, float(probability), frame), encoding="utf-8")
            mask_px0 = int(info["width"]) / mask.shape[1]
            _dump(tmp / "tissue.geojson", tissue_geojson(mask, mask_px0, frame, level0_mpp))
            cands = candidates(group, probability)
            write_candidates(tmp / "candidates.csv", cands)
            for job in jobs:
                job.result()
        store.publish(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_froc_export(dest.parent, slide_id, cands)
    return dest


def rerender(store_path: str | os.PathLike[str], slide_path: str | None = None,
             mpp: float | None = None, raw_heat: bool = False) -> Path:
    """Re-draw a slide's pictures and files from its store (``wsi-prune heatmap``)."""
    store_path = Path(store_path)
    try:
        group = zarr.open_group(str(store_path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError("not a wsi-prune store", store_path) from exc
    result = group.attrs.get("result")
    if not result:
        raise StoreError("store has no finished run (run `wsi-prune run` first)", store_path)
    cfg = RunConfig.from_dict(group.attrs["run_config"]) if "run_config" in group.attrs else None
    slide_id = store_path.name.removesuffix(".zarr")
    return write_outputs(group, store_path.parent / slide_id, slide_id, result["probability"],
                         cfg, slide_path, mpp, raw_heat)
