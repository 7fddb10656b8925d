"""QuPath GeoJSON: the regions a slide's lesion confidence marks (``regions.geojson``), one
tile object per tissue tile with its measurements (``tiles.geojson``) and the tissue contour
(``tissue.geojson``).

Coordinates are level-0 px in the viewer frame (:mod:`wsi_prune.outputs.frame`). Geometry is
exact (:mod:`wsi_prune.outputs.geometry`): every 8-connected part with its holes, valid
Polygons or MultiPolygons. Objects follow QuPath's GeoJSON reader: ``objectType``
(``annotation`` or ``tile``), ``classification`` ``{name, color: [r, g, b]}``, ``measurements``
a flat name -> number map (QuPath's measurement maps colour tiles by any of them).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import zarr

from wsi_prune.outputs.frame import ViewerFrame
from wsi_prune.outputs.geometry import geojson_geometry, mask_parts

#: lesion confidence at or above which a map pixel belongs to a region
REGION_THRESHOLD = 0.5
REGION_CLASS = {"name": "Tumor", "color": [200, 0, 0]}
TISSUE_CLASS = {"name": "Tissue", "color": [0, 160, 0]}
#: names of the measurements of ``tiles.geojson`` (QuPath shows them under these names)
TILE_MEASUREMENTS = ("heat", "lesion confidence", "CNN score", "kept", "MIL attention")


def _collection(features: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": features}


def _feature(geometry: dict[str, Any], object_type: str, name: str,
             classification: dict[str, Any] | None, measurements: dict[str, float]
             ) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": object_type, "name": name}
    if classification is not None:
        props["classification"] = {"name": classification["name"],
                                   "color": list(classification["color"])}
    props["measurements"] = measurements
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _clip(geom, frame: ViewerFrame | None):
    if frame is None:
        return geom
    import shapely

    from wsi_prune.outputs.geometry import valid_polygonal

    return valid_polygonal(shapely.clip_by_rect(geom, 0, 0, frame.width, frame.height))


def regions_geojson(confidence: np.ndarray, px_level0: float,
                    threshold: float = REGION_THRESHOLD, frame: ViewerFrame | None = None,
                    mpp: float | None = None) -> dict[str, Any]:
    """Every 8-connected region with lesion confidence >= ``threshold``, holes included, as a
    QuPath FeatureCollection of annotations.

    Args:
        confidence: (H, W) lesion confidence (heat times slide probability), NaN off tissue;
            map pixel (0, 0) starts at OpenSlide level-0 (0, 0).
        px_level0: side of one map pixel, level-0 px.
        threshold: confidence at or above which a pixel belongs to a region.
        frame: the viewer frame (offset subtracted, polygons clipped to its size); None: no
            offset, no clipping.
        mpp: level-0 µm/px, to add the area in µm².

    Each feature is a Polygon or MultiPolygon with ``objectType: annotation``, classification
    ``Tumor`` and measurements: mean and max confidence, area in level-0 px² (and µm²).
    """
    from skimage import measure

    conf = np.nan_to_num(np.asarray(confidence, np.float64), nan=0.0)
    labels = measure.label(conf >= threshold, connectivity=2)
    n = int(labels.max())
    if not n:
        return _collection([])
    # per-region mean and max over the labelled pixels only (ndimage.maximum argsorts the whole
    # map: 0.1 s of a slide's 0.5 s outputs stage)
    inside = labels > 0
    lab, val = labels[inside] - 1, conf[inside]
    means = np.bincount(lab, val, n) / np.bincount(lab, minlength=n)
    maxes = np.full(n, -np.inf)
    np.maximum.at(maxes, lab, val)
    offset = frame.offset if frame is not None else (0, 0)
    features = []
    for lab, geom in mask_parts(labels, px_level0, offset):
        geom = _clip(geom, frame)
        if geom.is_empty:
            continue
        m = {"mean_confidence": round(float(means[lab - 1]), 4),
             "max_confidence": round(float(maxes[lab - 1]), 4),
             "area_level0_px2": round(float(geom.area), 1)}
        if mpp is not None:
            m["area_um2"] = round(float(geom.area) * mpp * mpp, 1)
        features.append(_feature(geojson_geometry(geom), "annotation",
                                 f"region {len(features) + 1}", REGION_CLASS, m))
    return _collection(features)


def tissue_geojson(mask: np.ndarray, px_level0: float, frame: ViewerFrame | None = None,
                   mpp: float | None = None) -> dict[str, Any]:
    """The tissue mask's 8-connected parts with their holes, as QuPath annotations classified
    ``Tissue`` (measurements: area in level-0 px², and µm² when ``mpp`` is given).

    Args:
        mask: (H, W) bool tissue mask (``mask/tissue``); pixel (0, 0) starts at level-0 (0, 0).
        px_level0: side of one mask pixel, level-0 px.
        frame: the viewer frame (see :func:`regions_geojson`).
        mpp: level-0 µm/px.
    """
    from skimage import measure

    labels = measure.label(np.asarray(mask, bool), connectivity=2)
    offset = frame.offset if frame is not None else (0, 0)
    features = []
    for _, geom in mask_parts(labels, px_level0, offset):
        geom = _clip(geom, frame)
        if geom.is_empty:
            continue
        m = {"area_level0_px2": round(float(geom.area), 1)}
        if mpp is not None:
            m["area_um2"] = round(float(geom.area) * mpp * mpp, 1)
        features.append(_feature(geojson_geometry(geom), "annotation",
                                 f"tissue {len(features) + 1}", TISSUE_CLASS, m))
    return _collection(features)


def tiles_geojson(group: zarr.Group, probability: float, frame: ViewerFrame | None = None
                  ) -> dict[str, Any]:
    """One QuPath tile object per tissue tile, measured, so QuPath's measurement maps colour
    the slide by any of them.

    Measurements (:data:`TILE_MEASUREMENTS`): ``heat`` (``heatmap/tile``), ``lesion
    confidence`` (heat times ``probability``), ``CNN score`` (``triage/tile_score``), ``kept``
    (1 when the tile reached the ViT, else 0), ``MIL attention`` (kept tiles only: QuPath
    shows a missing measurement as NaN). Unreadable tiles (``tiles/unreadable``) are
    classified ``Unreadable``.

    Args:
        group: a finished slide store.
        probability: the slide's tumour probability.
        frame: the viewer frame; None: OpenSlide level-0 px.
    """
    rows, bad = _tile_rows(group, probability, frame)
    features = []
    for i, (a, b, c, d, h, lc, sc, k, att) in enumerate(rows):
        m = {"heat": h, "lesion confidence": lc, "CNN score": sc, "kept": k}
        if att == att:  # not NaN: a kept tile
            m["MIL attention"] = att
        props: dict[str, Any] = {"objectType": "tile", "name": f"tile {i}"}
        if i in bad:
            props["classification"] = dict(_UNREADABLE)
        props["measurements"] = m
        features.append({"type": "Feature", "properties": props, "geometry": {
            "type": "Polygon", "coordinates": [[[a, b], [c, b], [c, d], [a, d], [a, b]]]}})
    return _collection(features)


def tiles_geojson_text(group: zarr.Group, probability: float,
                       frame: ViewerFrame | None = None) -> str:
    """:func:`tiles_geojson` as compact JSON text: the string ``json.dumps(tiles_geojson(...),
    separators=(",", ":"))`` gives, written feature by feature without the dicts (a 50k²
    slide's 14 608 tiles: 236 ms through the dicts, 61 ms so; a CAMELYON16 slide has up to
    50 000)."""
    rows, bad = _tile_rows(group, probability, frame)
    num = _json_number
    unreadable = '"classification":' + json.dumps(_UNREADABLE, separators=(",", ":")) + ","
    parts = []
    for i, (a, b, c, d, h, lc, sc, k, att) in enumerate(rows):
        a, b, c, d = num(a), num(b), num(c), num(d)
        mil = f',"MIL attention":{num(att)}' if att == att else ""
        parts.append(
            f'{{"type":"Feature","properties":{{"objectType":"tile","name":"tile {i}",'
            f'{unreadable if i in bad else ""}"measurements":{{"heat":{num(h)},'
            f'"lesion confidence":{num(lc)},"CNN score":{num(sc)},"kept":{k}{mil}}}}},'
            f'"geometry":{{"type":"Polygon","coordinates":[[[{a},{b}],[{c},{b}],[{c},{d}],'
            f'[{a},{d}],[{a},{b}]]]}}}}')
    return '{"type":"FeatureCollection","features":[' + ",".join(parts) + "]}"


#: the classification of a tile that could not be read
_UNREADABLE = {"name": "Unreadable", "color": [80, 80, 80]}


def _json_number(v: float) -> str:
    """A float as ``json.dumps`` writes it (``repr``; NaN and infinities as JSON's)."""
    return repr(v) if math.isfinite(v) else json.dumps(v)


def _tile_rows(group: zarr.Group, probability: float, frame: ViewerFrame | None
               ) -> tuple[Any, set[int]]:
    """Per tissue tile (x0, y0, x1, y1, heat, lesion confidence, CNN score, kept, MIL
    attention or NaN) as Python numbers, rounded; and the unreadable tiles' indices."""
    coords = np.asarray(group["tiles/coords"][:], np.float64)
    side = float(group.attrs["grid"]["tile_level0"])
    heat = np.asarray(group["heatmap/tile"][:], np.float64)
    score = np.asarray(group["triage/tile_score"][:], np.float64)
    kept = np.asarray(group["triage/kept"][:], bool)
    attention = np.full(len(coords), np.nan)
    if "vit" in group and "mil" in group and "attention" in group["mil"]:
        attention[np.asarray(group["vit/tile_index"][:])] = np.asarray(group["mil/attention"][:])
    bad = set()
    if "unreadable" in group["tiles"]:
        bad = set(np.asarray(group["tiles/unreadable"][:]).tolist())
    if "vit" in group and "unreadable" in group["vit"]:
        bad |= set(np.asarray(group["vit/unreadable"][:]).tolist())
    ox, oy = frame.offset if frame is not None else (0, 0)
    # vectorised rounding, then plain lists: a CAMELYON16 slide has 10 000-50 000 tiles
    x0 = np.round(coords[:, 0] - ox, 2)
    y0 = np.round(coords[:, 1] - oy, 2)
    x1, y1 = np.round(x0 + side, 2), np.round(y0 + side, 2)
    rows = zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist(),
               np.round(heat, 5).tolist(), np.round(heat * probability, 5).tolist(),
               np.round(score, 5).tolist(), kept.astype(int).tolist(),
               np.round(attention, 6).tolist(), strict=True)
    return rows, bad
