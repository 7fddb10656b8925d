"""Heat, lesion confidence and the files rendered from a store: patch heat without holes,
regions and candidates that scale with the slide probability, CAMELYON16's candidate format.
Real run stores: a small synthetic slide through ``run_batch`` with ``pipelines/demo.yaml``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from shapely.geometry import shape

from wsi_prune.evaluation.runs import read_candidates
from wsi_prune.outputs.candidates import write_candidates
from wsi_prune.outputs.geojson import REGION_CLASS, REGION_THRESHOLD
from wsi_prune.outputs.heat import heat_map, patch_heat, tile_heat
from wsi_prune.outputs.writer import rerender

# -- heat ----------------------------------------------------------------------------------------


def test_patch_heat_hand_computed():
    # tile 0: two patches reached the ViT (importance .6, .3), two were pruned by the CNN prior
    # (CNN .4, .2); tile 1: no token importance at all (no CLS token): the CNN map alone
    imp = np.array([[0.6, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    entered = np.array([[True, True, False, False], [True, True, True, True]])
    cnn = np.array([[0.9, 0.8, 0.4, 0.2], [0.5, 0.25, 1.0, 0.0]]).reshape(2, 2, 2)
    out = patch_heat(imp, entered, cnn, np.array([0.5, 0.8]))
    assert out.shape == (2, 2, 2) and out.dtype == np.float32
    # r = 1, .5; floor .5; ref = min CNN of the ViT patches .8; fill .5 * .4/.8, .5 * .2/.8
    np.testing.assert_allclose(out[0].ravel(), 0.5 * np.array([1, 0.5, 0.25, 0.125]), rtol=1e-6)
    np.testing.assert_allclose(out[1].ravel(), 0.8 * np.array([0.5, 0.25, 1.0, 0.0]), rtol=1e-6)
    # a pruned patch the CNN rated above a ViT one (a non-top-k prior) still stays below it
    high = patch_heat(imp[:1], entered[:1], np.array([[[0.9, 0.3], [0.6, 0.2]]]), np.ones(1))
    np.testing.assert_allclose(high.ravel(), [1, 0.5, 0.5, 0.5 * 0.2 / 0.6], rtol=1e-6)
    assert patch_heat(np.zeros((0, 4)), np.zeros((0, 4), bool), np.zeros((0, 2, 2)),
                      np.zeros(0)).shape == (0, 2, 2)
    with pytest.raises(ValueError, match="must all be"):
        patch_heat(imp, entered, np.zeros((2, 3, 3)), np.ones(2))


def test_tile_heat_keeps_dropped_tiles_below_kept():
    heat, src = tile_heat(np.array([0.9, 0.2, 0.5, 0.7]), np.array([False, True, False, True]),
                          np.array([0.2, 0.8]))
    np.testing.assert_allclose(heat, [0.9 * 0.25, 0.25, 0.5 * 0.25, 1.0])
    assert src.tolist() == [0, 1, 0, 1]


def test_tile_heat_blends_the_cnn_score_into_kept_tiles_by_weight():
    score = np.array([0.9, 0.2, 0.5, 0.7, 0.01])
    kept = np.array([False, True, False, True, True])
    att = np.array([0.5, 0.3, 0.2])  # the ViT ranks tile 1 > 3 > 4; the CNN 3 > 1 > 4
    alone, _ = tile_heat(score, kept, att)
    same, _ = tile_heat(score, kept, att, vit_weight=1.0)
    np.testing.assert_array_equal(alone, same)
    heat, src = tile_heat(score, kept, att, vit_weight=0.75)
    logit = np.log(score / (1 - score))
    s = 0.75 * np.log(att) + 0.25 * logit[kept]
    np.testing.assert_allclose(heat[kept], np.exp(s - s.max()), rtol=1e-6)
    assert heat[3] == 1.0 and heat[1] < 1.0  # the CNN's 0.7 against 0.2 outweighs 0.5 vs 0.3
    assert heat[4] < heat[1]  # both agree tile 4 is coldest
    floor = heat[kept].min()
    np.testing.assert_allclose(heat[~kept], score[~kept] * floor, rtol=1e-6)
    assert heat[~kept].max() <= floor and src.tolist() == [0, 1, 0, 1, 1]
    cnn_only, _ = tile_heat(score, kept, att, vit_weight=0.0)
    assert np.argsort(cnn_only[kept]).tolist() == np.argsort(score[kept]).tolist()
    with pytest.raises(ValueError, match="vit_weight"):
        tile_heat(score, kept, att, vit_weight=-0.1)


def test_a_run_blends_its_heat_by_the_configured_weight_and_keeps_its_probability(run, tmp_path):
    from wsi_prune.config import RunConfig
    from wsi_prune.pipeline.batch import run_batch

    cfg = RunConfig.from_yaml(Path(__file__).parents[2] / "pipelines" / "demo.yaml")
    rows = run_batch([run.parent / "small.svs"], tmp_path / "out",
                     cfg.replace(mil={"heat_vit_weight": 0.5}), progress=False)
    assert rows[0]["status"] == "ok", rows[0]["error"]
    a = zarr.open_group(str(run / "small.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "out" / "small.zarr"), mode="r")
    assert b.attrs["result"]["probability"] == pytest.approx(a.attrs["result"]["probability"],
                                                             abs=1e-6)
    np.testing.assert_array_equal(b["triage/kept"][:], a["triage/kept"][:])
    want, _ = tile_heat(np.asarray(b["triage/tile_score"][:]), np.asarray(b["triage/kept"][:]),
                        np.asarray(b["mil/attention"][:]), vit_weight=0.5)
    np.testing.assert_allclose(b["heatmap/tile"][:], want, rtol=1e-6)
    assert not np.allclose(b["heatmap/tile"][:], a["heatmap/tile"][:])


def test_patch_map_has_no_holes_inside_kept_tiles(run):
    g = zarr.open_group(str(run / "small.zarr"), mode="r")
    tidx = np.asarray(g["vit/tile_index"][:])
    entered = np.asarray(g["vit/kept_tokens"][:, 0])
    imp = np.asarray(g["vit/token_importance"][:])
    cnn = np.asarray(g["triage/patch_importance"][:])[tidx].reshape(len(tidx), -1)
    heat = np.asarray(g["heatmap/tile"][:])[tidx]
    patch = np.asarray(g["heatmap/patch"][:]).reshape(len(tidx), -1)
    assert len(tidx) >= 4 and entered.mean() == pytest.approx(0.5)  # demo: keep_ratio 0.5
    assert (imp[~entered] == 0).all()  # what made the holes: no importance off the ViT
    # no exact zero where the CNN map is not zero, and every value in [0, tile heat]
    assert (patch[cnn > 0] > 0).all() and (cnn > 0).mean() > 0.99
    assert (patch >= 0).all() and (patch <= heat[:, None] + 1e-6).all()
    for k in range(len(tidx)):
        e, p, c = entered[k], patch[k], cnn[k]
        # ViT patches: importance relative to the tile's most important token, times its heat
        np.testing.assert_allclose(p[e], imp[k, e] / imp[k, e].max() * heat[k], rtol=1e-5)
        # the fill rises with the CNN importance and stays at or below every ViT patch
        order = np.argsort(c[~e], kind="stable")
        assert (np.diff(p[~e][order]) >= -1e-7).all()
        assert np.corrcoef(c[~e], p[~e])[0, 1] > 0.999  # proportional: floor * cnn / ref
        assert p[~e].max() <= p[e].min() + 1e-6
    # the rendered map: no zero inside kept tiles either
    m, px0 = heat_map(g)
    per = m.shape[0] // g.attrs["grid"]["n_rows"]
    rc = np.asarray(g["tiles/grid"][:])
    for r, c in rc[tidx]:
        assert (m[r * per:(r + 1) * per, c * per:(c + 1) * per] > 0).all()


# -- lesion confidence ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_px", [4096, 40, 17])
def test_slide_maps_put_each_tile_where_a_tile_by_tile_loop_puts_it(run, max_px):
    """The heat map and the token map are written for all tiles at once; each tile's block
    equals what a loop over the tiles writes (its heat, its patch map area-averaged to the
    map's px per tile, its tokens), also when the map has fewer px per tile than patches."""
    from wsi_prune.outputs import heat as heat_mod
    from wsi_prune.outputs import pictures

    g = zarr.open_group(str(run / "small.zarr"), mode="r")
    rc = np.asarray(g["tiles/grid"][:])
    tidx = np.asarray(g["vit/tile_index"][:])
    patch = np.asarray(g["heatmap/patch"][:])
    heat = np.asarray(g["heatmap/tile"][:])
    m, _ = heat_map(g, max_px=max_px)
    rows, cols = g.attrs["grid"]["n_rows"], g.attrs["grid"]["n_cols"]
    per = m.shape[0] // rows
    assert per == max(1, min(patch.shape[1], max_px // max(rows, cols)))
    ref = np.full_like(m, np.nan)
    for (r, c), h in zip(rc, heat, strict=True):
        ref[r * per:(r + 1) * per, c * per:(c + 1) * per] = h
    for k, i in enumerate(tidx):
        r, c = rc[i]
        block = patch[k]
        if per != patch.shape[1]:  # area average, one output px at a time
            e = np.linspace(0, block.shape[0], per + 1).round().astype(int)
            block = np.array([[block[e[a]:max(e[a + 1], e[a] + 1),
                                     e[b]:max(e[b + 1], e[b] + 1)].mean()
                               for b in range(per)] for a in range(per)])
        ref[r * per:(r + 1) * per, c * per:(c + 1) * per] = block
    np.testing.assert_allclose(m, ref, rtol=1e-6, atol=1e-7, equal_nan=True)

    if max_px == 4096:  # the token map at full patch resolution
        layer, _ = pictures.token_layer(g)
        tokens = np.asarray(g["vit/kept_tokens"][:])[:, -1]
        gg = int(np.sqrt(tokens.shape[1]))
        for k, i in enumerate(tidx):
            r, c = rc[i]
            want = np.where(tokens[k].reshape(gg, gg)[..., None], pictures.GREEN,
                            pictures.ORANGE)
            assert (layer[r * gg:(r + 1) * gg, c * gg:(c + 1) * gg] == want).all()
    assert heat_mod.block_mean(patch[:1], 3).shape == (1, 3, 3)


def _with_probability(run: Path, dest: Path, probability: float) -> Path:
    """A copy of the run's store claiming another slide probability, re-rendered."""
    store = dest / "small.zarr"
    shutil.copytree(run / "small.zarr", store)
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["result"] = dict(g.attrs["result"], probability=probability)
    rerender(store)
    return dest / "small"


def test_regions_and_candidates_scale_with_the_slide_probability(run, tmp_path):
    low = _with_probability(run, tmp_path / "low", 0.05)
    high = _with_probability(run, tmp_path / "high", 0.95)
    g = zarr.open_group(str(run / "small.zarr"), mode="r")
    assert float(np.asarray(g["heatmap/tile"][:]).max()) == pytest.approx(1.0)  # as always
    # normal slide: confidence <= 0.05 everywhere, so no region reaches the 0.5 threshold
    gl = json.loads((low / "regions.geojson").read_text())
    assert gl == {"type": "FeatureCollection", "features": []}
    cl, ch = read_candidates(low / "candidates.csv"), read_candidates(high / "candidates.csv")
    assert len(cl) == len(ch) == g["vit/tile_index"].shape[0]
    assert cl[:, 0].max() <= 0.05 + 1e-6 and ch[:, 0].max() == pytest.approx(0.95, abs=1e-5)
    np.testing.assert_array_equal(cl[:, 1:], ch[:, 1:])  # same places,
    np.testing.assert_allclose(ch[:, 0], cl[:, 0] * 19, rtol=1e-3)  # confidence x p ratio
    # tumour slide: the hottest patches (heat >= 0.5 / 0.95) become QuPath regions
    gh = json.loads((high / "regions.geojson").read_text())
    assert gh["type"] == "FeatureCollection" and len(gh["features"]) >= 1
    w, h = g.attrs["slide"]["width"], g.attrs["slide"]["height"]
    for f in gh["features"]:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
        assert props["classification"]["color"] == REGION_CLASS["color"]
        color = props["classification"]["color"]
        assert len(color) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in color)
        m = props["measurements"]
        assert REGION_THRESHOLD <= m["mean_confidence"] <= m["max_confidence"] <= 0.95 + 1e-4
        assert m["area_level0_px2"] > 0
        geom = shape(f["geometry"])  # Polygon, or MultiPolygon for diagonal contacts
        assert geom.is_valid and geom.geom_type in ("Polygon", "MultiPolygon")
        assert m["area_level0_px2"] == pytest.approx(geom.area, rel=1e-3)
        x0, y0, x1, y1 = geom.bounds
        assert x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h


def test_candidates_csv_is_the_camelyon16_format(run, tmp_path):
    path = run / "small" / "candidates.csv"
    lines = path.read_text().splitlines()
    assert lines and not lines[0][0].isalpha()  # no header line
    # what CAMELYON16's Evaluation_FROC.py readCSVContent does with each line
    parsed = []
    for line in lines:
        elems = line.rstrip().split(",")
        parsed.append((float(elems[0]), int(elems[1]), int(elems[2])))
    g = zarr.open_group(str(run / "small.zarr"), mode="r")
    p = g.attrs["result"]["probability"]
    conf = [c for c, _, _ in parsed]
    assert conf == sorted(conf, reverse=True) and 0 < conf[-1] <= conf[0] <= p + 1e-6
    np.testing.assert_allclose(read_candidates(path), np.array(parsed, float))
    coords = np.asarray(g["tiles/coords"][:])[np.asarray(g["vit/tile_index"][:])]
    side = g.attrs["grid"]["tile_level0"]
    for _, x, y in parsed:  # each at a patch centre inside a kept tile
        assert ((coords[:, 0] <= x) & (x < coords[:, 0] + side) & (coords[:, 1] <= y)
                & (y < coords[:, 1] + side)).any()
    # the writer rounds coordinates to integer px
    out = write_candidates(tmp_path / "c.csv", [(0.5, 10.4, 20.6), (0.25, 3, 4)])
    assert out.read_text() == "0.500000,10,21\n0.250000,3,4\n"


# -- a failure while writing ----------------------------------------------------------------------


def test_a_failed_rerender_keeps_the_published_folder_and_leaves_no_temporary_one(run, tmp_path):
    # the writers run side by side in threads: an error in one of them (here the MIL attention
    # chunk, corrupt on disk, read by the top tiles and the candidates) must still reach the
    # caller, and only after every writer has stopped, so the half-built folder is removed
    store = tmp_path / "small.zarr"
    shutil.copytree(run / "small.zarr", store)
    shutil.copytree(run / "small", tmp_path / "small")
    before = {p.relative_to(tmp_path): p.read_bytes()
              for p in (tmp_path / "small").rglob("*") if p.is_file()}
    (store / "mil" / "attention" / "c" / "0").write_bytes(b"not a zstd frame")
    with pytest.raises(RuntimeError, match="[Zz]std"):
        rerender(store)
    after = {p.relative_to(tmp_path): p.read_bytes()
             for p in (tmp_path / "small").rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small", "small.zarr"]
