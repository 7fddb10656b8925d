"""CAMELYON16-like lesions of texture slides: their sizes, shapes, places and how tumorous they
look, plus the tumour-like mimics (hard negatives) of normal tissue.

Sizes follow the pN classes by longest diameter: isolated tumour cells (ITC, < 0.2 mm),
micro- (0.2-2 mm) and macro-metastases (> 2 mm). A tumour slide holds 1-4 micro or macro
lesions, at least one of each slide being micro or macro by construction, plus 0-3 ITCs as
CAMELYON16's slides do. Whether a lesion *counts* in FROC is decided separately, by the
evaluation's own rule (:func:`wsi_prune.io.annotations.evaluation_mask`: ITC when the major
axis of the 75 µm-dilated mask is under 275 µm), so the two can be compared.

How tumorous a region looks is a *grade* g >= 0 mapped to five effects (:class:`Effects`),
each jittered on its own, so no single feature separates tumour from normal:

* ``density``: shift of the texture quantile towards the bank's denser, more cellular patches;
* ``growth``: blend towards a grey dilation of the haematoxylin channel (larger nuclei);
* ``gain``: haematoxylin multiplier inside nuclei (hyperchromasia);
* ``chromatin``: coarse clumped noise inside nuclei;
* ``stain``: H up and E down over the whole region (a purple shift).

Tumour grades are drawn around ``1 - 0.75 difficulty``; mimics ("germinal-centre-like" dense
regions) take a dense texture and nuclear effects from the upper tail of normal tissue's grade,
around ``0.15 + 0.3 difficulty``. Normal tissue's own variation (the texture-density field and
stain field of :mod:`wsi_prune.synth.texture_render`) overlaps both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from wsi_prune.io.annotations import ITC_UM, MACRO_UM, Annotation, evaluation_mask
from wsi_prune.io.annotations import size_class as annotation_size_class
from wsi_prune.synth.layout import _Blob, _random_blob

ITC_MAX_UM = ITC_UM  # longest diameter below this: isolated tumour cells
MICRO_MAX_UM = MACRO_UM  # up to this: micrometastasis; above: macrometastasis
SIZE_CLASSES = ("ITC", "micro", "macro")

_ITC_UM = (30.0, 190.0)  # diameter ranges drawn per class, µm (log-uniform)
_MICRO_UM = (ITC_MAX_UM, MICRO_MAX_UM)
_MACRO_UM = (MICRO_MAX_UM, 5000.0)
_MIMIC_UM = (150.0, 800.0)
_GAP_UM = 120.0  # between regions: more than the 75 µm the evaluation dilates them by
_EDGE_UM = 25.0  # a region stays this far inside its tissue island


def size_class(diameter_um: float) -> str:
    """``ITC`` (< 200 µm), ``micro`` (200-2000 µm) or ``macro`` (> 2000 µm): the evaluation's
    rule (:func:`wsi_prune.io.annotations.size_class`), spelled as the dataset files do."""
    cls = annotation_size_class(diameter_um)
    return "ITC" if cls == "itc" else cls


@dataclass(frozen=True)
class Effects:
    """How a region differs from the normal tissue around it (all 0 = normal).

    Attributes:
        density: added to the texture quantile, [0, 1) (1 = always the densest patch).
        growth: blend, [0, 1], towards the haematoxylin channel dilated by 1.5 µm.
        gain: relative haematoxylin increase inside nuclei (0.5 = 50 % darker OD).
        chromatin: amplitude of clumped noise inside nuclei, H concentration units.
        h_shift / e_shift: relative change of H / E concentration over the whole region.
    """

    density: float = 0.0
    growth: float = 0.0
    gain: float = 0.0
    chromatin: float = 0.0
    h_shift: float = 0.0
    e_shift: float = 0.0


def draw_effects(rng: np.random.Generator, grade: float, density_grade: float | None = None
                 ) -> Effects:
    """The effects of a region of ``grade`` (each jittered log-normally, sigma 0.3).

    Args:
        grade: nuclear and stain grade, >= 0 (1 = a clearly tumorous region).
        density_grade: grade of the texture-density shift (default ``grade``).
    """
    def j(x: float) -> float:
        return max(0.0, x) * math.exp(rng.normal(0.0, 0.3))

    dg = grade if density_grade is None else density_grade
    return Effects(density=min(0.9, j(0.5 * dg)), growth=min(1.0, j(0.8 * grade)),
                   gain=j(0.45 * grade), chromatin=j(0.25 * grade), h_shift=j(0.15 * grade),
                   e_shift=-min(0.5, j(0.12 * grade)))  # fmt: skip


@dataclass(frozen=True)
class Region:
    """A planted lesion or mimic.

    Attributes:
        shape: its outline (a wavy rotated ellipse), level-0 px.
        kind: ``ITC`` | ``micro`` | ``macro`` (tumour, by :attr:`diameter_um`) or ``mimic``.
        diameter_um: longest diameter of the outline, µm.
        grade: the grade its effects were drawn from.
        effects: how it looks.
        countable: a tumour lesion the CAMELYON16 FROC counts (not an ITC under its rule).
        salt: seed of its own texture layer.
    """

    shape: _Blob
    kind: str
    diameter_um: float
    grade: float
    effects: Effects
    countable: bool = False
    salt: int = 0

    @property
    def tumour(self) -> bool:
        return self.kind != "mimic"

    @property
    def centre_xy(self) -> tuple[float, float]:
        """Centre, level-0 px (inside the region)."""
        return self.shape.cx, self.shape.cy

    def polygon(self, k: int = 128) -> np.ndarray:
        """Outline, ``(k, 2) float64`` level-0 px (x, y)."""
        return self.shape.outline(k)


def feret_px(poly: np.ndarray) -> float:
    """Longest distance between two vertices of ``(K, 2)`` ``poly``, px."""
    d = poly[:, None, :] - poly[None, :, :]
    return float(np.sqrt((d * d).sum(-1)).max())


def tumour_diameters_um(rng: np.random.Generator, n_lesions: int, n_itc: int) -> list[float]:
    """Diameters, µm, of ``n_lesions`` micro/macro lesions (the first macro with probability
    0.5, the others 0.2; sizes log-uniform within the class) and ``n_itc`` ITCs."""
    def loguni(lo_hi: tuple[float, float]) -> float:
        return math.exp(rng.uniform(math.log(lo_hi[0]), math.log(lo_hi[1])))

    out = [loguni(_MACRO_UM if rng.uniform() < (0.5 if i == 0 else 0.2) else _MICRO_UM)
           for i in range(n_lesions)]  # fmt: skip
    return out + [loguni(_ITC_UM) for _ in range(n_itc)]


def mimic_diameters_um(rng: np.random.Generator, n: int) -> list[float]:
    """Diameters, µm, of ``n`` germinal-centre-like mimics (log-uniform 0.15-0.8 mm)."""
    return [math.exp(rng.uniform(*np.log(_MIMIC_UM))) for _ in range(n)]


def place(rng: np.random.Generator, islands: list[_Blob], diameters_um: list[float], mpp: float,
          taken: list[_Blob], wave: tuple[float, float] = (0.05, 0.2)) -> list[_Blob | None]:
    """Place one wavy blob per diameter inside the islands, clear of ``taken`` and each other.

    Largest first; each blob is scaled so that its outline's longest diameter is the drawn one.
    A blob that finds no room among 80 candidate places shrinks by 20 % and tries again, so on
    a small slide sizes shrink to what fits (its class then follows its real diameter).

    Returns:
        The blobs, in the order of ``diameters_um`` (``taken`` grows by them); ``None`` for one
        that found no room even at 10 µm (a full, small slide).
    """
    areas = np.array([i.a * i.b for i in islands])
    edge, gap = _EDGE_UM / mpp, _GAP_UM / mpp
    # No region wider than 3/4 of the largest island's narrowest width, so one lesion never
    # fills an island (on small slides sizes shrink to this, staying varied below it).
    cap = 0.75 * 2 * max(i.inradius for i in islands)
    out: dict[int, _Blob | None] = {}
    for k in sorted(range(len(diameters_um)), key=lambda i: -diameters_um[i]):
        d_px = min(diameters_um[k] / mpp, cap * math.exp(rng.uniform(-0.3, 0.0)))
        proto = _random_blob(rng, 0.0, 0.0, 1.0, float(rng.uniform(*wave)))
        unit = feret_px(proto.outline(64))
        while k not in out:
            shape = dataclasses.replace(proto, a=proto.a * d_px / unit, b=proto.b * d_px / unit)
            ring = shape.outline(32)  # around (0, 0)
            # 80 candidate centres at once, uniform over the islands' discs, area-weighted.
            which = rng.choice(len(islands), size=80, p=areas / areas.sum())
            r = np.array([islands[i].extent for i in which]) * np.sqrt(rng.uniform(size=80))
            t = rng.uniform(0, 2 * np.pi, 80)
            cx = np.array([islands[i].cx for i in which]) + r * np.cos(t)
            cy = np.array([islands[i].cy for i in which]) + r * np.sin(t)
            ok = np.ones(80, bool)
            for i in set(which.tolist()):
                sel = which == i
                sd = islands[i].signed_dist(cx[sel, None] + ring[None, :, 0],
                                            cy[sel, None] + ring[None, :, 1])  # fmt: skip
                ok[sel] = sd.min(axis=1) >= edge
            for o in taken:
                ok &= np.hypot(cx - o.cx, cy - o.cy) >= shape.extent + o.extent + gap
            if ok.any():
                j = int(np.argmax(ok))
                out[k] = dataclasses.replace(shape, cx=float(cx[j]), cy=float(cy[j]))
                taken.append(out[k])
                continue
            d_px *= 0.8
            if d_px < 10.0 / mpp:  # no room even for 10 µm: the slide is full
                out[k] = None
    return [out[k] for k in range(len(diameters_um))]


def countable(regions: list[Region], mpp: float) -> list[bool]:
    """Which tumour regions the CAMELYON16 FROC counts: the lesion's component in
    :func:`~wsi_prune.io.annotations.evaluation_mask` of all the slide's lesions exists and is
    not an ITC. Mimics are never countable."""
    tum = [r for r in regions if r.tumour]
    anns = [Annotation(r.polygon(), "Tumor", f"lesion {i}") for i, r in enumerate(tum)]
    les = evaluation_mask(anns, mpp)
    if not tum:
        return [False] * len(regions)
    ids, _ = les.lookup(np.array([r.centre_xy for r in tum]))
    ok = iter([bool(i > 0 and int(i) not in les.itc) for i in ids])
    return [next(ok) if r.tumour else False for r in regions]
