"""Raster masks to exact vector geometry: every 8-connected part of a mask, with its holes, as
a valid shapely (Multi)Polygon in level-0 px.

Why the union of pixel squares rather than contours through pixel centres
(``skimage.measure.find_contours``): a marching-squares contour cuts every corner (a 3x3 block
becomes an octagon of 7.5 px², not 9), gives holes as separate rings that must be nested by
hand, and a part joined to another only at a corner has no contour of its own. The union of
the pixels' squares is exact: its area is the pixel count times the pixel area, holes are
polygon interiors, and two blocks that touch at one corner form one MultiPolygon (valid: the
parts of a MultiPolygon may touch at points). TRIDENT builds its GeoJSON from shapely
geometry too.

Cost: pixel rows are cut into runs, runs with the same columns in consecutive rows are merged
into rectangles, and each part is one ``shapely.union_all`` of its rectangles: on a blocky
heat map (patch resolution) a region is tens of rectangles; a 1000 px tissue mask a few
thousand.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.polygon import orient


def _rectangles(mask: np.ndarray) -> np.ndarray:
    """(R, 4) int64 ``(col0, row0, col1, row1)`` rectangles (end-exclusive) whose union is
    ``mask``: runs of each row, merged down consecutive rows while their columns match."""
    m = np.asarray(mask, bool)
    if not m.any():
        return np.zeros((0, 4), np.int64)
    d = np.diff(np.pad(m, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, c0 = np.nonzero(d == 1)
    _, c1 = np.nonzero(d == -1)  # same row-major order: the k-th end closes the k-th start
    order = np.lexsort((rows, c1, c0))
    rows, c0, c1 = rows[order], c0[order], c1[order]
    new = np.ones(len(rows), bool)
    new[1:] = (c0[1:] != c0[:-1]) | (c1[1:] != c1[:-1]) | (rows[1:] != rows[:-1] + 1)
    start = np.flatnonzero(new)
    end = np.r_[start[1:], len(rows)] - 1
    return np.stack([c0[start], rows[start], c1[start], rows[end] + 1], axis=1).astype(np.int64)


def mask_parts(labels: np.ndarray, px_level0: float, offset: tuple[float, float] = (0.0, 0.0)
               ) -> Iterator[tuple[int, Polygon | MultiPolygon]]:
    """The geometry of every labelled part, in level-0 px.

    Args:
        labels: (H, W) int labels (0: background), e.g. ``skimage.measure.label(mask,
            connectivity=2)`` for 8-connected parts.
        px_level0: side of one label pixel, level-0 px.
        offset: (x, y) level-0 px subtracted from every coordinate (the viewer frame's origin:
            :class:`~wsi_prune.outputs.frame.ViewerFrame`).

    Yields:
        ``(label, geometry)`` in increasing label order: a valid Polygon (holes as interiors)
        or MultiPolygon (parts touching at corners), exteriors counter-clockwise.
    """
    rects = _rectangles(labels > 0)
    if not len(rects):
        return
    lab = labels[rects[:, 1], rects[:, 0]]
    order = np.argsort(lab, kind="stable")
    rects, lab = rects[order], lab[order]
    bounds = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        r = rects[a:b].astype(np.float64) * px_level0
        r[:, [0, 2]] -= offset[0]
        r[:, [1, 3]] -= offset[1]
        geom = shapely.union_all(shapely.box(r[:, 0], r[:, 1], r[:, 2], r[:, 3]))
        yield int(lab[a]), valid_polygonal(geom)


def valid_polygonal(geom: shapely.Geometry) -> Polygon | MultiPolygon:
    """``geom`` made valid, reduced to its polygonal parts and oriented (exteriors
    counter-clockwise, holes clockwise, as RFC 7946 asks)."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    polys: list[Polygon] = []
    for part in getattr(geom, "geoms", [geom]):
        if isinstance(part, Polygon) and not part.is_empty:
            polys.append(part)
        elif isinstance(part, MultiPolygon):
            polys.extend(part.geoms)
    polys = [orient(p, sign=1.0) for p in polys]
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def geojson_geometry(geom: Polygon | MultiPolygon, decimals: int = 2) -> dict:
    """GeoJSON ``geometry`` of ``geom`` with coordinates rounded to ``decimals``."""
    rounded = shapely.transform(geom, lambda xy: np.round(xy, decimals))
    return shapely.geometry.mapping(rounded)
