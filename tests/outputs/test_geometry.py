"""Exact QuPath geometry: masks to shapely (Multi)Polygons that round-trip through shapely with
the right area, holes and parts (what the longest-contour GeoJSON got wrong)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape

from wsi_prune.outputs.frame import ViewerFrame
from wsi_prune.outputs.geojson import regions_geojson, tissue_geojson
from wsi_prune.outputs.geometry import _rectangles, mask_parts


def _roundtrip(fc: dict) -> list:
    """Features parsed back by shapely from the JSON text, as a reader would."""
    return [shape(f["geometry"]) for f in json.loads(json.dumps(fc))["features"]]


def test_two_diagonal_blocks_are_one_region_of_the_right_area():
    """Two 3x3 blocks touching at one corner: one 8-connected region of 18 px², which the
    longest-contour code turned into a ring of ~8.5 px²."""
    conf = np.zeros((10, 10), np.float32)
    conf[1:4, 1:4] = 0.9
    conf[4:7, 4:7] = 0.7
    px = 16.0  # level-0 px per map pixel
    fc = regions_geojson(conf, px)
    (geom,) = _roundtrip(fc)
    assert isinstance(geom, MultiPolygon) and len(geom.geoms) == 2
    assert geom.is_valid
    assert geom.area == pytest.approx(18 * px * px)
    a, b = sorted(geom.geoms, key=lambda g: g.bounds)
    assert a.bounds == (16, 16, 64, 64) and b.bounds == (64, 64, 112, 112)
    assert a.intersection(b).geom_type == "Point"  # they touch at one corner only
    m = fc["features"][0]["properties"]["measurements"]
    assert m["area_level0_px2"] == pytest.approx(18 * px * px)
    assert m["mean_confidence"] == pytest.approx(0.8) and m["max_confidence"] == pytest.approx(0.9)


def test_ring_with_a_hole_keeps_the_hole():
    conf = np.zeros((9, 9), np.float32)
    conf[1:8, 1:8] = 0.8
    conf[3:6, 3:6] = 0.1  # a 3x3 hole below the threshold
    fc = regions_geojson(conf, 2.0)
    (geom,) = _roundtrip(fc)
    assert isinstance(geom, Polygon) and geom.is_valid
    assert len(geom.interiors) == 1
    assert geom.area == pytest.approx((49 - 9) * 4.0)
    assert Polygon(geom.interiors[0]).area == pytest.approx(9 * 4.0)
    # RFC 7946 orientation: exterior counter-clockwise, hole clockwise (in x right, y up terms)
    assert geom.exterior.is_ccw and not geom.interiors[0].is_ccw
    assert not geom.contains(shapely.Point(9.0, 9.0))  # the hole's centre is outside


def test_every_part_and_random_masks_have_exact_areas():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((40, 50)) < 0.45
        from skimage import measure

        labels = measure.label(mask, connectivity=2)
        parts = dict(mask_parts(labels, 1.0))
        assert sorted(parts) == list(range(1, labels.max() + 1))
        for lab, geom in parts.items():
            assert geom.is_valid
            assert geom.area == pytest.approx((labels == lab).sum())
        # the rectangles tile the mask exactly, without overlap
        r = _rectangles(mask)
        paint = np.zeros(mask.shape, int)
        for c0, r0, c1, r1 in r:
            paint[r0:r1, c0:c1] += 1
        assert np.array_equal(paint, mask.astype(int))


def test_regions_shift_by_the_viewer_offset_and_clip_to_its_size():
    conf = np.zeros((8, 8), np.float32)
    conf[2:4, 2:8] = 1.0
    frame = ViewerFrame(x=40, y=20, width=80, height=200)
    (geom,) = _roundtrip(regions_geojson(conf, 10.0, frame=frame, mpp=0.5))
    # level-0 box x 20..80, y 20..40 -> viewer x -20..40 -> clipped to 0..40, y 0..20
    assert geom.bounds == (0, 0, 40, 20)
    assert geom.area == pytest.approx(40 * 20)


def test_tissue_geojson_parts_holes_and_um2():
    mask = np.zeros((20, 20), bool)
    mask[2:10, 2:10] = True
    mask[5:7, 5:7] = False  # a hole
    mask[12:18, 12:15] = True  # another island
    fc = tissue_geojson(mask, 8.0, mpp=0.25)
    geoms = _roundtrip(fc)
    assert len(geoms) == 2 and all(g.is_valid for g in geoms)
    assert sorted(g.area for g in geoms) == [18 * 64, 60 * 64]
    props = [f["properties"] for f in fc["features"]]
    assert all(p["classification"]["name"] == "Tissue" for p in props)
    assert sorted(p["measurements"]["area_um2"] for p in props) == [
        pytest.approx(18 * 64 * 0.0625), pytest.approx(60 * 64 * 0.0625)]
