"""Slide reading on real files: synthetic pyramidal TIFFs of each flavour, the real Aperio slide,
and broken inputs, each with its exact error class and a message naming the file."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_prune.errors import CorruptSlide, MissingMPP, UnsupportedSlide
from wsi_prune.io.slide import Slide, resolve_mpp


def test_svs_metadata(svs_slide: Path) -> None:
    with Slide(svs_slide) as s:
        assert s.info.vendor == "aperio"
        assert s.info.mpp_source == "openslide"
        assert s.mpp == pytest.approx(0.5, abs=1e-3)
        assert s.dimensions == (4096, 4096)
        assert s.info.level_count > 1
        assert s.info.objective_power == 20


def test_generic_tiff_mpp_from_resolution_tags(tiff_slide: Path) -> None:
    with Slide(tiff_slide) as s:
        assert s.info.vendor == "generic-tiff"
        # OpenSlide 4's generic-tiff driver turns the centimetre resolution tags into
        # openslide.mpp-x/y itself (checked on openslide-bin 4.0.1), so the first link of our
        # chain wins; the "tiff-resolution" link serves drivers and versions that do not
        # (test_resolve_mpp_chain_order, test_synth.test_tiff_mpp_from_resolution_tags)
        assert s.info.mpp_source == "openslide"
        assert s.mpp == pytest.approx(0.25, rel=1e-3)


def test_objective_power_only_slide(svs_nompp_slide: Path, caplog) -> None:
    """An Aperio file with AppMag but no MPP (as some TCGA slides): 20x gives 0.5 µm/px."""
    import openslide

    with openslide.OpenSlide(str(svs_nompp_slide)) as osr:
        props = dict(osr.properties)
    assert props["aperio.AppMag"] == "20" and "aperio.MPP" not in props
    assert openslide.PROPERTY_NAME_MPP_X not in props
    with caplog.at_level("WARNING", logger="wsi_prune.io.mpp"):
        with Slide(svs_nompp_slide) as s:
            assert s.info.vendor == "aperio" and s.info.objective_power == 20
            assert s.info.mpp_source == "objective-power"
            assert (s.info.mpp_x, s.info.mpp_y) == (pytest.approx(0.5), pytest.approx(0.5))
    (rec,) = [r for r in caplog.records if r.name == "wsi_prune.io.mpp"]
    assert rec.levelno == logging.WARNING
    assert str(svs_nompp_slide) in rec.getMessage() and "objective power 20x" in rec.getMessage()



def test_explicit_mpp_wins_over_the_objective_power_estimate(svs_nompp_slide: Path,
                                                              caplog) -> None:
    """A GT450 at 40x is 0.263 µm/px, not 10/40: the user's value wins over the estimate,
    with no warning (the slide states no MPP to disagree with)."""
    with caplog.at_level("WARNING", logger="wsi_prune.io.mpp"):
        with Slide(svs_nompp_slide, mpp=0.263) as s:
            assert (s.mpp, s.info.mpp_source) == (pytest.approx(0.263), "user")
            assert s.info.objective_power == 20  # still reported
    assert not [r for r in caplog.records if r.name == "wsi_prune.io.mpp"]


def test_explicit_mpp_wins_over_metadata_and_warns_past_5_percent(svs_slide: Path,
                                                                  caplog) -> None:
    with caplog.at_level("WARNING", logger="wsi_prune.io.mpp"):
        with Slide(svs_slide, mpp=0.52) as s:  # 4 % off the slide's 0.5: silent
            assert (s.mpp, s.info.mpp_source) == (pytest.approx(0.52), "user")
    assert not [r for r in caplog.records if r.name == "wsi_prune.io.mpp"]
    with caplog.at_level("WARNING", logger="wsi_prune.io.mpp"):
        with Slide(svs_slide, mpp=0.6) as s:  # 20 % off: used, with a warning naming both
            assert (s.mpp, s.info.mpp_source) == (pytest.approx(0.6), "user")
            assert s.size_at(0.6) == (4096, 4096)  # the whole geometry follows the value
    (rec,) = [r for r in caplog.records if r.name == "wsi_prune.io.mpp"]
    msg = rec.getMessage()
    assert str(svs_slide) in msg and "0.6" in msg and "0.5" in msg and "20 %" in msg


def test_resolve_mpp_chain_order() -> None:
    tags = {"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000",
            "tiff.YResolution": "40000"}
    assert resolve_mpp(tags, "x") == (0.25, 0.25, "tiff-resolution")
    # implausible resolution tags (72 dpi from a photo editor) are not microscopy
    dpi = {
        "tiff.ResolutionUnit": "inch",
        "tiff.XResolution": "72",
        "openslide.objective-power": "40",
    }
    assert resolve_mpp(dpi, "x") == (0.25, 0.25, "objective-power")
    assert resolve_mpp({}, "x", override=0.3) == (0.3, 0.3, "user")
    both = {"openslide.mpp-x": "0.2431", "openslide.mpp-y": "0.2432"}
    assert resolve_mpp(both, "x") == (0.2431, 0.2432, "openslide")
    # an explicit value wins over metadata, resolution tags and the objective power
    assert resolve_mpp(both, "x", override=0.25) == (0.25, 0.25, "user")
    assert resolve_mpp(tags, "x", override=0.26) == (0.26, 0.26, "user")
    assert resolve_mpp(dpi, "x", override=0.263) == (0.263, 0.263, "user")
    with pytest.raises(MissingMPP, match="outside"):
        resolve_mpp(both, "x", override=50.0)
    with pytest.raises(MissingMPP, match="pass --mpp"):
        resolve_mpp({}, "/data/a.svs")
    # resolution tags that are there but not a scan's are named, not called missing
    with pytest.raises(MissingMPP, match=r"TIFF resolution 72 per inch = 352.8 µm/px: outside "
                                         r"0.05-20 µm/px.*pass --mpp"):
        resolve_mpp({k: v for k, v in dpi.items() if "objective" not in k}, "/data/a.tif")
    with pytest.raises(MissingMPP, match=r"openslide.mpp-x 0 µm/px; objective power 0x"):
        resolve_mpp({"openslide.mpp-x": "0", "openslide.objective-power": "0"}, "x")


def test_no_mpp_slide(nompp_slide: Path) -> None:
    with pytest.raises(MissingMPP) as err:
        Slide(nompp_slide)
    assert str(nompp_slide) in str(err.value) and "--mpp" in str(err.value)
    with Slide(nompp_slide, mpp=0.5) as s:
        assert (s.mpp, s.info.mpp_source) == (0.5, "user")


def test_read_physical_resolution(svs_slide: Path) -> None:
    with Slide(svs_slide) as s:
        full = s.read((1024, 1024), (896, 896), 0.5)
        coarse = s.read((1024, 1024), (896, 896), 2.0)
        assert full.shape == (896, 896, 3) and coarse.shape == (224, 224, 3)
        assert full.dtype == np.uint8
        # the coarse read comes from a reduced level; it must show the same picture
        pooled = full.reshape(224, 4, 224, 4, 3).mean(axis=(1, 3))
        assert np.abs(pooled - coarse.astype(float)).mean() < 12
        assert s.best_level(2.0) > 0 and s.best_level(0.5) == 0
        # outside the slide is white background, not black
        edge = s.read((4000, 4000), (192, 192), 0.5)
        assert edge[-50:, -50:].min() == 255


def test_40x_slide_read_at_20x_comes_from_level_1(tiff_slide: Path) -> None:
    """A 0.25 µm/px (40x) scan read at 0.5 µm/px (the ViT's tiles) is read from the 0.5 µm/px
    pyramid level as it is stored, not decoded from level 0 at 4x the pixels and shrunk."""
    import openslide

    from wsi_prune.io.tiling import read_tiles

    with Slide(tiff_slide) as s:
        assert s.mpp == pytest.approx(0.25)
        assert s.info.level_downsamples[:3] == (1.0, 2.0, 4.0)  # 0.25, 0.5, 1.0 µm/px
        assert s.best_level(0.5) == 1 and s.best_level(1.0) == 2 and s.best_level(0.3) == 0
        xy = np.array([[896, 448], [1344, 1792]])
        tiles, bad = read_tiles(s, xy, 448.0, 0.5, 224)  # 224 px at 0.5 = 448 level-0 px
        from_level0 = s._read_level((896, 448), (448, 448), 0, (224, 224))
    assert not bad
    with openslide.OpenSlide(str(tiff_slide)) as osr:
        for (x, y), tile in zip(xy, tiles, strict=True):
            level1 = np.asarray(osr.read_region((int(x), int(y)), 1, (224, 224)).convert("RGB"))
            assert np.array_equal(tile, level1)  # the stored level-1 pixels, bit for bit
    # and not what shrinking level 0 gives (the two encodings differ)
    assert not np.array_equal(tiles[0], from_level0)


def _ome_pyramid(path: Path, base: np.ndarray, factors=(4, 16), subifds: bool = True) -> list:
    """An OME-TIFF as QuPath or bfconvert write one: JPEG tiles, the reduced levels as SubIFDs
    of the first image (or, ``subifds=False``, no reduced levels), the pixel size in the
    OME-XML only."""
    levels = [base] + [np.asarray(Image.fromarray(base).reduce(f)) for f in factors]
    md = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(base, subifds=len(factors) if subifds else 0, tile=(128, 128),
                 photometric="rgb", compression="jpeg", metadata=md)
        for level in levels[1:] if subifds else []:
            tw.write(level, tile=(128, 128), photometric="rgb", compression="jpeg",
                     subfiletype=1)
    with tifffile.TiffFile(path) as tf:  # the stored (JPEG-decoded) pixels of each level
        return [lv.asarray() for lv in tf.series[0].levels]


def test_ome_tiff_subifd_levels_are_read_not_level_0(tmp_path: Path) -> None:
    """OpenSlide opens an OME-TIFF's level 0 only (it does not follow SubIFDs); reads at low
    resolution come from the stored reduced levels, bit for bit, as they do for an SVS."""
    base = _pattern(1536, 2048)
    stored = _ome_pyramid(tmp_path / "p.ome.tif", base)
    with Slide(tmp_path / "p.ome.tif") as s:
        assert s.info.reader == "openslide+tifffile"
        assert s.info.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
        assert s.info.level_downsamples == (1.0, 4.0, 16.0)
        assert (s.best_level(2.0), s.best_level(8.0), s.best_level(1.0)) == (1, 2, 0)
        # a box inside, one across the right and bottom edges (white outside)
        assert np.array_equal(s.read((512, 256), (224, 224), 2.0), stored[1][64:120, 128:184])
        edge = s.read((1920, 1408), (224, 224), 2.0)
        assert np.array_equal(edge[:32, :32], stored[1][352:, 480:])
        assert edge[32:].min() == 255 and edge[:, 32:].min() == 255
        assert np.array_equal(s.read_thumbnail(8.0), stored[2])
        assert np.array_equal(s.read((0, 0), (64, 64), 0.5), stored[0][:64, :64])
    _ome_pyramid(tmp_path / "flat.ome.tif", base, subifds=False)
    with Slide(tmp_path / "flat.ome.tif") as s:
        assert (s.info.reader, s.info.level_count) == ("openslide+tifffile", 1)


def test_ome_tiff_damaged_level_tile_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "p.ome.tif"
    _ome_pyramid(path, _pattern(1536, 2048))
    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[1].keyframe
        offset, count = int(page.dataoffsets[5]), int(page.databytecounts[5])
    with open(path, "r+b") as fh:  # tile 5 of level 1 (4 x 3 tiles): row 1, column 1
        fh.seek(offset)
        fh.write(b"\0" * count)
    with Slide(path) as s:
        s.read((0, 0), (512, 512), 2.0)  # tile 0 of level 1 reads
        with pytest.raises(CorruptSlide, match=r"read failed at level-0 .* level 1: segment 5 "
                           r"does not decode") as err:
            s.read((0, 512), (2048, 512), 2.0)
        assert str(path) in str(err.value) and s.broken


def test_thumbnail_blocks_match_direct_read(svs_slide: Path, monkeypatch) -> None:
    import wsi_prune.io.slide as slide_mod

    with Slide(svs_slide) as s:
        direct = s.read_thumbnail(8.0)
        monkeypatch.setattr(slide_mod, "_MAX_READ_PX", 300)  # force block-wise reading
        blocks = s.read_thumbnail(8.0)
    assert direct.shape == blocks.shape == (256, 256, 3)  # 4096 px x 0.5 / 8 µm/px
    assert np.abs(direct.astype(int) - blocks.astype(int)).mean() < 2


def test_low_resolution_read_from_single_level_slide(real_slide: Path, monkeypatch) -> None:
    """A read far coarser than the only pyramid level, with a small read limit, goes block by
    block at level 0 (it used to recurse forever) and matches an area-averaged reference."""
    import openslide

    import wsi_prune.io.slide as slide_mod

    x, y, w, h = 300, 500, 1800, 2200  # level-0 box, not at the origin
    with openslide.OpenSlide(str(real_slide)) as osr:
        assert osr.level_count == 1
        full = osr.read_region((0, 0), 0, osr.dimensions).convert("RGB")
    sizes = []
    real_read_region = Slide._read_region

    def counted(self, xy, level, size):
        sizes.append((level, *size))
        return real_read_region(self, xy, level, size)

    monkeypatch.setattr(slide_mod, "_MAX_READ_PX", 300)
    monkeypatch.setattr(Slide, "_read_region", counted)
    with Slide(real_slide) as s:
        thumb = s.read_thumbnail(16.0)
        box = s.read((x, y), (w, h), 16.0)
    assert thumb.shape == (93, 69, 3)  # 2967 x 2220 px at 0.499 / 16 µm/px
    assert box.shape == (round(h * 0.499 / 16), round(w * 0.499 / 16), 3)
    # bounded: no single OpenSlide call larger than the limit, all at the only level
    assert len(sizes) > 20 and max(max(sw, sh) for _, sw, sh in sizes) <= 300
    assert {lv for lv, _, _ in sizes} == {0}
    for got, ref_img in ((thumb, full), (box, full.crop((x, y, x + w, y + h)))):
        ref = np.asarray(ref_img.resize(got.shape[1::-1], Image.Resampling.BOX)).astype(int)
        diff = np.abs(got.astype(int) - ref)
        assert diff.mean() < 1.5 and np.percentile(diff, 99) < 8, (diff.mean(), diff.max())
        assert got.std() > 10  # real content, not a flat fill


def test_real_slide(real_slide: Path) -> None:
    with Slide(real_slide) as s:
        assert s.info.vendor == "aperio"
        assert s.mpp == pytest.approx(0.499)
        assert s.info.mpp_source == "openslide"
        assert s.dimensions == (2220, 2967)
        tile = s.read((1000, 1500), (224, 224), 0.5)
        assert tile.shape == (224, 224, 3) and 60 < tile.mean() < 240


# -- bad inputs -----------------------------------------------------------------------------
def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    with pytest.raises(UnsupportedSlide, match="empty file") as err:
        Slide(p)
    assert str(p) in str(err.value)


def _open_in_a_thread(path: Path, seconds: float = 20.0) -> BaseException | None:
    """Slide(path) in a daemon thread: the error it raised, or a failure if it still waits."""
    import threading

    box: list[BaseException | None] = []

    def opener() -> None:
        try:
            Slide(path)
            box.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)

    t = threading.Thread(target=opener, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():  # blocked in open(): let it go (a writer end opened without blocking)
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"Slide({path.name}) still waiting after {seconds} s")
    return box[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_or_folder_named_like_a_slide_fails_at_once(tmp_path: Path) -> None:
    """Opening a FIFO waits for a writer: a FIFO named .svs must fail without reading it,
    naming what it is, as a folder named .svs does."""
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    err = _open_in_a_thread(fifo)
    assert isinstance(err, UnsupportedSlide) and str(fifo) in str(err)
    assert "FIFO (named pipe), not a slide file" in str(err)
    folder = tmp_path / "folder.svs"
    folder.mkdir()
    with pytest.raises(UnsupportedSlide, match="is a directory, not a slide file"):
        Slide(folder)


def test_text_file_named_svs(tmp_path: Path) -> None:
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n" * 100)
    with pytest.raises(UnsupportedSlide) as err:
        Slide(p)
    assert str(p) in str(err.value)


@pytest.mark.parametrize("name, body", [
    ("notes.tif", b"hello\n"),
    ("download.png", b"<!DOCTYPE html><html>403 Forbidden</html>"),
    ("scan.jpg", b"\x00" * 64),
])
def test_a_non_image_named_like_an_image_is_not_asked_for_mpp(tmp_path: Path, name: str,
                                                                body: bytes) -> None:
    """No --mpp reads a file that is no image: say so, with its first bytes, not 'pass --mpp'."""
    p = tmp_path / name
    p.write_bytes(body)
    for mpp in (None, 0.5):
        with pytest.raises(UnsupportedSlide, match="not an image") as err:
            Slide(p, mpp=mpp)
        assert str(p) in str(err.value) and repr(body[:8]) in str(err.value)
        assert "--mpp" not in str(err.value)


def test_truncated_slide(svs_slide: Path, tmp_path: Path) -> None:
    p = tmp_path / "truncated.svs"
    data = svs_slide.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    # OpenSlide calls it "unsupported"; a file with a TIFF header cut short is corrupt
    with pytest.raises(CorruptSlide, match="past the end of the file") as err:
        Slide(p)
    assert type(err.value) is CorruptSlide
    assert str(p) in str(err.value) and "truncated" in str(err.value)


@pytest.mark.parametrize("bigtiff, byteorder", [(False, ">"), (True, "<"), (True, ">")])
def test_truncated_tiff_variants(tmp_path: Path, bigtiff: bool, byteorder: str) -> None:
    """BigTIFF and big-endian headers (MM) are recognised as TIFF too."""
    rng = np.random.default_rng(0)
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, rng.integers(0, 255, (1024, 1024, 3), np.uint8), tile=(256, 256),
                     photometric="rgb", bigtiff=bigtiff, byteorder=byteorder)
    magic = whole.read_bytes()[:4]
    assert magic == {(False, ">"): b"MM\0*", (True, "<"): b"II+\0",
                     (True, ">"): b"MM\0+"}[bigtiff, byteorder]
    for cut in (3, 100_000):  # into the tile data, and into the header
        p = tmp_path / f"cut{cut}.tif"
        p.write_bytes(whole.read_bytes()[: max(12, len(whole.read_bytes()) // cut)])
        with pytest.raises(CorruptSlide) as err:
            Slide(p, mpp=0.5)  # even with --mpp the fallback reader is not tried on it
        assert type(err.value) is CorruptSlide and str(p) in str(err.value)


def test_intact_plain_tiff_is_not_called_corrupt(tmp_path: Path) -> None:
    """A whole striped TIFF that OpenSlide rejects is a plain image, not a damaged slide."""
    p = tmp_path / "photo.tif"
    tifffile.imwrite(p, np.full((200, 300, 3), 180, np.uint8), photometric="rgb")
    with pytest.raises(UnsupportedSlide, match="--mpp") as err:
        Slide(p)
    assert type(err.value) is UnsupportedSlide
    with Slide(p, mpp=1.0) as s:
        assert (s.info.reader, s.dimensions) == ("image", (300, 200))


def corrupt_tiles(src: Path, dst: Path) -> None:
    """Copy ``src`` and overwrite the JPEG bytes of the middle tiles of every level."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        spans = []
        for page in tif.pages:
            offs, counts = page.dataoffsets, page.databytecounts
            mid = len(offs) // 2
            for i in range(max(0, mid - len(offs) // 4), min(len(offs), mid + len(offs) // 4 + 1)):
                spans.append((offs[i], counts[i]))
    with open(dst, "r+b") as fh:
        for off, n in spans:
            fh.seek(off + 2)  # keep the SOI marker, break everything after it
            fh.write(bytes([0xFF, 0xD9]) + b"\x13" * max(0, n - 4))


def damage_tile(src: Path, dst: Path, page: int, level0_xy: tuple[float, float]
                ) -> tuple[int, int, int, int]:
    """Copy ``src`` and break the one JPEG tile of pyramid ``page`` that holds level-0
    ``(x, y)``. Returns the level-0 box ``(x0, y0, x1, y1)`` that tile covers."""
    if not dst.exists():
        shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        base = tif.pages[0].shape[1]
        pg = tif.pages[page]
        ds = base / pg.shape[1]
        tw, th = pg.tilewidth, pg.tilelength
        across = -(-pg.shape[1] // tw)
        col, row = int(level0_xy[0] / ds) // tw, int(level0_xy[1] / ds) // th
        i = row * across + col
        off, n = pg.dataoffsets[i], pg.databytecounts[i]
    with open(dst, "r+b") as fh:
        fh.seek(off + 2)  # keep the SOI marker, break everything after it
        fh.write(bytes([0xFF, 0xD9]) + b"\x13" * max(0, n - 4))
    return (round(col * tw * ds), round(row * th * ds), round((col + 1) * tw * ds),
            round((row + 1) * th * ds))


def test_reopen_reads_on_past_a_damaged_tile(svs_slide: Path, tmp_path: Path) -> None:
    p = tmp_path / "one.svs"
    x0, y0, x1, y1 = damage_tile(svs_slide, p, 0, (1100, 1100))
    with Slide(p) as s, Slide(svs_slide) as good:
        with pytest.raises(CorruptSlide):
            s.read((x0, y0), (64, 64), 0.5)
        s.reopen()  # a fresh handle: the rest of the slide reads as before
        np.testing.assert_array_equal(s.read((0, 0), (256, 256), 0.5),
                                      good.read((0, 0), (256, 256), 0.5))


def test_single_level_thumbnail_masks_a_damaged_tile_as_glass(real_slide: Path,
                                                             tmp_path: Path, caplog) -> None:
    """The real slide has one level: no other level can stand in for a damaged tile of it.
    With ``max_damaged`` the thumbnail is read again part by part; only about the damaged
    JPEG tile's area turns white, with a warning, and the rest equals the whole slide's."""
    p = tmp_path / "onebad.svs"
    x0, y0, x1, y1 = damage_tile(real_slide, p, 0, (1100, 1500))
    with Slide(real_slide) as good:
        assert good.info.level_count == 1
        want = good.read_thumbnail(8.0)
    with Slide(p) as s:
        with pytest.raises(CorruptSlide):
            s.read_thumbnail(8.0, finer_on_error=True)  # no share allowed: the slide fails
        with pytest.raises(CorruptSlide, match=r"more than 0% of the slide.s area does not decode"):
            s.read_thumbnail(8.0, finer_on_error=True, max_damaged=0.001)
        with caplog.at_level("WARNING", logger="wsi_prune.io.slide"):
            got = s.read_thumbnail(8.0, finer_on_error=True, max_damaged=0.05)
    assert got.shape == want.shape
    assert "masked as glass" in caplog.text and str(p) in caplog.text
    f = 8.0 / 0.499  # level-0 px per thumbnail px
    white = (got == 255).all(-1) & ~(want == 255).all(-1)
    ys, xs = np.nonzero(white)
    # what turned white lies on the damaged tile (one thumbnail px of rounding, and the
    # 32 level px parts the damage is narrowed down to)
    assert len(ys) > 0.5 * ((x1 - x0) / f) * ((y1 - y0) / f)
    assert xs.min() >= x0 / f - 3 and xs.max() <= x1 / f + 3
    assert ys.min() >= y0 / f - 3 and ys.max() <= y1 / f + 3
    far = np.ones(want.shape[:2], bool)
    far[int(y0 / f) - 3:int(y1 / f) + 4, int(x0 / f) - 3:int(x1 / f) + 4] = False
    # elsewhere the same picture, up to the area average's rounding at the parts' edges (as
    # block-wise reads: test_thumbnail_blocks_match_direct_read)
    assert np.abs(got[far].astype(int) - want[far].astype(int)).mean() < 2
    assert (got[far] == 255).all(-1).sum() <= (want[far] == 255).all(-1).sum()


def test_single_level_thumbnail_with_wide_damage_fails(real_slide: Path, tmp_path: Path
                                                       ) -> None:
    """Damage over more than the allowed share fails the slide, naming the first place."""
    p = tmp_path / "manybad.svs"
    for x in range(300, 2200, 480):
        for y in range(300, 2900, 720):
            damage_tile(real_slide, p, 0, (x, y))  # 16 of the ~130 JPEG tiles: over 10 %
    with Slide(p) as s, pytest.raises(CorruptSlide) as err:
        s.read_thumbnail(8.0, finer_on_error=True, max_damaged=0.05)
    assert "more than 5% of the slide's area does not decode at level 0" in str(err.value)
    assert str(p) in str(err.value)


def test_corrupt_tile_mid_slide(svs_slide: Path, tmp_path: Path) -> None:
    p = tmp_path / "corrupt.svs"
    corrupt_tiles(svs_slide, p)
    with Slide(p) as s:  # the header is fine: it opens
        with pytest.raises(CorruptSlide) as err:
            s.read((1024, 1024), (2048, 2048), 0.5)
        assert str(p) in str(err.value)
        # the handle is unusable afterwards: every later read fails fast, even a good region
        with pytest.raises(CorruptSlide, match="earlier read failed"):
            s.read((0, 0), (64, 64), 0.5)


def test_non_ascii_file_name(svs_slide: Path, tmp_path: Path) -> None:
    p = tmp_path / "Präparat_µ_淋巴结.svs"
    shutil.copy(svs_slide, p)
    with Slide(p) as s:
        assert s.read((0, 0), (64, 64), 0.5).shape == (64, 64, 3)


def test_a_misnamed_image_says_what_it_is(tmp_path: Path) -> None:
    """A JPEG named .svs is an image under the wrong name, and the error says how to read it;
    a text file named .svs shows its first bytes."""
    jpg = tmp_path / "snapshot.svs"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(jpg, format="JPEG")
    with pytest.raises(UnsupportedSlide) as err:
        Slide(jpg)
    assert str(jpg) in str(err.value)
    assert "a JPEG image named .svs" in str(err.value) and "name it .jpg and pass --mpp" in str(
        err.value)
    txt = tmp_path / "notes.svs"
    txt.write_text("hello world")
    with pytest.raises(UnsupportedSlide, match=r"nor a plain image \(first bytes b'hello wo'\)"):
        Slide(txt)


def test_plain_image_needs_mpp(tmp_path: Path) -> None:
    p = tmp_path / "photo.png"
    rgba = np.zeros((300, 400, 4), np.uint8)
    rgba[50:250, 50:350] = (200, 100, 180, 255)  # opaque pink box on transparent glass
    Image.fromarray(rgba).save(p)
    with pytest.raises(UnsupportedSlide, match="--mpp") as err:
        Slide(p)
    assert str(p) in str(err.value)
    with Slide(p, mpp=1.0) as s:
        assert (s.info.reader, s.info.mpp_source, s.dimensions) == ("image", "user", (400, 300))
        img = s.read((0, 0), (400, 300), 2.0)
        assert img.shape == (150, 200, 3)
        assert tuple(img[0, 0]) == (255, 255, 255)  # transparent → white
        assert tuple(img[75, 100]) == (200, 100, 180)


@pytest.mark.parametrize("unit,res,mpp", [("CENTIMETER", 20000, 0.5), ("INCH", 101600, 0.25)])
def test_plain_tiff_takes_its_mpp_from_its_resolution_tags(tmp_path: Path, unit: str, res: int,
                                                          mpp: float) -> None:
    """A TIFF OpenSlide does not read (in strips, no pyramid) but whose resolution tags state
    a microscope's resolution opens without --mpp, by the rule OpenSlide's TIFFs follow."""
    p = tmp_path / "strips.tif"
    tifffile.imwrite(p, _pattern(300, 400), photometric="rgb", rowsperstrip=32,
                     resolution=(res, res), resolutionunit=unit)
    with Slide(p) as s:
        assert (s.info.reader, s.info.mpp_source, s.dimensions) == ("image", "tiff-resolution",
                                                                     (400, 300))
        assert s.mpp == pytest.approx(mpp)
        assert np.array_equal(s.read((10, 20), (64, 32), mpp), _pattern(300, 400)[20:52, 10:74])
    with Slide(p, mpp=0.3) as s:  # the user's value wins
        assert (s.info.mpp_source, s.mpp) == ("user", 0.3)


def test_plain_tiff_with_a_photo_resolution_still_needs_mpp(tmp_path: Path) -> None:
    p = tmp_path / "photo.tif"
    tifffile.imwrite(p, _pattern(300, 400), photometric="rgb", rowsperstrip=32,
                     resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(UnsupportedSlide, match=r"pass --mpp .*its resolution tags state no "
                       r"microscope's \(TIFF resolution 72 per inch = 352.8 µm/px\)"):
        Slide(p)
    with Slide(p, mpp=0.5) as s:
        assert (s.info.mpp_source, s.mpp) == ("user", 0.5)


@pytest.mark.parametrize("tiled", [True, False])
def test_ome_tiff_takes_its_mpp_from_the_ome_xml(tmp_path: Path, tiled: bool) -> None:
    """An OME-TIFF (as QuPath or bfconvert export it) states its pixel size in the OME-XML
    description, not in TIFF resolution tags: OpenSlide reads a tiled one as a generic TIFF
    without an MPP, and a striped one not at all; both open with the OME-XML's value."""
    p = tmp_path / "export.ome.tif"
    md = {"axes": "YXS", "PhysicalSizeX": 499.0, "PhysicalSizeXUnit": "nm",
          "PhysicalSizeY": 0.501, "PhysicalSizeYUnit": "µm"}
    layout = {"tile": (128, 128)} if tiled else {"rowsperstrip": 32}
    tifffile.imwrite(p, _pattern(300, 400), photometric="rgb", metadata=md, **layout)
    with Slide(p) as s:
        assert s.info.reader == ("openslide+tifffile" if tiled else "image")
        assert s.info.mpp_source == "ome-xml"
        assert (s.info.mpp_x, s.info.mpp_y) == pytest.approx((0.499, 0.501))
    q = tmp_path / "nosize.ome.tif"
    tifffile.imwrite(q, _pattern(300, 400), photometric="rgb", metadata={"axes": "YXS"},
                     tile=(128, 128))
    with pytest.raises(MissingMPP, match="no resolution in the slide's metadata"):
        Slide(q)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedSlide, match="no such file"):
        Slide(tmp_path / "nope.svs")


# -- plain images in bounded memory ------------------------------------------------------------
def _stripped_tiff(path: Path, img: np.ndarray, compression: str | None = "zlib",
                   rowsperstrip: int = 32) -> Path:
    tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=rowsperstrip,
                     compression=compression)
    return path


def _pattern(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 7 + yy) % 251, (yy * 5) % 253, (xx ^ yy) % 255], -1).astype(np.uint8)


def test_plain_images_read_by_segments_memmap_or_decoded_agree(tmp_path: Path) -> None:
    """The same pixels as a zlib-striped TIFF (read strip by strip), an uncompressed TIFF
    (memory-mapped), a tiled-less PNG (decoded once): every box, inside or across the edge,
    and the thumbnail are identical to the array itself."""
    from wsi_prune.io.plain_image import PlainImage

    img = _pattern(700, 900)
    files = {"segments": _stripped_tiff(tmp_path / "s.tif", img),
             "memmap": _stripped_tiff(tmp_path / "m.tif", img, compression=None),
             "decoded": tmp_path / "p.png"}
    Image.fromarray(img).save(files["decoded"])
    padded = np.full((1200, 1400, 3), 255, np.uint8)
    padded[100:800, 100:1000] = img
    thumbs = []
    for mode, p in files.items():
        with PlainImage(p) as pi:
            assert pi.mode == mode and (pi.width, pi.height) == (900, 700)
            for x, y, w, h in ((0, 0, 900, 700), (33, 61, 224, 224), (850, 650, 224, 224),
                               (-50, -20, 100, 100), (1000, 10, 50, 50)):
                got = pi.read(x, y, w, h)
                np.testing.assert_array_equal(got, padded[y + 100:y + 100 + h,
                                                          x + 100:x + 100 + w], err_msg=mode)
        with Slide(p, mpp=0.5) as s:
            thumbs.append(s.read_thumbnail(4.0))
    assert thumbs[0].shape == (88, 112, 3)
    for t in thumbs[1:]:
        np.testing.assert_array_equal(t, thumbs[0])


def test_png_is_decoded_once_for_every_reader(tmp_path: Path) -> None:
    """Tiling blocks (threads), the ViT stage and the thumbnail each open the slide: a PNG is
    decoded once per process, and every reader shares that one copy."""
    from wsi_prune.config import RunConfig
    from wsi_prune.io import plain_image
    from wsi_prune.io.tiling import tile_slide

    p = tmp_path / "region.png"
    img = np.full((1600, 1800, 3), 235, np.uint8)
    img[200:1400, 300:1500] = _pattern(1200, 1200) // 2 + 60  # tissue-like, darker than glass
    Image.fromarray(img).save(p)
    before = plain_image.decode_stats()["decoded"]
    cfg = RunConfig().replace(tiling={"tiles_per_shard": 4})
    res = tile_slide(p, tmp_path / "r.zarr", cfg, mpp=0.5, scheduler="threads")
    assert res.n_tiles >= 8  # several blocks, each opening the slide
    with Slide(p, mpp=0.5) as a, Slide(p, mpp=0.5) as b:
        assert a._plain._array is b._plain._array
        a.read_thumbnail(8.0)
    assert plain_image.decode_stats() == {"held": 1, "decoded": before + 1}


def test_plain_image_over_the_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    """A PNG whose header says 12 000 x 9 000 px (108 Mpx) is refused from its header alone,
    with the size, the limit and how to convert it; nothing is decoded."""
    import struct
    import zlib

    from wsi_prune.io import plain_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    p = tmp_path / "huge.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 9000,
                                                                     8, 2, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    before = plain_image.decode_stats()["decoded"]
    with pytest.raises(UnsupportedSlide, match=r"12000x9000 px \(108 Mpx\) is over the 100 Mpx"
                       ) as err:
        Slide(p, mpp=0.5)
    assert str(p) in str(err.value) and "pyramidal TIFF" in str(err.value)
    assert plain_image.decode_stats()["decoded"] == before


_RSS_SCRIPT = """
import resource, sys
from wsi_prune.config import RunConfig
from wsi_prune.io.tiling import tile_slide
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = tile_slide(sys.argv[1], sys.argv[2], RunConfig(), mpp=0.5, scheduler="threads")
print(res.n_tiles, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_large_striped_tiff_tiles_in_bounded_memory(tmp_path: Path) -> None:
    """A 10 000 x 10 000 px striped TIFF (300 MB of pixels, zlib): tiling it with two threads
    raises the process's peak RSS by less than one copy of the pixels (measured: +0.15 GB; it
    used to decode the whole image in every block: +3.3 GB, docs/reliability.md)."""
    import subprocess
    import sys

    h = w = 10_000
    raw = tifffile.memmap(tmp_path / "raw.tif", shape=(h, w, 3), dtype=np.uint8,
                          photometric="rgb")
    for y in range(0, h, 500):
        raw[y:y + 500] = 238
        # textured H&E-like colour (green below red and blue: the mask's tissue colours)
        band = _pattern(500, 6000)
        raw[y:y + 500, 2000:8000] = np.stack(
            [140 + band[..., 0] % 80, 60 + band[..., 1] % 50, 150 + band[..., 2] % 70], -1)
    raw.flush()
    p = _stripped_tiff(tmp_path / "big.tif", raw, rowsperstrip=16)
    del raw
    (tmp_path / "raw.tif").unlink()
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(p), str(tmp_path / "b.zarr")],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert out.returncode == 0, out.stderr
    n_tiles, base_kib, peak_kib = map(int, out.stdout.split())
    assert n_tiles > 500
    assert (peak_kib - base_kib) * 1024 < h * w * 3, (base_kib, peak_kib)


def test_sibling_shares_the_levels_not_the_failures(svs_slide: Path, tmp_path: Path) -> None:
    """A sibling handle reads the same pixels through the same TIFF level readers; a damaged
    tile breaks only the handle that read it; closing the sibling leaves the first handle
    reading."""
    p = tmp_path / "one.svs"
    x0, y0, _, _ = damage_tile(svs_slide, p, 0, (1100, 1100))
    with Slide(p) as s:
        assert s.info.reader == "openslide+tifffile"
        sib = s.sibling()
        assert sib.info == s.info and sib._levels is s._levels and sib._osr is not s._osr
        np.testing.assert_array_equal(sib.read((0, 0), (448, 448), 0.5),
                                      s.read((0, 0), (448, 448), 0.5))
        with pytest.raises(CorruptSlide, match="one.svs"):
            sib.read((x0, y0), (64, 64), 0.5)
        assert sib.broken and not s.broken
        s.read((0, 0), (64, 64), 0.5)  # the first handle reads on
        sib.close()
        with Slide(svs_slide) as good:
            np.testing.assert_array_equal(s.read((0, 0), (448, 448), 2.0),
                                          good.read((0, 0), (448, 448), 2.0))


def test_sibling_of_a_plain_image_is_a_new_handle(tmp_path: Path) -> None:
    png = tmp_path / "p.png"
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(png)
    with Slide(png, mpp=0.5) as s, s.sibling() as sib:
        assert sib.info == s.info and sib.mpp == 0.5
        np.testing.assert_array_equal(sib.read((0, 0), (100, 100), 0.5),
                                      s.read((0, 0), (100, 100), 0.5))
