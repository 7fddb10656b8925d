"""CAMELYON-style ground truth: ASAP XML lesion annotations and lesion masks (slide labels:
:mod:`wsi_prune.io.labels`).

ASAP XML (CAMELYON16/17) holds polygons in level-0 px::

    <ASAP_Annotations><Annotations>
      <Annotation Name="_0" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58">
        <Coordinates><Coordinate Order="0" X="1234.5" Y="678.9"/>...</Coordinates>
      </Annotation>...
    </Annotations><AnnotationGroups>...</AnnotationGroups></ASAP_Annotations>

Groups ``Tumor``, ``_0``, ``_1`` (and CAMELYON17's ``metastases``) are lesions; ``_2`` (and
``Exclusion``) are non-tumour regions cut out of them, as in the CAMELYON16 masks. Other groups
are kept on the :class:`Annotation` but take no part in masks.
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon
from skimage.measure import label as label_components
from skimage.measure import regionprops

from wsi_prune.errors import AnnotationError

_logger = logging.getLogger(__name__)

CAMELYON16_MASK_MPP = 0.243 * 2**5  # level 5 of the CAMELYON16 scans, µm/px
MARGIN_UM = 75.0  # CAMELYON16: "75 µm, the size of five tumour cells"
ITC_UM = 200.0  # isolated tumour cells: longest diameter below 200 µm
MACRO_UM = 2000.0  # macro-metastases: longest diameter above 2 mm (micro: 200 µm to 2 mm)

POSITIVE_GROUPS = frozenset({"tumor", "_0", "_1", "metastases", "metastasis"})
EXCLUSION_GROUPS = frozenset({"_2", "exclusion"})


def size_class(diameter_um: float) -> str:
    """CAMELYON16's class of a lesion by longest diameter: ``itc`` (< 200 µm), ``micro``
    (200 µm to 2 mm) or ``macro`` (> 2 mm)."""
    if diameter_um < ITC_UM:
        return "itc"
    return "micro" if diameter_um <= MACRO_UM else "macro"


@dataclass(frozen=True)
class Annotation:
    """One ASAP annotation.

    Attributes:
        coords: (K, 2) float64 (x, y) vertices, level-0 px, in ``Order``.
        group: ``PartOfGroup`` as written (``Tumor``, ``_0``, ``_2``...).
        name: ``Name`` attribute.
        type: ``Type`` attribute (``Polygon``, ``Spline``, ``Rectangle``, ``Dot``...).
    """

    coords: np.ndarray
    group: str
    name: str = ""
    type: str = "Polygon"

    @property
    def role(self) -> str:
        """``positive`` (lesion), ``exclusion`` (cut out of lesions) or ``other``."""
        g = self.group.strip().lower()
        if g in POSITIVE_GROUPS:
            return "positive"
        if g in EXCLUSION_GROUPS:
            return "exclusion"
        return "other"

    @property
    def is_area(self) -> bool:
        """True when the annotation encloses an area (at least 3 vertices, not a dot set)."""
        return len(self.coords) >= 3 and self.type.lower() not in ("dot", "pointset")


def _number(text: str | None, what: str, path: Path) -> float:
    if text is None:
        raise AnnotationError(f"{what} has no value", path)
    t = text.strip()
    if "," in t and "." not in t:  # some CAMELYON XMLs were written with a decimal comma
        t = t.replace(",", ".")
    try:
        value = float(t)
    except ValueError:
        raise AnnotationError(f"{what}: {text!r} is not a number", path) from None
    if not math.isfinite(value):
        raise AnnotationError(f"{what}: {text!r} is not finite", path)
    return value


def read_asap_xml(path: str | os.PathLike[str]) -> list[Annotation]:
    """Read every annotation of an ASAP XML file.

    Args:
        path: ``.xml`` file written by ASAP (CAMELYON16/17) or :func:`wsi_prune.synth`.

    Returns:
        The annotations in file order; coordinates in level-0 px.

    Raises:
        AnnotationError: the file is missing, is not XML, is not an ASAP file, or a coordinate
            is not a number.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError("no such annotation file", path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(f"not valid XML ({exc})", path) from None
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(f"root element is <{root.tag}>, not <ASAP_Annotations>", path)
    out = []
    for i, node in enumerate(root.iter("Annotation")):
        name = node.get("Name", f"#{i}")
        pts = []
        for j, c in enumerate(node.iter("Coordinate")):
            where = f"annotation {name!r} coordinate {j}"
            order = _number(c.get("Order", str(j)), f"{where} Order", path)
            pts.append((order, _number(c.get("X"), f"{where} X", path),
                        _number(c.get("Y"), f"{where} Y", path)))  # fmt: skip
        pts.sort(key=lambda p: p[0])
        coords = np.array([p[1:] for p in pts], np.float64).reshape(-1, 2)
        ann = Annotation(coords, node.get("PartOfGroup", "None"), name, node.get("Type", "Polygon"))
        if ann.role == "other":
            _logger.warning("%s: annotation %r in group %r is neither lesion nor exclusion; "
                            "ignored in masks", path, name, ann.group)  # fmt: skip
        out.append(ann)
    return out


def _rasterise(annotations: Iterable[Annotation], origin_xy: tuple[float, float],
               shape: tuple[int, int], scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Positive and exclusion masks of a region.

    Mask pixel (r, c) covers level-0 ``[x0 + c*scale, x0 + (c+1)*scale)`` (same for y) and is
    set when its centre lies inside a polygon, so the mask area matches the polygon area.

    Returns:
        (positive, exclusion), each (H, W) bool.
    """
    pos = np.zeros(shape, bool)
    exc = np.zeros(shape, bool)
    for ann in annotations:
        if not ann.is_area or ann.role == "other":
            continue
        # skimage fills pixels whose integer (centre) coordinate is inside: shift by half a px.
        cols = (ann.coords[:, 0] - origin_xy[0]) / scale - 0.5
        rows = (ann.coords[:, 1] - origin_xy[1]) / scale - 0.5
        rr, cc = draw_polygon(rows, cols, shape=shape)
        (pos if ann.role == "positive" else exc)[rr, cc] = True
    return pos, exc


def region_masks(annotations: Sequence[Annotation], level0_xy: tuple[float, float],
                 shape: tuple[int, int], mpp: float, level0_mpp: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Positive and exclusion masks of an ``shape`` region at ``mpp``, top-left ``level0_xy``.

    Args:
        annotations: from :func:`read_asap_xml`.
        level0_xy: top-left of the region, level-0 px.
        shape: (H, W) of the masks, px at ``mpp``.
        mpp: mask resolution, µm/px.
        level0_mpp: slide level-0 resolution, µm/px.

    Returns:
        (positive, exclusion): (H, W) bool each. Memory is that of the two masks only.
    """
    if mpp <= 0 or level0_mpp <= 0:
        raise ValueError(f"mpp and level0_mpp must be > 0, got {mpp}, {level0_mpp}")
    return _rasterise(annotations, level0_xy, shape, mpp / level0_mpp)


def lesion_mask(annotations: Sequence[Annotation], level0_size: tuple[int, int], mpp: float,
                level0_mpp: float, level0_xy: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Lesion mask (positive groups minus exclusion groups) at any resolution.

    Args:
        annotations: from :func:`read_asap_xml`.
        level0_size: (width, height) of the area to cover, level-0 px (the slide dimensions,
            or a region of them).
        mpp: resolution of the mask, µm/px.
        level0_mpp: the slide's level-0 resolution, µm/px.
        level0_xy: top-left of the area, level-0 px.

    Returns:
        (ceil(height / s), ceil(width / s)) bool with s = mpp / level0_mpp; True = lesion.
    """
    if mpp <= 0 or level0_mpp <= 0:
        raise ValueError(f"mpp and level0_mpp must be > 0, got {mpp}, {level0_mpp}")
    scale = mpp / level0_mpp
    shape = (math.ceil(level0_size[1] / scale - 1e-9), math.ceil(level0_size[0] / scale - 1e-9))
    pos, exc = _rasterise(annotations, level0_xy, shape, scale)
    return pos & ~exc


@dataclass(frozen=True)
class SlideLesions:
    """The evaluation mask of one slide over a region of the global ``scale`` mask grid.

    Attributes:
        labels: (H, W) int32 lesion ids, 0 = none (dilated, holes filled).
        exclusion: (H, W) bool exclusion regions.
        itc: lesion ids that are isolated tumour cells.
        origin: (col, row) of ``labels[0, 0]`` in the grid whose pixel (r, c) covers level-0
            ``[c*scale, (c+1)*scale)`` x ``[r*scale, (r+1)*scale)``.
        scale: level-0 px per mask px.
    """

    labels: np.ndarray
    exclusion: np.ndarray
    itc: frozenset[int]
    origin: tuple[int, int]
    scale: float

    @property
    def n_lesions(self) -> int:
        """Lesions to find (ITCs excluded)."""
        return int(self.labels.max(initial=0)) - len(self.itc)

    def lookup(self, level0_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lesion id (0 = none) and exclusion flag of (M, 2) level-0 (x, y) points."""
        xy = np.asarray(level0_xy, np.float64).reshape(-1, 2)
        c = np.floor(xy[:, 0] / self.scale).astype(np.int64) - self.origin[0]
        r = np.floor(xy[:, 1] / self.scale).astype(np.int64) - self.origin[1]
        h, w = self.labels.shape
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        ids = np.zeros(len(xy), np.int32)
        exc = np.zeros(len(xy), bool)
        ids[inside] = self.labels[r[inside], c[inside]]
        exc[inside] = self.exclusion[r[inside], c[inside]]
        return ids, exc


def evaluation_mask(annotations: Sequence[Annotation], level0_mpp: float,
                    mask_mpp: float = CAMELYON16_MASK_MPP, margin_um: float = MARGIN_UM,
                    itc_um: float = ITC_UM) -> SlideLesions:
    """Lesions of one slide as the CAMELYON16 evaluation script sees them.

    The lesion mask (positive minus exclusion) is drawn at ``mask_mpp``; pixels closer than
    ``margin_um / 2`` to it join it, holes are filled, and 8-connected components are the
    lesions. A lesion is an ITC when the major axis of its component is below
    ``itc_um + margin_um``. The mask covers only the annotations' bounding box plus the margin.
    See :mod:`wsi_prune.evaluation.runs` for the whole protocol.

    Args:
        annotations: from :func:`read_asap_xml` (may be empty: no lesions).
        level0_mpp: the slide's level-0 µm/px.
        mask_mpp: evaluation-mask resolution, µm/px.
        margin_um, itc_um: lesion margin and ITC size, µm.
    """
    scale = mask_mpp / level0_mpp
    areas = [a for a in annotations if a.is_area and a.role != "other"]
    if not areas:
        return SlideLesions(np.zeros((0, 0), np.int32), np.zeros((0, 0), bool), frozenset(),
                            (0, 0), scale)  # fmt: skip
    pts = np.concatenate([a.coords for a in areas])
    pad = margin_um / mask_mpp + 2  # mask px: room for the dilation and a background ring
    c0 = max(0, math.floor(pts[:, 0].min() / scale - pad))
    r0 = max(0, math.floor(pts[:, 1].min() / scale - pad))
    c1 = math.ceil(pts[:, 0].max() / scale + pad)
    r1 = math.ceil(pts[:, 1].max() / scale + pad)
    pos, exc = region_masks(areas, (c0 * scale, r0 * scale), (r1 - r0, c1 - c0), mask_mpp,
                            level0_mpp)  # fmt: skip
    lesion = pos & ~exc
    if lesion.any():
        lesion = ndi.distance_transform_edt(~lesion) < margin_um / 2 / mask_mpp
    labels = label_components(ndi.binary_fill_holes(lesion), connectivity=2).astype(np.int32)
    itc_px = (itc_um + margin_um) / mask_mpp
    itc = frozenset(int(p.label) for p in regionprops(labels) if p.axis_major_length < itc_px)
    return SlideLesions(labels, exc, itc, (c0, r0), scale)

