"""A slide's output folder ``OUT/<id>/``: pictures, GeoJSON and candidates written together and
published atomically, from the slide's store alone (so ``wsi-prune heatmap`` re-renders them
without recomputing anything).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from wsi_prune.config import RunConfig
from wsi_prune.errors import StoreError
from wsi_prune.io import store
from wsi_prune.outputs.candidates import candidates, write_candidates
from wsi_prune.outputs.geojson import regions_geojson
from wsi_prune.outputs.heat import heat_map
from wsi_prune.outputs.pictures import render_heatmap, render_tokens, resize_mask, thumbnail


def write_outputs(group: zarr.Group, dest: Path, slide_id: str, probability: float,
                  config: RunConfig | None = None, slide_path: str | os.PathLike | None = None,
                  mpp: float | None = None) -> Path:
    """Write ``heatmap.png``, ``tokens.png``, ``regions.geojson`` and ``candidates.csv`` into
    ``dest`` atomically (built in a temporary folder, then renamed)."""
    dest = Path(dest)
    tmp = store.tmp_path_for(dest)
    tmp.mkdir(parents=True)
    try:
        heat, heat_px0 = heat_map(group)
        thumb, thumb_px0 = thumbnail(group, slide_path, mpp)
        tissue = np.asarray(group["mask/tissue"][:])
        tissue = resize_mask(tissue, thumb.shape[:2])
        thr = config.mil.threshold if config is not None else 0.5
        call = "tumour" if probability >= thr else "normal"
        title = f"{slide_id}: p(tumour) = {probability:.3f} ({call})"
        render_heatmap(tmp / "heatmap.png", thumb, thumb_px0, heat, heat_px0, tissue, title)
        render_tokens(tmp / "tokens.png", thumb, thumb_px0, group, f"{slide_id}: token QC")
        info = group.attrs["slide"]
        gj = regions_geojson(heat * float(probability), heat_px0,
                             slide_size=(int(info["width"]), int(info["height"])))
        (tmp / "regions.geojson").write_text(json.dumps(gj), encoding="utf-8")
        write_candidates(tmp / "candidates.csv", candidates(group, probability))
        store.publish(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def rerender(store_path: str | os.PathLike[str], slide_path: str | None = None,
             mpp: float | None = None) -> Path:
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
                         cfg, slide_path, mpp)
