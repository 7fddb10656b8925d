"""Synthetic CAMELYON-like pyramidal slides that real OpenSlide reads, for tests and the demo.

The content is a procedural function of level-0 coordinates: a handful of analytic shapes (tissue
islands, tumour regions inside them, pen strokes, a black slide-edge strip) plus hash-placed
nuclei and lattice noise. Any tile of any level is therefore rendered on its own, directly at the
level's resolution, and a slide is written tile by tile: memory does not grow with slide size
(a 100k x 100k px slide needs the same few tens of MB as a 2k one).

Four flavours are written with tifffile, each pyramid level as its own tiled JPEG page
(no SubIFDs, ``subfiletype=1`` on reduced levels), which is what OpenSlide's aperio and
generic-tiff drivers expect:

* ``svs``: Aperio ImageDescription carrying ``MPP`` and ``AppMag`` (vendor ``aperio``).
* ``svs-nompp``: Aperio ImageDescription with ``AppMag`` but no ``MPP``, like some TCGA files:
  only the objective power tells the resolution.
* ``tiff``: generic TIFF with ``ResolutionUnit`` centimeter and X/YResolution in px/cm.
* ``tiff-nompp``: generic TIFF with no physical resolution (unit NONE), like some TCGA files.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import pathlib
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import tifffile

from wsi_prune.errors import ConfigError

_logger = logging.getLogger(__name__)

FLAVOURS = ("svs", "svs-nompp", "tiff", "tiff-nompp")
_MIN_TOP_LEVEL_PX = 1024  # stop the pyramid once the smallest side is at most this

# Colours (RGB 0-255). Stroma is eosin pink, nuclei haematoxylin blue-purple; tumour cytoplasm
# and nuclei are darker so a CNN has something to learn.
_BACKGROUND = np.array([241.0, 240.0, 243.0], np.float32)
_STROMA = np.array([232.0, 162.0, 202.0], np.float32)
_TUMOUR_CYTO = np.array([200.0, 128.0, 186.0], np.float32)
_NUCLEUS_STROMA = np.array([98.0, 66.0, 150.0], np.float32)
_NUCLEUS_TUMOUR = np.array([66.0, 40.0, 122.0], np.float32)
_BORDER = np.array([22.0, 22.0, 26.0], np.float32)
# Pen ink as transmittance (multiplied over what is below); index 0-1 are blue and green.
_INKS = np.array([[40, 72, 190], [36, 150, 78], [46, 46, 52]], np.float32) / 255.0

# Alpha of a shape that covers a whole tile: broadcasts like a full (M, N) alpha.
_FULL = np.ones((1, 1), np.float32)
_FULL.flags.writeable = False

# ASAP's default annotation colour, as in CAMELYON16's lesion files.
_ASAP_COLOUR = "#F4FA58"

# Nuclei layers: (cell side µm, probability of a nucleus per cell, radius range µm).
_STROMA_NUCLEI = (14.0, 0.35, 2.6, 3.8)
_TUMOUR_NUCLEI = (10.0, 0.92, 3.6, 4.6)


@dataclass(frozen=True)
class SynthSpec:
    """Everything that defines a synthetic slide (the same spec always gives the same pixels).

    Attributes:
        width / height: level-0 size, px.
        mpp: level-0 resolution, µm/px.
        flavour: ``svs`` | ``svs-nompp`` | ``tiff`` | ``tiff-nompp``.
        seed: seed of the layout and the texture (>= 0).
        tumour: plant tumour regions (the slide label is then 1).
        n_tumours: number of tumour regions when ``tumour`` is set.
        tumour_radius_um: (min, max) radius of a tumour region, µm. Each lesion's radius is
            drawn log-uniformly in this range, capped at what its island can hold, so one
            slide mixes sizes like CAMELYON's classes: with the default (50, 2500) about a
            third are ITC/small-micro-like (50-200 µm), 40 % micro (200-1000 µm) and a
            quarter macro (> 1000 µm, i.e. > 2 mm across) where the island can hold one:
            the first appear at a slide side of about 10 mm (20k px at 0.5 µm/px), the full
            quarter from about 30 mm. On smaller slides the range shrinks to what the island
            holds (a 2 mm slide gets 50-120 µm lesions), still log-uniform within it.
        pen: draw 1-2 thick pen-ink strokes (blue or green first, maybe black) around tissue.
        border: draw a black slide-edge strip along one side.
        tissue_fraction: approximate fraction of the slide area covered by tissue.
        tile: TIFF tile side, px (multiple of 16).
        quality: JPEG quality, 1-100.
        level_step: downsample factor between pyramid levels (2 or 4).
    """

    width: int = 8192
    height: int = 8192
    mpp: float = 0.5
    flavour: str = "svs"
    seed: int = 0
    tumour: bool = True
    n_tumours: int = 2
    tumour_radius_um: tuple[float, float] = (50.0, 2500.0)
    pen: bool = False
    border: bool = False
    tissue_fraction: float = 0.35
    tile: int = 256
    quality: int = 80
    level_step: int = 2

    def __post_init__(self) -> None:
        # YAML/JSON give lists; the spec must stay hashable and immutable.
        object.__setattr__(self, "tumour_radius_um", tuple(float(r) for r in self.tumour_radius_um))
        checks = [
            (256 <= self.width <= 1_000_000, f"synth.width={self.width} outside 256-1e6 px"),
            (256 <= self.height <= 1_000_000, f"synth.height={self.height} outside 256-1e6 px"),
            (0.05 <= self.mpp <= 20, f"synth.mpp={self.mpp} outside 0.05-20 µm/px"),
            (self.flavour in FLAVOURS, f"synth.flavour={self.flavour!r} not one of {FLAVOURS}"),
            (self.seed >= 0, "synth.seed must be >= 0"),
            (self.n_tumours >= (1 if self.tumour else 0), "synth.n_tumours must be >= 1"),
            (len(self.tumour_radius_um) == 2, "synth.tumour_radius_um must be (min, max) µm"),
            (0.0 < self.tissue_fraction <= 0.6, "synth.tissue_fraction must be in (0, 0.6]"),
            (self.tile >= 16 and self.tile % 16 == 0, "synth.tile must be a multiple of 16"),
            (1 <= self.quality <= 100, "synth.quality must be 1-100"),
            (self.level_step in (2, 4), "synth.level_step must be 2 or 4"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        lo, hi = self.tumour_radius_um
        if not 0 < lo <= hi:
            raise ConfigError(
                f"synth.tumour_radius_um={self.tumour_radius_um} needs 0 < min <= max"
            )

    @property
    def level_shapes(self) -> list[tuple[int, int, int]]:
        """Pyramid levels as ``(width px, height px, downsample)``; level 0 first."""
        shapes, ds = [(self.width, self.height, 1)], 1
        while min(shapes[-1][:2]) > _MIN_TOP_LEVEL_PX:
            ds *= self.level_step
            shapes.append((-(-self.width // ds), -(-self.height // ds), ds))
        return shapes


@dataclass(frozen=True, eq=False)
class SynthSlide:
    """A written synthetic slide and its ground truth.

    Attributes:
        path: the slide file.
        spec: the spec it was written from.
        label: 1 if tumour was planted, else 0.
        tumour_polygons: outlines of tumour regions, each ``(K, 2) float64`` level-0 px (x, y).
    """

    path: pathlib.Path
    spec: SynthSpec
    label: int
    tumour_polygons: list[np.ndarray] = field(default_factory=list)


def _hash32(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Integer hash of lattice coordinates, ``uint32`` of the broadcast shape."""
    h = (ix.astype(np.uint32) * np.uint32(0x9E3779B1)) ^ (
        iy.astype(np.uint32) * np.uint32(0x85EBCA77)
    )
    h ^= np.uint32(salt & 0xFFFFFFFF)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return h


@dataclass(frozen=True)
class _Blob:
    """A rotated ellipse with a wavy outline: inside where ``rho < 1 + sum amp cos(k t + ph)``.

    ``rho`` is the radius in the ellipse's normalised frame; coordinates are level-0 px.
    """

    cx: float
    cy: float
    a: float
    b: float
    angle: float
    amps: tuple[float, ...]
    phases: tuple[float, ...]

    @property
    def extent(self) -> float:
        """Largest distance of the outline from the centre, level-0 px."""
        return max(self.a, self.b) * (1.0 + sum(self.amps))

    @property
    def inradius(self) -> float:
        """Every point this close to the centre is inside, level-0 px."""
        return min(self.a, self.b) * (1.0 - sum(self.amps))

    def _wave(self, t: np.ndarray) -> np.ndarray:
        w = np.ones_like(t)
        for k, (amp, ph) in enumerate(zip(self.amps, self.phases, strict=True), start=2):
            w += amp * np.cos(k * t + ph)
        return w

    def signed_dist(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Approximate signed distance to the outline (positive inside), level-0 px.

        Args:
            x: ``(1, N)`` level-0 x; y: ``(M, 1)`` level-0 y (any broadcastable shapes).
        """
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx = (x - self.cx).astype(np.float32)
        dy = (y - self.cy).astype(np.float32)
        u = (dx * c + dy * s) / self.a
        v = (dy * c - dx * s) / self.b
        rho = np.sqrt(u * u + v * v)
        wave = self._wave(np.arctan2(v, u))
        return (wave - rho) / wave * math.sqrt(self.a * self.b)

    def outline(self, k: int = 128) -> np.ndarray:
        """The outline as a ``(k, 2) float64`` polygon of level-0 px (x, y)."""
        t = np.linspace(0.0, 2 * np.pi, k, endpoint=False)
        w = self._wave(t)
        u, v = w * np.cos(t) * self.a, w * np.sin(t) * self.b
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.cx + u * c - v * s, self.cy + u * s + v * c], axis=1)

    def bbox(self, pad: float = 0.0) -> tuple[float, float, float, float]:
        e = self.extent + pad
        return self.cx - e, self.cy - e, self.cx + e, self.cy + e

    def cover(self, box: tuple[float, float, float, float], edge: float) -> int:
        """1 if every point of ``box`` has alpha 1, -1 if every point has alpha 0, else 0.

        From bounds on :meth:`signed_dist` at distance ``r`` from the centre:
        ``(1 - r / inradius) k <= sd <= (1 - r / extent) k`` with ``k = sqrt(a b)``; alpha is
        clipped to 1 (0) once ``sd >= edge / 2`` (``<= -edge / 2``). Interior tiles of a large
        island then skip the per-pixel outline, which is most of the work on a 100k px slide.
        """
        x0, y0, x1, y1 = box
        far = math.hypot(max(abs(x0 - self.cx), abs(x1 - self.cx)),
                         max(abs(y0 - self.cy), abs(y1 - self.cy)))
        near = math.hypot(max(x0 - self.cx, 0.0, self.cx - x1),
                          max(y0 - self.cy, 0.0, self.cy - y1))
        slack = edge / math.sqrt(self.a * self.b)  # twice what the bound needs
        if far <= self.inradius * (1.0 - slack):
            return 1
        if near >= self.extent * (1.0 + slack):
            return -1
        return 0


@dataclass(frozen=True)
class _Stroke:
    """A thick pen arc around a centre: radius ``r0 (1 + 0.04 sin(3t + ph))``, angles a0..a1."""

    cx: float
    cy: float
    r0: float
    width: float
    a0: float
    span: float
    phase: float
    ink: int

    def signed_dist(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx = (x - self.cx).astype(np.float32)
        dy = (y - self.cy).astype(np.float32)
        t = np.mod(np.arctan2(dy, dx) - self.a0, 2 * np.pi)
        r = self.r0 * (1.0 + 0.04 * np.sin(3 * t + self.phase))
        d = self.width / 2 - np.abs(np.sqrt(dx * dx + dy * dy) - r)
        return np.where(t <= self.span, d, -1e6).astype(np.float32)

    def bbox(self, pad: float = 0.0) -> tuple[float, float, float, float]:
        e = self.r0 * 1.04 + self.width + pad
        return self.cx - e, self.cy - e, self.cx + e, self.cy + e


def _hits(box: tuple[float, float, float, float], x0: float, y0: float, x1: float, y1: float):
    return box[0] < x1 and box[2] > x0 and box[1] < y1 and box[3] > y0


def _random_blob(rng: np.random.Generator, cx: float, cy: float, r: float, wav: float) -> _Blob:
    aspect = math.sqrt(rng.uniform(0.7, 1.4))
    amps = rng.uniform(0.2, 1.0, 4)
    amps = amps / amps.sum() * wav
    return _Blob(
        cx, cy, r * aspect, r / aspect, float(rng.uniform(0, np.pi)),
        tuple(float(a) for a in amps), tuple(float(p) for p in rng.uniform(0, 2 * np.pi, 4)),
    )  # fmt: skip


# Largest extent / radius of a tumour blob: aspect up to 1/sqrt(0.7) and a wave of up to 0.15
# (see _random_blob and the draw in _Layout).
_TUMOUR_EXTENT_PER_RADIUS = 1.0 / math.sqrt(0.7) * 1.15


def _lesion_radius_um(spec: SynthSpec, u: float, island_inradius: float) -> float:
    """A lesion radius, µm: ``u`` in [0, 1) mapped log-uniformly onto ``tumour_radius_um``,
    the range first capped at the largest lesion its island holds (extent <= 0.6 inradius).

    Capping the range rather than the draw keeps sizes varied on small slides, where a plain
    clip would turn every large draw into the same island-filling lesion.
    """
    lo, hi = spec.tumour_radius_um
    cap = 0.6 * island_inradius * spec.mpp / _TUMOUR_EXTENT_PER_RADIUS
    hi = min(hi, cap)
    if hi <= lo:
        return hi  # not even the smallest size fits: the largest that does
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


class _Layout:
    """The analytic layout of one slide (level-0 px) and its texture parameters."""

    def __init__(self, spec: SynthSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0x5EED])
        w, h, side = spec.width, spec.height, min(spec.width, spec.height)
        self.border_side = int(rng.integers(4))  # 0 left, 1 right, 2 top, 3 bottom
        self.border_w = 0.04 * side if spec.border else 0.0
        self.border_phase = float(rng.uniform(0, 2 * np.pi))
        # Tissue islands: areas share the target fraction, then shrink until they fit with room
        # for a pen ring and the border strip.
        n_isl = int(rng.integers(1, 4))
        shares = rng.uniform(0.6, 1.4, n_isl)
        shares /= shares.sum()
        fit = 1.3 if spec.pen else 1.05
        self.islands: list[_Blob] = []
        for share in shares:
            r = math.sqrt(spec.tissue_fraction * w * h * share / np.pi)
            proto = _random_blob(rng, 0.0, 0.0, r, float(rng.uniform(0.1, 0.2)))
            limit = (side / 2 - self.border_w * 1.3) / fit
            r *= min(1.0, limit / proto.extent)
            proto = _random_blob(rng, 0.0, 0.0, r, sum(proto.amps))
            margin = proto.extent * fit + self.border_w * 1.3
            cx, cy = w / 2, h / 2
            for _ in range(200):  # rejection sampling for non-overlapping islands
                cx = float(rng.uniform(margin, max(margin, w - margin)))
                cy = float(rng.uniform(margin, max(margin, h - margin)))
                if all(
                    math.hypot(cx - o.cx, cy - o.cy) > o.extent + proto.extent for o in self.islands
                ):
                    break
            self.islands.append(dataclasses.replace(proto, cx=cx, cy=cy))
        # Tumours sit well inside an island (centre offset + extent < 0.9 inradius), so their
        # polygons are tissue by construction.
        self.tumours: list[_Blob] = []
        if spec.tumour:
            areas = np.array([isl.a * isl.b for isl in self.islands])
            for _ in range(spec.n_tumours):
                isl = self.islands[int(rng.choice(len(self.islands), p=areas / areas.sum()))]
                r = _lesion_radius_um(spec, float(rng.uniform()), isl.inradius) / spec.mpp
                t = _random_blob(rng, 0.0, 0.0, r, float(rng.uniform(0.05, 0.15)))
                scale = min(1.0, 0.6 * isl.inradius / t.extent)
                t = _random_blob(rng, 0.0, 0.0, r * scale, sum(t.amps))
                room = max(0.0, 0.9 * isl.inradius - t.extent)
                off, ang = rng.uniform(0, room), rng.uniform(0, 2 * np.pi)
                cx, cy = isl.cx + off * math.cos(ang), isl.cy + off * math.sin(ang)
                self.tumours.append(dataclasses.replace(t, cx=cx, cy=cy))
        # Pen strokes circle an island, on one of the sides where the arc stays on the slide.
        self.strokes: list[_Stroke] = []
        if spec.pen:
            width = max(0.015 * side, 60.0 / spec.mpp)
            starts = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            for i in range(1 + int(rng.integers(2))):
                isl = self.islands[int(rng.integers(len(self.islands)))]
                r0 = isl.extent * 1.1 + width
                span = float(rng.uniform(0.6, 1.1) * np.pi)
                t = starts[:, None] + np.linspace(0, span, 32)[None, :]
                px, py = isl.cx + r0 * np.cos(t), isl.cy + r0 * np.sin(t)
                on_slide = (px > width) & (px < w - width) & (py > width) & (py < h - width)
                frac = on_slide.mean(axis=1)
                a0 = float(rng.choice(starts[frac >= 0.9 * frac.max()]))
                ink = int(rng.integers(2)) if i == 0 else int(rng.integers(3))
                phase = float(rng.uniform(0, 2 * np.pi))
                self.strokes.append(_Stroke(isl.cx, isl.cy, r0, width, a0, span, phase, ink))
        self.salt = int(rng.integers(1, 2**31))
        self.noise = rng.uniform(-1.0, 1.0, (512, 512)).astype(np.float32)

    # --- analytic fields, each ``(M, N) float32`` alpha in [0, 1] or None if absent ------------

    @staticmethod
    def _alpha(shapes: list[_Blob], x, y, box, edge: float) -> np.ndarray | None:
        """Union of the blobs' alphas; ``None`` where none reaches the box, and the ``(1, 1)``
        array :data:`_FULL` where one covers it entirely (callers skip blending then)."""
        out = None
        for shp in shapes:
            if not _hits(shp.bbox(edge), *box):
                continue
            cover = shp.cover(box, edge)
            if cover == 1:
                return _FULL
            if cover == -1:
                continue
            a = np.clip(shp.signed_dist(x, y) / edge + 0.5, 0.0, 1.0)
            if a.max() <= 0.0:
                continue
            out = a if out is None else np.maximum(out, a)
        return out

    def tissue(self, x, y, box, edge):
        return self._alpha(self.islands, x, y, box, edge)

    def tumour(self, x, y, box, edge):
        return self._alpha(self.tumours, x, y, box, edge)

    def border(self, x, y, box, edge) -> np.ndarray | None:
        if not self.border_w:
            return None
        w, h, bw = self.spec.width, self.spec.height, self.border_w
        # Distance of the tile from the bordered side decides whether to evaluate at all.
        near = (box[0], w - box[2], box[1], h - box[3])[self.border_side]
        if near > bw * 1.3 + edge:
            return None
        along, across = ((y, x), (y, w - x), (x, y), (x, h - y))[self.border_side]
        limit = bw * (1.0 + 0.25 * np.sin(along * (2 * np.pi / (bw * 12)) + self.border_phase))
        return np.clip((limit - across).astype(np.float32) / edge + 0.5, 0.0, 1.0)

    def pen(self, x, y, box, edge) -> tuple[np.ndarray, np.ndarray] | None:
        """Pen alpha ``(M, N)`` and the ink transmittance ``(M, N, 3)`` under it."""
        alpha, trans = None, None
        for st in self.strokes:
            if _hits(st.bbox(edge), *box):
                a = np.clip(st.signed_dist(x, y) / edge + 0.5, 0.0, 1.0) * 0.95
                if alpha is None:
                    alpha, trans = a, np.broadcast_to(_INKS[st.ink], (*a.shape, 3)).copy()
                else:
                    trans = np.where((a > alpha)[..., None], _INKS[st.ink], trans)
                    alpha = np.maximum(alpha, a)
        return None if alpha is None else (alpha, trans)


def _value_noise(x_um: np.ndarray, y_um: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Smooth lattice noise in [-1, 1], ``(M, N) float32``, from 1-D coordinates in µm.

    Bilinear interpolation is separable, so the field is two small matrix products.
    """

    def weights(t: np.ndarray) -> tuple[np.ndarray, int]:
        g = t / scale
        i = np.floor(g).astype(np.int64)
        f = (g - i).astype(np.float32)
        f = f * f * (3 - 2 * f)
        i0 = int(i.min())
        m = np.zeros((len(t), int(i.max()) - i0 + 2), np.float32)
        rows = np.arange(len(t))
        m[rows, i - i0] = 1 - f
        m[rows, i - i0 + 1] = f
        return m, i0

    wx, ix0 = weights(x_um)
    wy, iy0 = weights(y_um)
    gx = np.arange(ix0, ix0 + wx.shape[1])[None, :]
    gy = np.arange(iy0, iy0 + wy.shape[1])[:, None]
    lattice = (_hash32(gx, gy, salt) >> np.uint32(8)).astype(np.float32) * (2.0 / 2**24) - 1.0
    return wy @ lattice @ wx.T


def _cell_params(gx: np.ndarray, gy: np.ndarray, layer: tuple, salt: int):
    """Disc centre x, y and radius (µm; radius -100 where the cell holds no disc) of the grid
    cells ``(gx, gy)``, three ``float32`` arrays of their broadcast shape.

    Each cell's hash gives presence, radius and a jitter that keeps the disc inside its cell.
    """
    cell, prob, rmin, rmax = layer
    h = _hash32(gx, gy, salt)
    byte = [
        ((h >> np.uint32(8 * k)) & np.uint32(0xFF)).astype(np.float64) / 255.0 for k in range(4)
    ]
    r = rmin + (rmax - rmin) * byte[1]
    margin = r + 0.3
    ncx = gx * cell + margin + byte[2] * (cell - 2 * margin)
    ncy = gy * cell + margin + byte[3] * (cell - 2 * margin)
    r = np.where(byte[0] < prob, r, -100.0)
    return ncx.astype(np.float32), ncy.astype(np.float32), r.astype(np.float32)


def _nuclei(x_um: np.ndarray, y_um: np.ndarray, layer: tuple, edge_um: float, salt: int,
            rows_per_chunk: int = 128) -> np.ndarray:
    """Coverage ``(M, N) float32`` of hash-placed discs, at most one per grid cell.

    A pixel only ever looks at its own cell, so any tile renders independently. Fine levels
    evaluate each cell once and gather; on coarse levels of a large slide a tile spans more
    cells than it has samples (a 256 px tile at 64 µm/px covers ~1200² cells of 14 µm), so each
    sample evaluates its own cell instead. Either way the work runs in chunks of rows, which
    keeps temporaries at a few MB whatever the level.
    """
    cell = layer[0]
    cx = np.floor(x_um / cell).astype(np.int64)
    cy = np.floor(y_um / cell).astype(np.int64)
    xs, ys = x_um.astype(np.float32)[None, :], y_um.astype(np.float32)[:, None]
    n_cells = (int(cx.max() - cx.min()) + 1) * (int(cy.max() - cy.min()) + 1)
    by_cell = n_cells <= len(cx) * len(cy)
    if by_cell:
        gx0, gy0 = int(cx.min()), int(cy.min())
        grid = _cell_params(np.arange(gx0, cx.max() + 1)[None, :],
                            np.arange(gy0, cy.max() + 1)[:, None], layer, salt)
        ix = (cx - gx0)[None, :]
    out = np.empty((len(y_um), len(x_um)), np.float32)
    for r0 in range(0, len(y_um), rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        if by_cell:
            iy = (cy[rows] - gy0)[:, None]
            px, py, pr = (g[iy, ix] for g in grid)
        else:
            px, py, pr = _cell_params(cx[None, :], cy[rows, None], layer, salt)
        dx = xs - px
        dy = ys[rows] - py
        out[rows] = np.clip((pr - np.sqrt(dx * dx + dy * dy)) / edge_um + 0.5, 0.0, 1.0)
    return out


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t[..., None]


def render_tile(layout: _Layout, downsample: int, col0: int, row0: int, tw: int, th: int):
    """Render pixels ``[row0, row0+th) x [col0, col0+tw)`` of the level with this downsample.

    Coarse levels are supersampled (samples never more than ~1 µm apart up to 4x4 per pixel)
    so their mean colour matches a downsampled level 0.

    Returns:
        ``(th, tw, 3) uint8`` RGB.
    """
    spec = layout.spec
    px_um = downsample * spec.mpp
    s = int(min(4, max(1, math.ceil(px_um / 1.0))))
    # Level-0 px coordinates of the sample centres (1-D; fields broadcast them).
    xs = (col0 + (np.arange(tw * s) + 0.5) / s) * downsample
    ys = (row0 + (np.arange(th * s) + 0.5) / s) * downsample
    x, y = xs[None, :], ys[:, None]
    box = (col0 * downsample, row0 * downsample, (col0 + tw) * downsample, (row0 + th) * downsample)
    edge = downsample / s  # soft edges one sample wide, level-0 px
    edge_um = edge * spec.mpp
    out = np.broadcast_to(_BACKGROUND, (th * s, tw * s, 3)).copy()

    tissue = layout.tissue(x, y, box, edge)
    if tissue is not None:
        x_um, y_um = xs * spec.mpp, ys * spec.mpp
        salt = layout.salt
        tex = 0.07 * _value_noise(x_um, y_um, 40.0, salt + 1)
        tex += 0.05 * _value_noise(x_um, y_um, 9.0, salt + 2)
        tumour = layout.tumour(x, y, box, edge)
        if tumour is _FULL:  # inside a tumour: no stroma to blend with
            col = _TUMOUR_CYTO * (1.0 + tex)[..., None]
            cov = _nuclei(x_um, y_um, _TUMOUR_NUCLEI, edge_um, salt + 4)
            ncol = np.broadcast_to(_NUCLEUS_TUMOUR, col.shape)
        else:
            col = _STROMA * (1.0 + tex)[..., None]
            cov = _nuclei(x_um, y_um, _STROMA_NUCLEI, edge_um, salt + 3)
            ncol = np.broadcast_to(_NUCLEUS_STROMA, col.shape)
        if tumour is not None and tumour is not _FULL:
            col = _lerp(col, _TUMOUR_CYTO * (1.0 + tex)[..., None], tumour)
            cov_t = _nuclei(x_um, y_um, _TUMOUR_NUCLEI, edge_um, salt + 4)
            cov = cov + (cov_t - cov) * tumour
            ncol = _lerp(ncol, np.broadcast_to(_NUCLEUS_TUMOUR, col.shape), tumour)
        col = _lerp(col, ncol, cov)
        out = col if tissue is _FULL else _lerp(out, col, tissue)
    pen = layout.pen(x, y, box, edge)
    if pen is not None:
        alpha, trans = pen
        out *= 1.0 - alpha[..., None] * (1.0 - trans)
    border = layout.border(x, y, box, edge)
    if border is not None:
        out = _lerp(out, _BORDER, border)
    if s > 1:
        out = out.reshape(th, s, tw, s, 3).mean(axis=(1, 3))
    # Fine grain per output pixel; the offset per level keeps levels from sharing a pattern.
    off = 97 * downsample.bit_length()
    grain = layout.noise[np.ix_((np.arange(th) + row0 + off) % 512, (np.arange(tw) + col0) % 512)]
    out += 3.0 * grain[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _prefetch(fn: Callable, items: list, workers: int) -> Iterator[np.ndarray]:
    """``map(fn, items)`` in order, computed by threads with a bounded look-ahead."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        it = iter(items)
        window = deque(pool.submit(fn, item) for item in islice(it, 2 * workers))
        while window:
            fut = window.popleft()
            nxt = next(it, None)
            if nxt is not None:
                window.append(pool.submit(fn, nxt))
            yield fut.result()


def _aperio_description(spec: SynthSpec, path: pathlib.Path) -> str:
    w, h, t = spec.width, spec.height, spec.tile
    app_mag = 40 if spec.mpp < 0.35 else 20
    mpp = "" if spec.flavour == "svs-nompp" else f"|MPP = {spec.mpp:.6g}"
    return (
        f"Aperio Image Library v12.0.0 \n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) JPEG/RGB Q={spec.quality}"
        f"|AppMag = {app_mag}|Filename = {path.stem}{mpp}"
    )


def write_slide(path: str | os.PathLike[str], spec: SynthSpec, workers: int = 2) -> SynthSlide:
    """Write a synthetic pyramidal slide, tile by tile, in bounded memory.

    The file is written next to ``path`` and renamed into place, so a crash leaves no half slide.

    Args:
        path: output file (``.svs`` or ``.tif``; the flavour decides the format, not the suffix).
        spec: what to draw.
        workers: threads rendering tiles ahead of the JPEG encoder.

    Returns:
        The slide with its label and tumour polygons (level-0 px).
    """
    path = pathlib.Path(path)
    layout = _Layout(spec)
    levels = spec.level_shapes
    t = spec.tile
    raw = spec.width * spec.height * 3
    tmp = path.with_name(f".{path.name}.partial")
    start = time.perf_counter()
    try:
        # Classic TIFF offsets are 32-bit: switch to BigTIFF well before compressed data nears 4 GB.
        with tifffile.TiffWriter(tmp, bigtiff=raw > 2**31) as tif:
            for li, (lw, lh, ds) in enumerate(levels):
                tiles = [(c, r) for r in range(0, lh, t) for c in range(0, lw, t)]
                _logger.info("%s: level %d/%d %dx%d px (%d tiles)", path.name, li + 1,
                             len(levels), lw, lh, len(tiles))  # fmt: skip
                kwargs: dict = {}
                if li == 0 and spec.flavour in ("svs", "svs-nompp"):
                    kwargs["description"] = _aperio_description(spec, path)
                if spec.flavour == "tiff":
                    px_per_cm = 10_000.0 / (spec.mpp * ds)
                    kwargs.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
                else:
                    kwargs.update(resolution=(1.0, 1.0), resolutionunit="NONE")

                def render(cr: tuple[int, int], ds: int = ds) -> np.ndarray:
                    return render_tile(layout, ds, cr[0], cr[1], t, t)

                # maxworkers=1: tifffile would otherwise buffer up to 512 MB of tiles to
                # compress them in parallel; our look-ahead threads render instead.
                tif.write(
                    _prefetch(render, tiles, workers),
                    shape=(lh, lw, 3),
                    dtype=np.uint8,
                    tile=(t, t),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": spec.quality},
                    subfiletype=1 if li else 0,
                    metadata=None,
                    software=False,
                    maxworkers=1,
                    **kwargs,
                )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _logger.info("%s: written in %.1f s", path, time.perf_counter() - start)
    label = int(spec.tumour and spec.n_tumours > 0)
    return SynthSlide(path, spec, label, [b.outline() for b in layout.tumours])


def _mask(spec: SynthSpec, mpp: float, fn: Callable, rows_per_chunk: int = 256) -> np.ndarray:
    """Evaluate ``fn(layout, x, y, box, edge) -> alpha | None`` at mask pixel centres (> 0.5)."""
    if not 0 < mpp <= 1000:
        raise ConfigError(f"mask mpp={mpp} must be in (0, 1000] µm/px")
    layout = _Layout(spec)
    f = mpp / spec.mpp  # level-0 px per mask px
    w = max(1, math.ceil(spec.width / f - 1e-9))
    h = max(1, math.ceil(spec.height / f - 1e-9))
    xs = (np.arange(w) + 0.5) * f
    out = np.zeros((h, w), bool)
    # Edge of a tenth of a mask pixel: nearly binary, and in row chunks so temporaries stay
    # small even for a fine mask of a huge slide.
    edge = max(f * 0.1, 1e-3)
    for r0 in range(0, h, rows_per_chunk):
        ys = (np.arange(r0, min(h, r0 + rows_per_chunk)) + 0.5) * f
        box = (0.0, float(ys[0]) - f, float(spec.width), float(ys[-1]) + f)
        a = fn(layout, xs[None, :], ys[:, None], box, edge)
        if a is not None:
            out[r0 : r0 + len(ys)] = np.broadcast_to(a > 0.5, (len(ys), w))
    return out


def tumour_mask(spec: SynthSpec, mpp: float) -> np.ndarray:
    """Ground-truth tumour regions, ``(H, W) bool`` at ``mpp`` µm/px (H = ceil(height px / f)).

    Tumours are placed well inside tissue islands, so the mask lies inside
    :func:`tissue_truth` unless a pen stroke crosses it.
    """
    return _mask(spec, mpp, lambda lay, x, y, box, e: lay.tumour(x, y, box, e))


def pen_mask(spec: SynthSpec, mpp: float) -> np.ndarray:
    """Where pen ink was drawn, ``(H, W) bool`` at ``mpp`` µm/px."""

    def fn(lay, x, y, box, e):
        p = lay.pen(x, y, box, e)
        return None if p is None else p[0] / 0.95

    return _mask(spec, mpp, fn)


def border_mask(spec: SynthSpec, mpp: float) -> np.ndarray:
    """Where the black slide-edge strip was drawn, ``(H, W) bool`` at ``mpp`` µm/px."""
    return _mask(spec, mpp, lambda lay, x, y, box, e: lay.border(x, y, box, e))


def tissue_truth(spec: SynthSpec, mpp: float) -> np.ndarray:
    """Where tissue was drawn and is visible (not under pen or border), ``(H, W) bool``."""
    tissue = _mask(spec, mpp, lambda lay, x, y, box, e: lay.tissue(x, y, box, e))
    if spec.pen:
        tissue &= ~pen_mask(spec, mpp)
    if spec.border:
        tissue &= ~border_mask(spec, mpp)
    return tissue


def write_asap_xml(
    path: str | os.PathLike[str],
    polygons: Sequence[np.ndarray] | SynthSpec,
    group: str = "Tumor",
) -> pathlib.Path:
    """Write polygons as an ASAP annotation file, the format of CAMELYON16's lesion XMLs.

    One ``<Annotation Type="Polygon" PartOfGroup=group>`` per polygon, coordinates in level-0
    px, and one ``<Group Name=group>``. Written next to ``path`` and renamed into place.

    Args:
        path: output ``.xml`` file.
        polygons: outlines, each ``(K, 2)`` level-0 px (x, y) with K >= 3; or a
            :class:`SynthSpec`, whose planted tumour outlines are written (what
            :func:`write_slide` returns as ``tumour_polygons``, without rendering the slide).
        group: annotation group (``Tumor``, or CAMELYON16's ``_0``/``_1``/``_2``).

    Returns:
        ``path``.
    """
    path = pathlib.Path(path)
    if isinstance(polygons, SynthSpec):
        polygons = [b.outline() for b in _Layout(polygons).tumours]
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    for i, poly in enumerate(polygons):
        poly = np.asarray(poly, np.float64)
        if poly.ndim != 2 or poly.shape[1] != 2 or len(poly) < 3 or not np.isfinite(poly).all():
            raise ConfigError(f"polygon {i} must be (K >= 3, 2) finite level-0 px, "
                              f"got shape {poly.shape}", path)  # fmt: skip
        ann = ET.SubElement(anns, "Annotation", Name=f"Annotation {i}", Type="Polygon",
                            PartOfGroup=group, Color=_ASAP_COLOUR)  # fmt: skip
        coords = ET.SubElement(ann, "Coordinates")
        for k, (x, y) in enumerate(poly):
            ET.SubElement(coords, "Coordinate", Order=str(k), X=f"{x:.2f}", Y=f"{y:.2f}")
    groups = ET.SubElement(root, "AnnotationGroups")
    grp = ET.SubElement(groups, "Group", Name=group, PartOfGroup="None", Color=_ASAP_COLOUR)
    ET.SubElement(grp, "Attributes")
    ET.indent(root, space="\t")
    tmp = path.with_name(f".{path.name}.partial")
    try:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_dataset(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    size: int = 8192,
    tumour_fraction: float = 0.5,
    **spec_overrides,
) -> list[SynthSlide]:
    """Write ``n`` square slides and a CAMELYON16-style ``labels.csv`` (``slide,label``).

    Exactly ``round(n * tumour_fraction)`` slides get tumour, at positions drawn from ``seed``;
    each slide has its own seed derived from ``(seed, index)``. Labels are ``Tumor``/``Normal``.
    Each tumour slide ``synth_<i>.<ext>`` gets its lesion outlines in ``synth_<i>.xml`` (ASAP
    format, group ``Tumor``, level-0 px; see :func:`write_asap_xml`), as CAMELYON16 ships them.

    Args:
        out_dir: created if missing.
        n: number of slides (>= 1).
        seed: dataset seed.
        size: side of each slide, level-0 px.
        tumour_fraction: fraction of tumour slides, in [0, 1].
        **spec_overrides: any other :class:`SynthSpec` field (``mpp``, ``flavour``, ``pen``...).
    """
    if n < 1 or not 0.0 <= tumour_fraction <= 1.0:
        raise ConfigError(f"write_dataset needs n >= 1 and tumour_fraction in [0, 1], got "
                          f"n={n}, tumour_fraction={tumour_fraction}")  # fmt: skip
    bad = {"width", "height", "seed", "tumour"} & spec_overrides.keys()
    if bad:
        raise ConfigError(f"write_dataset sets {sorted(bad)} itself")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0xDA7A])
    positive = set(rng.permutation(n)[: round(n * tumour_fraction)].tolist())
    slides = []
    for i in range(n):
        slide_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        spec = SynthSpec(width=size, height=size, seed=slide_seed, tumour=i in positive,
                         **spec_overrides)  # fmt: skip
        ext = ".svs" if spec.flavour.startswith("svs") else ".tif"
        slide = write_slide(out / f"synth_{i:03d}{ext}", spec)
        xml = slide.path.with_suffix(".xml")
        if slide.label:
            write_asap_xml(xml, slide.tumour_polygons)
        else:
            xml.unlink(missing_ok=True)  # a stale annotation from an earlier set in this folder
        slides.append(slide)
    tmp = out / ".labels.csv.partial"
    with tmp.open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["slide", "label"])
        for s in slides:
            wr.writerow([s.path.stem, "Tumor" if s.label else "Normal"])
    os.replace(tmp, out / "labels.csv")
    return slides
