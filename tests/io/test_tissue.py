"""Tissue masks on synthetic H&E-like images (and on a real Aperio slide when it is present)."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_prune.config import TissueConfig
from wsi_prune.errors import ConfigError
from wsi_prune.io.tissue import TissueMask, pen_mask, tile_fractions, tissue_mask

GLASS = (238, 236, 240)
STROMA = (232, 150, 190)  # eosin pink, saturation ~90/255
NUCLEUS = (120, 80, 170)  # hematoxylin purple, saturation ~135/255
BLUE_INK = (30, 70, 200)
GREEN_INK = (40, 150, 80)
BLACK = (20, 20, 22)


def _noisy(shape: tuple[int, int], colour: tuple[int, int, int], rng, sd: float = 4.0):
    img = np.asarray(colour, np.float32) + rng.normal(0, sd, (*shape, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _he_texture(shape: tuple[int, int], rng, nuclei: float = 0.2) -> np.ndarray:
    """(H, W, 3) uint8 pink stroma with about ``nuclei`` of the area in purple nuclei.

    Nuclei and stroma differ in saturation, so a naive Otsu on an all-tissue image would cut
    the tissue in two: the texture makes the Otsu guard observable.
    """
    img = _noisy(shape, STROMA, rng, sd=8.0)
    nuc = rng.random(shape) < nuclei / 4
    # 2x2 blobs (about 4 px each, so ~nuclei of the area)
    nuc = nuc | np.roll(nuc, 1, 0) | np.roll(nuc, 1, 1) | np.roll(np.roll(nuc, 1, 0), 1, 1)
    img[nuc] = _noisy(shape, NUCLEUS, rng, sd=8.0)[nuc]
    return img


def _disc_image(size: int = 400, radius: float = 120.0, seed: int = 0):
    """Glass with one H&E disc centred in the image; returns (rgb, disc mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius**2
    img = _noisy((size, size), GLASS, rng)
    img[disc] = _he_texture((size, size), rng)[disc]
    return img, disc


# -- whole-image masks ---------------------------------------------------------------------------
def test_disc_fraction_and_location():
    img, disc = _disc_image()
    tm = tissue_mask(img, mpp=8.0)
    assert isinstance(tm, TissueMask)
    assert tm.mask.shape == img.shape[:2] and tm.mask.dtype == bool
    assert tm.mpp == 8.0
    assert tm.fraction == pytest.approx(disc.mean(), abs=0.03)
    assert tm.fraction == pytest.approx(tm.mask.mean())
    # the mask is the disc: almost all of it inside, almost all of the disc covered
    assert (tm.mask & disc).sum() / tm.mask.sum() > 0.98
    assert (tm.mask & disc).sum() / disc.sum() > 0.97
    assert tm.tissue_um2 == pytest.approx(tm.mask.sum() * 64.0)


def test_pen_strokes_and_black_border_are_not_tissue():
    img, disc = _disc_image(seed=1)
    blue = np.zeros(disc.shape, bool)
    blue[100:106, 20:380] = True  # crosses the disc and the glass
    green = np.zeros(disc.shape, bool)
    green[20:380, 290:296] = True
    border = np.zeros(disc.shape, bool)
    border[:, :15] = True
    img[blue] = BLUE_INK
    img[green] = GREEN_INK
    img[border] = BLACK
    tm = tissue_mask(img, mpp=8.0)
    assert not tm.mask[blue].any()
    assert not tm.mask[green].any()
    assert not tm.mask[border].any()
    # the rest of the disc is still tissue
    rest = disc & ~blue & ~green
    assert tm.mask[rest].mean() > 0.97
    # with pen rejection off, the inked glass is (wrongly) tissue: the rejection is what works
    loose = tissue_mask(img, mpp=8.0, config=TissueConfig(reject_pen=False))
    assert loose.mask[blue & ~disc].mean() > 0.9


def test_pen_mask_colours_and_he_is_not_ink():
    rng = np.random.default_rng(2)
    tissue = _he_texture((64, 64), rng)
    assert pen_mask(tissue).mean() < 0.01
    for ink in (BLUE_INK, GREEN_INK, (200, 30, 35), (45, 45, 50)):
        patch = _noisy((16, 16), ink, rng, sd=3.0)
        assert pen_mask(patch).mean() > 0.95, ink
    # eosin-rich (red blood cell like) pink keeps its blue, so it is not red marker
    assert not pen_mask(_noisy((16, 16), (215, 70, 120), rng, sd=3.0)).any()
    # dense hematoxylin is dark but saturated, so it is not black marker
    assert not pen_mask(_noisy((16, 16), (75, 45, 110), rng, sd=3.0)).any()
    # glass is not ink
    assert not pen_mask(_noisy((16, 16), GLASS, rng)).any()


def test_min_region_is_in_square_micrometres():
    rng = np.random.default_rng(3)
    img = _noisy((200, 200), GLASS, rng)
    img[100:105, 100:105] = NUCLEUS  # 25 px speck, away from the edges
    cfg = TissueConfig(min_region_um2=20_000.0)
    # 25 px at 8 µm/px = 1 600 µm² < 20 000 µm²: dropped
    assert not tissue_mask(img, mpp=8.0, config=cfg).mask.any()
    # the same pixels at 40 µm/px are 40 000 µm² > 20 000 µm²: kept
    kept = tissue_mask(img, mpp=40.0, config=cfg)
    assert kept.mask[100:105, 100:105].all()
    assert kept.mask.sum() == 25


def test_small_hole_filled_large_hole_kept():
    rng = np.random.default_rng(4)
    img = _noisy((200, 200), GLASS, rng)
    img[40:160, 40:160] = _he_texture((120, 120), rng)
    img[70:76, 70:76] = GLASS  # 36 px = 2 304 µm² at 8 µm/px: a hole to fill
    img[110:130, 110:130] = GLASS  # 400 px = 25 600 µm²: a real lumen, kept
    cfg = TissueConfig(closing_um=0.0, min_hole_um2=10_000.0)
    tm = tissue_mask(img, mpp=8.0, config=cfg)
    assert tm.mask[70:76, 70:76].all()
    assert not tm.mask[110:130, 110:130].any()
    # with hole filling off the small hole stays open: the filling is what closed it
    open_ = tissue_mask(img, mpp=8.0, config=TissueConfig(closing_um=0.0, min_hole_um2=0.0))
    assert not open_.mask[70:76, 70:76].any()


def test_closing_is_in_micrometres():
    rng = np.random.default_rng(5)
    img = _noisy((200, 200), GLASS, rng)
    img[40:160, 40:97] = _he_texture((120, 57), rng)
    img[40:160, 100:160] = _he_texture((120, 60), rng)  # a 3 px (24 µm) crack at x 97-99
    cfg = TissueConfig(closing_um=16.0, min_hole_um2=0.0)
    assert tissue_mask(img, mpp=8.0, config=cfg).mask[60:140, 97:100].all()  # r = 2 px: bridged
    assert not tissue_mask(img, mpp=8.0, config=TissueConfig(closing_um=4.0, min_hole_um2=0.0)
                           ).mask[60:140, 97:100].any()  # r = 0.5 px: no closing


def test_all_glass_tile_has_no_tissue():
    rng = np.random.default_rng(6)
    tm = tissue_mask(_noisy((56, 56), GLASS, rng), mpp=2.0)
    assert tm.fraction == 0.0
    assert tm.mask.shape == (56, 56)


def test_all_tissue_tile_is_all_tissue():
    # Otsu on a glass-free tile would split nuclei from stroma; the guard falls back to the
    # saturation floor and keeps the whole tile.
    rng = np.random.default_rng(7)
    tm = tissue_mask(_he_texture((56, 56), rng), mpp=2.0)
    assert tm.fraction > 0.99
    # also at thumbnail scale and at full resolution (the distance-transform closing path)
    assert tissue_mask(_he_texture((300, 300), rng), mpp=8.0).fraction > 0.99
    assert tissue_mask(_he_texture((224, 224), rng), mpp=0.5).fraction > 0.99


@pytest.mark.parametrize(("size", "mpp"), [(56, 2.0), (224, 0.5), (400, 8.0)])
def test_half_tissue_tile(size, mpp):
    # Tissue touching the tile edge is kept although it is smaller than min_region_um2 (it may
    # continue outside the tile), and edge pixels are not eroded by the closing.
    rng = np.random.default_rng(8)
    img = _noisy((size, size), GLASS, rng)
    img[:, : size // 2] = _he_texture((size, size // 2), rng)
    tm = tissue_mask(img, mpp=mpp)
    assert tm.fraction == pytest.approx(0.5, abs=0.02)
    assert tm.mask[:, : size // 2 - 2].all()
    assert not tm.mask[:, size // 2 + 2 :].any()


def test_rgba_transparent_is_background_and_bad_input_raises():
    rng = np.random.default_rng(9)
    rgba = np.dstack([_he_texture((64, 64), rng), np.full((64, 64), 255, np.uint8)])
    rgba[:, 32:, 3] = 0
    tm = tissue_mask(rgba, mpp=2.0)
    assert tm.fraction == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask(np.zeros((8, 8, 3), np.float32), mpp=2.0)
    with pytest.raises(ValueError, match="mpp"):
        tissue_mask(np.zeros((8, 8, 3), np.uint8), mpp=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"white_threshold": 300},
        {"black_threshold": -1},
        {"black_threshold": 220, "white_threshold": 215},
        {"saturation_min": 256},
        {"closing_um": -1.0},
        {"min_region_um2": -5.0},
        {"mask_mpp": 0.1},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        TissueConfig(**kwargs)


# -- tile fractions ------------------------------------------------------------------------------
def test_tile_fractions_inside_outside_half_and_edge():
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True  # left half tissue
    # level 0 at 0.5 µm/px, mask at 8 µm/px: 16 level-0 px per mask px; 256 px tiles = 16 mask px
    xy = np.array(
        [
            [0, 0],  # inside
            [60 * 16, 0],  # outside
            [42 * 16, 40 * 16],  # columns 42-57: half
            [-8 * 16, 0],  # half past the left edge, the rest inside tissue
            [300 * 16, 300 * 16],  # entirely past the mask
        ]
    )
    f = tile_fractions(mask, 8.0, xy, 256, 0.5)
    assert f.dtype == np.float32 and f.shape == (5,)
    np.testing.assert_allclose(f, [1.0, 0.0, 0.5, 0.5, 0.0])

    full = np.ones((100, 100), bool)
    g = tile_fractions(full, 8.0, np.array([[92 * 16, 0], [92 * 16, 96 * 16]]), 256, 0.5)
    np.testing.assert_allclose(g, [0.5, 0.125])  # 8/16 columns; 8/16 x 4/16 inside
    assert tile_fractions(full, 8.0, np.zeros((0, 2), int), 256, 0.5).shape == (0,)


def test_tile_fractions_match_brute_force_on_unaligned_tiles():
    rng = np.random.default_rng(10)
    mask = rng.random((40, 50)) < 0.5
    scale = 5  # level-0 px per mask px (mask 2.5 µm/px, level 0 0.5 µm/px)
    tile = 23  # not a multiple of the mask pixel
    xy = rng.integers(-30, 260, (300, 2))
    f = tile_fractions(mask, 2.5, xy, tile, 0.5)
    # reference: the mask upsampled to level 0 with the past-edge padding as background
    big = np.zeros((40 * scale + 400, 50 * scale + 400), bool)
    big[100 : 100 + 40 * scale, 100 : 100 + 50 * scale] = np.kron(mask, np.ones((scale, scale)))
    exact = np.array(
        [big[y + 100 : y + 100 + tile, x + 100 : x + 100 + tile].mean() for x, y in xy]
    )
    # rounding each edge to the nearest mask pixel moves it by at most half a mask pixel
    # (2.5 level-0 px) per side, so at most ~2 x 2.5 / 23 of the tile area per axis
    assert np.abs(f - exact).max() <= 0.45
    assert np.abs(f - exact).mean() < 0.08
    assert np.corrcoef(f, exact)[0, 1] > 0.9


# -- a real slide --------------------------------------------------------------------------------
def test_real_aperio_slide_fraction(real_slide):
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(real_slide)) as slide:
        w, h = slide.dimensions
        mpp0 = float(slide.properties["openslide.mpp-x"])
        rgb = np.asarray(slide.get_thumbnail((w // 16, h // 16)).convert("RGB"))
    mpp = mpp0 * w / rgb.shape[1]
    tm = tissue_mask(rgb, mpp=mpp)
    # Measured 0.366 at ~8 µm/px; the overlay shows the skin section masked, glass and the
    # loose dust speck outside it not masked.
    assert 0.26 <= tm.fraction <= 0.46
    # the left third is mostly glass, the bottom-centre is dense tissue
    hh, ww = tm.mask.shape
    assert tm.mask[: hh // 3, : ww // 4].mean() < 0.1
    assert tm.mask[int(hh * 0.8) :, int(ww * 0.35) : int(ww * 0.55)].mean() > 0.85
