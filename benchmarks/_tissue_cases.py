"""Labelled images for ``bench_tissue.py``: the real slide with a hand-set ground truth, plus
synthetic overlays whose masks are known by construction.

Nothing here calls :mod:`wsi_prune.io.tissue`: the labels must not depend on the algorithm they
grade.

**Real slide** (``cmu-1-small-region.svs``, 0.499 µm/px, skin). Tissue is set by hand at full
resolution: summed optical density over the slide's own glass above :data:`GT_OD_MIN` (glass
stays under 0.03, the palest stroma fibres reach 0.14), closed over :data:`GT_CLOSE_UM` to join
fibres, holes under :data:`GT_HOLE_UM2` filled. The thresholds were checked by eye on overlays
of the whole slide and of its loose-fibre and margin areas (``bench_tissue.py --overlays``).
Two kinds of pixel are ignored (neither tissue nor glass): detached fragments under
:data:`GT_FRAGMENT_UM2` (keeping them is a policy, ``min_region_um2``, not a detection error)
and the green tissue-marking dye painted on the margins (with a few µm around it).

**Overlays**, drawn at a render resolution and box-averaged to the evaluated one, so edges are
partial pixels as in a scanner's pyramid, then round-tripped through JPEG like an SVS tile:

- marker ink as a filter (Beer-Lambert: ``out = under * T ** density``), strokes with streaks,
  denser rims, a blur (out of focus) or a low density (translucent);
- scanner white points (dim and tinted glass), pale staining (optical density scaled down),
  fat (adipocyte membranes), dust, lint, bubbles, black scanner borders.

Labels: :data:`BG` (glass, debris, border), :data:`TISSUE`, :data:`INK_GLASS` and
:data:`INK_TISSUE` (ink over glass / over tissue), :data:`IGNORE`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

BG, TISSUE, INK_GLASS, IGNORE, INK_TISSUE = 0, 1, 2, 3, 4

REAL_MPP = 0.499
#: ground truth on the real slide, set by hand (see the module docstring)
GT_OD_MIN = 0.12
GT_CLOSE_UM = 12.0
GT_HOLE_UM2 = 2_500.0
GT_FRAGMENT_UM2 = 5_000.0
# tissue-marking dye: G above R (H&E keeps G lowest) on a coloured, not near-white pixel (pale
# gaps between fibres show green chromatic fringes of G - R ~ 10-15)
GT_DYE_MARGIN = 20
GT_DYE_MAX_R = 190
GT_DYE_PAD_UM = 2.0

#: marker colours at full density over this slide's glass (RGB), as scans of marker show them
INKS = {
    "black": (38, 40, 48),
    "dark blue": (30, 45, 112),
    "purple": (92, 44, 120),
    "green": (36, 122, 82),
    "red": (202, 46, 62),
}
#: stroke styles: (density, edge blur µm)
STYLES = {"opaque": (1.0, 1.5), "blurred": (1.0, 14.0), "translucent": (0.45, 1.5)}
#: scanner white points: the glass colour a dim or tinted scan gives (min channel 206-221)
DIM_GLASS = ((226, 221, 231), (214, 212, 204), (208, 208, 215))

#: evaluated scales: name -> (mpp of the image, render downsample k, side px)
SCALES = {
    "tile 0.5 µm/px": (REAL_MPP, 1, 224),
    "tile 2 µm/px": (REAL_MPP * 4, 4, 224),
    "slide 8 µm/px": (REAL_MPP * 16, 4, 256),
}


@dataclass
class Case:
    """One labelled image.

    Attributes:
        category: row of the table.
        rgb: (H, W, 3) uint8 at ``mpp``.
        mpp: µm/px.
        label: (H, W) uint8 codes (:data:`BG`, :data:`TISSUE`, ...).
        detail: what was drawn (ink colour and style, glass variant...).
    """

    category: str
    rgb: np.ndarray
    mpp: float
    label: np.ndarray
    detail: str = ""
    extra: dict = field(default_factory=dict)


# -- the real slide and its ground truth ---------------------------------------------------------
def read_real(path: str) -> np.ndarray:
    """The whole real slide at level 0, (H, W, 3) uint8."""
    import openslide

    with openslide.OpenSlide(path) as osr:
        return np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"))


def glass_reference(rgb: np.ndarray) -> np.ndarray:
    """(3,) float: median colour of the bright, grey pixels (the slide's glass)."""
    flat = rgb.reshape(-1, 3)
    grey = (flat.min(1) > 230) & (flat.max(1).astype(int) - flat.min(1) < 12)
    return np.median(flat[grey], axis=0).astype(np.float64)


def optical_density(rgb: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """(H, W) float32 summed optical density of ``rgb`` over ``glass``."""
    rel = np.clip(rgb.astype(np.float32), 1, None) / glass.astype(np.float32)
    return -np.log10(np.minimum(rel, 1.0)).sum(-1)


def _disk_close(mask: np.ndarray, radius: float) -> np.ndarray:
    """Closing with a disk of ``radius`` px; outside the image counts as tissue for the erosion
    (a crop must not eat its own edge)."""
    grown = ndi.distance_transform_edt(~mask) <= radius
    padded = np.pad(grown, 1, constant_values=True)
    return ndi.distance_transform_edt(padded)[1:-1, 1:-1] > radius


def real_truth(rgb: np.ndarray, mpp: float = REAL_MPP) -> np.ndarray:
    """(H, W) uint8 labels of the real slide (:data:`BG`, :data:`TISSUE`, :data:`IGNORE`)."""
    glass = glass_reference(rgb)
    stained = optical_density(rgb, glass) > GT_OD_MIN
    tissue = _disk_close(stained, GT_CLOSE_UM / mpp)
    holes, n = ndi.label(~tissue)
    sizes = np.bincount(holes.ravel(), minlength=n + 1)
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = sizes < GT_HOLE_UM2 / mpp**2
    fill[edge] = False
    fill[0] = False
    tissue |= fill[holes]
    parts, n = ndi.label(tissue, structure=np.ones((3, 3), bool))
    sizes = np.bincount(parts.ravel(), minlength=n + 1)
    small = sizes < GT_FRAGMENT_UM2 / mpp**2
    small[0] = False
    label = np.where(tissue, TISSUE, BG).astype(np.uint8)
    label[small[parts]] = IGNORE
    r, g = rgb[..., 0].astype(np.int16), rgb[..., 1].astype(np.int16)
    dye = ndi.binary_opening((g - r > GT_DYE_MARGIN) & (r < GT_DYE_MAX_R), np.ones((2, 2), bool))
    dye = ndi.distance_transform_edt(~dye) <= GT_DYE_PAD_UM / mpp
    label[dye & tissue] = IGNORE
    return label


# -- building blocks ----------------------------------------------------------------------------
@dataclass
class Source:
    """The real slide at one render resolution.

    Attributes:
        rgb: (H, W, 3) float32, 0-255.
        label: (H, W) uint8 (:data:`BG`, :data:`TISSUE`, :data:`IGNORE`).
        glass: (3,) the glass colour.
        glass_patch: (h, w, 3) float32, a clean stretch of real glass to tile canvases with.
        mpp: µm/px.
    """

    rgb: np.ndarray
    label: np.ndarray
    glass: np.ndarray
    glass_patch: np.ndarray
    mpp: float


def make_source(rgb: np.ndarray, label: np.ndarray, k: int) -> Source:
    """The real slide and its labels box-averaged by ``k`` (a scanner pyramid level)."""
    glass = glass_reference(rgb)
    small = box_mean(rgb.astype(np.float32), k)
    lab = labels_at(label, k)
    # rows 200-600, columns 100-500 of level 0 are clean glass (checked on the overlay)
    patch = small[200 // k:600 // k, 100 // k:500 // k]
    return Source(small, lab, glass, patch, REAL_MPP * k)


def box_mean(img: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k blocks (trailing rows/columns that do not fill a block are dropped)."""
    if k == 1:
        return img
    h, w = img.shape[0] // k * k, img.shape[1] // k * k
    x = img[:h, :w].reshape(h // k, k, w // k, k, *img.shape[2:])
    return x.mean(axis=(1, 3), dtype=np.float32)


def labels_at(label: np.ndarray, k: int) -> np.ndarray:
    """Labels of k x k blocks: ink where at least half is ink; tissue / background where at
    least three quarters of the rest agree; otherwise ignored (a mixed pixel has no right
    answer)."""
    if k == 1:
        return label
    frac = {c: box_mean((label == c).astype(np.float32), k)
            for c in (BG, TISSUE, INK_GLASS, INK_TISSUE, IGNORE)}
    ink = frac[INK_GLASS] + frac[INK_TISSUE]
    rest = np.maximum(frac[BG] + frac[TISSUE], 1e-6)
    out = np.full(ink.shape, IGNORE, np.uint8)
    out[(frac[TISSUE] / rest >= 0.75) & (frac[IGNORE] + ink < 0.5)] = TISSUE
    out[(frac[BG] / rest >= 0.75) & (frac[IGNORE] + ink < 0.5)] = BG
    out[ink >= 0.5] = np.where(frac[INK_TISSUE] >= frac[INK_GLASS], INK_TISSUE, INK_GLASS)[
        ink >= 0.5]
    return out


def glass_canvas(src: Source, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 glass: mirrored copies of the real glass patch, randomly shifted."""
    p = src.glass_patch
    reps = (shape[0] // p.shape[0] + 3, shape[1] // p.shape[1] + 3)
    quad = np.concatenate([np.concatenate([p, p[:, ::-1]], 1),
                           np.concatenate([p[::-1], p[::-1, ::-1]], 1)], 0)
    big = np.tile(quad, (reps[0] // 2 + 1, reps[1] // 2 + 1, 1))
    y, x = rng.integers(0, p.shape[0]), rng.integers(0, p.shape[1])
    return big[y:y + shape[0], x:x + shape[1]].copy()


def smooth_noise(shape: tuple[int, int], sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 Gaussian-filtered white noise scaled to unit standard deviation (made
    on a grid sigma/2 coarser and interpolated up when sigma is large: same look, less time)."""
    step = max(1, int(sigma_px // 2))
    small = (shape[0] // step + 2, shape[1] // step + 2)
    n = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32),
                            max(sigma_px / step, 0.5))
    if step > 1:
        n = ndi.zoom(n, step, order=1)
    n = n[:shape[0], :shape[1]]
    return n / max(float(n.std()), 1e-6)


def polyline_distance(shape: tuple[int, int], pts: np.ndarray, bound: float) -> np.ndarray:
    """(H, W) float32 distance (px) from every pixel to points ``pts`` (N, 2) (x, y) sampled
    densely along a line, capped at ``bound``; only the points' bounding box is searched."""
    from scipy.spatial import cKDTree

    h, w = shape
    out = np.full(shape, bound, np.float32)
    x0, y0 = np.maximum(np.floor(pts.min(0) - bound), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(pts.max(0) + bound) + 1, (w, h)).astype(int)
    if x1 <= x0 or y1 <= y0:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d, _ = cKDTree(pts).query(np.stack([xx.ravel(), yy.ravel()], 1), k=1,
                              distance_upper_bound=bound)
    out[y0:y1, x0:x1] = np.minimum(d, bound).reshape(yy.shape)
    return out


def curve_distance(shape: tuple[int, int], rng: np.random.Generator,
                   offset_px: float) -> np.ndarray:
    """(H, W) float32 distance (px) to a gently bent stroke centreline crossing the image: an
    arc of a circle 1.5-6 image sides in radius (exact distance, no rasterising), passing
    ``offset_px`` from the image centre."""
    h, w = shape
    ang = rng.uniform(0, 2 * np.pi)
    nrm = np.array([np.cos(ang), np.sin(ang)])
    radius = rng.uniform(1.5, 6.0) * max(h, w)
    mid = np.array([w / 2, h / 2]) + nrm * offset_px
    cx, cy = mid + nrm * radius
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    return np.abs(np.hypot(xx - cx, yy - cy) - radius).astype(np.float32)


def stroke_density(shape: tuple[int, int], mpp: float, rng: np.random.Generator,
                   width_um: float, blur_um: float, offset_um: float = 0.0) -> np.ndarray:
    """(H, W) float32 relative ink density of one marker stroke (about 1 inside).

    Inside the stroke: streaks along it (marker felt), a denser rim where the ink pools, and a
    fine grain; the edge is blurred by ``blur_um`` (Gaussian sigma, out-of-focus ink).
    """
    half = width_um / 2
    dist = curve_distance(shape, rng, offset_um / mpp) * mpp  # µm
    inside = np.clip(half - dist + 0.5 * mpp, 0, mpp) / mpp  # anti-aliased edge
    streak = 1 + 0.12 * smooth_noise(shape, 12 / mpp, rng) + 0.03 * smooth_noise(
        shape, 1.0 / mpp, rng)
    rim = 1 + 0.25 * np.exp(-np.clip(half - dist, 0, None) / 6.0)
    dens = inside * streak * rim
    if blur_um / mpp >= 0.5:
        dens = ndi.gaussian_filter(dens, blur_um / mpp)
    return np.clip(dens, 0, None).astype(np.float32)


def apply_ink(rgb: np.ndarray, dens: np.ndarray, colour: tuple[int, int, int],
              glass: np.ndarray, strength: float) -> np.ndarray:
    """Marker ink as a filter over ``rgb`` (Beer-Lambert): transmittance = colour / glass at
    density 1, raised to ``strength * dens``."""
    t = np.clip(np.asarray(colour, np.float32) / glass.astype(np.float32), 0.02, 1.0)
    return rgb * np.power(t[None, None, :], (strength * dens)[..., None])


def ink_labels(label: np.ndarray, dens: np.ndarray) -> np.ndarray:
    """Labels under a stroke: ink where the density is at least half its nominal value, the
    faint fringe (0.1-0.5) ignored, the rest unchanged."""
    out = label.copy()
    fringe = (dens >= 0.1) & (dens < 0.5)
    out[fringe] = IGNORE
    core = dens >= 0.5
    out[core & (label == TISSUE)] = INK_TISSUE
    out[core & (label != TISSUE)] = INK_GLASS
    return out


def add_od(rgb: np.ndarray, od: np.ndarray, colour_od: np.ndarray) -> np.ndarray:
    """Add optical density ``od`` (H, W) along ``colour_od`` (3,) to ``rgb``."""
    return rgb * np.power(10.0, -(od[..., None] * colour_od[None, None, :])).astype(np.float32)


def fade(rgb: np.ndarray, glass: np.ndarray, factor: float) -> np.ndarray:
    """Pale staining: every pixel's optical density over glass times ``factor``."""
    rel = np.clip(rgb / glass.astype(np.float32), 1e-3, 1.0)
    return glass.astype(np.float32) * rel**factor


def rescan(rgb: np.ndarray, glass: np.ndarray, white: tuple[int, int, int]) -> np.ndarray:
    """The same slide on a scanner whose glass comes out as ``white`` (per-channel gain)."""
    return rgb * (np.asarray(white, np.float32) / glass.astype(np.float32))


def to_uint8_jpeg(rgb: np.ndarray, quality: int = 80) -> np.ndarray:
    """Clip to uint8 and round-trip through JPEG (SVS tiles are JPEG, quality ~70-90)."""
    u8 = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


# -- debris, fat, borders -----------------------------------------------------------------------
_GREY_OD = np.array([0.95, 1.0, 1.05], np.float32)  # dust and bubble rims: near-neutral
_EOSIN_OD = np.array([0.08, 0.82, 0.42], np.float32)  # direction of stroma's OD on this slide
_HEMA_OD = np.array([0.62, 0.72, 0.30], np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def add_dust(rgb: np.ndarray, mpp: float, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` dark specks of 1-8 µm radius (grey to brown)."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    od = np.zeros((h, w), np.float32)
    for _ in range(n):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, 8) / mpp
        blob = np.clip(r + 0.5 - np.hypot(yy - cy, xx - cx), 0, 1)
        od = np.maximum(od, blob * rng.uniform(0.3, 1.2))
    brown = _unit(np.array([0.8, 1.0, 1.3], np.float32))
    return add_od(rgb, ndi.gaussian_filter(od, 0.7 / mpp), brown * np.sqrt(3))


def add_lint(rgb: np.ndarray, mpp: float, rng: np.random.Generator) -> np.ndarray:
    """A textile fibre: a thin wandering line, 2-5 µm wide and 60-400 µm long, grey or
    bluish."""
    h, w = rgb.shape[:2]
    length = rng.uniform(60, 400) / mpp
    n = max(20, int(2 * length))  # points 0.5 px apart
    step = length / n
    ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.03 * np.sqrt(step), n))
    pts = np.array([rng.uniform(0, w), rng.uniform(0, h)]) + np.cumsum(
        np.stack([np.cos(ang), np.sin(ang)], 1) * step, 0)
    dist = polyline_distance((h, w), pts, 10 / mpp) * mpp
    od = np.clip(rng.uniform(1, 2.5) - dist + mpp / 2, 0, mpp) / mpp * rng.uniform(0.2, 0.6)
    colour = _unit(np.array([1.0, 1.0, 1.0]) if rng.random() < 0.6 else
                   np.array([1.3, 1.0, 0.6])) * np.sqrt(3)
    return add_od(rgb, od.astype(np.float32), colour.astype(np.float32))


def add_bubble(rgb: np.ndarray, mpp: float, rng: np.random.Generator,
               radius_um: tuple[float, float]) -> np.ndarray:
    """An air bubble under the coverslip: a dark refracting rim 3-8 µm wide, a faint grey
    inside and a brighter ring just within the rim."""
    h, w = rgb.shape[:2]
    r = rng.uniform(*radius_um)
    cy = rng.uniform(-0.3 * h, 1.3 * h)
    cx = rng.uniform(-0.3 * w, 1.3 * w)
    yy, xx = np.mgrid[:h, :w]
    d = np.hypot(yy - cy, xx - cx) * mpp - r  # µm from the rim, negative inside
    rim_w = rng.uniform(3, 8)
    od = rng.uniform(0.3, 0.8) * np.exp(-0.5 * (d / (rim_w / 2)) ** 2)
    od += np.where(d < 0, rng.uniform(0.01, 0.04), 0.0)
    od -= 0.03 * np.exp(-0.5 * ((d + rim_w) / 3.0) ** 2)  # the bright inner ring
    return add_od(rgb, od.astype(np.float32), _GREY_OD)


def fat_lobule(rgb: np.ndarray, label: np.ndarray, mpp: float, rng: np.random.Generator,
               radius_um: float, centre: tuple[float, float] | None = None):
    """Draw adipose tissue: cells of 50-110 µm whose membranes (1.5-3 µm, eosin pink, a few
    flat nuclei) enclose empty (glass-white) fat. The whole lobule is tissue."""
    from scipy.spatial import cKDTree

    h, w = label.shape
    cy, cx = centre if centre is not None else (rng.uniform(0, h), rng.uniform(0, w))
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    ang = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.15 * np.sin(3 * ang + rng.uniform(0, 6)) + 0.08 * np.sin(5 * ang + 1)
    lobule = np.hypot(yy - cy, xx - cx) * mpp <= radius_um * wobble
    if not lobule.any():
        return rgb, label
    spacing = rng.uniform(50, 110) / mpp
    gy, gx = np.mgrid[-spacing:h + spacing:spacing, -spacing:w + spacing:spacing]
    seeds = np.stack([gy.ravel(), gx.ravel()], 1) + rng.uniform(-0.35, 0.35,
                                                               (gy.size, 2)) * spacing
    ys, xs = np.nonzero(lobule)
    box = np.s_[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    d, _ = cKDTree(seeds).query(np.stack([yy[box].ravel(), xx[box].ravel()], 1), k=2)
    gap = np.full((h, w), 1e6, np.float32)  # ~2x µm to the nearest cell wall
    gap[box] = ((d[:, 1] - d[:, 0]) * mpp).reshape(yy[box].shape)
    thick = rng.uniform(1.5, 3.0)
    wall = np.clip(thick - gap + mpp, 0, mpp) / mpp
    edge = ndi.distance_transform_edt(lobule) * mpp
    wall = np.maximum(wall, np.clip(thick / 2 - edge + mpp, 0, mpp) / mpp) * lobule
    od = wall * rng.uniform(0.45, 0.8)
    nuclei = (rng.random((h, w)) < 2e-4 * mpp**2) & (wall > 0.5)
    nuc = ndi.gaussian_filter(nuclei.astype(np.float32), 2.0 / mpp) * (2.0 / mpp) ** 2 * 6
    out = add_od(rgb, od.astype(np.float32), _unit(_EOSIN_OD) * 1.2)
    out = add_od(out, np.clip(nuc, 0, 1.2).astype(np.float32), _unit(_HEMA_OD) * 1.5)
    lab = label.copy()
    lab[lobule] = TISSUE
    return out, lab


def add_border(rgb: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """A scanner border along one or two edges: black (outside the scanned area) or the dark
    grey bevel of the slide's edge, 10-35 % of the side, with a soft inner edge (3 px)."""
    h, w = label.shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    out, lab = rgb.copy(), label.copy()
    black = rng.random() < 0.6
    for side in rng.choice(4, size=rng.integers(1, 3), replace=False):
        dist = (yy, xx, h - 1 - yy, w - 1 - xx)[int(side)]  # px from that edge
        n = rng.uniform(0.1, 0.35) * (h if side in (0, 2) else w)
        a = np.clip((n - dist) / 3.0, 0, 1)[..., None]
        if black:
            colour = rng.uniform(8, 35) + rng.normal(0, 3, (h, w, 1))
        else:  # the bevel darkens towards the edge
            colour = rng.uniform(70, 130) - 40 * (1 - dist / max(n, 1))[..., None]
        out = out * (1 - a) + colour.astype(np.float32) * a
        lab[dist < n] = BG
    return out, lab


# -- categories ---------------------------------------------------------------------------------
CATEGORIES = ("tissue", "tissue, dim scan", "faint tissue", "fat", "empty glass",
              "glass + debris", "glass + fragment", "scanner border",
              *(f"ink: {c}" for c in INKS))
#: categories holding only tissue and glass (no ink, no debris): "no loss against today"
TISSUE_ONLY = ("tissue", "tissue, dim scan", "faint tissue", "fat")


def _orient(rgb: np.ndarray, lab: np.ndarray, rng: np.random.Generator):
    k = int(rng.integers(4))
    rgb, lab = np.rot90(rgb, k), np.rot90(lab, k)
    if rng.random() < 0.5:
        rgb, lab = rgb[:, ::-1], lab[:, ::-1]
    return np.ascontiguousarray(rgb), np.ascontiguousarray(lab)


def tissue_base(src: Source, size: int, rng: np.random.Generator,
                tissue: tuple[float, float] = (0.05, 1.0)):
    """A crop of the real slide whose tissue share lies in ``tissue``; when the slide is
    smaller than ``size`` (slide scale), the whole slide on a glass canvas."""
    h, w = src.label.shape
    if size > min(h, w):
        rgb = glass_canvas(src, (size, size), rng)
        lab = np.zeros((size, size), np.uint8)
        s_rgb, s_lab = _orient(src.rgb, src.label, rng)
        sh, sw = min(s_lab.shape[0], size), min(s_lab.shape[1], size)
        y, x = rng.integers(0, size - sh + 1), rng.integers(0, size - sw + 1)
        rgb[y:y + sh, x:x + sw] = s_rgb[:sh, :sw]
        lab[y:y + sh, x:x + sw] = s_lab[:sh, :sw]
        return rgb, lab
    for _ in range(500):
        y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        lab = src.label[y:y + size, x:x + size]
        if tissue[0] <= (lab == TISSUE).mean() <= tissue[1]:
            break
    return _orient(src.rgb[y:y + size, x:x + size].copy(), lab.copy(), rng)


def glass_base(src: Source, size: int, rng: np.random.Generator):
    return glass_canvas(src, (size, size), rng), np.zeros((size, size), np.uint8)


def _fragment(src: Source, rgb: np.ndarray, lab: np.ndarray, rng: np.random.Generator):
    """Paste a small piece of real tissue (irregular, 5-15 % of the image side in radius) in a
    corner; half the time it touches the image edge."""
    size = lab.shape[0]
    r = rng.uniform(0.05, 0.15) * size
    n = int(2 * r) + 2
    h, w = src.label.shape
    for _ in range(200):
        y, x = rng.integers(0, h - n), rng.integers(0, w - n)
        if (src.label[y:y + n, x:x + n] == TISSUE).mean() > 0.8:
            break
    piece, plab = src.rgb[y:y + n, x:x + n], src.label[y:y + n, x:x + n]
    yy, xx = np.mgrid[:n, :n]
    ang = np.arctan2(yy - n / 2, xx - n / 2)
    shape = np.hypot(yy - n / 2, xx - n / 2) <= r * (1 + 0.25 * np.sin(3 * ang + rng.uniform(0, 6)))
    shape &= plab == TISSUE
    m = min(n, size)
    at_edge = rng.random() < 0.5
    oy = 0 if at_edge else int(rng.uniform(0.03, 0.1) * size)
    ox = oy
    if rng.random() < 0.5:  # another corner
        oy = size - m - oy
    sl = np.s_[oy:oy + m, ox:ox + m]
    sh = shape[:m, :m]
    rgb[sl][sh] = piece[:m, :m][sh]
    lab[sl][sh] = TISSUE
    return rgb, lab


def make_case(category: str, scale: str, src: Source, rng: np.random.Generator) -> Case:
    """One labelled image of ``category`` at ``scale`` (a key of :data:`SCALES`)."""
    mpp_eval, k, side = SCALES[scale]
    size = side * k
    mpp = src.mpp
    slide = scale.startswith("slide")
    detail = ""
    if category in ("tissue", "tissue, dim scan", "faint tissue", "scanner border"):
        # half tiles at the tissue's edge, half inside it
        share = (0.0, 1.0) if category == "scanner border" else (
            (0.15, 0.85) if rng.random() < 0.5 else (0.9, 1.0))
        rgb, lab = tissue_base(src, size, rng, share)
        if category == "tissue, dim scan":
            white = DIM_GLASS[rng.integers(len(DIM_GLASS))]
            rgb, detail = rescan(rgb, src.glass, white), f"glass {white}"
        elif category == "faint tissue":
            f = rng.uniform(0.25, 0.45)
            rgb, detail = fade(rgb, src.glass, f), f"OD x {f:.2f}"
        elif category == "scanner border":
            rgb, lab = add_border(rgb, lab, rng)
    elif category == "fat":
        rgb, lab = glass_base(src, size, rng)
        if slide:
            rgb, lab = fat_lobule(rgb, lab, mpp, rng, rng.uniform(400, 800),
                                  (size / 2, size / 2))
        else:  # lobules larger than the tile, centred anywhere from inside to past its edge
            extent = size * mpp
            centre = tuple(rng.uniform(-0.3, 1.3, 2) * size)
            rgb, lab = fat_lobule(rgb, lab, mpp, rng, rng.uniform(0.6, 1.5) * extent, centre)
    elif category in ("empty glass", "glass + debris", "glass + fragment"):
        rgb, lab = glass_base(src, size, rng)
        if category == "glass + debris":
            rgb = add_dust(rgb, mpp, rng, int(rng.integers(2, 9)))
            for _ in range(int(rng.integers(0, 3))):
                rgb = add_lint(rgb, mpp, rng)
            if rng.random() < 0.7:
                rgb = add_bubble(rgb, mpp, rng, (0.3 * size * mpp, 1.2 * size * mpp))
        elif category == "glass + fragment":
            rgb, lab = _fragment(src, rgb, lab, rng)
            rgb = add_dust(rgb, mpp, rng, int(rng.integers(0, 4)))
        if rng.random() < 0.5:
            white = DIM_GLASS[rng.integers(len(DIM_GLASS))]
            rgb, detail = rescan(rgb, src.glass, white), f"glass {white}"
    elif category.startswith("ink: "):
        colour = category[5:]
        style = tuple(STYLES)[int(rng.integers(len(STYLES)))]
        strength, blur = STYLES[style]
        over_glass = not slide and rng.random() < 0.5
        if over_glass:
            rgb, lab = glass_base(src, size, rng)
        else:
            rgb, lab = tissue_base(src, size, rng, (0.3, 1.0))
        width = rng.uniform(300, 700)
        for _ in range(50):
            # two times in three the stroke's edge crosses the image, else it may cover it
            extent = size * mpp
            off = (width / 2 + rng.uniform(-0.4, 0.4) * extent if rng.random() < 2 / 3
                   else rng.uniform(-1, 1) * width / 2) * rng.choice([-1, 1])
            dens = stroke_density((size, size), mpp, rng, width, blur, off)
            if (dens >= 0.5).mean() > 0.05:
                break
        rgb = apply_ink(rgb, dens, INKS[colour], src.glass, strength)
        lab = ink_labels(lab, dens)
        detail = f"{style}, {'glass' if over_glass else 'tissue'} base"
    else:
        raise ValueError(f"unknown category {category!r}")
    out = to_uint8_jpeg(box_mean(np.asarray(rgb, np.float32), k))
    return Case(category, out, mpp_eval, labels_at(lab, k), detail)


def make_cases(src_by_k: dict[int, Source], scale: str, n: int, seed: int) -> list[Case]:
    """``n`` cases per category at ``scale``, seeded (same seed, same images)."""
    mpp_eval, k, side = SCALES[scale]
    src = src_by_k[1] if scale.startswith("tile") else src_by_k[4]
    out = []
    for ci, cat in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, ci, int(mpp_eval * 1000)])
        out += [make_case(cat, scale, src, rng) for _ in range(n)]
    return out
