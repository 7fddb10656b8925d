"""TIFF slides' levels read tile by tile with tifffile (``wsi_prune.io.tiff_levels``): the same
pixels as OpenSlide, and OpenSlide wherever that cannot be shown."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import openslide
import pytest

from wsi_prune.io import tiff_levels
from wsi_prune.io.slide import Slide, _resize, _to_rgb
from wsi_prune.io.tiling import read_tiles


def _openslide_rgb(path: Path, level: int, xy: tuple[int, int], size: tuple[int, int]
                   ) -> np.ndarray:
    """OpenSlide's read, transparent (outside the slide) as white, as ``Slide`` gives it."""
    with openslide.OpenSlide(str(path)) as osr:
        return _to_rgb(np.asarray(osr.read_region(xy, level, size)))


@pytest.mark.parametrize("fixture", ["svs_slide", "tiff_slide", "real_slide"])
def test_levels_read_by_tifffile_equal_openslide_bit_for_bit(fixture: str, request) -> None:
    """An Aperio SVS (YCbCr JPEG), a generic pyramidal TIFF and the real Aperio slide (RGB
    JPEG): every level is read here, and tiles at the pipeline's two resolutions, inside and
    across the slide's edge, equal OpenSlide's reads of the same boxes."""
    path = request.getfixturevalue(fixture)
    with Slide(path) as s:
        assert s.info.reader == "openslide+tifffile"
        assert s._levels.levels == tuple(range(s.info.level_count))
        w, h = s.dimensions
        side = round(224 * 0.5 / s.mpp)
        # on the tile grid, as the pipeline reads (the last box crosses the right and bottom
        # edges); off the grid, a level of downsample d starts at level-0 px x / d, which
        # OpenSlide interpolates when it is not whole, and which is rounded here
        xy = np.array([[0, 0], [side * 3, side * 2], [w // side * side, h // side * side]])
        for mpp, px in ((0.5, 224), (2.0, 56)):
            level = s.best_level(mpp)
            ds = s.info.level_downsamples[level]
            tiles, bad = read_tiles(s, xy, float(side), mpp, px)
            assert not bad
            for (x, y), tile in zip(xy, tiles, strict=True):
                # the same box straight from OpenSlide, resized as Slide.read resizes
                n = max(1, -(-side // round(ds)))
                raw = _openslide_rgb(path, level, (int(x), int(y)), (n, n))
                assert np.array_equal(tile, _resize(raw, (px, px))), (fixture, mpp, x, y)


def test_a_level_that_differs_from_openslide_is_left_to_openslide(svs_slide: Path,
                                                                   tmp_path: Path) -> None:
    """The check at opening compares each level with OpenSlide; a level whose pixels differ
    (here: OpenSlide's answer altered for level 1) is read by OpenSlide, the others are not,
    and the verdict holds for the file in this process."""
    path = tmp_path / "copy.svs"
    shutil.copy(svs_slide, path)
    with Slide(path) as s:
        dims = s.info.level_dimensions
    levels = tiff_levels.open_levels(str(path), "aperio", dims)
    assert levels is not None and levels.levels == tuple(range(len(dims)))
    tiff_levels._checked.clear()
    with openslide.OpenSlide(str(path)) as osr:
        def altered(level, x, y, w, h):
            rgb = np.asarray(osr.read_region((x, y), level, (w, h)).convert("RGB")).copy()
            if level == 1:
                rgb[0, 0, 0] ^= 1
            return rgb

        levels.check(altered, tuple(osr.level_downsamples))
    assert levels.levels == tuple(k for k in range(len(dims)) if k != 1)
    levels.close()
    with Slide(path) as s:  # the same file: the verdict is remembered, level 1 is OpenSlide's
        assert s._levels.levels == levels.levels
        assert not s._levels.reads(1) and s._levels.reads(0)


def test_other_vendors_and_odd_pages_stay_openslides(tmp_path: Path, svs_slide: Path) -> None:
    import tifffile

    with Slide(svs_slide) as s:
        dims = s.info.level_dimensions
    # a vendor whose files are not plain TIFF pages
    assert tiff_levels.open_levels(str(svs_slide), "ventana", dims) is None
    # a JPEG 2000 TIFF (Aperio 33003/33005 decode differently) is not read here
    rng = np.random.default_rng(0)
    p = tmp_path / "j2k.tif"
    tifffile.imwrite(p, rng.integers(0, 255, (512, 512, 3), dtype=np.uint8), tile=(256, 256),
                     photometric="rgb", compression="jpeg2000")
    assert tiff_levels.open_levels(str(p), "generic-tiff", ((512, 512),)) is None


def test_threads_reading_two_levels_of_one_handle_get_the_right_pixels(svs_slide: Path) -> None:
    """The levels of one file share its file handle: reads of level 0 and of level 2 from two
    threads at once give what each gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    with Slide(svs_slide) as s:
        boxes = [((x, y), mpp) for x in range(0, 3584, 448) for y in range(0, 3584, 896)
                 for mpp in (0.5, 2.0)]
        alone = [s.read(xy, (448, 448), mpp) for xy, mpp in boxes]
    with Slide(svs_slide) as s, ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda b: s.read(b[0], (448, 448), b[1]), boxes * 3))
    for i, img in enumerate(together):
        assert np.array_equal(img, alone[i % len(boxes)])


def test_a_large_read_gives_the_same_pixels_in_threads(svs_slide: Path, monkeypatch) -> None:
    # Level 0 of the 4096² slide read whole at 8 µm/px, in blocks of at most 1024² level px
    # (patched down from 4096² so that this small slide needs many): read side by side in
    # threads (blocks of 512²) it is the area average of the whole level, as one after another.
    from wsi_prune.io import slide as slide_mod

    monkeypatch.setattr(slide_mod, "_MAX_READ_PX", 1024)
    seen = set()
    real_read = Slide._read_region

    def spy(self, xy, level, size):
        seen.add(threading.current_thread().name.startswith("wsi-prune-read"))
        return real_read(self, xy, level, size)

    with Slide(svs_slide) as s:
        assert s.info.reader == "openslide+tifffile"
        whole = _resize(s._read_region((0, 0), 0, s.dimensions), (256, 256))
        monkeypatch.setattr(Slide, "_read_region", spy)
        threaded = s.read_thumbnail(8.0, level=0)
        again = s.read_thumbnail(8.0, level=0)
        monkeypatch.setattr(slide_mod, "_READ_THREADS", 1)
        one = s.read_thumbnail(8.0, level=0)
    assert seen == {True, False}  # the threaded reads ran in the pool, the last one did not
    assert threaded.shape == one.shape == (256, 256, 3)
    assert np.array_equal(threaded, again)
    for img in (threaded, one):
        assert np.abs(img.astype(int) - whole.astype(int)).max() <= 1
