"""The files a run writes for viewers and challenge tools, read back by the tools' own readers
where we can run them: ``heatmap.tif`` through OpenSlide, the NGFF heat image's metadata,
``tiles.geojson`` / ``tissue.geojson`` through shapely, ``OUT/froc/`` as ``Evaluation_FROC.py``
reads it, top-attended tile PNGs against the slide."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr
from PIL import Image
from shapely.geometry import box, shape
from shapely.ops import unary_union

from wsi_prune.io.slide import Slide
from wsi_prune.outputs.frame import ViewerFrame
from wsi_prune.outputs.heat import heat_map
from wsi_prune.outputs.heat_tiff import _lut, write_heatmap_tiff
from wsi_prune.outputs.top_tiles import TOP_K
from wsi_prune.outputs.writer import rerender


def _group(run: Path) -> zarr.Group:
    return zarr.open_group(str(run / "small.zarr"), mode="r")


def _hottest_patch(g: zarr.Group) -> tuple[float, float]:
    """Level-0 (x, y) of the centre of the patch with the highest heat."""
    patch = np.asarray(g["heatmap/patch"][:])
    k, pr, pc = np.unravel_index(int(np.argmax(patch)), patch.shape)
    i = int(np.asarray(g["vit/tile_index"][:])[k])
    x, y = np.asarray(g["tiles/coords"][:])[i]
    side = float(g.attrs["grid"]["tile_level0"]) / patch.shape[1]
    assert patch[k, pr, pc] == pytest.approx(1.0)  # the most attended tile's top patch
    return x + (pc + 0.5) * side, y + (pr + 0.5) * side


def test_openslide_reads_the_heatmap_tiff(run):
    g = _group(run)
    w, h = g.attrs["slide"]["width"], g.attrs["slide"]["height"]
    mpp = float(g.attrs["mpp"])
    px0 = float(g.attrs["grid"]["tile_level0"]) / 14  # one TIFF px per ViT patch
    assert px0 == 16
    with openslide.OpenSlide(str(run / "small" / "heatmap.tif")) as osr:
        assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        # same physical extent as the slide, at the heat map's own resolution; ASAP's
        # overlay scale (integer size ratio) is 16 both ways
        assert osr.dimensions == (w // 16, h // 16) == (128, 128)
        assert (w // osr.dimensions[0], h // osr.dimensions[1]) == (16, 16)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(
            mpp * px0, rel=1e-4)
        assert osr.dimensions[0] * mpp * px0 == pytest.approx(w * mpp, abs=mpp * px0)
        assert osr.level_count == 1  # 128 px: one 256 px tile, nothing to halve
        # the hottest patch lands at its level-0 position, coloured as heat 1.0
        x, y = _hottest_patch(g)
        hot = np.asarray(osr.read_region((int(x / px0), int(y / px0)), 0, (1, 1)))[0, 0]
        assert hot[3] == 255 and tuple(hot[:3]) == tuple(_lut()[255])
        # off tissue (outside every tile) is transparent
        coords = np.asarray(g["tiles/coords"][:])
        side = float(g.attrs["grid"]["tile_level0"])
        empty = [(c, r) for r in range(0, h, int(side)) for c in range(0, w, int(side))
                 if not ((coords[:, 0] <= c + 1) & (c + 1 < coords[:, 0] + side)
                         & (coords[:, 1] <= r + 1) & (r + 1 < coords[:, 1] + side)).any()]
        assert empty
        c, r = empty[0]
        assert np.asarray(osr.read_region((int((c + 2) / px0), int((r + 2) / px0)), 0,
                                          (1, 1)))[0, 0, 3] == 0


def test_heatmap_tiff_pyramid_and_offset_frame(tmp_path):
    """A larger map: OpenSlide sees the halving levels, the MPP of each, and a hot spot where
    the viewer frame (offset by the slide's bounds) puts it, at every level."""
    heat = np.full((700, 1100), np.nan, np.float32)
    heat[50:650, 100:1000] = 0.25
    heat[300:310, 520:530] = 1.0  # level-0 px x 8320..8480, y 4800..4960 at 16 px per map px
    # bounds at multiples of 16, sizes halving exactly (OpenSlide averages the x and y
    # downsamples of a level and reads between pixels when they differ)
    frame = ViewerFrame(x=1600, y=800, width=16000, height=10240)
    path = write_heatmap_tiff(tmp_path / "h.tif", heat, 16.0, 0.25, frame)
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.dimensions == (1000, 640)
        assert osr.level_dimensions[1:] == ((500, 320), (250, 160))
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(4.0)
        for lvl, ds in enumerate((1, 2, 4)):
            # in the spot: level-0 x 8384, y 4832 -> viewer 6784, 4032 -> TIFF 424, 252 (a
            # multiple of 4, so no level reads between two pixels)
            x, y = 424, 252
            px = np.asarray(osr.read_region((x, y), lvl, (1, 1)))[0, 0]
            assert osr.level_downsamples[lvl] == pytest.approx(ds, rel=0.01)
            assert px[3] == 255 and tuple(px[:3]) == tuple(_lut()[255]), lvl
        cold = np.asarray(osr.read_region((425 - 40, 255), 0, (1, 1)))[0, 0]
        assert tuple(cold[:3]) == tuple(_lut()[round(0.25 * 255)])
        # the viewer's (0, 0) is level-0 (1600, 800): map px (50, 100), the tissue's corner
        assert np.asarray(osr.read_region((0, 0), 0, (1, 1)))[0, 0, 3] == 255
        assert np.asarray(osr.read_region((999, 639), 0, (1, 1)))[0, 0, 3] == 0


def test_heatmap_tiff_on_a_non_integer_pixel_keeps_asaps_integer_scale(tmp_path):
    """The real slide's map pixel is 224.45 / 14 = 16.03 level-0 px: the TIFF uses 16, and
    its size divides the slide's by exactly 16 both ways (ASAP's integer overlay scale)."""
    px0 = 224.45 / 14
    heat = np.zeros((int(2967 / px0), int(2220 / px0)), np.float32)
    heat[100, 60] = 1.0  # level-0 x 962..978, y 1603..1619 (16.03 px per map px)
    path = write_heatmap_tiff(tmp_path / "r.tif", heat, px0, 0.499, ViewerFrame(0, 0, 2220, 2967))
    with openslide.OpenSlide(str(path)) as osr:
        w, h = osr.dimensions
        assert (2220 // w, 2967 // h) == (16, 16) and (2220 - 16 * w, 2967 - 16 * h) == (12, 7)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.499 * 16)
        assert np.asarray(osr.read_region((970 // 16, 1611 // 16), 0, (1, 1)))[0, 0, 0] > 240


def test_raw_heat_tiff_holds_the_heat_values(run, tmp_path):
    store = tmp_path / "small.zarr"
    import shutil

    shutil.copytree(run / "small.zarr", store)
    rerender(store, slide_path=str(run.parent / "small.svs"), raw_heat=True)
    g = _group(run)
    raw = tifffile.imread(tmp_path / "small" / "heatmap_raw.tif")
    heat, px0 = heat_map(g)
    assert raw.dtype == np.float32
    n = min(raw.shape[0], heat.shape[0]), min(raw.shape[1], heat.shape[1])
    np.testing.assert_array_equal(raw[:n[0], :n[1]], heat[:n[0], :n[1]])
    x, y = _hottest_patch(g)
    assert raw[int(y / px0), int(x / px0)] == pytest.approx(1.0)


def test_heat_image_has_ngff_multiscales(run):
    g = _group(run)
    img = g["heatmap/image"]
    ome = img.attrs["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in ms["axes"])
    heat, px0 = heat_map(g)
    mpp = float(g.attrs["mpp"])
    assert len(ms["datasets"]) >= 2
    for i, ds in enumerate(ms["datasets"]):
        arr = img[ds["path"]]
        scale, trans = (t for t in ds["coordinateTransformations"])
        assert scale["type"] == "scale" and trans["type"] == "translation"
        assert scale["scale"] == pytest.approx([mpp * px0 * 2 ** i] * 2)
        assert trans["translation"] == pytest.approx([mpp * px0 * 2 ** i / 2] * 2)
        assert arr.shape == (int(np.ceil(heat.shape[0] / 2 ** i)),
                             int(np.ceil(heat.shape[1] / 2 ** i)))
        assert tuple(arr.metadata.dimension_names) == ("y", "x")  # NGFF 0.5 asks for them
    np.testing.assert_array_equal(np.asarray(img["0"][:]), heat)
    # level 1 is the NaN-aware 2x2 mean of level 0
    l1 = np.asarray(img["1"][:])
    block = heat[:2, :2]
    if np.isfinite(block).any():
        assert l1[0, 0] == pytest.approx(np.nanmean(block))


def test_tiles_geojson_carries_the_stores_measurements(run):
    g = _group(run)
    fc = json.loads((run / "small" / "tiles.geojson").read_text())
    coords = np.asarray(g["tiles/coords"][:])
    assert len(fc["features"]) == len(coords)
    side = float(g.attrs["grid"]["tile_level0"])
    heat = np.asarray(g["heatmap/tile"][:])
    score = np.asarray(g["triage/tile_score"][:])
    kept = np.asarray(g["triage/kept"][:])
    att = dict(zip(np.asarray(g["vit/tile_index"][:]).tolist(),
                   np.asarray(g["mil/attention"][:]).tolist(), strict=True))
    p = g.attrs["result"]["probability"]
    for i, f in enumerate(fc["features"]):
        props = f["properties"]
        assert props["objectType"] == "tile"
        geom = shape(f["geometry"])
        x, y = coords[i]
        assert geom.equals(box(x, y, x + side, y + side)) and geom.exterior.is_ccw
        m = props["measurements"]
        assert m["heat"] == pytest.approx(heat[i], abs=1e-5)
        assert m["lesion confidence"] == pytest.approx(heat[i] * p, abs=1e-5)
        assert m["CNN score"] == pytest.approx(score[i], abs=1e-5)
        assert m["kept"] == int(kept[i])
        if kept[i]:
            assert m["MIL attention"] == pytest.approx(att[i], rel=1e-4)
        else:
            assert "MIL attention" not in m


def test_tiles_geojson_text_is_the_dicts_json(run, tmp_path):
    """The writer's text is json.dumps of tiles_geojson's dicts, byte for byte: on the run's
    store as written, then on a copy with unreadable tiles and a NaN and an infinite heat."""
    import shutil

    from wsi_prune.io.store import write_array
    from wsi_prune.outputs.geojson import tiles_geojson, tiles_geojson_text

    g = _group(run)
    frame = ViewerFrame.of(g.attrs["slide"])
    p = float(g.attrs["result"]["probability"])
    text = tiles_geojson_text(g, p, frame)
    assert text == json.dumps(tiles_geojson(g, p, frame), separators=(",", ":"))
    assert text == (run / "small" / "tiles.geojson").read_text()
    shutil.copytree(run / "small.zarr", tmp_path / "c.zarr")
    c = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+")
    write_array(c, "tiles/unreadable", np.array([0, 2], np.int64))
    heat = np.asarray(c["heatmap/tile"][:])
    heat[1], heat[3] = np.nan, np.inf
    write_array(c, "heatmap/tile", heat)
    text = tiles_geojson_text(c, p, None)
    assert text == json.dumps(tiles_geojson(c, p, None), separators=(",", ":"))
    feats = json.loads(text)["features"]
    assert [f["properties"].get("classification", {}).get("name") for f in feats[:4]] == [
        "Unreadable", None, "Unreadable", None]
    assert np.isnan(feats[1]["properties"]["measurements"]["heat"])


def test_tissue_geojson_covers_the_mask(run):
    g = _group(run)
    fc = json.loads((run / "small" / "tissue.geojson").read_text())
    mask = np.asarray(g["mask/tissue"][:])
    px0 = g.attrs["slide"]["width"] / mask.shape[1]
    geoms = [shape(f["geometry"]) for f in fc["features"]]
    assert geoms and all(gm.is_valid for gm in geoms)
    assert unary_union(geoms).area == pytest.approx(mask.sum() * px0 * px0, rel=1e-6)
    assert all(f["properties"]["classification"]["name"] == "Tissue" for f in fc["features"])


def test_froc_folder_is_what_evaluation_froc_reads(run):
    folder = run / "froc"
    # Evaluation_FROC.py: every .csv in the result folder is one slide, named by the file
    files = [f for f in os.listdir(folder) if f.endswith(".csv")]
    assert files == ["small.csv"]
    assert (folder / "small.csv").read_text() == (run / "small" / "candidates.csv").read_text()
    probs, xs, ys = [], [], []
    for line in open(folder / "small.csv").readlines():  # its readCSVContent, line by line
        elems = line.rstrip().split(",")
        probs.append(float(elems[0]))
        xs.append(int(elems[1]))
        ys.append(int(elems[2]))
    assert len(probs) == _group(run)["vit/tile_index"].shape[0]


def test_top_attended_tiles_are_read_from_the_slide(run):
    g = _group(run)
    folder = run / "small" / "top_tiles"
    pngs = sorted(folder.glob("*.png"))
    tidx = np.asarray(g["vit/tile_index"][:])
    att = np.asarray(g["mil/attention"][:])
    assert len(pngs) == min(TOP_K, len(tidx))
    with open(run / "small" / "top_tiles.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["png"] for r in rows] == [p.name for p in pngs]
    order = tidx[np.argsort(-att, kind="stable")][:len(pngs)]
    assert [int(r["tile"]) for r in rows] == order.tolist()
    assert [float(r["attention"]) for r in rows] == sorted(
        (float(r["attention"]) for r in rows), reverse=True)
    grid = g.attrs["grid"]
    coords = np.asarray(g["tiles/coords"][:])
    side = round(float(grid["tile_level0"]))
    with Slide(run.parent / "small.svs") as s:
        for r, png in zip(rows, pngs, strict=True):
            i = int(r["tile"])
            x, y = coords[i]
            assert png.name == f"{int(r['rank']):02d}_tile{i}_x{x}_y{y}.png"
            want = s.read((int(x), int(y)), (side, side), grid["mpp"],
                          out_size=(grid["tile_px"], grid["tile_px"]))
            with Image.open(png) as im:
                np.testing.assert_array_equal(np.asarray(im), want)


def test_manifest_and_store_record_the_viewer_frame(run):
    m = json.loads((run / "manifest.json").read_text())
    assert "viewer frame" in json.dumps(m["coordinates"])
    assert m["slides"]["small"]["viewer_offset"] == [0, 0]
    vf = _group(run).attrs["viewer_frame"]
    assert vf["offset_level0"] == [0, 0] and vf["size_level0"] == [2048, 2048]


def test_heat_tiff_tiles_and_levels_match_their_definitions():
    """The colouring of heatmap.tif's tiles and the 2x2 NaN-mean of its levels against plain
    per-pixel definitions: a finite heat v is colour floor(255 v + 0.5), opaque; NaN,
    and the padding past the map's edge, transparent black. Random maps with NaN, whole empty
    tiles, odd sizes, and the exact values 0, 1/510 and 1."""
    from wsi_prune.io.store import halve_nanmean
    from wsi_prune.outputs.heat_tiff import _rgba_tiles

    rng = np.random.default_rng(3)
    lut = _lut()
    for h, w in [(300, 517), (256, 256), (1, 1), (70, 3)]:
        a = rng.random((h, w)).astype(np.float32)
        a[rng.random((h, w)) < 0.5] = np.nan
        a[: h // 2, : w // 2] = np.nan
        a.flat[-3:] = [0.0, 1 / 510, 1.0][: a.size]
        tiles = list(_rgba_tiles(a, lut, 128))
        rows, cols = -(-h // 128), -(-w // 128)
        assert len(tiles) == rows * cols
        full = np.zeros((rows * 128, cols * 128, 4), np.uint8)
        for k, t in enumerate(tiles):
            assert t.shape == (128, 128, 4) and t.dtype == np.uint8
            r, c = divmod(k, cols)
            full[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128] = t
        want = np.zeros_like(full)
        ok = np.isfinite(a)
        # float32 arithmetic, as the map is float32: 1/510 sits on a rounding edge there
        idx = np.floor(np.where(ok, a, 0) * np.float32(255) + np.float32(0.5)).astype(int)
        want[:h, :w, :3] = np.where(ok[..., None], lut[np.clip(idx, 0, 255)], 0)
        want[:h, :w, 3] = np.where(ok, 255, 0)
        assert np.array_equal(full, want), (h, w)

        half = halve_nanmean(a)
        assert half.shape == (-(-h // 2), -(-w // 2)) and half.dtype == np.float32
        padded = np.full((2 * half.shape[0], 2 * half.shape[1]), np.nan, np.float32)
        padded[:h, :w] = a
        blocks = padded.reshape(half.shape[0], 2, half.shape[1], 2).transpose(0, 2, 1, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a block all NaN: "empty slice"
            ref = np.nanmean(blocks.reshape(*half.shape, 4).astype(np.float64), axis=2)
        assert np.array_equal(np.isnan(half), np.isnan(ref))
        assert np.allclose(half[~np.isnan(half)], ref[~np.isnan(ref)], rtol=1e-6, atol=0)
