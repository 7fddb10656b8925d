"""Reading the levels of TIFF-based slides (Aperio SVS, generic pyramidal TIFF such as
CAMELYON16's, OME-TIFF) tile by tile with tifffile, past OpenSlide.

Two reasons:

- **Speed.** OpenSlide's ``read_region`` costs about 0.13 ms a call beyond decoding (a
  Cairo surface, premultiplied ARGB, a PIL image, the copy to RGB), which for the pipeline's
  thousands of small reads is most of the work: a 12 288² px slide's 1 124 coarse tiles
  (56 px at 2 µm/px) took 0.15-0.20 s through OpenSlide and 0.04 s through
  :class:`~wsi_prune.io.plain_image.SegmentReader` on the same JPEG tiles.
- **OME-TIFF pyramids.** An OME-TIFF (as QuPath, bfconvert and tifffile write them) keeps
  its reduced levels as SubIFDs of the first image; OpenSlide's generic-TIFF reader follows
  only the main chain of directories and opens such a file as one level, so every read at
  low resolution decoded level 0 (tiling a 12 288² px OME-TIFF took 6.7 s against 0.33 s).

What is read here, and how (everything else stays OpenSlide's):

- a level is mapped to the one tiled page of the file whose size is the level's, 8-bit RGB,
  YCbCr-coded JPEG, grey or RGBA, samples interleaved, compressed with JPEG, deflate, LZW or
  not at all (JPEG 2000 SVS, whose YCbCr handling differs, and other vendors' layouts, such
  as Ventana's overlapping tiles or Leica's multi-image files, are not touched);
- :meth:`TiffLevels.check` compares a box of each mapped level with OpenSlide's read of
  the same pixels; a level that differs by one bit is left to OpenSlide;
- a level-0 box ``(x, y)`` is level px ``(round(x / d), round(y / d))`` for a level of
  downsample ``d``. OpenSlide interpolates when ``x / d`` is not whole (a vendor's
  downsample of 4.0003); the nearest whole px is kept here. On slides whose downsamples are
  whole (most generic TIFFs, synthetic slides) the two agree bit for bit.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import numpy as np
import tifffile

from wsi_prune.io.plain_image import MAX_SEGMENT_PX, SegmentReader

_logger = logging.getLogger(__name__)

#: OpenSlide vendors whose levels are plain TIFF pages of the file
TIFF_VENDORS = frozenset({"aperio", "generic-tiff"})
#: decoded segments kept per level, bytes (OpenSlide keeps 32 MiB per handle)
LEVEL_CACHE_BYTES = 32 * 2**20
_COMPRESSIONS = frozenset({1, 5, 7, 8, 32946})  # none, LZW, JPEG, deflate (Adobe, old)
_CHECK_PX = 256

# verdicts of :meth:`TiffLevels.check` by (file, size, mtime): a slide is opened by every
# tiling block and stage, its pixels compared once per process
_checked: dict[tuple[str, int, int], tuple[int, ...]] = {}
_checked_lock = threading.Lock()


class TiffLevels:
    """Some levels of a slide read by boxes of level px. Thread-safe; close it.

    Attributes:
        levels: the slide's level indices read here.
        extra: (width, height) px of levels beyond OpenSlide's (an OME-TIFF's SubIFDs),
            largest first.
    """

    def __init__(self, tif: tifffile.TiffFile, pages: dict[int, tifffile.TiffPage],
                 n_openslide: int, path: str) -> None:
        self._tif = tif
        self._path = path
        io_lock = threading.Lock()  # one file handle under every level
        self._readers = {k: SegmentReader(tif, page, path, LEVEL_CACHE_BYTES, io_lock)
                         for k, page in pages.items()}
        self.extra = tuple((self._readers[k].width, self._readers[k].height)
                           for k in sorted(self._readers) if k >= n_openslide)
        self._n_openslide = n_openslide

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(sorted(self._readers))

    def reads(self, level: int) -> bool:
        return level in self._readers

    def paste(self, level: int, out: np.ndarray, x: int, y: int) -> None:
        """Fill ``out`` ((h, w, 3) uint8) with the box at (x, y) px of ``level``; the parts of
        ``out`` outside the level are left as they are.

        Raises:
            CorruptSlide: a segment does not decode.
        """
        self._readers[level].paste(out, x, y)

    def check(self, openslide_box: Callable[[int, int, int, int, int], np.ndarray],
              downsamples: tuple[float, ...]) -> None:
        """Keep only the levels whose pixels equal OpenSlide's.

        Args:
            openslide_box: ``(level, level-0 x, level-0 y, w, h)`` -> (h, w, 3) uint8 RGB as
                OpenSlide reads it.
            downsamples: the slide's level downsamples.

        Compared: a box of up to 256² px at each level's origin (where level px and level-0
        px coincide whatever the downsample), and at the middle of level 0. Levels beyond
        OpenSlide's cannot be compared and stay. A verdict is kept per file for the process.
        """
        st = os.stat(self._path)
        key = (os.path.realpath(self._path), st.st_size, st.st_mtime_ns)
        with _checked_lock:
            verdict = _checked.get(key)
        if verdict is None:
            keep = []
            for k in sorted(self._readers):
                if k >= self._n_openslide or self._same(k, openslide_box, downsamples):
                    keep.append(k)
            verdict = tuple(keep)
            with _checked_lock:
                _checked[key] = verdict
        for k in [k for k in self._readers if k not in verdict]:
            _logger.debug("%s: level %d differs from OpenSlide's pixels; read by OpenSlide",
                          self._path, k)
            del self._readers[k]

    def _same(self, level: int, openslide_box: Callable, downsamples: tuple[float, ...]
              ) -> bool:
        r = self._readers[level]
        w, h = min(_CHECK_PX, r.width), min(_CHECK_PX, r.height)
        boxes = [(0, 0)]
        if level == 0:
            boxes.append((max(0, r.width // 2 - w // 2), max(0, r.height // 2 - h // 2)))
        for x, y in boxes:
            ours = np.full((h, w, 3), 255, np.uint8)
            try:
                r.paste(ours, x, y)
                theirs = openslide_box(level, round(x * downsamples[level]),
                                       round(y * downsamples[level]), w, h)
            except Exception:  # noqa: BLE001 - either cannot read it: OpenSlide decides
                return False
            if not np.array_equal(ours, theirs):
                return False
        return True

    def close(self) -> None:
        self._tif.close()


def open_levels(path: str, vendor: str, level_dimensions: tuple[tuple[int, int], ...]
                ) -> TiffLevels | None:
    """The levels of the slide at ``path`` that can be read tile by tile (see the module
    docstring), or None when there are none.

    Args:
        path: the slide file.
        vendor: OpenSlide's ``openslide.vendor``; only :data:`TIFF_VENDORS` are read.
        level_dimensions: OpenSlide's (width, height) of each level. A generic TIFF with one
            level gains the SubIFD levels of its first image.
    """
    if vendor not in TIFF_VENDORS:
        return None
    try:
        tif = tifffile.TiffFile(path)
    except Exception:  # noqa: BLE001 - OpenSlide opened it; nothing of ours to add
        return None
    try:
        pages: dict[int, tifffile.TiffPage] = {}
        by_size: dict[tuple[int, int], list[tifffile.TiffPage]] = {}
        for page in tif.pages:
            by_size.setdefault((page.imagewidth, page.imagelength), []).append(page)
        for k, size in enumerate(level_dimensions):
            found = [p for p in by_size.get(tuple(size), []) if p.is_tiled]
            if len(found) == 1 and _readable(found[0]):
                pages[k] = found[0]
        if vendor == "generic-tiff" and len(level_dimensions) == 1:
            for k, page in enumerate(_subifd_levels(tif, level_dimensions[0])[1:], start=1):
                pages[k] = page
        if not pages:
            tif.close()
            return None
        return TiffLevels(tif, pages, len(level_dimensions), path)
    except Exception:  # noqa: BLE001 - an odd layout: OpenSlide reads it all, as before
        tif.close()
        return None


def _subifd_levels(tif: tifffile.TiffFile, size: tuple[int, int]) -> list[tifffile.TiffPage]:
    """The pages of the first series' levels when level 0 is ``size`` and every reduced
    level is readable and smaller than the one before; [] otherwise."""
    levels = tif.series[0].levels if tif.series else []
    pages = []
    for level in levels:
        if len(level.pages) != 1:
            return []
        pages.append(level.keyframe)
    if len(pages) < 2 or (pages[0].imagewidth, pages[0].imagelength) != tuple(size):
        return []
    sizes = [(p.imagewidth, p.imagelength) for p in pages]
    if not all(_readable(p) for p in pages[1:]) or not all(
            b[0] < a[0] and b[1] < a[1] for a, b in zip(sizes, sizes[1:], strict=False)):
        return []
    return pages


def _readable(page: tifffile.TiffPage) -> bool:
    photometric = (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR,
                   tifffile.PHOTOMETRIC.MINISBLACK)
    return bool(page.dtype == np.uint8 and page.planarconfig == 1
                and page.samplesperpixel in (1, 3, 4) and page.shaped[1] == 1
                and page.photometric in photometric and int(page.compression) in _COMPRESSIONS
                and len(page.dataoffsets) > 0
                and int(page.chunks[0]) * int(page.chunks[1]) <= MAX_SEGMENT_PX)
