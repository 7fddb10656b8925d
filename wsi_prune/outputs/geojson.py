"""QuPath GeoJSON of the regions a slide's lesion confidence marks: level-0 px polygons with a
classification and measurements (heat and lesion confidence: :mod:`wsi_prune.outputs.heat`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: lesion confidence at or above which a map pixel belongs to a region
REGION_THRESHOLD = 0.5
REGION_CLASS = {"name": "Tumor", "color": [200, 0, 0]}


def regions_geojson(confidence: np.ndarray, px_level0: float,
                    threshold: float = REGION_THRESHOLD,
                    slide_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Polygons around map regions with lesion confidence >= ``threshold``, as a QuPath
    FeatureCollection.

    Args:
        confidence: (H, W) lesion confidence (heat times slide probability), NaN off tissue.
        px_level0: side of one map pixel, level-0 px.
        threshold: confidence at or above which a pixel belongs to a region.
        slide_size: (width, height) level-0 px to clip the polygons to.

    Each feature is a level-0 px polygon with ``objectType: annotation``, a classification
    (name, colour as QuPath's ``[r, g, b]``) and measurements (mean and max confidence, area in
    level-0 px²).
    """
    from skimage import measure

    conf = np.nan_to_num(confidence, nan=0.0)
    labels = measure.label(conf >= threshold, connectivity=2)
    features = []
    for region in measure.regionprops(labels, intensity_image=conf):
        sub = np.pad(labels[region.slice] == region.label, 1)
        contours = measure.find_contours(sub.astype(np.float32), 0.5)
        if not contours:
            continue
        ring = max(contours, key=len)
        y0, x0 = region.slice[0].start - 1, region.slice[1].start - 1
        # contour points are at pixel centres; +0.5 puts them on the map's pixel grid
        xy = np.stack([(ring[:, 1] + x0 + 0.5) * px_level0, (ring[:, 0] + y0 + 0.5) * px_level0],
                      axis=1)
        if slide_size is not None:
            xy[:, 0] = np.clip(xy[:, 0], 0, slide_size[0])
            xy[:, 1] = np.clip(xy[:, 1], 0, slide_size[1])
        coords = [[round(float(x), 1), round(float(y), 1)] for x, y in xy]
        if coords[0] != coords[-1]:
            coords.append(coords[0])
        if len(coords) < 4:
            continue
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [coords]},
            "properties": {
                "objectType": "annotation",
                "name": f"region {len(features) + 1}",
                "classification": {"name": REGION_CLASS["name"],
                                   "color": list(REGION_CLASS["color"])},
                "measurements": {
                    "mean_confidence": round(float(region.intensity_mean), 4),
                    "max_confidence": round(float(region.intensity_max), 4),
                    "area_level0_px2": round(float(region.area) * px_level0**2, 1),
                },
            },
        })
    return {"type": "FeatureCollection", "features": features}
