"""Plain images as slides (PNG, JPEG, and TIFFs without a pyramid that OpenSlide does not
read), in bounded memory.

Every stage opens the slide again (each tiling block, the ViT stage, the thumbnail), so a reader
that decodes the whole image on opening would decode it once per block and hold one copy per
thread. Instead, by what the file allows:

- **TIFF in strips or tiles** (``segments`` of at most :data:`MAX_SEGMENT_PX` px, 8-bit RGB or
  grey): a read decodes only the segments it touches and keeps recently decoded ones in a cache
  of :func:`segment_cache_bytes` (16 MiB, or about 1024 image rows when that is more), so
  memory does not grow with the image's height.
- **Uncompressed TIFF**: memory-mapped; a read touches only its own pages.
- **Anything else** (PNG, JPEG, a TIFF in one compressed strip): decoded whole, **once per
  process** (the readers of one file share it: blocks, threads, the ViT stage, the thumbnail;
  the last image decoded stays until another replaces it), and only up to
  :data:`MAX_DECODED_PX` pixels; a larger one is refused with :class:`UnsupportedSlide`, saying
  how to convert it to a pyramidal TIFF.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from wsi_prune.errors import UnsupportedSlide

#: Largest plain image decoded whole, px (10 000 x 10 000: 300 MB as RGB, about 700 MB while
#: Pillow decodes it). Larger PNG/JPEG are refused; convert them to a tiled pyramidal TIFF.
MAX_DECODED_PX = 10_000 * 10_000
#: Largest strip or tile read segment by segment, px; a TIFF with bigger ones is decoded whole.
MAX_SEGMENT_PX = 4096 * 4096
_MIN_CACHE_BYTES = 16 * 2**20
_CACHE_ROWS = 1024


def segment_cache_bytes(width: int, segment_px: int) -> int:
    """Bytes of decoded segments a reader keeps: 16 MiB, or about 1024 full-width rows of
    RGB (the rows a band of tiles or of the thumbnail spans), whichever is more, and never
    fewer than two segments."""
    return max(_MIN_CACHE_BYTES, width * _CACHE_ROWS * 3, 2 * segment_px * 3)


def _to_rgb(a: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8, alpha over white."""
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        rgb, alpha = a[..., :3], a[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        w = alpha.astype(np.float32) / 255.0
        return np.clip(rgb * w + 255.0 * (1.0 - w) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])


class PlainImage:
    """A plain image read by level-0 boxes. Thread-safe; use as a context manager.

    Attributes:
        width / height: px.
        mode: ``segments``, ``memmap`` or ``decoded`` (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._tif: tifffile.TiffFile | None = None
        self._array: np.ndarray | None = None
        spath = str(self.path)
        if is_tiff(self.path) and self._open_tiff():
            return
        try:
            with warnings.catch_warnings():
                # our own limit applies (_check_decodable), below Pillow's error threshold
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(spath) as im:
                    self.width, self.height = im.size
        except Image.DecompressionBombError as exc:
            raise UnsupportedSlide(f"plain image too large to decode whole ({exc}); " + _CONVERT,
                                   spath) from exc
        except (OSError, ValueError) as exc:
            raise UnsupportedSlide(f"cannot read as an image: {exc}", spath) from exc
        _check_decodable(spath, self.width, self.height)
        self.mode = "decoded"
        self._array = _decoded(spath)

    def _open_tiff(self) -> bool:
        """Open a TIFF for segment or memory-mapped reads; False: decode it whole instead."""
        try:
            tif = tifffile.TiffFile(self.path)
        except Exception:  # noqa: BLE001 - Pillow gets its turn, and says what is wrong
            return False
        try:
            page = tif.pages.first
            self.height, self.width = int(page.imagelength), int(page.imagewidth)
            ok = (page.dtype == np.uint8 and page.planarconfig == 1
                  and page.samplesperpixel in (1, 3, 4) and page.shaped[1] == 1
                  and page.photometric in (tifffile.PHOTOMETRIC.RGB,
                                           tifffile.PHOTOMETRIC.MINISBLACK))
            if ok and page.is_memmappable and page.compression == 1:
                self._array = tifffile.memmap(str(self.path), page=0, mode="r")
                self.mode = "memmap"
                tif.close()
                return True
            if ok and int(page.chunks[0]) * int(page.chunks[1]) <= MAX_SEGMENT_PX:
                self._tif = tif
                self._segments = SegmentReader(tif, page, str(self.path))
                self.mode = "segments"
                return True
        except Exception:  # noqa: BLE001 - an odd layout: decoded whole (or refused) instead
            pass
        tif.close()
        return False

    # -- context management --------------------------------------------------------------------
    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        self._array = None

    def __enter__(self) -> PlainImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pixels --------------------------------------------------------------------------------
    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The level-0 box at (x, y) of (w, h) px as (h, w, 3) uint8; outside is white."""
        out = np.full((h, w, 3), 255, np.uint8)
        xs, ys = max(x, 0), max(y, 0)
        xe, ye = min(x + w, self.width), min(y + h, self.height)
        if xe <= xs or ye <= ys:
            return out
        if self._array is not None:
            out[ys - y:ye - y, xs - x:xe - x] = _to_rgb(np.asarray(self._array[ys:ye, xs:xe]))
            return out
        self._segments.paste(out, x, y)
        return out


class SegmentReader:
    """Boxes of one TIFF page (an image in strips or tiles, 8-bit RGB, grey or RGBA, one
    plane), decoding only the segments a box touches and keeping recently decoded ones (see
    :func:`segment_cache_bytes`). Thread-safe.

    Args:
        tif: the open file; the caller closes it.
        page: the page (or a pyramid level's key frame) to read.
        path: the file, for messages.
        cache_bytes: decoded segments kept; default :func:`segment_cache_bytes`.
        io_lock: held while reading from ``tif``'s file handle; readers of one file share
            one (default: a lock of this reader's own).
    """

    def __init__(self, tif: tifffile.TiffFile, page: tifffile.TiffPage, path: str,
                 cache_bytes: int | None = None, io_lock: threading.Lock | None = None
                 ) -> None:
        self._tif, self._page, self._path = tif, page, path
        self._lock = threading.Lock()
        self._io_lock = io_lock if io_lock is not None else threading.Lock()
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        seg_h, seg_w = int(page.chunks[0]), int(page.chunks[1])
        self._seg = (seg_h, seg_w)
        self._seg_cols = math.ceil(self.width / seg_w)
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = (segment_cache_bytes(self.width, seg_h * seg_w)
                             if cache_bytes is None else max(cache_bytes, 2 * seg_h * seg_w * 3))

    def paste(self, out: np.ndarray, x: int, y: int) -> None:
        """Fill ``out`` ((h, w, 3) uint8, the box at page px (x, y)) with the page's pixels
        where the box overlaps the page; the rest of ``out`` is left as it is.

        Raises:
            CorruptSlide: a segment does not decode.
        """
        h, w = out.shape[:2]
        xs, ys = max(x, 0), max(y, 0)
        xe, ye = min(x + w, self.width), min(y + h, self.height)
        if xe <= xs or ye <= ys:
            return
        sh, sw = self._seg
        for r in range(ys // sh, (ye - 1) // sh + 1):
            for c in range(xs // sw, (xe - 1) // sw + 1):
                seg = self._segment(r * self._seg_cols + c)
                y0, x0 = r * sh, c * sw
                iy0, iy1 = max(ys, y0), min(ye, y0 + seg.shape[0])
                ix0, ix1 = max(xs, x0), min(xe, x0 + seg.shape[1])
                if iy1 > iy0 and ix1 > ix0:
                    out[iy0 - y:iy1 - y, ix0 - x:ix1 - x] = seg[iy0 - y0:iy1 - y0,
                                                                ix0 - x0:ix1 - x0]

    def _segment(self, index: int) -> np.ndarray:
        with self._lock:
            seg = self._cache.get(index)
            if seg is not None:
                self._cache.move_to_end(index)
                return seg
        page = self._page
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        sh, sw = self._seg
        if count == 0:  # a sparse TIFF leaves empty segments out: background
            seg = np.full((sh, sw, 3), 255, np.uint8)
        else:
            # the file handle is shared by every reader of the file (the levels of a
            # pyramid); decoding runs outside the locks, so two threads decode at once
            with self._io_lock:
                fh = self._tif.filehandle
                fh.seek(offset)
                data = fh.read(count)
            try:
                decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            except Exception as exc:  # noqa: BLE001 - any codec failure is the file's
                from wsi_prune.errors import CorruptSlide

                raise CorruptSlide(f"segment {index} does not decode: {exc}",
                                   self._path) from exc
            seg = _to_rgb(np.asarray(decoded)[0])
        with self._lock:
            if index not in self._cache:
                self._cache[index] = seg
                self._cache_bytes += seg.nbytes
            while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
        return seg


#: the first four bytes of a TIFF (little- and big-endian) and of a BigTIFF
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def is_tiff(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts like a TIFF or BigTIFF (its first four bytes)."""
    with open(path, "rb") as fh:
        return fh.read(4) in TIFF_MAGIC


#: how the plain images read here begin: TIFF/BigTIFF, PNG, JPEG (any marker after SOI)
IMAGE_MAGIC = {**{m: "TIFF" for m in TIFF_MAGIC}, b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG"}


def image_kind(path: str | os.PathLike[str]) -> str | None:
    """"TIFF", "PNG" or "JPEG" by the file's first bytes (not its name); None for anything else."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    return next((kind for magic, kind in IMAGE_MAGIC.items() if head.startswith(magic)), None)


def not_a_slide(path: str | os.PathLike[str]) -> str:
    """Why a file OpenSlide refused, whose name is no plain image's, cannot be read: an image
    misnamed (a JPEG called .svs: rename it and pass --mpp), or what its first bytes are."""
    suffix = Path(path).suffix
    kind = image_kind(path)
    if kind is not None:
        ext = {"TIFF": ".tif", "PNG": ".png", "JPEG": ".jpg"}[kind]
        return (f"a {kind} image named {suffix}, not a format OpenSlide reads; to read it as a "
                f"plain image, name it {ext} and pass --mpp (µm/px)")
    return (f"not a slide format OpenSlide reads, nor a plain image (first bytes "
            f"{head_repr(path)})")


def head_repr(path: str | os.PathLike[str], n: int = 8) -> str:
    """The file's first ``n`` bytes as Python writes them, for error messages."""
    with open(path, "rb") as fh:
        return repr(fh.read(n))


_CONVERT = ("convert it to a tiled pyramidal TIFF (e.g. `vips tiffsave in.png out.tif --tile "
            "--pyramid --compression jpeg`), which is read tile by tile")


def _check_decodable(path: str, width: int, height: int) -> None:
    if width * height > MAX_DECODED_PX:
        raise UnsupportedSlide(
            f"plain image of {width}x{height} px ({width * height / 1e6:.0f} Mpx) is over the "
            f"{MAX_DECODED_PX / 1e6:.0f} Mpx that are decoded whole; " + _CONVERT, path)


# One decoded image per process, shared by every reader of the file (see the module docstring).
_decoded_lock = threading.Lock()
_decoded_cache: dict[tuple[str, int, int], np.ndarray] = {}
_stats = {"decoded": 0}


def _decoded(path: str) -> np.ndarray:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _decoded_lock:
        if key in _decoded_cache:
            return _decoded_cache[key]
        _decoded_cache.clear()  # the previous image goes before the next is decoded
        try:
            with warnings.catch_warnings(), Image.open(path) as im:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
                img = _to_rgb(np.asarray(im.convert("RGBA")))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise UnsupportedSlide(f"cannot read as an image: {exc}", path) from exc
        img.setflags(write=False)
        _decoded_cache[key] = img
        _stats["decoded"] += 1
        return img


def decode_stats() -> dict[str, int]:
    """``{"held": images this process holds decoded (0 or 1), "decoded": decodes so far}``."""
    with _decoded_lock:
        return {"held": len(_decoded_cache), **_stats}
