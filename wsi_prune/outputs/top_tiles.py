"""The tiles the slide head attended to most, as PNGs (``OUT/<id>/top_tiles/``): what CLAM
users look at first to see what drove a slide's call.

Each PNG is read from the slide file itself at the ViT's resolution (``tiling.mpp``,
``tile_px``), not from the store's coarse triage tiles, so it shows what the ViT saw.
``top_tiles.csv`` beside them lists rank, tile index, level-0 (x, y) in OpenSlide's frame and
the viewer frame (:mod:`wsi_prune.outputs.frame`), MIL attention and heat.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import zarr

from wsi_prune.errors import SlideError
from wsi_prune.io.slide import Slide
from wsi_prune.outputs._draw import save_png
from wsi_prune.outputs.frame import ViewerFrame

_logger = logging.getLogger(__name__)

#: attended tiles saved per slide
TOP_K = 8


def top_attended(group: zarr.Group, k: int = TOP_K) -> list[tuple[int, float]]:
    """(tile index, MIL attention) of the ``k`` most attended kept tiles, most first (ties:
    lower index first)."""
    if "vit" not in group or "mil" not in group or "attention" not in group["mil"]:
        return []
    tidx = np.asarray(group["vit/tile_index"][:])
    att = np.asarray(group["mil/attention"][:], np.float64)
    order = np.lexsort((tidx, -att))[:k]
    return [(int(tidx[j]), float(att[j])) for j in order]


def write_top_tiles(dest: Path, group: zarr.Group, slide_path: str | os.PathLike | None,
                    mpp: float | None, k: int = TOP_K) -> list[Path]:
    """Write the ``k`` most attended tiles as ``dest/top_tiles/NN_tile<i>_x<X>_y<Y>.png``
    (X, Y OpenSlide level-0 px) and ``dest/top_tiles.csv``.

    A slide file that cannot be opened (moved, deleted) or a tile that fails to decode is
    skipped with a warning: the other outputs do not depend on these pictures.

    Returns:
        The PNGs written.
    """
    top = top_attended(group, k)
    path = slide_path or group.attrs["slide"].get("path")
    if not top or not path or not Path(path).exists():
        if top:
            _logger.warning("%s: slide file not found; no top-attended tile pictures", path)
        return []
    grid = group.attrs["grid"]
    side = max(1, round(float(grid["tile_level0"])))
    coords = np.asarray(group["tiles/coords"][:])
    heat = np.asarray(group["heatmap/tile"][:])
    frame = ViewerFrame.of(group.attrs["slide"])
    folder = dest / "top_tiles"
    folder.mkdir(exist_ok=True)
    written, rows = [], []
    try:
        slide = Slide(path, mpp if mpp is not None else float(group.attrs["mpp"]))
    except SlideError as exc:
        _logger.warning("%s: cannot open for top-attended tiles (%s)", path, exc)
        return []
    with slide:
        for rank, (i, att) in enumerate(top, start=1):
            x, y = (int(v) for v in coords[i])
            try:
                img = slide.read((x, y), (side, side), float(grid["mpp"]),
                                 out_size=(int(grid["tile_px"]),) * 2)
            except SlideError as exc:
                _logger.warning("%s: top tile %d unreadable (%s)", path, i, exc.reason)
                slide.reopen()
                continue
            png = folder / f"{rank:02d}_tile{i}_x{x}_y{y}.png"
            save_png(png, img)
            written.append(png)
            rows.append([rank, i, x, y, x - frame.x, y - frame.y, f"{att:.6g}",
                         f"{float(heat[i]):.6g}", png.name])
    with open(dest / "top_tiles.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "tile", "x_level0", "y_level0", "x_viewer", "y_viewer",
                    "attention", "heat", "png"])
        w.writerows(rows)
    return written
