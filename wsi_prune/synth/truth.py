"""Ground truth of a synthetic slide: tumour, pen, border and tissue masks at any µm/px, and
the tumour outlines as CAMELYON-style ASAP XML.
"""

from __future__ import annotations

import math
import os
import pathlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence

import numpy as np

from wsi_prune.errors import ConfigError
from wsi_prune.synth.layout import _Layout
from wsi_prune.synth.spec import SynthSpec

# ASAP's default annotation colour, as in CAMELYON16's lesion files.
_ASAP_COLOUR = "#F4FA58"


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
