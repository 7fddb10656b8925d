"""heatmap.png and tokens.png drawn with numpy and Pillow: the colour table, the PNG writer and
what the pictures show, pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from wsi_prune.outputs import _draw
from wsi_prune.outputs.pictures import (
    GREEN,
    GREY,
    HEAT_ALPHA,
    LIME,
    ORANGE,
    render_heatmap,
    render_tokens,
    thumbnail,
    token_layer,
)


def test_inferno_table_is_matplotlibs():
    import matplotlib

    cmap = matplotlib.colormaps["inferno"]
    expected = (cmap(np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(_draw.INFERNO, expected)
    # indexed as matplotlib indexes a 256-entry map
    v = np.array([0.0, 0.3, 0.5, 0.999, 1.0, 1.5, -1.0, np.nan], np.float32)
    ours = _draw.colormap(v)
    theirs = (cmap(np.nan_to_num(v, nan=0.0).clip(0, 1))[:, :3] * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(ours, theirs)


def test_png_round_trips_through_pillow(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    _draw.save_png(tmp_path / "x.png", rgb)
    with Image.open(tmp_path / "x.png") as im:
        assert im.mode == "RGB" and im.size == (53, 37)
        assert np.array_equal(np.asarray(im), rgb)


def test_blend_matches_float_within_one_level():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    top = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    alpha = rng.random((64, 64)).astype(np.float32)
    ref = base * (1 - alpha[..., None]) + top * alpha[..., None]
    assert np.abs(_draw.blend(base, top, alpha).astype(float) - ref).max() <= 1.0
    assert np.array_equal(_draw.blend(base, top, 0.0), base)


def test_heatmap_shows_heat_over_the_slide_and_glass_untouched(tmp_path):
    # a white 200 px slide picture; a 2 x 2 heat map whose px cover 100 picture px each:
    # hot, no tissue (NaN), cold, half
    thumb = np.full((200, 200, 3), 255, np.uint8)
    heat = np.array([[1.0, np.nan], [0.0, 0.5]], np.float32)
    tissue = np.zeros((200, 200), bool)
    tissue[20:180, 20:80] = True
    x0, y0 = render_heatmap(tmp_path / "h.png", thumb, 1.0, heat, 100.0, tissue, "slide 1")
    img = np.asarray(Image.open(tmp_path / "h.png"))
    assert img.shape[1] > 200 + 40 and img.shape[0] > 200  # colour bar, title
    pic = img[y0:y0 + 200, x0:x0 + 200].astype(int)
    white = np.array([255, 255, 255])

    def expect(v):
        return (white * (1 - HEAT_ALPHA) + _draw.INFERNO[min(int(v * 256), 255)] * HEAT_ALPHA)

    assert np.abs(pic[40, 40] - expect(1.0)).max() <= 3  # hot, inside the cell
    assert np.abs(pic[150, 150] - expect(0.5)).max() <= 3
    assert np.abs(pic[150, 50] - expect(0.0)).max() <= 3
    assert (pic[40, 150] == white).all()  # NaN: glass stays as scanned, no bleed
    assert (pic[100, 20] == LIME).all() and (pic[100, 50] != LIME).any()  # contour only
    # the colour bar holds the whole table, hot end up
    bar = img[y0:y0 + 200, x0 + 200:]
    assert (np.abs(bar.astype(int) - _draw.INFERNO[255]).max(axis=2) <= 6).any()
    assert (np.abs(bar.astype(int) - _draw.INFERNO[0]).max(axis=2) <= 6).any()


def test_tokens_picture_counts_the_kept_tokens(run):
    g = zarr.open_group(str(run / "small.zarr"), mode="r")
    rgba, px0 = token_layer(g)
    final = np.asarray(g["vit/kept_tokens"][:])[:, -1]
    n_tiles, n_kept = g["tiles/grid"].shape[0], g["vit/tile_index"].shape[0]
    g_side = int(round(np.sqrt(final.shape[1])))
    assert rgba.shape[0] == g.attrs["grid"]["n_rows"] * g_side  # one px per token
    assert px0 == pytest.approx(g.attrs["grid"]["tile_level0"] / g_side)
    px = rgba.reshape(-1, 4)
    assert (px == GREEN).all(axis=1).sum() == final.sum()
    assert (px == ORANGE).all(axis=1).sum() == final.size - final.sum()
    assert (px == GREY).all(axis=1).sum() == (n_tiles - n_kept) * g_side ** 2
    assert (px[:, 3] == 0).sum() == px.shape[0] - n_tiles * g_side ** 2


def test_tokens_png_over_the_slide(run, tmp_path):
    g = zarr.open_group(str(run / "small.zarr"), mode="r")
    thumb, thumb_px0 = thumbnail(g, None, None)
    x0, y0 = render_tokens(tmp_path / "t.png", thumb, thumb_px0, g, "small: token QC")
    img = np.asarray(Image.open(tmp_path / "t.png"))
    h, w = thumb.shape[:2]
    pic = img[y0:y0 + h, x0:x0 + w]
    green = _draw.blend(thumb, np.broadcast_to(np.array(GREEN[:3], np.uint8), thumb.shape),
                        GREEN[3] / 255)
    # green over the tokens that reached the last block (nearest-resized: exact colours)
    assert (pic == green).all(axis=2).any()
    # glass far from any tile is the slide picture itself
    assert np.array_equal(pic[:3, :3], thumb[:3, :3])


def test_thumbnail_reads_a_pyramid_level_as_is(run):
    g = zarr.open_group(str(run / "small.zarr"), mode="r")
    thumb, px0 = thumbnail(g, None, None)
    # the 2048² slide's 1024² level is within 3/4 of PICTURE_PX: read as it is, not shrunk
    # from the 2048² level
    assert thumb.shape[:2] == (1024, 1024) and px0 == 2.0
