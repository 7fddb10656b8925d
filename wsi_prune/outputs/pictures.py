"""The pictures a pathologist looks at first: the heat overlaid on the slide (``heatmap.png``)
and the token QC picture (``tokens.png``), both at about :data:`PICTURE_PX` px.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import zarr

from wsi_prune.errors import SlideError
from wsi_prune.io.slide import Slide
from wsi_prune.outputs.heat import MAX_MAP_PX, block_mean

_logger = logging.getLogger(__name__)

#: longest side of the rendered pictures, px
PICTURE_PX = 1100
# zlib level 1: a 1200 px picture encodes in ~0.05 s instead of ~0.25 s at PIL's default 6,
# for files about 30 % larger; pictures are written once per slide, on the critical path.
_PNG = {"compress_level": 1}


def thumbnail(group: zarr.Group, slide_path: str | os.PathLike[str] | None,
              mpp: float | None) -> tuple[np.ndarray, float]:
    """(H, W, 3) uint8 picture of the slide and its level-0 px per picture px. Falls back to
    the tissue mask (grey on white) when the slide file cannot be read."""
    info = group.attrs["slide"]
    width, height = int(info["width"]), int(info["height"])
    level0_mpp = float(group.attrs["mpp"])
    pic_mpp = level0_mpp * max(width, height) / PICTURE_PX
    path = slide_path or info.get("path")
    if path and Path(path).exists():
        try:
            with Slide(path, mpp if mpp is not None else level0_mpp) as s:
                img = s.read_thumbnail(max(pic_mpp, level0_mpp))
            return img, width / img.shape[1]
        except SlideError as exc:
            _logger.warning("%s: thumbnail unreadable (%s); drawing on the mask", path, exc)
    mask = np.asarray(group["mask/tissue"][:])
    img = np.where(mask[..., None], 200, 255).astype(np.uint8).repeat(3, axis=2)
    return img, width / mask.shape[1]


def render_heatmap(path: Path, thumb: np.ndarray, thumb_px0: float, heat: np.ndarray,
                   heat_px0: float, tissue: np.ndarray, title: str) -> None:
    """Heat overlaid on the thumbnail: smooth (bilinear from the patch map), colour bar,
    tissue contour, title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    h, w = thumb.shape[:2]
    extent_map = (0, heat.shape[1] * heat_px0 / thumb_px0, heat.shape[0] * heat_px0 / thumb_px0, 0)
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.6), dpi=150)
    # the thumbnail is read at about the axes' size (PICTURE_PX): nearest is then a near 1:1
    # copy, where matplotlib's default antialiasing filter costs ~0.1 s per picture
    ax.imshow(thumb, extent=(0, w, h, 0), interpolation="nearest")
    masked = np.ma.masked_invalid(heat)
    im = ax.imshow(masked, cmap="inferno", vmin=0, vmax=1, alpha=0.55, extent=extent_map,
                   interpolation="bilinear")
    if tissue.any():
        from skimage import measure

        # the mask is resized to the thumbnail, so contour (row, col) are picture px
        for ring in measure.find_contours(np.pad(tissue, 1).astype(np.float32), 0.5):
            ax.plot(ring[:, 1] - 1, ring[:, 0] - 1, color="lime", lw=0.6)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    cbar = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    cbar.set_label("heat (ViT/MIL in kept tiles, scaled CNN elsewhere)", fontsize=7)
    ax.legend(handles=[Line2D([0], [0], color="lime", lw=1, label="tissue contour")],
              loc="lower right", fontsize=7, framealpha=0.7)
    fig.savefig(path, bbox_inches="tight", pil_kwargs=_PNG)
    plt.close(fig)


def render_tokens(path: Path, thumb: np.ndarray, thumb_px0: float, group: zarr.Group,
                  title: str) -> None:
    """QC picture: tissue tiles dropped by the triage (grey), tokens pruned before or inside
    the ViT (orange), tokens that reached the last stage (green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    grid = group.attrs["grid"]
    n_rows, n_cols = int(grid["n_rows"]), int(grid["n_cols"])
    rc = np.asarray(group["tiles/grid"][:])
    kept_tokens = np.asarray(group["vit/kept_tokens"][:]) if "vit" in group else None
    tidx = np.asarray(group["vit/tile_index"][:]) if "vit" in group else np.zeros(0, int)
    g = int(round(np.sqrt(kept_tokens.shape[2]))) if kept_tokens is not None and \
        kept_tokens.size else 1
    per = max(1, min(g, MAX_MAP_PX // max(n_rows, n_cols, 1)))
    rgba = np.zeros((n_rows * per, n_cols * per, 4), np.float32)
    grey, orange, green = (0.5, 0.5, 0.5, 0.6), (1.0, 0.55, 0.0, 0.7), (0.0, 0.8, 0.2, 0.8)
    for r, c in rc:
        rgba[r * per:(r + 1) * per, c * per:(c + 1) * per] = grey
    for k, i in enumerate(tidx):
        r, c = rc[i]
        final = kept_tokens[k, -1].reshape(g, g)
        if per != g:
            final = block_mean(final.astype(np.float32), per) >= 0.5
        block = np.where(final[..., None], np.array(green), np.array(orange))
        rgba[r * per:(r + 1) * per, c * per:(c + 1) * per] = block
    h, w = thumb.shape[:2]
    px0 = float(grid["tile_level0"]) / per
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.6), dpi=150)
    # the thumbnail is read at about the axes' size (PICTURE_PX): nearest is then a near 1:1
    # copy, where matplotlib's default antialiasing filter costs ~0.1 s per picture
    ax.imshow(thumb, extent=(0, w, h, 0), interpolation="nearest")
    ax.imshow(rgba, extent=(0, rgba.shape[1] * px0 / thumb_px0, rgba.shape[0] * px0 / thumb_px0,
                            0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[Patch(color=grey, label="tile dropped by CNN triage"),
                       Patch(color=orange, label="token pruned"),
                       Patch(color=green, label="token reached last ViT block")],
              loc="lower right", fontsize=7, framealpha=0.8)
    fig.savefig(path, bbox_inches="tight", pil_kwargs=_PNG)
    plt.close(fig)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 127
