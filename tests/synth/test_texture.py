"""Texture slides: real H&E texture read by real OpenSlide with the right MPP, pyramid levels
that agree with level 0, lesions whose XML outlines cover darker nuclear texture, CAMELYON16
size classes and FROC countability that follow the drawn outlines, determinism from a seed,
labels/XML/lesion tables that the package's readers parse, and a clear error without the
source slide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from click.testing import CliRunner

from wsi_prune.cli import main
from wsi_prune.errors import ConfigError, SlideError
from wsi_prune.io.annotations import evaluation_mask, lesion_mask, read_asap_xml
from wsi_prune.io.labels import read_labels
from wsi_prune.io.slide import Slide
from wsi_prune.io.tissue import tissue_mask
from wsi_prune.synth import (
    TextureLayout,
    TextureSpec,
    build_texture_bank,
    nuclear_darkness,
    plan_texture_dataset,
    render_region,
    size_class,
    write_texture_dataset,
    write_texture_slide,
)
from wsi_prune.synth.lesions import feret_px
from wsi_prune.synth.pyramid import downsample, write_pyramid

SIZE = 2048
SEED = 3


@pytest.fixture(scope="module")
def texture_set(real_slide: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two tumour and one normal 2048² px slide at 0.5 µm/px, default difficulty (0.5)."""
    out = tmp_path_factory.mktemp("texture")
    slides = write_texture_dataset(out, n_tumour=2, n_normal=1, size=SIZE, seed=SEED,
                                   source=real_slide)
    return out, slides


def test_openslide_reads_texture_slide_with_mpp(texture_set) -> None:
    _, slides = texture_set
    for s in slides:
        with openslide.OpenSlide(str(s.path)) as osr:
            assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
            assert osr.properties[openslide.PROPERTY_NAME_MPP_X] == "0.5"
            assert osr.level_dimensions == ((SIZE, SIZE), (SIZE // 2, SIZE // 2))
        with Slide(s.path) as sl:
            assert (sl.mpp, sl.info.mpp_source) == (0.5, "openslide")
            thumb = sl.read_thumbnail(8.0)
        # real tissue on glass: a stained part and a glass part
        frac = tissue_mask(thumb, 8.0).fraction
        assert 0.15 < frac < 0.7, frac


def test_tiff_flavour_has_resolution_tags(texture_set, tmp_path: Path) -> None:
    _, slides = texture_set
    spec = TextureSpec(width=1536, height=1100, mpp=0.5, seed=4, tumour=False, flavour="tiff",
                       bank_seed=slides[0].spec.bank_seed, source=slides[0].spec.source)
    s = write_texture_slide(tmp_path / "t.tif", spec)
    with openslide.OpenSlide(str(s.path)) as osr:
        assert osr.properties["tiff.ResolutionUnit"] == "centimeter"
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        # 1536x1100 -> 768x550 (short side 1100 > 1024 asks for one reduced level)
        assert osr.level_dimensions == ((1536, 1100), (768, 550))
        corner = np.asarray(osr.read_region((1530, 1094), 0, (6, 6)))
        assert corner[..., 3].min() == 255  # the last partial tile decodes


def test_pyramid_levels_agree_with_level0(texture_set) -> None:
    _, slides = texture_set
    with openslide.OpenSlide(str(slides[0].path)) as osr:
        full = np.asarray(osr.read_region((0, 0), 0, (SIZE, SIZE)).convert("RGB"))
        half = np.asarray(osr.read_region((0, 0), 1, (SIZE // 2, SIZE // 2)).convert("RGB"))
    pooled = downsample(full, 2).astype(np.float64)
    diff = np.abs(pooled - half).mean()
    # level 1 is the box average of level 0 before JPEG: only the two levels' compression
    # noise is left (measured 2.8 grey levels on this fine texture) ...
    assert diff < 4, diff
    # ... far below what a level one pixel off would show
    shifted = np.abs(pooled[:, 1:] - half[:, :-1]).mean()
    assert shifted > 2 * diff, (shifted, diff)
    assert pooled.std() > 20  # and the picture is not flat


def test_lesion_outlines_cover_darker_nuclear_texture(texture_set) -> None:
    """Inside the XML outlines the share of nuclear haematoxylin is higher than in the rest of
    the tissue (mimics included), on average over the tumour slides, by a margin."""
    out, slides = texture_set
    inside, outside = [], []
    for s in slides:
        if not s.label:
            continue
        anns = read_asap_xml(out / f"{s.path.stem}.xml")
        with openslide.OpenSlide(str(s.path)) as osr:
            rgb = np.asarray(osr.read_region((0, 0), 0, (SIZE, SIZE)).convert("RGB"))
        dark = nuclear_darkness(rgb).reshape(SIZE // 4, 4, SIZE // 4, 4).mean(axis=(1, 3))
        lesion = lesion_mask(anns, (SIZE, SIZE), 2.0, 0.5)
        tissue = tissue_mask(downsample(rgb, 4), 2.0).mask
        assert lesion.sum() > 50 and (lesion & ~tissue).mean() < 0.01  # lesions lie in tissue
        inside.append(dark[lesion].mean())
        outside.append(dark[tissue & ~lesion].mean())
    # measured 0.19 and 0.14 inside vs 0.05 and 0.06 outside for this seed; a lesion drawn off
    # its outline, or not drawn, fails
    assert np.mean(inside) > np.mean(outside) + 0.05, (inside, outside)


def test_difficulty_moves_tumour_towards_normal(texture_set) -> None:
    """The same lesion is less dark at difficulty 1 than at 0: the knob moves its grade."""
    _, slides = texture_set
    s = next(s for s in slides if s.label)
    means = []
    for d in (0.0, 1.0):
        lay = TextureLayout(TextureSpec(**{**_spec_dict(s.spec), "difficulty": d}))
        les = lay.lesions[0]
        x, y = int(les.centre_xy[0]) - 32, int(les.centre_xy[1]) - 32
        means.append(nuclear_darkness(render_region(lay, x, y, 64, 64)).mean())
        assert les.kind == s.lesions[0].kind  # same places and sizes, other grades
    assert means[0] > means[1], means


def test_boxes_render_independently(texture_set) -> None:
    """A box rendered alone equals the same pixels of a bigger render (across a lesion edge):
    the property that lets the writer work tile by tile."""
    _, slides = texture_set
    s = next(s for s in slides if s.label)
    lay = TextureLayout(s.spec)
    les = lay.lesions[0]
    x0 = int(les.shape.cx - les.shape.extent) - 256  # straddles the lesion outline
    y0 = int(les.shape.cy) - 256
    big = render_region(lay, x0, y0, 512, 512).astype(int)
    for dx, dy in ((0, 0), (256, 0), (0, 256), (256, 256)):
        part = render_region(lay, x0 + dx, y0 + dy, 256, 256)
        assert np.abs(big[dy : dy + 256, dx : dx + 256] - part).max() <= 1
    assert big.std() > 20


def _spec_dict(spec: TextureSpec) -> dict:
    return {f: getattr(spec, f) for f in spec.__dataclass_fields__}


def test_same_seed_same_pixels_other_seed_differs(texture_set, tmp_path: Path) -> None:
    _, slides = texture_set
    base = TextureSpec(width=1024, height=1024, seed=9, n_lesions=1, difficulty=0.2,
                       bank_seed=slides[0].spec.bank_seed, source=slides[0].spec.source)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_texture_slide(tmp_path / "a" / "s.svs", base)
    b = write_texture_slide(tmp_path / "b" / "s.svs", base, workers=2)  # threads must not matter
    c = write_texture_slide(tmp_path / "c.svs", TextureSpec(**{**_spec_dict(base), "seed": 10}))
    assert a.path.read_bytes() == b.path.read_bytes()
    assert [r.diameter_um for r in a.lesions] == [r.diameter_um for r in b.lesions]

    def pixels(p: Path) -> np.ndarray:
        with openslide.OpenSlide(str(p)) as osr:
            return np.asarray(osr.read_region((0, 0), 0, (1024, 1024)))[..., :3].astype(int)

    assert np.abs(pixels(a.path) - pixels(c.path)).mean() > 5


def test_bank_is_deterministic_real_texture(real_slide: Path) -> None:
    a = build_texture_bank(real_slide, mpp=0.5, seed=5, n_patches=6, patch_px=128)
    b = build_texture_bank(real_slide, mpp=0.5, seed=5, n_patches=6, patch_px=128)
    c = build_texture_bank(real_slide, mpp=0.5, seed=6, n_patches=6, patch_px=128)
    assert a.patches.shape == (6, 128, 128, 3)
    assert np.array_equal(a.patches, b.patches) and not np.array_equal(a.patches, c.patches)
    assert np.all(np.diff(a.density) >= 0)  # palest first
    # tissue, not glass: every patch is mostly stained
    assert ((a.patches.min(axis=-1) > 215).mean(axis=(1, 2)) <= 0.25).all()


def test_size_classes_and_froc_countability_follow_the_outlines() -> None:
    """On a planned set of 16 tumour slides of 12288² px (no pixels drawn): each lesion's class is
    that of its outline's longest diameter, each tumour slide has 1-4 micro/macro lesions, and
    the evaluation's own ITC rule counts >= 40 lesions."""
    plan = plan_texture_dataset(16, 0, size=12288, seed=2, difficulty=0.5)
    countable, by_kind = 0, {"ITC": 0, "micro": 0, "macro": 0}
    for _, spec in plan:
        lay = TextureLayout(spec)
        if not spec.tumour:
            assert not lay.lesions
            continue
        for r in lay.lesions:
            assert r.kind == size_class(feret_px(r.polygon()) * spec.mpp)
            assert r.diameter_um == pytest.approx(feret_px(r.polygon()) * spec.mpp)
            by_kind[r.kind] += 1
        main_lesions = sum(r.kind != "ITC" for r in lay.lesions)
        assert 1 <= main_lesions <= 4
        # countability agrees with evaluation_mask run on the outlines as the XML has them
        from wsi_prune.io.annotations import Annotation

        les = evaluation_mask([Annotation(r.polygon(), "Tumor") for r in lay.lesions], spec.mpp)
        assert les.n_lesions == sum(r.countable for r in lay.lesions)
        assert all(r.countable or r.kind != "macro" for r in lay.lesions)
        assert not any(r.countable for r in lay.lesions if r.kind == "ITC")
        countable += les.n_lesions
        # mimics are clear of lesions by more than the evaluation's 75 µm margin
        for m in lay.mimics:
            for r in lay.lesions:
                gap = np.hypot(m.shape.cx - r.shape.cx, m.shape.cy - r.shape.cy) \
                    - m.shape.extent - r.shape.extent
                assert gap * spec.mpp > 75
    assert countable >= 40, countable
    assert by_kind["macro"] >= 1 and by_kind["micro"] >= 16 and by_kind["ITC"] >= 1, by_kind


def test_labels_xml_and_lesion_table_parse(texture_set) -> None:
    out, slides = texture_set
    labels = read_labels(out / "labels.csv")
    assert labels == {s.path.stem: s.label for s in slides}
    assert sorted(labels.values()) == [0, 1, 1]
    rows = list(csv.DictReader((out / "lesions.csv").open()))
    meta = json.loads((out / "dataset.json").read_text())
    for s in slides:
        xml = out / f"{s.path.stem}.xml"
        assert xml.exists() == bool(s.label)
        if s.label:
            anns = read_asap_xml(xml)
            assert len(anns) == len(s.lesions) >= 1
            for ann, r in zip(anns, s.lesions, strict=True):
                assert ann.role == "positive"
                np.testing.assert_allclose(ann.coords, r.polygon(), atol=0.006)
        mine = [r for r in rows if r["slide"] == s.path.stem]
        assert [r["kind"] for r in mine] == [r.kind for r in (*s.lesions, *s.mimics)]
        assert meta["slides"][s.path.stem]["label"] == s.label
    c = meta["counts"]
    assert (c["slides"], c["tumour_slides"], c["normal_slides"]) == (3, 2, 1)
    assert c["lesions"] == c["ITC"] + c["micro"] + c["macro"] == sum(len(s.lesions) for s in slides)
    assert c["countable"] == sum(r["countable"] == "yes" for r in rows)


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "he.svs"
    spec = TextureSpec(width=1024, height=1024, seed=1, source=str(missing))
    with pytest.raises(SlideError, match="real H&E slide") as exc:
        write_texture_slide(tmp_path / "x.svs", spec)
    assert str(missing) in str(exc.value)
    assert not (tmp_path / "x.svs").exists()
    with pytest.raises(ConfigError, match="difficulty"):
        TextureSpec(difficulty=1.5)


def test_cli_texture_preset(texture_set, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, ["synth", "--preset", "texture", "--n", "1", "--size", "1024",
                                    "--seed", str(SEED), "--difficulty", "0.3",
                                    "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "FROC-countable" in res.output
    assert (out / "texture_000.svs").exists() and (out / "texture_000.xml").exists()
    assert json.loads((out / "dataset.json").read_text())["difficulty"] == 0.3
    res = CliRunner().invoke(main, ["synth", "--difficulty", "0.3", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--preset texture" in res.output


def test_write_pyramid_streams_exact_box_averages(tmp_path: Path) -> None:
    """Odd sizes, partial tiles and a level step of 4: every level is the box average of the
    level above, computed from bands."""
    rng = np.random.default_rng(0)
    img = np.repeat((rng.uniform(0, 1, (37, 29, 1)) * 255).astype(np.uint8), 3, axis=2)  # grey: no
    # JPEG chroma subsampling to blur the check
    big = np.kron(img, np.ones((40, 40, 1), np.uint8))[:1300, :1100]  # smooth-ish, 1300x1100

    def render(x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.zeros((h, w, 3), np.uint8)
        part = big[y : y + h, x : x + w]
        out[: part.shape[0], : part.shape[1]] = part
        return out

    shapes = [(1100, 1300, 1), (275, 325, 4)]
    write_pyramid(tmp_path / "p.tif", 1100, 1300, render, level_shapes=shapes, tile=64,
                  quality=95)  # fmt: skip
    with openslide.OpenSlide(str(tmp_path / "p.tif")) as osr:
        assert osr.level_dimensions == ((1100, 1300), (275, 325))
        lvl1 = np.asarray(osr.read_region((0, 0), 1, (275, 325)).convert("RGB")).astype(float)
    assert np.abs(lvl1 - downsample(big, 4)).mean() < 2.0
    assert not list(tmp_path.glob(".*"))  # scratch files and partial file removed
    # a partial block averages what it has (edge pixels repeated)
    np.testing.assert_array_equal(downsample(np.full((3, 5, 3), 9, np.uint8), 2),
                                  np.full((2, 3, 3), 9, np.uint8))
