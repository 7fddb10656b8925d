"""The pictures a pathologist looks at first: the heat overlaid on the slide (``heatmap.png``)
and the token QC picture (``tokens.png``), both at about :data:`PICTURE_PX` px plus a title
band, colour bar and legend.

Drawn with numpy and Pillow (:mod:`wsi_prune.outputs._draw`), not a matplotlib figure: the
pictures are on every slide's critical path (see ``_draw``'s docstring for the numbers).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import zarr

from wsi_prune.errors import SlideError
from wsi_prune.io.slide import Slide
from wsi_prune.outputs import _draw
from wsi_prune.outputs.heat import MAX_MAP_PX, block_mean, paste_tiles

_logger = logging.getLogger(__name__)

#: longest side of the rendered pictures, px
PICTURE_PX = 1100
# smallest longest side, as a fraction of PICTURE_PX, of a pyramid level used as the picture
_LEVEL_AS_IS = 0.75
#: opacity of the heat over the slide
HEAT_ALPHA = 0.55
LIME = (0, 255, 0)
#: token QC colours, RGBA
GREY, ORANGE, GREEN = (128, 128, 128, 153), (255, 140, 0, 179), (0, 204, 51, 204)


def thumbnail(group: zarr.Group, slide_path: str | os.PathLike[str] | None,
              mpp: float | None) -> tuple[np.ndarray, float]:
    """(H, W, 3) uint8 picture of the slide and its level-0 px per picture px. Falls back to
    the tissue mask (grey on white) when the slide file cannot be read."""
    info = group.attrs["slide"]
    width, height = int(info["width"]), int(info["height"])
    level0_mpp = float(group.attrs["mpp"])
    pic_mpp = level0_mpp * max(width, height) / PICTURE_PX
    # A pyramid level a little smaller than PICTURE_PX is read as it is: the next finer
    # level holds up to 4x the pixels to decode and then shrink (0.2 s on a 4096² slide
    # whose levels are 2048² and 1024²), for a picture only slightly larger.
    downsamples = info.get("level_downsamples") or [1.0]
    for ds in sorted(downsamples):
        if PICTURE_PX * _LEVEL_AS_IS <= max(width, height) / ds <= PICTURE_PX:
            pic_mpp = level0_mpp * ds
            break
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


def _overlay_extent(shape: tuple[int, int], map_px0: float, thumb_px0: float
                    ) -> tuple[int, int]:
    """(width, height) in picture px of a map of ``shape`` (rows, cols) whose px are
    ``map_px0`` level-0 px, on a picture whose px are ``thumb_px0`` level-0 px."""
    return (max(1, round(shape[1] * map_px0 / thumb_px0)),
            max(1, round(shape[0] * map_px0 / thumb_px0)))


def _place(layer: np.ndarray, h: int, w: int, fill: float) -> np.ndarray:
    """``layer`` (rows, cols, ...) cropped or padded with ``fill`` to (h, w, ...): the tile
    grid covers whole tiles only, so it may end short of the picture's right and bottom."""
    out = np.full((h, w, *layer.shape[2:]), fill, layer.dtype)
    hh, ww = min(h, layer.shape[0]), min(w, layer.shape[1])
    out[:hh, :ww] = layer[:hh, :ww]
    return out


def heat_layer(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The heat map resized bilinearly to ``size`` (width, height) px, NaN where no tissue tile
    is: (H, W) float32.

    NaN (no tile) is resized as a weight: values and a validity mask are resized alike and
    divided (normalised convolution), so a tile's heat does not bleed into the glass beside it
    and the glass does not darken the tile's edge; a px is NaN where it is mostly outside the
    tiles (weight < 0.5).
    """
    from PIL import Image

    valid = np.isfinite(heat)
    vals = Image.fromarray(np.where(valid, heat, 0.0).astype(np.float32), mode="F")
    wgt = Image.fromarray(valid.astype(np.float32), mode="F")
    v = np.asarray(vals.resize(size, Image.Resampling.BILINEAR))
    m = np.asarray(wgt.resize(size, Image.Resampling.BILINEAR))
    out = np.divide(v, m, out=np.full(v.shape, np.nan, np.float32), where=m >= 0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def render_heatmap(path: Path, thumb: np.ndarray, thumb_px0: float, heat: np.ndarray,
                   heat_px0: float, tissue: np.ndarray, title: str) -> tuple[int, int]:
    """Heat overlaid on the thumbnail: smooth (bilinear from the patch map), inferno at 55 %
    opacity, tissue contour (lime), title, colour bar and legend.

    Args:
        thumb: (H, W, 3) uint8 picture of the slide; ``thumb_px0`` level-0 px per picture px.
        heat: (h, w) float32 heat in [0, 1], NaN where no tissue tile is; ``heat_px0`` level-0
            px per heat px.
        tissue: (H, W) bool tissue mask resized to the thumbnail.

    Returns:
        (x, y) px of the thumbnail's top-left corner in the PNG.
    """
    h, w = thumb.shape[:2]
    layer = _place(heat_layer(heat, _overlay_extent(heat.shape, heat_px0, thumb_px0)), h, w,
                   np.nan)
    img = _draw.blend(thumb, _draw.colormap(layer), np.where(np.isfinite(layer), HEAT_ALPHA, 0.0))
    if tissue.any():
        img[_draw.outline(tissue)] = LIME
    label = "heat (ViT/MIL in kept tiles, scaled CNN elsewhere)"
    canvas, x0, y0 = _draw.frame(img, title, right=_draw.colourbar_width(label))
    _draw.colourbar(canvas, x0 + w + 12, y0, h, label)
    _draw.legend(canvas, x0 + w - 6, y0 + h - 6, [("tissue contour", LIME, "line")])
    _draw.save_png(path, np.asarray(canvas))
    return x0, y0


def token_layer(group: zarr.Group) -> tuple[np.ndarray, float]:
    """The token QC map: (rows, cols, 4) uint8 RGBA, grey over tiles dropped by the triage,
    orange over tokens pruned before or inside the ViT, green over tokens that reached the
    last stage, transparent elsewhere; and its px size in level-0 px."""
    grid = group.attrs["grid"]
    n_rows, n_cols = int(grid["n_rows"]), int(grid["n_cols"])
    rc = np.asarray(group["tiles/grid"][:]).reshape(-1, 2)
    kept_tokens = np.asarray(group["vit/kept_tokens"][:]) if "vit" in group else None
    tidx = np.asarray(group["vit/tile_index"][:]) if "vit" in group else np.zeros(0, int)
    g = int(round(np.sqrt(kept_tokens.shape[2]))) if kept_tokens is not None and \
        kept_tokens.size else 1
    per = max(1, min(g, MAX_MAP_PX // max(n_rows, n_cols, 1)))
    cells = np.zeros((n_rows, n_cols, 4), np.uint8)
    cells[rc[:, 0], rc[:, 1]] = GREY
    rgba = cells.repeat(per, axis=0).repeat(per, axis=1)
    if len(tidx):
        # every kept tile at once: (K, per, per) tokens that reached the last block
        final = kept_tokens[:, -1].reshape(len(tidx), g, g)
        final = (block_mean(final.astype(np.float32), per) >= 0.5 if per != g
                 else final.astype(bool))
        paste_tiles(rgba, per, rc[tidx], np.where(
            final[..., None], np.array(GREEN, np.uint8), np.array(ORANGE, np.uint8)))
    return rgba, float(grid["tile_level0"]) / per


def render_tokens(path: Path, thumb: np.ndarray, thumb_px0: float, group: zarr.Group,
                  title: str) -> tuple[int, int]:
    """QC picture: tissue tiles dropped by the triage (grey), tokens pruned before or inside
    the ViT (orange), tokens that reached the last stage (green), over the thumbnail.

    Returns:
        (x, y) px of the thumbnail's top-left corner in the PNG.
    """
    from PIL import Image

    rgba, px0 = token_layer(group)
    h, w = thumb.shape[:2]
    size = _overlay_extent(rgba.shape[:2], px0, thumb_px0)
    # nearest: the blocks are the data (one token or one tile each), not a field to smooth
    layer = _place(np.asarray(Image.fromarray(rgba, "RGBA").resize(size,
                                                                   Image.Resampling.NEAREST)),
                   h, w, 0)
    img = _draw.blend(thumb, layer[..., :3], layer[..., 3] / 255.0)
    canvas, x0, y0 = _draw.frame(img, title)
    _draw.legend(canvas, x0 + w - 6, y0 + h - 6,
                 [("tile dropped by CNN triage", GREY, "patch"),
                  ("token pruned", ORANGE, "patch"),
                  ("token reached last ViT block", GREEN, "patch")])
    _draw.save_png(path, np.asarray(canvas))
    return x0, y0


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 127
