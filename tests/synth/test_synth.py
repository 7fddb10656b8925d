"""Synthetic slides: every flavour opens in real OpenSlide with the right geometry and MPP, the
pyramid levels show the same picture, the planted tumour is where its mask and polygons say,
the same seed gives the same bytes, and a dataset comes with labels and ASAP XML lesions."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
import pytest
from skimage.draw import polygon as fill_polygon

from wsi_prune import synth
from wsi_prune.errors import ConfigError
from wsi_prune.io.slide import Slide, resolve_mpp
from wsi_prune.synth import SynthSpec, tissue_truth, tumour_mask, write_dataset, write_slide
from wsi_prune.synth import layout as layout_mod
from wsi_prune.synth import render as render_mod

# Non-square and not a multiple of the TIFF tile, so a width/height swap or a lost edge shows.
_W, _H = 2600, 2050
SVS_SPEC = SynthSpec(width=4096, height=4096, mpp=0.5, flavour="svs", seed=1, tumour=True)


@pytest.fixture(scope="module")
def flavours(tmp_path_factory: pytest.TempPathFactory) -> dict[str, synth.SynthSlide]:
    d = tmp_path_factory.mktemp("flavours")
    out = {}
    for i, (flavour, ext) in enumerate((("svs", ".svs"), ("tiff", ".tif"),
                                        ("tiff-nompp", ".tif"), ("svs-nompp", ".svs"))):
        spec = SynthSpec(width=_W, height=_H, mpp=0.25, flavour=flavour, seed=10 + i)
        out[flavour] = write_slide(d / f"{flavour}{ext}", spec)
    return out


@pytest.mark.parametrize("flavour", ["svs", "svs-nompp", "tiff", "tiff-nompp"])
def test_flavour_geometry(flavours, flavour: str) -> None:
    s = flavours[flavour]
    with openslide.OpenSlide(str(s.path)) as osr:
        assert osr.dimensions == (_W, _H)
        # 2600x2050 -> 1300x1025 -> 650x513: stops once the short side is <= 1024 px
        assert osr.level_dimensions == ((2600, 2050), (1300, 1025), (650, 513))
        assert osr.level_dimensions == tuple((w, h) for w, h, _ in s.spec.level_shapes)
        assert osr.level_downsamples == pytest.approx((1.0, 2.0, 4.0), rel=2e-3)
        vendor = osr.properties[openslide.PROPERTY_NAME_VENDOR]
        assert vendor == ("aperio" if flavour.startswith("svs") else "generic-tiff")
        # every level decodes right up to its last partial tile
        for level, (w, h) in enumerate(osr.level_dimensions):
            ds = osr.level_downsamples[level]
            corner = np.asarray(osr.read_region((int((w - 8) * ds), int((h - 8) * ds)), level,
                                                (8, 8)))
            assert corner[..., 3].min() == 255


def test_svs_mpp_from_aperio_description(flavours) -> None:
    path = flavours["svs"].path
    with openslide.OpenSlide(str(path)) as osr:
        props = dict(osr.properties)
    assert props["aperio.MPP"] == "0.25" and props["aperio.AppMag"] == "40"
    # the TIFF tags carry no unit: the MPP can only have come from the description
    assert props["tiff.ResolutionUnit"] == "none"
    with Slide(path) as s:
        assert (s.mpp, s.info.mpp_source, s.info.objective_power) == (0.25, "openslide", 40.0)


def test_tiff_mpp_from_resolution_tags(flavours) -> None:
    path = flavours["tiff"].path
    with openslide.OpenSlide(str(path)) as osr:
        props = dict(osr.properties)
    assert props["tiff.ResolutionUnit"] == "centimeter"
    assert float(props["tiff.XResolution"]) == pytest.approx(1e4 / 0.25)
    assert not any(k.startswith("aperio.") for k in props)
    # OpenSlide 4 turns the tags into openslide.mpp-x itself; without it our chain must find the
    # same value in the tags
    no_vendor_mpp = {k: v for k, v in props.items() if not k.startswith("openslide.mpp")}
    assert resolve_mpp(no_vendor_mpp, str(path)) == (0.25, 0.25, "tiff-resolution")
    with Slide(path) as s:
        # OpenSlide (4.0.1 here) sets openslide.mpp-x from the tags, and that link comes first
        assert s.mpp == pytest.approx(0.25) and s.info.mpp_source == "openslide"


def test_svs_nompp_has_only_objective_power(flavours) -> None:
    path = flavours["svs-nompp"].path
    with openslide.OpenSlide(str(path)) as osr:
        props = dict(osr.properties)
        desc = osr.properties["tiff.ImageDescription"]
    assert "AppMag = 40" in desc and "MPP" not in desc  # 0.25 µm/px is a 40x scan
    assert props[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == "40"
    assert openslide.PROPERTY_NAME_MPP_X not in props and props["tiff.ResolutionUnit"] == "none"
    with Slide(path) as s:
        assert (s.mpp, s.info.mpp_source) == (pytest.approx(0.25), "objective-power")


def test_nompp_has_no_resolution(flavours) -> None:
    path = flavours["tiff-nompp"].path
    with openslide.OpenSlide(str(path)) as osr:
        props = dict(osr.properties)
    assert openslide.PROPERTY_NAME_MPP_X not in props
    assert openslide.PROPERTY_NAME_OBJECTIVE_POWER not in props
    assert props["tiff.ResolutionUnit"] == "none"
    with Slide(path, mpp=0.25) as s:
        assert s.info.mpp_source == "user"


@pytest.mark.parametrize("flavour", ["svs", "tiff"])
def test_pyramid_levels_show_the_same_picture(flavours, flavour: str) -> None:
    """Each reduced level is the area-average of level 0 (up to JPEG and texture grain)."""
    path = flavours[flavour].path
    box = (512, 384, 1536, 1536)  # x, y, w, h level-0 px, across tissue and background
    with openslide.OpenSlide(str(path)) as osr:
        full = np.asarray(osr.read_region(box[:2], 0, box[2:]))[..., :3].astype(np.float64)
        for level in (1, 2):
            ds = round(osr.level_downsamples[level])
            w, h = box[2] // ds, box[3] // ds
            reduced = np.asarray(osr.read_region(box[:2], level, (w, h)))[..., :3]
            pooled = full.reshape(h, ds, w, ds, 3).mean(axis=(1, 3))
            diff = np.abs(pooled - reduced)
            assert diff.mean() < 6, (level, diff.mean())
            # the picture is not flat: a constant image would pass the line above
            assert pooled.std() > 15


def test_tumour_mask_inside_tissue_and_darker() -> None:
    spec = SynthSpec(width=4096, height=4096, mpp=0.5, seed=1, tumour=True, n_tumours=2)
    truth = tumour_mask(spec, 4.0)
    tissue = tissue_truth(spec, 4.0)
    assert truth.shape == tissue.shape == (512, 512)
    # two lesions of >= 50 µm radius (the smallest size drawn): >= 2 x ~400 px at 4 µm/px
    assert truth.sum() > 600
    assert not (truth & ~tissue).any()
    normal = SynthSpec(width=4096, height=4096, mpp=0.5, seed=1, tumour=False)
    assert not tumour_mask(normal, 4.0).any()
    assert (tissue_truth(normal, 4.0) == tissue).all()  # tumours never move the tissue


def test_tumour_pixels_and_polygons_match_the_mask(svs_slide: Path, tmp_path: Path) -> None:
    spec = SVS_SPEC  # what conftest wrote to svs_slide
    polys, _ = _read_xml(synth.write_asap_xml(tmp_path / "t.xml", spec))
    assert len(polys) == 2
    mpp = 4.0
    truth = tumour_mask(spec, mpp)
    drawn = np.zeros_like(truth)
    for poly in polys:
        rr, cc = fill_polygon(poly[:, 1] / 8.0 - 0.5, poly[:, 0] / 8.0 - 0.5, truth.shape)
        drawn[rr, cc] = True
    iou = (drawn & truth).sum() / (drawn | truth).sum()
    assert iou > 0.95
    # the slide's pixels: tumour is darker than the surrounding stroma
    with Slide(svs_slide) as sl:
        img = sl.read_thumbnail(mpp).astype(np.float64).mean(axis=2)
    stroma = tissue_truth(spec, mpp) & ~truth
    assert img.shape == truth.shape
    assert img[truth].mean() < img[stroma].mean() - 15


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    spec = SynthSpec(width=2048, height=2048, mpp=0.5, seed=7, flavour="svs")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_slide(tmp_path / "a" / "s.svs", spec)
    b = write_slide(tmp_path / "b" / "s.svs", spec, workers=1)  # thread count must not matter
    c = write_slide(tmp_path / "c.svs", SynthSpec(width=2048, height=2048, mpp=0.5, seed=8))
    assert a.path.read_bytes() == b.path.read_bytes()

    def region(p: Path) -> bytes:
        with openslide.OpenSlide(str(p)) as osr:
            return osr.read_region((300, 500), 0, (1024, 1024)).tobytes()

    assert region(a.path) == region(b.path)
    assert region(a.path) != region(c.path)
    assert [p.tolist() for p in a.tumour_polygons] == [p.tolist() for p in b.tumour_polygons]
    # the XML written from the spec alone holds the same outlines as the rendered slide
    polys, _ = _read_xml(synth.write_asap_xml(tmp_path / "a.xml", spec))
    assert len(polys) == len(a.tumour_polygons) == 2
    for got, want in zip(polys, a.tumour_polygons, strict=True):
        np.testing.assert_allclose(got, want, atol=0.006)


def test_tiles_render_independently() -> None:
    """A tile rendered alone equals the same pixels of a bigger render: the property that lets
    write_slide work tile by tile in bounded memory."""
    layout = layout_mod._Layout(SynthSpec(width=8192, height=8192, mpp=0.5, seed=1, pen=True))
    isl = layout.islands[0]
    c0, r0 = int(isl.cx - isl.a) // 256 * 256, int(isl.cy) // 256 * 256  # across the outline
    for ds in (1, 4):
        big = synth.render_tile(layout, ds, c0 // ds, r0 // ds, 512, 512).astype(int)
        part = synth.render_tile(layout, ds, c0 // ds + 256, r0 // ds + 256, 256, 256)
        assert np.abs(big[256:, 256:] - part).max() <= 1
        assert big.std() > 10


def test_nuclei_same_by_cell_and_by_sample() -> None:
    """Sparse samples (more cells than samples: each sample hashes its own cell, as on coarse
    levels) see exactly the nuclei that dense sampling (cells hashed once) draws there."""
    x = np.arange(2048) * 1.0 + 5000.0  # µm
    y = np.arange(2048) * 1.0 + 7000.0
    for layer in (render_mod._STROMA_NUCLEI, render_mod._TUMOUR_NUCLEI):
        dense = render_mod._nuclei(x, y, layer, 1.0, 17)
        sparse = render_mod._nuclei(x[::32], y[::32], layer, 1.0, 17)
        assert len(x[::32]) ** 2 < (2048 / layer[0]) ** 2  # the by-sample path ran
        np.testing.assert_array_equal(sparse, dense[::32, ::32])
        assert 0.05 < dense.mean() < 0.6  # there are nuclei, and not everywhere


def test_blob_cover_agrees_with_per_pixel_alpha() -> None:
    """The whole-tile shortcut (cover) never disagrees with the per-pixel outline."""
    rng = np.random.default_rng(0)
    layout = layout_mod._Layout(SynthSpec(width=60000, height=60000, mpp=0.5, seed=3))
    seen = {1: 0, -1: 0, 0: 0}
    for blob in layout.islands + layout.tumours:
        for _ in range(60):
            side = float(rng.choice([64.0, 256.0, 2048.0]))
            x0 = blob.cx + rng.uniform(-1.2, 1.2) * blob.extent
            y0 = blob.cy + rng.uniform(-1.2, 1.2) * blob.extent
            edge = side / 256
            xs = x0 + (np.arange(256) + 0.5) * edge
            ys = y0 + (np.arange(256) + 0.5) * edge
            cover = blob.cover((x0, y0, x0 + side, y0 + side), edge)
            alpha = np.clip(blob.signed_dist(xs[None, :], ys[:, None]) / edge + 0.5, 0, 1)
            seen[cover] += 1
            if cover == 1:
                assert alpha.min() == 1.0
            elif cover == -1:
                assert alpha.max() == 0.0
    assert min(seen.values()) > 5, seen


def _radii_um(spec: SynthSpec) -> list[float]:
    """Radius (geometric mean of the semi-axes) of each planted lesion, µm."""
    return [np.sqrt(t.a * t.b) * spec.mpp for t in layout_mod._Layout(spec).tumours]


def test_lesion_sizes_range_from_itc_to_macro() -> None:
    """Over seeds and slide sizes, lesions span CAMELYON's classes: ITC/small micro-metastases
    (< 200 µm radius) everywhere, macro-metastases (> 1000 µm, > 2 mm across) on slides big
    enough to hold them; sizes vary within a slide and come from the seed alone."""
    small_slide, big_slide = [], []
    for seed in range(12):
        small = SynthSpec(width=8192, height=8192, mpp=0.5, seed=seed, n_tumours=3)
        big = SynthSpec(width=60000, height=60000, mpp=0.5, seed=seed, n_tumours=3)
        small_slide += _radii_um(small)
        big_slide += _radii_um(big)
        assert _radii_um(big) == _radii_um(dataclasses.replace(big))  # deterministic
    lo, hi = SynthSpec().tumour_radius_um
    for radii in (small_slide, big_slide):
        assert min(radii) >= lo and max(radii) <= hi
        assert sum(r < 200 for r in radii) >= 5
    assert sum(200 <= r <= 1000 for r in small_slide) >= 3  # micro fits on a 4 mm slide
    assert max(small_slide) < 1000  # but no macro lesion: its islands cannot hold one
    assert sum(r > 1000 for r in big_slide) >= 3 and sum(200 <= r <= 1000 for r in big_slide) >= 5
    assert max(big_slide) / min(big_slide) > 20
    # a user range is kept (test_train plants 200-400 µm lesions)
    fixed = SynthSpec(width=8192, height=8192, mpp=0.5, seed=1, n_tumours=4,
                      tumour_radius_um=(200.0, 400.0))
    assert all(200 <= r <= 400 for r in _radii_um(fixed))


def test_macro_lesion_in_the_ground_truth_mask() -> None:
    """The drawn tumour of a macro-sized draw really is > 2 mm across, inside tissue."""
    from skimage.measure import label, regionprops

    specs = (SynthSpec(width=60000, height=60000, mpp=0.5, seed=s, n_tumours=3)
             for s in range(12))
    spec = next(sp for sp in specs if max(_radii_um(sp)) > 1200)
    mpp = 32.0
    truth = tumour_mask(spec, mpp)
    assert not (truth & ~tissue_truth(spec, mpp)).any()
    regions = regionprops(label(truth))
    diam_um = max(r.equivalent_diameter_area for r in regions) * mpp
    assert diam_um > 2000
    assert len(regions) >= 2


def _read_xml(path: Path) -> tuple[list[np.ndarray], ET.Element]:
    root = ET.parse(path).getroot()
    polys = []
    for ann in root.iter("Annotation"):
        pts = sorted(ann.iter("Coordinate"), key=lambda c: int(c.get("Order")))
        polys.append(np.array([[float(c.get("X")), float(c.get("Y"))] for c in pts]))
    return polys, root


def test_write_dataset(tmp_path: Path) -> None:
    slides = write_dataset(tmp_path / "set", n=5, seed=3, size=1024, tumour_fraction=0.4,
                           flavour="tiff")
    files = sorted(p.name for p in (tmp_path / "set").iterdir())
    names = [f"synth_{i:03d}" for i in range(5)]
    tumour = [s.path.stem for s in slides if s.label]
    assert len(tumour) == 2  # round(5 x 0.4), exactly
    assert files == sorted(["labels.csv"] + [f"{n}.tif" for n in names]
                           + [f"{n}.xml" for n in tumour])
    with open(tmp_path / "set" / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide", "label"]
    assert {r["slide"]: r["label"] for r in rows} == {
        s.path.stem: "Tumor" if s.label else "Normal" for s in slides}
    for s in slides:
        assert s.spec.tumour == bool(s.label)
        with Slide(s.path) as sl:
            assert sl.dimensions == (1024, 1024) and sl.mpp == pytest.approx(0.5)
        if s.label:
            polys, root = _read_xml(s.path.with_suffix(".xml"))
            assert len(polys) == len(s.tumour_polygons) == s.spec.n_tumours
            for got, want in zip(polys, s.tumour_polygons, strict=True):
                np.testing.assert_allclose(got, want, atol=0.006)
                assert ((got >= 0) & (got <= 1024)).all()
            anns = list(root.iter("Annotation"))
            assert {(a.get("Type"), a.get("PartOfGroup")) for a in anns} == {("Polygon", "Tumor")}
            (group,) = root.iter("Group")
            assert (group.get("Name"), group.get("PartOfGroup"), group.get("Color")) == (
                "Tumor", "None", "#F4FA58")
    # a re-run with another seed in the same folder leaves no stale XML on a normal slide
    again = write_dataset(tmp_path / "set", n=5, seed=4, size=1024, tumour_fraction=0.4,
                          flavour="tiff")
    xmls = {p.stem for p in (tmp_path / "set").glob("*.xml")}
    assert xmls == {s.path.stem for s in again if s.label}


def test_dataset_tumour_fraction_and_determinism(tmp_path: Path) -> None:
    """Labels come from the seed alone: no need to render slides to check the split."""
    a = write_dataset(tmp_path / "a", n=4, seed=11, size=512, tumour_fraction=0.75)
    b = write_dataset(tmp_path / "b", n=4, seed=11, size=512, tumour_fraction=0.75)
    assert [s.label for s in a] == [s.label for s in b] and sum(s.label for s in a) == 3
    assert [s.spec for s in a] == [s.spec for s in b]
    assert len({s.spec.seed for s in a}) == 4
    for sa, sb in zip(a, b, strict=True):
        assert sa.path.read_bytes() == sb.path.read_bytes()
    assert sum(s.label for s in write_dataset(tmp_path / "c", 2, size=512,
                                              tumour_fraction=0.0)) == 0


def test_write_asap_xml_groups_and_bad_polygon(tmp_path: Path) -> None:
    polys, root = _read_xml(synth.write_asap_xml(tmp_path / "g.xml", [np.eye(3, 2)], "_0"))
    np.testing.assert_array_equal(polys[0], np.eye(3, 2))
    assert next(root.iter("Annotation")).get("PartOfGroup") == "_0"
    assert next(root.iter("Group")).get("Name") == "_0"
    with pytest.raises(ConfigError, match="polygon 0") as err:
        synth.write_asap_xml(tmp_path / "bad.xml", [np.zeros((2, 2))])
    assert str(tmp_path / "bad.xml") in str(err.value)
    assert not list(tmp_path.glob("*bad.xml*"))


def test_bad_dataset_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tumour_fraction"):
        write_dataset(tmp_path, 2, tumour_fraction=1.5)
    with pytest.raises(ConfigError, match="sets"):
        write_dataset(tmp_path, 2, seed=1, width=512)
    with pytest.raises(ConfigError, match="flavour"):
        SynthSpec(flavour="ndpi")


_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from wsi_prune.synth import SynthSpec, write_slide
    size = int(sys.argv[2])
    write_slide(sys.argv[1], SynthSpec(width=size, height=size, mpp=0.5, seed=1))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


@pytest.mark.slow
def test_write_memory_does_not_grow_with_size(tmp_path: Path) -> None:
    """6x the pixels, about the same peak RSS (each size in a fresh process)."""
    rss = {}
    for size in (8192, 20480):
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / f"{size}.svs"),
                              str(size)], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        rss[size] = int(out.stdout.split()[-1])
    assert rss[20480] < rss[8192] + 48, rss  # MiB
