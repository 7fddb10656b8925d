"""Marker ink on H&E images: colour rules, smooth stain and a dark neighbourhood floor.

All tests run on the *white-balanced* image (glass = 240 in every channel, see
:func:`wsi_prune.io.tissue.glass_colour`), so a dim or tinted scan looks like any other:

1. **Colour** (:func:`ink_colour`): H&E absorbs green strongly (haematoxylin and eosin both do),
   so its pixels are purple (R, B > G) or pink (R > B > G). Blue, cyan, green and saturated pure
   red are colours H&E never produces; dark grey (black marker) is one a dark nucleus can
   approach, so it only counts in a large region (:func:`ink_candidates`, *black*).
2. **Smoothness**: purple or black-purple marker and translucent red are H&E colours, but ink
   is a film of even density hundreds of µm wide, while stained tissue is never even at that
   scale: nuclei, fibres and gaps make its optical density vary from pixel to pixel. Measured
   on ``bench_tissue.py``'s images at 0.5, 2 and 8 µm/px, the relative local spread of optical
   density (std / mean over about 8 µm) has a median of 0.01-0.06 on ink-over-glass pixels,
   and is above 0.1 on 95 % of tissue pixels (real tissue, faint included).
3. **Dark floor**: marker laid over tissue keeps the tissue's texture, but adds its density to
   every pixel, so even the palest pixel within 40 µm stays dark; tissue always has a pale
   fibre, gap or cytoplasm that close (:func:`floor_threshold`).

Smooth and floor pixels are ink only in regions of at least ``ink_min_um2`` and only with an
ink-like colour (never pink: eosin may lie evenly over a large area); regions then grow back
over their windows' margins (:func:`ink_regions`).

4. **Following** (:func:`follow_strokes`): a stroke found where it crosses glass (or where it
   is dense) is followed into the tissue it crosses: ink adds its optical density to the
   tissue's, so its floor over tissue is at least its floor where it was found, in every
   channel, while tissue beside the stroke has a pale pixel in some channel within 40 µm.

What this does not see: ink of an H&E colour laid thinly or blurred over tissue *and* never
seen over glass in the image (a tile inside the tissue), where the tissue's own texture shows
through and the floor stays at tissue level (translucent purple or red over stroma: about 80 %
excluded on the benchmark's 0.5 µm/px tiles). Colour rules still catch blue, green and black
there. Dense tissue right beside a thin stroke that was followed can be taken with it.

5. **Width** (:func:`keep_strokes_narrow`): haematoxylin-dense tissue scanned out of focus
   (blur sigma >= 6-8 µm) is as even and dark as purple marker, and following carries a few
   smooth patches of it over the whole section. Ink found only by smoothness or floor (no
   colour rule covers :data:`MIN_VOUCHED_SHARE` of the region) in a region wider than
   :data:`MAX_STROKE_UM` (1.5 mm, no marker stroke is that wide) is given back to the
   tissue, with a warning. Out-of-focus
   pieces narrower than that, and H&E-coloured strokes wider than it, are still mistaken.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import disk

_logger = logging.getLogger(__name__)

# Colour rules, on 0-255 white-balanced RGB and 0-255 HSV saturation.
_BLUE_MIN_MARGIN = 45  # B - max(R, G) of blue ink; hematoxylin-dense pixels reach ~40
_BLUE_MAX_RED_OVER_GREEN = 10  # blue/cyan ink has R <= G; hematoxylin purple has R > G
_GREEN_MIN_MARGIN = 12  # G - max(R, B) of green ink; H&E has G lowest, margin < 0
_PEN_MIN_SATURATION = 64  # ink is saturated; light-grey noise around glass is not
_RED_MIN_R = 120  # red marker is bright red ...
# ... with G and B <= 0.3 R (eosin keeps B > 0.5 R), tested in integers as 10 G <= 3 R
_BLACK_INK_MAX_V = 110  # black marker: dark ...
_BLACK_INK_MAX_CHROMA = 30  # ... and grey; dense hematoxylin is as dark but coloured

#: relative spread of optical density (std / (mean + :data:`_TEXTURE_OD_OFFSET`)) below which a
#: stained pixel is smooth enough to be ink
SMOOTH_TEXTURE = 0.06
_TEXTURE_OD_OFFSET = 0.05
#: side of the window the spread is measured over, µm (about a nucleus); at least 3 px
TEXTURE_UM = 8.0
# optical-density ratios of ink-like colours (see _inky)
_MIN_RED_OVER_GREEN_OD = 0.3
_MIN_BLUE_OVER_GREEN_OD = 0.75
# optical density from which an ink-like pixel next to an ink region joins it (its fringe)
_FRINGE_MIN_OD = 0.1
#: side of the neighbourhood whose darkest pixel must still be dark for ink over tissue, µm
FLOOR_UM = 40.0
#: coarsest resolution the smoothness test runs at, µm/px: its 3 px window then spans 48 µm, and
#: coarser pixels average tissue into evenness too (colour rules still run)
SMOOTH_MAX_MPP = 16.0
#: widest region of smooth or dark-floored stain taken for ink, µm (the diameter of the largest
#: disc inside it): marker strokes are 0.3-1 mm wide, while dense tissue scanned out of focus
#: (blur sigma from 6-8 µm at 8 µm/px, from 5-6 µm at 2 µm/px: bench_out_of_focus.py) is as
#: even and as dark as ink over a whole section; a wider region is kept as tissue, with a warning
MAX_STROKE_UM = 1500.0
#: gaps up to this wide (µm) inside a region are bridged before its width is measured
MAX_GAP_UM = 120.0
#: summed optical density (over glass) from which a smooth pixel may be ink: translucent marker
#: starts near 0.5, smooth pale glass-like areas (bubbles' insides, mounting medium) stay < 0.1
INK_MIN_OD = 0.35


def texture_window(mpp: float) -> int:
    """Odd window side, px, over which the optical-density spread is measured at ``mpp``."""
    return max(3, int(round(TEXTURE_UM / mpp)) | 1)


def ink_colour(rgb: np.ndarray, cmax: np.ndarray, sat: np.ndarray,
               black: bool = True) -> np.ndarray:
    """Pixels whose colour is marker ink: blue, cyan, green, saturated red, dark grey.

    Args:
        rgb: (H, W, 3) uint8 white-balanced RGB.
        cmax: (H, W) uint8 max over channels.
        sat: (H, W) uint8 HSV saturation 0-255.
        black: include dark grey. :func:`ink_candidates` returns it separately, since a dark
            nucleus in a dim scan can be as grey: only a large region of it is ink.

    Returns:
        (H, W) bool.
    """
    r = rgb[..., 0].astype(np.int16)
    g = rgb[..., 1].astype(np.int16)
    b = rgb[..., 2].astype(np.int16)
    saturated = sat >= _PEN_MIN_SATURATION
    blue = (b - np.maximum(r, g) >= _BLUE_MIN_MARGIN) & (r - g <= _BLUE_MAX_RED_OVER_GREEN)
    green = g - np.maximum(r, b) >= _GREEN_MIN_MARGIN
    # integer form of G, B <= 0.3 R (a float product would cost 8 bytes per pixel)
    red = (r >= _RED_MIN_R) & (10 * g <= 3 * r) & (10 * b <= 3 * r)
    # Grey means little chroma; on dark pixels HSV saturation is dominated by sensor noise
    # (a 16-level spread at V=50 is saturation 80), so the test is on max - min instead.
    out = (blue | green | red) & saturated
    if black:
        out |= _black(rgb, cmax)
    return out


def _black(rgb: np.ndarray, cmax: np.ndarray) -> np.ndarray:
    # Grey means little chroma; on dark pixels HSV saturation is dominated by sensor noise
    # (a 16-level spread at V=50 is saturation 80), so the test is on max - min instead.
    # (np.minimum over the three channels: a reduction over a last axis of 3 is ~10x slower)
    chroma = cmax - np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    return (cmax <= _BLACK_INK_MAX_V) & (chroma <= _BLACK_INK_MAX_CHROMA)


#: grey level of glass in the white-balanced image (typical of scanners, and of the images the
#: colour thresholds were set on)
GLASS_LEVEL = 240.0
_OD_LUT = np.maximum(-np.log10(np.maximum(np.arange(256), 1.0) / GLASS_LEVEL), 0.0).astype(
    np.float32)


def optical_density(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W) float32 optical density of each channel of white-balanced RGB (glass = 0; brighter
    than glass counts as 0)."""
    return _OD_LUT[rgb[..., 0]], _OD_LUT[rgb[..., 1]], _OD_LUT[rgb[..., 2]]


def texture(od: np.ndarray, window: int) -> np.ndarray:
    """(H, W) float32 relative spread of ``od``: local std / (local mean + offset)."""
    mean = ndi.uniform_filter(od, window, mode="reflect")
    sq = ndi.uniform_filter(od * od, window, mode="reflect")
    return np.sqrt(np.maximum(sq - mean * mean, 0.0)) / (mean + _TEXTURE_OD_OFFSET)


def floor_threshold(mpp: float) -> float:
    """Summed optical density a pixel's neighbourhood floor must reach to be ink at ``mpp``.

    Tissue's floor (minimum over :data:`FLOOR_UM`) stays under 0.6 on 99 % of the benchmark's
    real tissue pixels at 0.5 and 2 µm/px: within 40 µm there is always a pale fibre, gap or
    cytoplasm. A dim scan with no glass in view (a tile of tissue, which cannot be
    white-balanced) darkens that by up to ~0.25, hence 1.0. Coarser pixels average nuclei with
    stroma, so dense tissue's floor rises (99 % under 1.05 at 8 µm/px, where glass is always
    in view); the threshold follows, to 1.3 at 8 µm/px. Opaque marker over tissue has a
    floor of 1-2.5; thin (translucent) marker over tissue, 0.4-0.9, is left to the other
    tests.
    """
    return 1.0 + 0.3 * min(max(math.log2(mpp / 2.0) / 2.0, 0.0), 1.0)


def floor_window(mpp: float) -> int:
    """Odd window side, px, of the neighbourhood floor at ``mpp``."""
    return max(3, int(round(FLOOR_UM / mpp)) | 1)


def halo(mpp: float) -> int:
    """Rows a strip needs beyond its own for :func:`ink_candidates` to be exact."""
    return max(texture_window(mpp), floor_window(mpp)) // 2


def ink_candidates(rgb: np.ndarray, mpp: float, min_saturation: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel ink evidence beyond colour: smooth stain and a dark neighbourhood floor.

    Args:
        rgb: (H, W, 3) uint8 white-balanced RGB; callers pass a strip with :func:`halo` extra
            rows on each side, since the windows reach that far.
        mpp: µm/px.
        min_saturation: HSV saturation (0-255) a *smooth* or *black* pixel needs: one below
            the tissue's saturation floor cannot be tissue anyway, and a neutral grey scanner
            border or slide bevel (smooth, dark grey) must not seed an ink region that eats the
            tissue beside it.

    Returns:
        ``(smooth, stained, floor, deep, black)``, each (H, W) bool:

        - *smooth*: an ink-like pixel of optical density >= :data:`INK_MIN_OD` whose
          optical-density spread is below :data:`SMOOTH_TEXTURE`: ink over glass, or ink
          dense enough to hide the tissue;
        - *stained*: an ink-like pixel of optical density >= 0.1, what smooth regions grow
          over (a stroke's blurred fringe);
        - *floor*: the per-channel minimum optical density over :data:`FLOOR_UM` reaches
          :func:`floor_threshold` with an ink-like colour: marker laid over tissue adds its
          density to every pixel, so even the palest one in the window stays dark;
        - *deep*: an ink-like pixel that on its own reaches :func:`floor_threshold`.

        - *black*: dark grey, black marker's colour (a large region of it is ink; a dark
          nucleus in a dim scan can be as grey).
    """
    od_r, od_g, od_b = optical_density(rgb)
    od = od_r + od_g + od_b
    inky = _inky(od_r, od_g, od_b)
    stained = (od >= _FRINGE_MIN_OD) & inky
    threshold = floor_threshold(mpp)
    deep = (od >= threshold) & inky
    cmax = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    cmin = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    # saturation >= min_saturation, in integers
    coloured = (cmax - cmin).astype(np.int32) * 255 >= min_saturation * np.maximum(cmax, 1)
    if mpp <= SMOOTH_MAX_MPP:
        smooth = (od >= INK_MIN_OD) & inky & (texture(od, texture_window(mpp)) < SMOOTH_TEXTURE)
        smooth &= coloured
    else:
        smooth = np.zeros(od.shape, bool)
    del od, inky
    w = floor_window(mpp)
    fr, fg, fb = (ndi.minimum_filter(c, w, mode="nearest") for c in (od_r, od_g, od_b))
    floor = (fr + fg + fb >= threshold) & _inky(fr, fg, fb)
    black = _black(rgb, cmax) & coloured
    return smooth, stained, floor, deep, black


def _inky(od_r: np.ndarray, od_g: np.ndarray, od_b: np.ndarray) -> np.ndarray:
    # Eosin is the one stain that may lie evenly and densely over a large area (collagen,
    # muscle), so pink is never ink here: only absorption in red (purple, blue, green, black:
    # OD_R / OD_G >= 0.3; eosin ~0.1) or as much in blue as in green (red marker ~0.8, eosin
    # ~0.5) qualifies. The ratios do not change with the ink's density (Beer-Lambert).
    return (od_r >= _MIN_RED_OVER_GREEN_OD * od_g) | (od_b >= _MIN_BLUE_OVER_GREEN_OD * od_g)


def ink_regions(plane: Callable[[str], np.ndarray], mpp: float, min_px: float) -> np.ndarray:
    """Ink: colour-rule strokes, plus regions of smooth or dark-floored stain.

    Args:
        plane: gives an (H, W) bool plane by name, when it is needed (so that no more than
            three are alive at once on a large thumbnail): ``"colour"`` (:func:`ink_colour`),
            ``"smooth"``, ``"stained"``, ``"floor"``, ``"deep"``, ``"black"``
            (:func:`ink_candidates`) and
            ``"dark"``, near-black pixels (excluded anyway), which seed no region, so that a
            scanner border does not grow into the tissue beside it.
        mpp: µm/px.
        min_px: smallest region of smooth or dark-floored pixels that is ink, px
            (``ink_min_um2`` at ``mpp``); a quarter of that for a region touching the image
            edge, which continues outside.

    Returns:
        (H, W) bool.
    """
    ink = _strokes(plane("colour"))
    # A smooth region grows by a whole texture window: its own half-window margin, plus the
    # fringe of an out-of-focus stroke. Dark grey (black marker's colour) is a per-pixel test:
    # it grows by half a window, like the colour strokes. The floor grows by half its window,
    # which makes an opening of it.
    tw = texture_window(mpp)
    for cores_name, over_name, reach in (("smooth", "stained", tw), ("black", "stained", tw // 2),
                                         ("floor", "deep", floor_window(mpp) // 2)):
        cores = plane(cores_name)
        if not cores.any():
            continue
        cores &= ~plane("dark")
        labels, n = ndi.label(cores, structure=np.ones((3, 3), bool))
        sizes = label_sizes(labels, n)
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        keep = sizes >= min_px
        keep[edge[sizes[edge] >= min_px / 4]] = True
        keep[0] = False
        cores = keep[labels]
        del labels
        # Both tests look at a window, so they stop half a window short of the stroke's edge
        # (the floor is an erosion by its window); growing back over the pixels that pass the
        # per-pixel half of the test makes an opening of it.
        if reach >= 1 and cores.any():
            cores |= _dilate(cores, reach) & plane(over_name)
        ink |= cores
    return ink


#: share of a wide ink region that a colour rule must cover to keep it ink
MIN_VOUCHED_SHARE = 0.25


def keep_strokes_narrow(inked: np.ndarray, certain: Callable[[], np.ndarray], mpp: float
                        ) -> np.ndarray:
    """Give back to the tissue each ink region wider than :data:`MAX_STROKE_UM` that no colour
    rule vouches for.

    Smooth or dark-floored stain of an H&E colour is ink only as a stroke: tissue scanned out
    of focus is as even and dark, but over a whole section, and following (:func:`follow_strokes`)
    would carry a few smooth patches of it over all of it. A region's width is the diameter of
    the largest disc inside it, measured on its pixels shrunk by whole blocks (a block counts
    in the region when at least half its pixels are), after closing gaps of up to
    :data:`MAX_GAP_UM`; a region of a whole thumbnail costs distance transforms of at most
    ~1000² px.

    Args:
        inked: (H, W) bool ink found so far (changed in place and returned).
        certain: gives the (H, W) bool pixels of a colour H&E never has (blue, green,
            saturated red) or black marker's: a region they cover at least
            :data:`MIN_VOUCHED_SHARE` of stays ink, however wide (a few such px do not vouch:
            dense nuclei averaged at 8 µm/px can be as dark and grey as black marker).
            Called only when some region's bounding box is wider than the limit.
        mpp: µm/px.
    """
    max_px = MAX_STROKE_UM / mpp
    if not inked.any() or min(inked.shape) <= max_px:
        return inked
    labels, n = ndi.label(inked, structure=np.ones((3, 3), bool))
    wide = [(lab, sl) for lab, sl in enumerate(ndi.find_objects(labels), start=1)
            if sl is not None and min(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) > max_px]
    if not wide:
        return inked
    # a colour rule vouches for a region where it covers a good part of it: a few dark grey
    # px (dense nuclei at 8 µm/px pass for black marker) inside a flooded section do not
    sure = np.bincount(labels[certain() & inked], minlength=n + 1)
    vouched = set(np.flatnonzero(sure >= MIN_VOUCHED_SHARE * label_sizes(labels, n)).tolist())
    for lab, sl in wide:
        if lab in vouched:
            continue
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        region = labels[sl] == lab
        k = max(1, math.ceil(max(h, w) / 1024))
        if k > 1:
            hh, ww = -(-h // k) * k, -(-w // k) * k
            small = np.zeros((hh, ww), bool)
            small[:h, :w] = region
            small = small.reshape(hh // k, k, ww // k, k).mean(axis=(1, 3)) >= 0.5
        else:
            small = region
        # bridge the tissue's own gaps (out-of-focus tissue is smooth in patches, and
        # following joins them into a lattice); a circling stroke's inside stays open
        r = MAX_GAP_UM / 2 / (mpp * k)
        pad = int(math.ceil(r)) + 1
        grown = ndi.distance_transform_edt(~np.pad(small, pad)) <= r
        closed = ndi.distance_transform_edt(grown) > r
        width = 2.0 * k * float(ndi.distance_transform_edt(closed).max())
        if width > max_px:
            inked[sl] &= ~region
            _logger.warning(
                "a region of even, dark stain %.1f mm wide is kept as tissue, not taken for "
                "marker ink: no stroke is that wide (tissue out of focus?)",
                width * mpp / 1000.0)
    return inked


def label_sizes(labels: np.ndarray, n: int, rows: int = 512) -> np.ndarray:
    """(n + 1,) int64 pixel count of each label of an (H, W) label image.

    ``np.bincount`` copies its input to 8-byte integers: over a whole 16 Mpx thumbnail that is
    128 MB, so it runs over strips of rows.
    """
    sizes = np.zeros(n + 1, np.int64)
    for y0 in range(0, labels.shape[0], rows):
        sizes += np.bincount(labels[y0:y0 + rows].ravel(), minlength=n + 1)
    return sizes


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a disk of ``radius`` px (distance transform beyond a small radius)."""
    if radius <= 3:
        return ndi.binary_dilation(mask, disk(radius))
    return ndi.distance_transform_edt(~mask) <= radius
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


# -- following a stroke from where it is certain into the tissue it crosses ---------------------
#: optical density step of the uint8 planes :func:`follow_strokes` works on
OD_STEP = 0.01
#: white-balanced level (0-255) -> optical density in steps of :data:`OD_STEP` (uint8)
OD_LUT_Q = np.minimum(np.round(_OD_LUT / OD_STEP), 255).astype(np.uint8)
#: share of a stroke's own floor that a pixel's floor must keep, in every channel, to continue
#: it over tissue (the stroke's density varies along it: streaks, rims)
FOLLOW_KEEP = 0.9
#: optical density a continuation's floor may lose to noise (JPEG, sensor) in each channel
FOLLOW_NOISE_OD = 0.03
#: summed floor optical density below which a region is too faint to follow
FOLLOW_MIN_OD = 0.25
#: at most this many ink regions (the largest) are followed
FOLLOW_MAX_REGIONS = 16


def follow_strokes(ink: np.ndarray, od: Callable[[int], np.ndarray], dark: np.ndarray,
                   mpp: float, min_px: float) -> np.ndarray:
    """Continue each ink region into the tissue it crosses.

    Ink is a filter (Beer-Lambert): over tissue, a stroke's optical density is the tissue's
    *plus* the ink's, channel by channel. So the floor (minimum over :data:`FLOOR_UM`) of a
    stroke where it was found (over glass, or dense) bounds from below, in every channel, the
    floor of the same stroke wherever it goes on over tissue, whatever the tissue is; tissue
    beside the stroke has a pale gap within 40 µm in some channel. Each ink region with at
    least ``min_px`` px of found ink (near-black pixels join it but do not count: black marker
    is near-black, a scanner border alone is not ink) grows through the connected pixels whose
    floor keeps :data:`FOLLOW_KEEP` of the region's median floor in every channel (less
    :data:`FOLLOW_NOISE_OD`), then back over the half window the floor loses at the stroke's
    edge, where each pixel must pass the same bound on its own (an opening).

    What stops it: dense tissue next to a *thin* stroke can pass the bound (translucent purple
    over glass has a floor of ~0.5, the epidermis 0.3-0.85), and is then taken with the stroke.

    Args:
        ink: (H, W) bool ink found so far.
        od: gives the (H, W) uint8 optical density of one channel (0-2) of the white-balanced
            image, in steps of :data:`OD_STEP`.
        dark: (H, W) bool near-black pixels.
        mpp: µm/px.
        min_px: smallest region followed, px of found ink.

    Returns:
        (H, W) bool, ``ink`` with the continuations.
    """
    square = np.ones((3, 3), bool)
    labels, n = ndi.label(ink | dark, structure=square)
    if n == 0:
        return ink
    # found ink per region (a gather of the ink pixels' labels: no second full label image)
    sizes = np.bincount(labels[ink & ~dark], minlength=n + 1)
    sizes[0] = 0
    order = [i for i in np.argsort(sizes)[::-1][:FOLLOW_MAX_REGIONS] if sizes[i] >= min_px]
    if not order:
        return ink
    w = floor_window(mpp)
    floors = [ndi.minimum_filter(od(c), w, mode="nearest") for c in range(3)]
    noise = FOLLOW_NOISE_OD / OD_STEP
    out = ink.copy()
    for i in order:
        region = labels == i
        v = np.array([np.median(f[region]) for f in floors])
        if v.sum() * OD_STEP < FOLLOW_MIN_OD:
            continue
        low = np.maximum(FOLLOW_KEEP * v - noise, 0).astype(np.uint8)
        cand = region.copy()
        keep = floors[0] >= low[0]
        keep &= floors[1] >= low[1]
        keep &= floors[2] >= low[2]
        cand |= keep
        del keep
        grown = ndi.binary_propagation(region, structure=square, mask=cand)
        del cand
        new = grown & ~region
        if not new.any():
            continue
        new = ndi.maximum_filter(new.view(np.uint8), w, mode="constant").view(bool)
        for c in range(3):
            if low[c]:
                new &= od(c) >= low[c]
        out |= new
    return out
