"""Bounded slides: a Leica SCN whose image sits at an offset inside its collection, so OpenSlide
reports ``openslide.bounds-x/y``. QuPath shows only the bounds, so every coordinate written
for a viewer shifts by them; the CAMELYON16 files stay in OpenSlide's frame."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import zarr
from shapely.geometry import box, shape
from shapely.ops import unary_union
from skimage import measure

from tests._paths import REPO as ROOT
from wsi_prune.config import RunConfig
from wsi_prune.evaluation.runs import read_candidates
from wsi_prune.outputs.geometry import mask_parts
from wsi_prune.pipeline.batch import run_batch
from wsi_prune.synth import SynthSpec, tissue_truth
from wsi_prune.synth.scn import write_leica_scn

OFFSET = (1200, 700)  # level-0 px; 700 is not a multiple of the 16 px heat-map pixel
SPEC = SynthSpec(width=2048, height=2048, mpp=0.5, seed=4, tumour=True, tissue_fraction=0.5)


@pytest.fixture(scope="module")
def bounded_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bounds")
    slide = write_leica_scn(root / "bounded.scn", SPEC, OFFSET, (4096, 3072))
    cfg = RunConfig.from_yaml(ROOT / "pipelines" / "demo.yaml")
    rows = run_batch([slide.path], root / "out", cfg, progress=False)
    assert rows[0]["status"] == "ok", rows[0]["error"]
    return slide.path, root / "out"


def test_openslide_reports_the_bounds(bounded_run):
    slide, out = bounded_run
    with openslide.OpenSlide(str(slide)) as osr:
        p = osr.properties
        assert p[openslide.PROPERTY_NAME_VENDOR] == "leica"
        assert osr.dimensions == (4096, 3072)
        assert (int(p[openslide.PROPERTY_NAME_BOUNDS_X]), int(p[openslide.PROPERTY_NAME_BOUNDS_Y]),
                int(p[openslide.PROPERTY_NAME_BOUNDS_WIDTH]),
                int(p[openslide.PROPERTY_NAME_BOUNDS_HEIGHT])) == (*OFFSET, 2048, 2048)
        assert float(p[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
    g = zarr.open_group(str(out / "bounded.zarr"), mode="r")
    assert g.attrs["slide"]["bounds"] == [*OFFSET, 2048, 2048]
    assert g.attrs["viewer_frame"]["offset_level0"] == list(OFFSET)
    m = json.loads((out / "manifest.json").read_text())
    assert m["slides"]["bounded"]["viewer_offset"] == list(OFFSET)


def test_tiles_geojson_is_in_the_viewer_frame(bounded_run):
    _, out = bounded_run
    g = zarr.open_group(str(out / "bounded.zarr"), mode="r")
    coords = np.asarray(g["tiles/coords"][:])
    side = float(g.attrs["grid"]["tile_level0"])
    # tissue is only inside the bounds, in OpenSlide's frame
    assert coords[:, 0].min() >= OFFSET[0] - side and coords[:, 1].min() >= OFFSET[1] - side
    fc = json.loads((out / "bounded" / "tiles.geojson").read_text())
    for f, (x, y) in zip(fc["features"], coords, strict=True):
        assert shape(f["geometry"]).equals(
            box(x - OFFSET[0], y - OFFSET[1], x - OFFSET[0] + side, y - OFFSET[1] + side))


def test_tissue_geojson_lands_on_the_drawn_tissue(bounded_run):
    _, out = bounded_run
    fc = json.loads((out / "bounded" / "tissue.geojson").read_text())
    found = unary_union([shape(f["geometry"]) for f in fc["features"]])
    x0, y0, x1, y1 = found.bounds
    assert x0 >= 0 and y0 >= 0 and x1 <= 2048 and y1 <= 2048
    # the tissue as drawn, in the image's own px (= QuPath's frame of the bounded slide)
    truth = tissue_truth(SPEC, 8.0)  # 16 level-0 px per mask px
    want = unary_union([gm for _, gm in mask_parts(measure.label(truth, connectivity=2), 16.0)])
    iou = found.intersection(want).area / found.union(want).area
    assert iou > 0.8, iou
    # in OpenSlide's frame (no offset) it would miss by the bounds
    shifted = unary_union([gm for _, gm in mask_parts(measure.label(truth, connectivity=2), 16.0,
                                                      (-OFFSET[0], -OFFSET[1]))])
    assert found.intersection(shifted).area / found.union(shifted).area < 0.3


def test_heatmap_tiff_covers_the_bounds_and_candidates_stay_in_openslide_frame(bounded_run):
    _, out = bounded_run
    g = zarr.open_group(str(out / "bounded.zarr"), mode="r")
    px0 = float(g.attrs["grid"]["tile_level0"]) / 14
    patch = np.asarray(g["heatmap/patch"][:])
    k, pr, pc = np.unravel_index(int(np.argmax(patch)), patch.shape)
    i = int(np.asarray(g["vit/tile_index"][:])[k])
    x, y = np.asarray(g["tiles/coords"][:])[i] + (np.array([pc, pr]) + 0.5) * px0
    with openslide.OpenSlide(str(out / "bounded" / "heatmap.tif")) as osr:
        assert osr.dimensions == (128, 128)  # 2048 px of bounds / 16, not the 4096 collection
        tx, ty = int((x - OFFSET[0]) / px0), int((y - OFFSET[1]) / px0)
        hot = np.asarray(osr.read_region((tx, ty), 0, (1, 1)))[0, 0]
        assert hot[3] == 255 and hot[0] > 240  # inferno at heat 1.0: (252, 255, 164)
    # candidates: OpenSlide level-0 px, as Evaluation_FROC.py and ASAP XML use
    cands = read_candidates(out / "bounded" / "candidates.csv")
    kept = np.asarray(g["tiles/coords"][:])[np.asarray(g["vit/tile_index"][:])]
    side = float(g.attrs["grid"]["tile_level0"])
    for _, cx, cy in cands:  # inside a kept tile, in the store's (OpenSlide's) coordinates
        assert ((kept[:, 0] <= cx) & (cx < kept[:, 0] + side) & (kept[:, 1] <= cy)
                & (cy < kept[:, 1] + side)).any()
    inside = ((cands[:, 1] >= OFFSET[0]) & (cands[:, 2] >= OFFSET[1])).mean()
    assert inside > 0.8  # a viewer-frame file would have most of them below the offset
    assert (out / "froc" / "bounded.csv").read_text() == (
        out / "bounded" / "candidates.csv").read_text()
