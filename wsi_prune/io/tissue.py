"""Tissue, background and pen-ink masks of H&E images, in physical units.

One function, :func:`tissue_mask`, serves two scales: slide thumbnails (about 8-16 µm/px, a few
thousand px a side) and single tiles (e.g. 224 px at 0.5 µm/px or 56 px at 2 µm/px). Every size
in :class:`~wsi_prune.config.TissueConfig` is in µm or µm² and is converted to px with the
image's ``mpp``, so the same config means the same physical thing at both scales.
:func:`slide_tissue_mask` reads a slide's thumbnail and masks it, coarser than ``mask_mpp`` for
slides too large to mask in bounded memory.

The recipe, step by step (each step says why in the code):

1. the glass colour is measured (:func:`glass_colour`) and the image white-balanced so that
   glass is a neutral 240 (what the thresholds were set on): a dim or tinted scan then looks
   like any other, and every threshold below is relative to glass;
2. near-white (glass) and near-black (slide-edge borders, black marker) pixels are background,
   and so are colours H&E never produces: both stains absorb green most, so a pixel whose
   green is clearly above its red or blue (brown dust, bluish lint) is not tissue;
3. marker ink is rejected by colour, by smoothness and by a dark neighbourhood floor, and each
   ink region so found is followed into the tissue it crosses (:mod:`wsi_prune.io.ink`);
4. tissue is saturated: HSV saturation above an Otsu threshold, never below a fixed floor, with
   Otsu trusted only when the image really holds both glass and stain. The floor is measured
   from the glass, so it holds on a tile with no glass at all (a tile of faint tissue, or of
   glass alone);
5. a morphological closing bridges gaps between nuclei and stroma fibres;
6. specks smaller than ``min_region_um2`` are dropped (a region cut by the image edge from 1 %
   of the image up is kept, as it may continue outside) and holes smaller than
   ``min_hole_um2`` filled;
7. ink and black pixels are removed again, since steps 5-6 may have painted over them.

Steps 1-3 run in strips of rows and keep two bytes per pixel of the whole image (saturation
and eight yes/no tests packed as bits) plus one strip of temporaries, whatever the image size.
Measured on ``benchmarks/bench_tissue.py`` (docs/benchmarks.md): ink over glass >= 98 %
excluded at 0.5-8 µm/px for five marker colours, glass <= 0.1 % false tissue.

:func:`tile_fractions` then reads the tissue fraction of any set of level-0 tiles off the mask
with a summed-area table.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import disk

from wsi_prune.config import TissueConfig
from wsi_prune.io import ink

if TYPE_CHECKING:
    from wsi_prune.io.slide import Slide

_logger = logging.getLogger(__name__)

#: Version of the mask algorithm, part of a tile store's identity: a new version rebuilds
#: stores masked by an older one (1: Otsu on saturation; 2: glass white balance, H&E hue gate,
#: ink by smoothness and dark floor, bounded slide-level stage; 3: ink regions followed from
#: where they are found into the tissue they cross, one more pixel of closing on coarse masks;
#: 4: a smooth or dark-floored region wider than ink.MAX_STROKE_UM is tissue out of focus;
#: 5: the slide thumbnail is averaged from a level finer than the mask, :data:`MASK_OVERSAMPLE`;
#: 6: a wide ink region is vouched for by colour only where it covers
#: ink.MIN_VOUCHED_SHARE of it).
MASK_VERSION = 6

#: The slide mask's thumbnail is area-averaged from a level at least this many times finer
#: than the mask. A vendor's reduced level at the mask's own scale was resampled and then
#: JPEG-compressed on its own (Aperio writes Q=30): that flattens the texture the ink test
#: reads, so dense tissue passes for purple marker, and fades pale tissue. On the real slide's
#: pixels in 18 pyramids made so, the mask of the level at 8 µm/px had IoU 0.10-0.90 with the
#: single-level slide's; averaged from 2x finer 0.915-0.980, from 4x finer 0.953-0.980
#: (``benchmarks/bench_mask_levels.py``, docs/benchmarks.md "Masks from a vendor's level").
MASK_OVERSAMPLE = 4.0
#: ... unless that level holds more than this many times the thumbnail's pixels (4x finer is
#: 16 times the pixels); then the level at the mask's scale is read, as before
MASK_SOURCE_MAX_RATIO = 20.0

# Closing with a disk of more elements than this switches from binary morphology (cost grows
# with the disk area) to Euclidean distance transforms (cost independent of the radius).
_MAX_DISK_ELEMENTS = 50
# A closing radius under this many px is coarse: it gets one pixel more (see _mask_from_features).
_COARSE_CLOSING_PX = 4
# Smallest region touching the image edge kept as tissue, as a share of the image (see
# _remove_small_objects).
_EDGE_REGION_SHARE = 0.01
# Levels by which green may exceed red or blue on a pale stained pixel (noise, JPEG chroma).
_HUE_SLACK = 4
# Pixels per strip of the per-pixel stage (plus its halo): the stage's float32 temporaries,
# about 60 bytes per pixel, stay near 30 MB whatever the image.
_STRIP_PX = 1 << 19
# Rows per strip when computing the saturation histogram (bincount copies to 8-byte ints).
_STRIP_ROWS = 512
# Glass: bright and grey. A pixel is a glass candidate when its darkest channel is at least
# _GLASS_MIN_V (dim scanners put glass near 205) and its chroma at most _GLASS_MAX_CHROMA
# (tinted glass reaches ~12; pale stroma keeps 20 or more).
_GLASS_MIN_V = 170
_GLASS_MAX_CHROMA = 18
# The candidates are trusted as glass when they are at least this share of the image ...
_GLASS_MIN_SHARE = 0.01
# ... and the brighter half of them agree within this many levels (interquartile range of the
# channel sum): real glass is flat (scanner noise, JPEG), pale tissue is not.
_GLASS_MAX_IQR = 12
_CLIPPED = 254
# Sampled pixels for the glass estimate: a strided subset, enough for a stable median.
_GLASS_SAMPLES = 1 << 20



@dataclass(frozen=True)
class TissueMask:
    """A tissue mask and its resolution.

    Attributes:
        mask: (H, W) bool, True = tissue.
        mpp: resolution of the mask, µm/px.
        fraction: tissue fraction of the whole image, 0-1.
        glass: (3,) RGB colour taken as glass, or None when the image showed none.
    """

    mask: np.ndarray
    mpp: float
    fraction: float
    glass: tuple[float, float, float] | None = None

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
        The mask at ``mpp`` with its tissue fraction and the glass colour it measured.

    Raises:
        ValueError: ``rgb`` is not an (H, W, 3|4) uint8 array or ``mpp`` is not positive.
    """
    rgb, transparent = _split_rgb(rgb)
    if not (np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of µm/px, got {mpp!r}")
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        return TissueMask(np.zeros((h, w), bool), float(mpp), 0.0)

    glass = glass_colour(rgb, transparent)
    f = _features(rgb, mpp, glass, config)
    return _mask_from_features(f, transparent, mpp, glass, config)


def _mask_from_features(f: _Features, transparent: np.ndarray | None, mpp: float,
                        glass: np.ndarray | None, config: TissueConfig) -> TissueMask:
    """Steps 3-7 of the recipe, on the per-pixel planes (consumed: ``f`` is emptied)."""
    # Near-black is never tissue on a bright-field slide: scanner borders, slide edges, black
    # marker. Even dense hematoxylin keeps one channel above ~60.
    dark = f.get(_DARK)
    hard_out = dark.copy()
    if transparent is not None:
        hard_out |= transparent
    px2 = mpp * mpp
    if config.reject_pen:
        bits = {"colour": _COLOUR, "smooth": _SMOOTH, "stained": _STAINED, "floor": _FLOOR,
                "deep": _DEEP, "black": _BLACK, "dark": _DARK}
        inked = ink.ink_regions(lambda name: f.get(bits[name]), mpp, config.ink_min_um2 / px2)
        # A stroke's last few px are never smooth nor dark-floored (the windows straddle its
        # edge): grow ink over the non-glass pixels within half a texture window of it. Not
        # from near-black pixels: a scanner border's edge is sharp.
        grow = ink.texture_window(mpp) // 2
        if grow >= 1 and inked.any():
            inked |= ndi.binary_dilation(inked & ~dark, disk(grow)) & ~f.get(_BACKGROUND)
        if inked.any():  # (the image is held until here only when there is ink to follow)
            inked = ink.follow_strokes(inked, lambda c: f.optical_density(c, transparent),
                                       dark, mpp, config.ink_min_um2 / px2)
            inked = ink.keep_strokes_narrow(inked, lambda: f.get(_COLOUR) | f.get(_BLACK), mpp)
        hard_out |= inked
        del inked
    f.rgb = None
    del dark

    # Otsu sees glass too (it is the low mode that makes the histogram bimodal) but not the
    # black/pen pixels, whose saturation would drag the threshold anywhere.
    sat_min = _saturation_threshold(f.sat, ~hard_out, config.saturation_min)
    fg = f.sat >= sat_min
    fg &= ~f.get(_BACKGROUND)
    fg &= ~hard_out
    f.sat = f.flags = None  # the planes are done with: free them before the region labels

    radius_px = config.closing_um / mpp
    if radius_px >= 1.0:
        # Nuclei, stroma fibres and small lumens leave a speckled mask at thumbnail scale;
        # closing joins them into the tissue region they belong to. On a coarse mask (a radius
        # under _COARSE_CLOSING_PX) one pixel more: the pixels on each side of a gap are part
        # tissue, part glass, and a thin fibre's share is too pale to pass the threshold, so
        # the thresholded tissue stands about a pixel back from each edge. At 8 µm/px that
        # pixel is half the radius (16 µm closed 2 px and left loose, fibrous edges open); on
        # a tile it is a small fraction and is left out.
        radius = int(round(radius_px))
        fg = _closing(fg, radius + 1 if radius < _COARSE_CLOSING_PX else radius)
    fg = _remove_small_objects(fg, config.min_region_um2 / px2)
    fg = _fill_small_holes(fg, config.min_hole_um2 / px2)
    # Closing and hole filling may have grown tissue over thin pen strokes or into the black
    # border; ink hides what is under it and the border never is tissue.
    fg &= ~hard_out

    fraction = float(np.count_nonzero(fg)) / fg.size
    _logger.debug(
        "tissue mask %dx%d px at %.3g µm/px: glass %s, saturation >= %d, fraction %.3f",
        fg.shape[1], fg.shape[0], mpp, None if glass is None else np.round(glass).tolist(),
        sat_min, fraction,
    )
    return TissueMask(fg, float(mpp), fraction,
                      None if glass is None else tuple(float(v) for v in glass))


def slide_tissue_mask(slide: Slide, config: TissueConfig = TissueConfig(),
                      finer_on_error: bool = False, max_damaged: float = 0.0) -> TissueMask:
    """The tissue mask of a whole slide, from its thumbnail.

    The thumbnail is area-averaged from a level :data:`MASK_OVERSAMPLE` times finer than the
    mask where one holds at most :data:`MASK_SOURCE_MAX_RATIO` times its pixels, rather than
    taken from the vendor's level at the mask's own scale (resampled and re-compressed, that
    level flattens the texture the ink test reads). It is read at ``config.mask_mpp``, or
    coarser when that would exceed ``config.max_mask_mpx`` megapixels: the mask stage holds
    about 10 bytes per thumbnail pixel at its peak (the RGB thumbnail and two planes of
    per-pixel features, then a few bool planes and int32 region labels; the thumbnail is
    released after the per-pixel stage), so
    the cap bounds its memory whatever the slide's size (16 Mpx measured at 252 MB above the
    process's start, thumbnail read included; docs/benchmarks.md). At 8 µm/px the default
    cap (24 Mpx) is reached only by scans over about 39 x 39 mm: the largest CAMELYON16 slides
    (24 x 54 mm, 20 Mpx) stay at 8 µm/px.

    Args:
        slide: an open slide.
        finer_on_error: a damaged tile of the thumbnail's level is read from a finer level
            instead (``tiling.on_corrupt_tile: skip``).
        max_damaged: share of the area that may be masked as glass where no level decodes
            whole (:meth:`~wsi_prune.io.slide.Slide.read_thumbnail`).
        config: the tissue section.

    Returns:
        The mask at the thumbnail's real scale (the rounded width sets it).
    """
    mpp = mask_mpp_for(slide.info.width, slide.info.height, slide.mpp, config)
    level = slide.averaging_level(mpp, MASK_OVERSAMPLE, MASK_SOURCE_MAX_RATIO)
    thumb = slide.read_thumbnail(mpp, finer_on_error=finer_on_error, level=level,
                                 max_damaged=max_damaged)
    # the thumbnail's real scale (rounded size) is what the mask is measured in
    real_mpp = slide.info.width * slide.mpp / thumb.shape[1]
    glass = glass_colour(thumb)
    f = _features(thumb, real_mpp, glass, config)
    del thumb  # 3 bytes per pixel: f holds it only until the ink is found
    return _mask_from_features(f, None, real_mpp, glass, config)


def mask_mpp_for(width: int, height: int, level0_mpp: float, config: TissueConfig) -> float:
    """Resolution to mask a ``width`` x ``height`` px slide at, µm/px: ``config.mask_mpp``, or
    coarser so that the thumbnail holds at most ``config.max_mask_mpx`` megapixels."""
    area_um2 = width * height * level0_mpp * level0_mpp
    return max(config.mask_mpp, math.sqrt(area_um2 / (config.max_mask_mpx * 1e6)))


def glass_colour(rgb: np.ndarray, transparent: np.ndarray | None = None) -> np.ndarray | None:
    """The colour of the slide's glass in ``rgb``, or None when it shows none.

    Glass is the bright, grey, flat part of a bright-field image: the median colour of the
    brighter half of the grey candidates, trusted when they cover at least 1 % of the image and
    agree closely (a tile of pale tissue has grey pixels too, but never a flat mode of them).

    Args:
        rgb: (H, W, 3) uint8.
        transparent: (H, W) bool pixels to leave out, or None.

    Returns:
        (3,) float64 RGB, or None.
    """
    step = max(1, int(math.sqrt(rgb.shape[0] * rgb.shape[1] / _GLASS_SAMPLES)))
    sample = rgb[::step, ::step].reshape(-1, 3)
    if transparent is not None:
        sample = sample[~transparent[::step, ::step].ravel()]
    if len(sample) == 0:
        return None
    r, g, b = sample[:, 0], sample[:, 1], sample[:, 2]
    cmin = np.minimum(np.minimum(r, g), b)
    cmax = np.maximum(np.maximum(r, g), b)
    # clipped pixels (JPEG overshoot at edges, a saturated sensor) say nothing of the glass
    grey = (cmin >= _GLASS_MIN_V) & (cmax - cmin <= _GLASS_MAX_CHROMA) & (cmax < _CLIPPED)
    if np.count_nonzero(grey) < max(16, _GLASS_MIN_SHARE * len(sample)):
        return None
    # Order statistics from histograms (the values are small integers): the same numbers as
    # np.median / np.percentile, without sorting up to a million samples (0.2 s a thumbnail).
    cand = sample[grey]
    bright = cand[:, 0].astype(np.int32) + cand[:, 1] + cand[:, 2]
    top = cand[bright >= _quantiles(np.bincount(bright, minlength=766), [0.5])[0]]
    top_sum = top[:, 0].astype(np.int32) + top[:, 1] + top[:, 2]
    q1, q3 = _quantiles(np.bincount(top_sum, minlength=766), [0.25, 0.75])
    if q3 - q1 > _GLASS_MAX_IQR:
        return None
    return np.array([_quantiles(np.bincount(top[:, c], minlength=256), [0.5])[0]
                     for c in range(3)], np.float64)


def _quantiles(hist: np.ndarray, qs: list[float]) -> list[float]:
    """Quantiles ``qs`` (in [0, 1]) of the integers counted by ``hist`` (value i counted
    ``hist[i]`` times), interpolated linearly between order statistics as ``np.percentile``
    does by default."""
    cum = np.cumsum(hist)
    n = int(cum[-1])
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(math.floor(pos))
        v_lo = int(np.searchsorted(cum, lo, side="right"))
        v_hi = int(np.searchsorted(cum, min(lo + 1, n - 1), side="right"))
        out.append(v_lo + (v_hi - v_lo) * (pos - lo))
    return out


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose colour is marker ink: blue, green, red and black.

    Red marker looks much like eosin and red blood cells, so only highly saturated pure red with
    little blue is called ink; black marker must be dark *and* grey, since dense hematoxylin is
    dark too but saturated. Colour only: :func:`tissue_mask` also rejects smooth ink of H&E
    colours (purple marker), see :mod:`wsi_prune.io.ink`.

    Args:
        rgb: (H, W, 3) uint8 RGB image (RGBA accepted, alpha ignored).

    Returns:
        (H, W) bool, True = ink.
    """
    rgb, _ = _split_rgb(rgb)
    cmax, _, sat = _max_min_saturation(rgb)
    return ink.ink_colour(rgb, cmax, sat)


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


# Bits of _Features.flags.
_BACKGROUND, _DARK, _COLOUR, _SMOOTH, _STAINED, _FLOOR, _DEEP, _BLACK = (1 << i for i in range(8))


@dataclass
class _Features:
    """Per-pixel planes of the white-balanced image: saturation, and eight yes/no tests packed
    as bits of one byte (a bool plane each would cost 8 bytes per pixel).

    Attributes:
        sat: (H, W) uint8 HSV saturation 0-255.
        flags: (H, W) uint8 bits: ``_BACKGROUND`` glass (near-white) or a colour H&E never
            has; ``_DARK`` near-black (borders, black marker); ``_COLOUR`` an ink colour;
            ``_SMOOTH``, ``_STAINED``, ``_FLOOR``, ``_DEEP``, ``_BLACK`` see
            :func:`wsi_prune.io.ink.ink_candidates`.
        rgb: (H, W, 3) uint8 the image as read (not balanced: no copy), kept for
            :func:`wsi_prune.io.ink.follow_strokes` while ink is being looked for.
        luts: three (256,) uint8 white-balance lookup tables, one per channel.
    """

    sat: np.ndarray | None
    flags: np.ndarray | None
    rgb: np.ndarray | None = None
    luts: list[np.ndarray] | None = None

    def optical_density(self, channel: int, transparent: np.ndarray | None) -> np.ndarray:
        """(H, W) uint8 optical density of one channel of the white-balanced image, in steps
        of :data:`wsi_prune.io.ink.OD_STEP` (transparent pixels count as glass)."""
        assert self.rgb is not None and self.luts is not None
        od = ink.OD_LUT_Q[self.luts[channel]][self.rgb[..., channel]]
        if transparent is not None:
            od[transparent] = 0
        return od

    def get(self, bit: int) -> np.ndarray:
        """(H, W) bool plane of one bit."""
        assert self.flags is not None
        return (self.flags & bit) != 0


def _features(rgb: np.ndarray, mpp: float, glass: np.ndarray | None,
              config: TissueConfig) -> _Features:
    """The per-pixel stage, strip by strip (with a halo of rows for the windows of
    :func:`wsi_prune.io.ink.ink_candidates`).

    The image is white-balanced so that its glass becomes :data:`~wsi_prune.io.ink.GLASS_LEVEL`
    grey, the glass the thresholds were set on (left as it is when no glass is in view).
    """
    h, w = rgb.shape[:2]
    # white balance as a lookup table per channel: no float copy of the image
    gain = np.ones(3) if glass is None else ink.GLASS_LEVEL / np.maximum(glass, 1.0)
    luts = [np.clip(np.round(np.arange(256) * g), 0, 255).astype(np.uint8) for g in gain]
    out = _Features(np.empty((h, w), np.uint8), np.empty((h, w), np.uint8), rgb, luts)
    halo = ink.halo(mpp)
    rows = max(16, _STRIP_PX // max(w, 1))
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        a0, a1 = max(0, y0 - halo), min(h, y1 + halo)
        part = rgb[a0:a1]
        bal = np.stack([luts[c][part[..., c]] for c in range(3)], axis=-1)
        inner = np.s_[y0 - a0:y1 - a0]
        b = bal[inner]
        cmax, cmin, sat = _max_min_saturation(b)
        out.sat[y0:y1] = sat
        # Glass is bright and grey in every channel; requiring *all* channels bright
        # (min > t) keeps pale eosin, whose green channel is low even when red and blue are
        # near white. H&E absorbs green most (both stains do), so green is about the lowest
        # channel of any stained pixel; brown dust and bluish lint break the rule. The slack
        # grows with chroma (noise and JPEG chroma error do), from _HUE_SLACK on pale pixels.
        slack = _HUE_SLACK + (cmax - cmin) // 8
        green_lowest = b[..., 1] <= np.minimum(b[..., 0], b[..., 2]).astype(np.int16) + slack
        flags = np.where((cmin > config.white_threshold) | ~green_lowest, _BACKGROUND, 0)
        flags = flags.astype(np.uint8)
        flags[cmax < config.black_threshold] |= _DARK
        flags[ink.ink_colour(b, cmax, sat, black=False)] |= _COLOUR
        for bit, plane in zip((_SMOOTH, _STAINED, _FLOOR, _DEEP, _BLACK),
                              ink.ink_candidates(bal, mpp, config.saturation_min),
                              strict=True):
            flags[plane[inner]] |= bit
        out.flags[y0:y1] = flags
    return out


def _saturation_threshold(sat: np.ndarray, valid: np.ndarray, floor: int) -> int:
    """Lowest saturation (0-255) counted as tissue.

    Otsu is only meaningful on a bimodal histogram (glass + stain). A tile that is all glass or
    all tissue is unimodal, and Otsu would then split noise or cut the tissue in two (nuclei vs
    stroma). So Otsu is trusted only when its low class looks like glass (mean below the floor)
    and its high class is clearly more saturated; otherwise the fixed floor alone decides.
    """
    hist = np.zeros(256, np.float64)
    for y0 in range(0, sat.shape[0], _STRIP_ROWS):  # bincount casts to intp: 8 B per pixel
        rows = np.s_[y0:y0 + _STRIP_ROWS]
        hist += np.bincount(sat[rows][valid[rows]], minlength=256)
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

    A region touching the image edge may continue past it (a tile, a cropped scan), so its true
    area is unknown: it is kept from 1 % of the image up (:data:`_EDGE_REGION_SHARE`), even
    below ``min_px``. Without this a single 112 µm tile could never hold a region of the
    default 20 000 µm²; with no floor at all, a dust speck or lint fibre cut by the tile's edge
    would count as tissue. (skimage's remove_small_objects has no such rule, and its size
    argument changed meaning between releases.)
    """
    if min_px <= 1 or not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    sizes = ink.label_sizes(labels, n)
    keep = sizes >= min_px
    edge = _border_labels(labels)
    keep[edge] |= sizes[edge] >= min(min_px, _EDGE_REGION_SHARE * mask.size)
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
    sizes = ink.label_sizes(labels, n)
    fill = sizes < max_px
    fill[_border_labels(labels)] = False
    fill[0] = False
    return mask | fill[labels]
