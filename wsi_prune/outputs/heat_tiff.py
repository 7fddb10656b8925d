"""The slide-scale heat map as a tiled pyramidal TIFF (``heatmap.tif``) that OpenSlide, QuPath
and ASAP open and that overlays the slide in physical units.

Layout: a generic tiled TIFF as OpenSlide's ``generic-tiff`` driver reads it: 256 px RGBA
tiles, deflate, level 0 then levels halving in size in the main directory chain (reduced
images), each with resolution tags in pixels per centimetre. Level 0 is at about the heat
map's own resolution: one pixel per patch-level map pixel rounded to a whole number ``f`` of
slide level-0 px (16 for 224 px tiles at 14x14 patches on a 0.5 µm/px slide), and
``floor(size / f)`` pixels a side. It covers the slide's physical extent (the viewer frame of
:mod:`wsi_prune.outputs.frame`) to within one of its pixels with a 1/f² share of the slide's
pixels, so writing it costs little next to the pictures. OpenSlide and QuPath read its MPP
(the slide's µm/px times f) from the resolution tags; ASAP scales an overlay by the integer
ratio of the two images' sizes, which the whole ``f`` and the floor make exactly ``f`` in both
directions.

Pixels: heat in [0, 1] through the ``inferno`` colour map (the colours of ``heatmap.png``),
alpha 0 where there is no tissue tile. ``raw=True`` also writes ``heatmap_raw.tif``, the heat
itself as one float32 channel (NaN off tissue) with the same geometry, for tools that apply
their own colour map (QuPath, tifffile); OpenSlide reads only the RGBA file.

Memory: the heat map is at most :data:`~wsi_prune.outputs.heat.MAX_MAP_PX` a side; tiles
are coloured one at a time as tifffile asks for them, so no full-size RGBA array exists.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from wsi_prune.io.store import halve_nanmean
from wsi_prune.outputs._draw import INFERNO
from wsi_prune.outputs.frame import ViewerFrame

#: TIFF tile side, px
TIFF_TILE = 256
#: the colour map (as in heatmap.png)
COLORMAP = "inferno"


def _lut() -> np.ndarray:
    """(256, 3) uint8 colour table (:data:`COLORMAP`, the table ``heatmap.png`` uses; a table
    and not ``matplotlib.colormaps``, whose import cost ~0.2 s per process)."""
    return INFERNO


def tiff_px(heat_px0: float) -> int:
    """Level-0 px per TIFF pixel: the map's pixel rounded to a whole number (at least 1)."""
    return max(1, round(heat_px0))


def viewer_grid(heat: np.ndarray, heat_px0: float, frame: ViewerFrame) -> np.ndarray:
    """The heat map resampled (nearest) onto the TIFF's level-0 grid: with ``f =
    tiff_px(heat_px0)``, pixel (r, c) covers viewer-frame level-0 ``[c, c + 1) * f`` (same for
    r), i.e. OpenSlide level-0 ``frame.x + c * f``. NaN where the map has no value.

    Returns:
        (floor(frame.height / f), floor(frame.width / f)) float32 (at least 1 x 1).
    """
    f = tiff_px(heat_px0)
    h = max(1, frame.height // f)
    w = max(1, frame.width // f)
    # map index of each TIFF pixel's centre
    rows = np.floor((frame.y + (np.arange(h) + 0.5) * f) / heat_px0).astype(np.int64)
    cols = np.floor((frame.x + (np.arange(w) + 0.5) * f) / heat_px0).astype(np.int64)
    out = np.full((h, w), np.nan, np.float32)
    rok = (rows >= 0) & (rows < heat.shape[0])
    cok = (cols >= 0) & (cols < heat.shape[1])
    out[np.ix_(rok, cok)] = heat[np.ix_(rows[rok], cols[cok])]
    return out


def _levels(level0: np.ndarray, tile: int) -> list[np.ndarray]:
    levels = [level0]
    while max(levels[-1].shape) > tile:
        levels.append(halve_nanmean(levels[-1]))
    return levels


def _rgba_lut(lut: np.ndarray) -> np.ndarray:
    """(257, 4) uint8: entry i < 256 is colour i, opaque; entry 256 is off tissue (0, 0, 0, 0)."""
    rgba = np.zeros((257, 4), np.uint8)
    rgba[:256, :3] = lut
    rgba[:256, 3] = 255
    return rgba


def _rgba_tiles(a: np.ndarray, lut: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """(tile, tile, 4) uint8 tiles of ``a`` in row-major order: heat ``v`` as colour
    ``int(255 v + 0.5)`` (in ``a``'s float type), opaque; NaN (no tissue) and the padding past
    ``a``'s edge transparent black. One table lookup per tile (:func:`_rgba_lut`); a tile
    without tissue, most of a slide's, is one shared zero tile."""
    rgba = _rgba_lut(lut)
    empty = np.zeros((tile, tile, 4), np.uint8)
    for r in range(0, a.shape[0], tile):
        for c in range(0, a.shape[1], tile):
            part = a[r:r + tile, c:c + tile]
            ok = np.isfinite(part)
            if not ok.any():
                yield empty
                continue
            colour = np.clip(np.where(ok, part, 0) * 255 + 0.5, 0, 255).astype(np.uint16)
            idx = np.full((tile, tile), 256, np.uint16)
            idx[:part.shape[0], :part.shape[1]] = np.where(ok, colour, 256)
            yield rgba[idx]


def _float_tiles(a: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    for r in range(0, a.shape[0], tile):
        for c in range(0, a.shape[1], tile):
            block = np.full((tile, tile), np.nan, np.float32)
            part = a[r:r + tile, c:c + tile]
            block[:part.shape[0], :part.shape[1]] = part
            yield block


def write_heatmap_tiff(path: str | os.PathLike[str], heat: np.ndarray, heat_px0: float,
                       slide_mpp: float, frame: ViewerFrame, raw: bool = False,
                       tile: int = TIFF_TILE) -> Path:
    """Write ``heatmap.tif`` (and with ``raw`` ``heatmap_raw.tif`` beside it).

    Args:
        path: the RGBA TIFF.
        heat: (H, W) float heat in [0, 1], NaN off tissue, map pixel (0, 0) at OpenSlide
            level-0 (0, 0) (:func:`~wsi_prune.outputs.heat.heat_map`).
        heat_px0: side of one map pixel, level-0 px.
        slide_mpp: the slide's level-0 µm/px.
        frame: the viewer frame the TIFF covers.
        raw: also write the float32 heat.
        tile: TIFF tile side, px (a multiple of 16).

    Returns:
        ``path``.
    """
    path = Path(path)
    level0 = viewer_grid(np.asarray(heat, np.float32), heat_px0, frame)
    levels = _levels(level0, tile)
    lut = _lut()
    f = tiff_px(heat_px0)
    mpp0 = slide_mpp * f
    desc = (f"wsi-prune heat map: {COLORMAP} colour map of heat in [0, 1], alpha 0 off "
            f"tissue; {mpp0:.6g} um/px at level 0 ({f} slide level-0 px per px); "
            f"origin at slide level-0 ({frame.x}, {frame.y})")
    files = [(path, "rgba")] + ([(path.with_name(path.stem + "_raw.tif"), "raw")] if raw else [])
    for dest, kind in files:
        with tifffile.TiffWriter(dest, bigtiff=False) as tif:
            for i, a in enumerate(levels):
                ppcm = 1e4 / (mpp0 * 2 ** i)
                common = dict(shape=a.shape + ((4,) if kind == "rgba" else ()), tile=(tile, tile),
                              compression="zlib", resolution=(ppcm, ppcm),
                              resolutionunit="CENTIMETER", subfiletype=1 if i else 0,
                              metadata=None, software=False, maxworkers=1)
                if i == 0:
                    common["description"] = desc
                if kind == "rgba":
                    tif.write(_rgba_tiles(a, lut, tile), dtype=np.uint8, photometric="rgb",
                              extrasamples=["unassalpha"], **common)
                else:
                    tif.write(_float_tiles(a, tile), dtype=np.float32,
                              photometric="minisblack", **common)
    return path
