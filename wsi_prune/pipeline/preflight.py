"""Preflight: what a slide is and how much work it will be, without running any model."""

from __future__ import annotations

import os
import time
from typing import Any

from wsi_prune.config import RunConfig
from wsi_prune.io.slide import Slide
from wsi_prune.io.tiling import make_grid
from wsi_prune.io.tissue import tissue_mask

# A rough time estimate, not a benchmark. Measured 2026-12-01 with run_batch (force=True,
# models already built) and pipelines/demo.yaml on the 2-core shared development machine, on
# synthetic SVS slides of 2048², 4096² and 6144² px at 0.5 µm/px (29, 123 and 233 tissue
# tiles): 2.6, 3.3 and 3.9-4.6 s per slide. A line through those gives about 2.4 s per slide
# (mostly rendering heatmap.png and tokens.png) plus 0.008 s per tissue tile. Larger models
# (pipelines/camelyon16.yaml's ViT-S) are several times slower per tile.
#: seconds per slide that do not grow with its size (pictures, opening), demo config
SECONDS_PER_SLIDE = 2.4
#: seconds per tissue tile (tiling, triage, pruned ViT on the kept share), demo config
SECONDS_PER_TISSUE_TILE = 0.008
#: what ``estimated_seconds`` is, for reports
ESTIMATE_NOTE = "rough: demo-config speed on 2 CPU cores, measured 2026-12-01"


def inspect_slide(
    path: str | os.PathLike[str], config: RunConfig, mpp: float | None = None
) -> dict[str, Any]:
    """Metadata, levels, MPP and its source, and the tissue tiles the run would make.

    Returns:
        A flat dict, JSON-serialisable. Raises :class:`~wsi_prune.errors.SlideError` subclasses
        for slides that cannot be used.
    """
    t0 = time.perf_counter()
    with Slide(path, mpp) as slide:
        info = slide.info
        thumb = slide.read_thumbnail(config.tissue.mask_mpp)
    mask_mpp = info.width * info.mpp / thumb.shape[1]
    tm = tissue_mask(thumb, mask_mpp, config.tissue)
    grid = make_grid(info, tm.mask, mask_mpp, config.tiling)
    return {
        "path": info.path,
        "reader": info.reader,
        "vendor": info.vendor,
        "size_px": f"{info.width}x{info.height}",
        "mpp": round(info.mpp, 4),
        "mpp_source": info.mpp_source,
        "objective_power": info.objective_power,
        "levels": info.level_count,
        "level_downsamples": [round(d, 3) for d in info.level_downsamples],
        "size_mm": f"{info.width * info.mpp / 1000:.2f}x{info.height * info.mpp / 1000:.2f}",
        "tissue_fraction": round(tm.fraction, 4),
        "grid_tiles": grid.n_rows * grid.n_cols,
        "tissue_tiles": len(grid),
        "tile": f"{config.tiling.tile_px} px @ {config.tiling.mpp} µm/px",
        "inspect_seconds": round(time.perf_counter() - t0, 3),
        "estimated_seconds": round(SECONDS_PER_SLIDE + len(grid) * SECONDS_PER_TISSUE_TILE, 1),
        "estimate_note": ESTIMATE_NOTE,
    }
