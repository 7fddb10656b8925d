"""Tissue, background and pen-ink masks of H&E images, in physical units.

One function, :func:`tissue_mask`, serves two scales: slide thumbnails (about 8-16 µm/px, a few
thousand px a side) and single tiles (e.g. 56 px at 2 µm/px). Every size in
:class:`~wsi_prune.config.TissueConfig` is in µm or µm² and is converted to px with the image's
``mpp``, so the same config means the same physical thing at both scales.

The recipe, step by step (each step says why in the code):

1. near-white (glass) and near-black (slide-edge borders, black marker) pixels are background;
2. pen ink (blue, green, red, black marker) is rejected by colour rules (:func:`pen_mask`);
3. tissue is saturated: HSV saturation above an Otsu threshold, never below a fixed floor, with
   Otsu trusted only when the image really holds both glass and stain;
4. a morphological closing bridges gaps between nuclei and stroma fibres;
5. specks smaller than ``min_region_um2`` are dropped and holes smaller than ``min_hole_um2``
   filled;
6. pen and black pixels are removed again, since steps 4-5 may have painted over them.

:func:`tile_fractions` then reads the tissue fraction of any set of level-0 tiles off the mask
with a summed-area table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import disk

from wsi_prune.config import TissueConfig

_logger = logging.getLogger(__name__)

# Pen-ink colour rules, on 0-255 RGB and 0-255 HSV saturation. H&E absorbs green strongly
# (both haematoxylin and eosin do), so its pixels are purple (R, B > G) or pink (R > B > G):
# the rules below look for what H&E never produces.
_BLUE_MIN_MARGIN = 45  # B - max(R, G) of blue ink; hematoxylin-dense pixels reach ~40
_BLUE_MAX_RED_OVER_GREEN = 10  # blue/cyan ink has R <= G; hematoxylin purple has R > G
_GREEN_MIN_MARGIN = 12  # G - max(R, B) of green ink; H&E has G lowest, margin < 0
_PEN_MIN_SATURATION = 64  # ink is saturated; light-grey noise around glass is not
_RED_MIN_R = 120  # red marker is bright red ...
_RED_MAX_GB_OVER_R = 0.3  # ... with little green and blue; eosin keeps B > 0.5 R
_BLACK_INK_MAX_V = 110  # black marker: dark ...
_BLACK_INK_MAX_CHROMA = 30  # ... and grey; dense hematoxylin is as dark but coloured
# Closing with a disk of more elements than this switches from binary morphology (cost grows
# with the disk area) to Euclidean distance transforms (cost independent of the radius).
_MAX_DISK_ELEMENTS = 50


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask and its resolution.

    Attributes:
        mask: (H, W) bool, True = tissue.
        mpp: resolution of the mask, µm/px.
        fraction: tissue fraction of the whole image, 0-1.
    """

    mask: np.ndarray
    mpp: float
    fraction: float

    @property
    def tissue_um2(self) -> float:
        """Tissue area, µm²."""
        return float(np.count_nonzero(self.mask)) * self.mpp * self.mpp


def tissue_mask(rgb: np.ndarray, mpp: float, config: TissueConfig = TissueConfig()) -> TissueMask:
    """Find the tissue in an H&E image.

    Args:
        rgb: (H, W, 3) uint8 RGB image at ``mpp`` (a thumbnail or a single tile). An (H, W, 4)
            RGBA image is accepted too: fully transparent pixels (outside the scanned area in
            OpenSlide reads) are background.
        mpp: resolution of ``rgb``, µm/px.
        config: thresholds; its sizes are in µm and µm² and converted to px with ``mpp``.

    Returns:
        The mask at ``mpp`` with its tissue fraction.

    Raises:
        ValueError: ``rgb`` is not an (H, W, 3|4) uint8 array or ``mpp`` is not positive.
    """
    rgb, transparent = _split_rgb(rgb)
    if not (np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of µm/px, got {mpp!r}")
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        return TissueMask(np.zeros((h, w), bool), float(mpp), 0.0)

    cmax, cmin, sat = _max_min_saturation(rgb)
    # Glass is bright and grey in every channel; requiring *all* channels bright (min > t) keeps
    # pale eosin, whose green channel is low even when red and blue are near white.
    background = cmin > config.white_threshold
    # Near-black is never tissue on a bright-field slide: scanner borders, slide edges, black
    # marker. Even dense hematoxylin keeps one channel above ~60.
    hard_out = cmax < config.black_threshold
    if transparent is not None:
        hard_out |= transparent
    if config.reject_pen:
        hard_out |= _strokes(_pen(rgb, cmax, sat))

    # Otsu sees glass too (it is the low mode that makes the histogram bimodal) but not the
    # black/pen pixels, whose saturation would drag the threshold anywhere.
    sat_min = _saturation_threshold(sat, ~hard_out, config.saturation_min)
    fg = (sat >= sat_min) & ~background & ~hard_out

    radius_px = config.closing_um / mpp
    if radius_px >= 1.0:
        # Nuclei, stroma fibres and small lumens leave a speckled mask at thumbnail scale;
        # closing joins them into the tissue region they belong to.
        fg = _closing(fg, int(round(radius_px)))
    px2 = mpp * mpp
    fg = _remove_small_objects(fg, config.min_region_um2 / px2)
    fg = _fill_small_holes(fg, config.min_hole_um2 / px2)
    # Closing and hole filling may have grown tissue over thin pen strokes or into the black
    # border; ink hides what is under it and the border never is tissue.
    fg &= ~hard_out

    fraction = float(np.count_nonzero(fg)) / fg.size
    _logger.debug(
        "tissue mask %dx%d px at %.3g µm/px: saturation >= %d, fraction %.3f",
        w, h, mpp, sat_min, fraction,
    )
    return TissueMask(fg, float(mpp), fraction)


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels covered by marker ink: blue, green, red and black.

    Red marker looks much like eosin and red blood cells, so only highly saturated pure red with
    little blue is called ink; black marker must be dark *and* grey, since dense hematoxylin is
    dark too but saturated.

    Args:
        rgb: (H, W, 3) uint8 RGB image (RGBA accepted, alpha ignored).

    Returns:
        (H, W) bool, True = ink.
    """
    rgb, _ = _split_rgb(rgb)
    cmax, _, sat = _max_min_saturation(rgb)
    return _pen(rgb, cmax, sat)


def tile_fractions(
    mask: np.ndarray,
    mask_mpp: float,
    level0_xy: np.ndarray,
    tile_level0: float,
    level0_mpp: float,
) -> np.ndarray:
    """Tissue fraction of square level-0 tiles, read off a whole-slide mask.

    Tile edges are rounded to the nearest mask-pixel boundary (at least one mask pixel a side),
    so a tile fully inside tissue gives exactly 1.0 and one fully outside exactly 0.0. The part
    of a tile past the mask's edge counts as background.

    Args:
        mask: (H, W) bool whole-slide tissue mask at ``mask_mpp``; its pixel (0, 0) starts at
            level-0 (0, 0).
        mask_mpp: resolution of ``mask``, µm/px.
        level0_xy: (N, 2) int top-left corners (x, y) of the tiles, level-0 px.
        tile_level0: tile side, level-0 px.
        level0_mpp: resolution of level 0, µm/px.

    Returns:
        (N,) float32 tissue fractions in [0, 1].

    Raises:
        ValueError: bad shapes or non-positive sizes.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    xy = np.asarray(level0_xy, dtype=np.float64).reshape(-1, 2)
    if not (mask_mpp > 0 and level0_mpp > 0 and tile_level0 > 0):
        raise ValueError("mask_mpp, level0_mpp and tile_level0 must be positive")
    if len(xy) == 0:
        return np.zeros(0, np.float32)
    h, w = mask.shape
    scale = level0_mpp / mask_mpp  # mask px per level-0 px

    def edges(start: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo = np.round(start * scale).astype(np.int64)
        hi = np.maximum(np.round((start + tile_level0) * scale).astype(np.int64), lo + 1)
        return np.clip(lo, 0, size), np.clip(hi, 0, size), hi - lo

    x0, x1, nx = edges(xy[:, 0], w)
    y0, y1, ny = edges(xy[:, 1], h)
    # Summed-area table with a zero first row/column: the sum over [y0, y1) x [x0, x1) is four
    # look-ups, so N tiles cost O(N) whatever their size. int32 is enough below 2**31 px.
    dtype = np.int32 if mask.size < 2**31 else np.int64
    sat = np.zeros((h + 1, w + 1), dtype)
    np.cumsum(np.cumsum(mask != 0, axis=0, dtype=dtype), axis=1, out=sat[1:, 1:])
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    # The denominator is the whole tile, clipped part included: outside the mask is background.
    return (inside / (nx * ny)).astype(np.float32)


# -- helpers -----------------------------------------------------------------------------------
def _split_rgb(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3|4) uint8 image, got {rgb.shape} {rgb.dtype}")
    if rgb.shape[2] == 4:
        return rgb[..., :3], rgb[..., 3] == 0
    return rgb, None


def _max_min_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W) uint8 max and min over channels, and HSV saturation scaled to 0-255 (uint8).

    Computed in integers rather than with skimage's float64 ``rgb2hsv``: on a 4000² thumbnail
    that is ~10x faster and a quarter of the memory, and hue is not needed.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cmax = np.maximum(np.maximum(r, g), b)
    cmin = np.minimum(np.minimum(r, g), b)
    num = (cmax - cmin).astype(np.uint16) * 255  # <= 65025, fits uint16
    sat = (num // np.maximum(cmax, 1)).astype(np.uint8)  # black (max 0) has saturation 0
    return cmax, cmin, sat


def _pen(rgb: np.ndarray, cmax: np.ndarray, sat: np.ndarray) -> np.ndarray:
    r = rgb[..., 0].astype(np.int16)
    g = rgb[..., 1].astype(np.int16)
    b = rgb[..., 2].astype(np.int16)
    saturated = sat >= _PEN_MIN_SATURATION
    blue = (b - np.maximum(r, g) >= _BLUE_MIN_MARGIN) & (r - g <= _BLUE_MAX_RED_OVER_GREEN)
    green = g - np.maximum(r, b) >= _GREEN_MIN_MARGIN
    red = (
        (r >= _RED_MIN_R)
        & (g <= _RED_MAX_GB_OVER_R * r)
        & (b <= _RED_MAX_GB_OVER_R * r)
    )
    # Grey means little chroma; on dark pixels HSV saturation is dominated by sensor noise
    # (a 16-level spread at V=50 is saturation 80), so the test is on max - min instead.
    chroma = cmax.astype(np.int16) - np.minimum(np.minimum(r, g), b)
    black = (cmax <= _BLACK_INK_MAX_V) & (chroma <= _BLACK_INK_MAX_CHROMA)
    return ((blue | green | red) & saturated) | black


def _strokes(pen: np.ndarray) -> np.ndarray:
    """Keep ink pixels that belong to a stroke at least 3 px wide.

    A dark-blue nucleus pixel with sensor noise can pass the colour rules on its own; a marker
    stroke is tens of µm wide at any scale we mask at. A 3x3 opening (edge pixels count as
    ink for the erosion, so strokes leaving the image survive) drops the isolated ones.
    """
    if not pen.any():
        return pen
    square = np.ones((3, 3), bool)
    core = ndi.binary_erosion(pen, square, border_value=1)
    return ndi.binary_dilation(core, square) & pen


def _saturation_threshold(sat: np.ndarray, valid: np.ndarray, floor: int) -> int:
    """Lowest saturation (0-255) counted as tissue.

    Otsu is only meaningful on a bimodal histogram (glass + stain). A tile that is all glass or
    all tissue is unimodal, and Otsu would then split noise or cut the tissue in two (nuclei vs
    stroma). So Otsu is trusted only when its low class looks like glass (mean below the floor)
    and its high class is clearly more saturated; otherwise the fixed floor alone decides.
    """
    hist = np.bincount(sat[valid], minlength=256).astype(np.float64)
    if np.count_nonzero(hist) < 2:
        return floor
    levels = np.arange(256, dtype=np.float64)
    # skimage returns t such that pixels > t are the foreground
    t = int(threshold_otsu(hist=(hist, levels)))
    low, high = hist[: t + 1], hist[t + 1 :]
    if low.sum() == 0 or high.sum() == 0:
        return floor
    mean_low = float(levels[: t + 1] @ low / low.sum())
    mean_high = float(levels[t + 1 :] @ high / high.sum())
    if mean_low >= floor or mean_high - mean_low < floor:
        return floor
    return max(t + 1, floor)


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with a disk of ``radius`` px.

    Pixels beyond the image edge count as background for the dilation and as foreground for
    the erosion, so tissue that touches the edge (a crop, a single tile) is not eaten away.
    """
    if not mask.any():
        return mask
    footprint = disk(radius)
    if np.count_nonzero(footprint) <= _MAX_DISK_ELEMENTS:
        grown = ndi.binary_dilation(mask, footprint)
        return ndi.binary_erosion(grown, footprint, border_value=1)
    # Large radius (a tile at high resolution): a disk dilation/erosion is a threshold on the
    # Euclidean distance to the other class, whose cost does not grow with the radius. The
    # distance transform only measures to zeros inside the array, which is the same edge
    # convention as above.
    grown = ndi.distance_transform_edt(~mask) <= radius
    if grown.all():
        # No zero inside the array: scipy's transform would then measure to a phantom corner.
        return grown
    return ndi.distance_transform_edt(grown) > radius


def _border_labels(labels: np.ndarray) -> np.ndarray:
    return np.unique(
        np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    )


def _remove_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected regions of fewer than ``min_px`` px.

    A region touching the image edge is kept whatever its visible size: it may continue past
    the edge (a tile, a cropped scan), so its true area is unknown. Without this a single
    112 µm tile could never hold a region of the default 20 000 µm².
    (skimage's remove_small_objects has no such rule, and its size argument changed meaning
    between releases.)
    """
    if min_px <= 1 or not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[_border_labels(labels)] = True
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill 4-connected background regions of fewer than ``max_px`` px enclosed by tissue.

    Background touching the image edge is never a hole (it may be glass continuing outside).
    4-connectivity for the background is the dual of 8-connectivity for tissue.
    """
    if max_px <= 1 or mask.all() or not mask.any():
        return mask
    labels, n = ndi.label(~mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    fill = sizes < max_px
    fill[_border_labels(labels)] = False
    fill[0] = False
    return mask | fill[labels]
