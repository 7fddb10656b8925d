"""The layout of a synthetic slide: the analytic shapes of its content (tissue islands, tumour
regions inside them, pen strokes, a black slide-edge strip), placed from the spec's seed, and
the lattice hash that places nuclei and noise.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from wsi_prune.synth.spec import SynthSpec

# Pen ink as transmittance (multiplied over what is below); index 0-1 are blue and green.
_INKS = np.array([[40, 72, 190], [36, 150, 78], [46, 46, 52]], np.float32) / 255.0

# Alpha of a shape that covers a whole tile: broadcasts like a full (M, N) alpha.
_FULL = np.ones((1, 1), np.float32)
_FULL.flags.writeable = False


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
