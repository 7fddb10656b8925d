"""Slide reading: an OpenSlide adapter with MPP resolution, physical-resolution reads and a
fallback reader for plain images.

Everything here speaks physical units: a read asks for a level-0 box and a resolution in µm/px,
never for a pyramid level. This is the only module that catches OpenSlide's exceptions; each
becomes one of :class:`~wsi_prune.errors.UnsupportedSlide`, :class:`~wsi_prune.errors.CorruptSlide`
or :class:`~wsi_prune.errors.MissingMPP`, naming the file.

The MPP resolution chain is :mod:`wsi_prune.io.mpp`'s.

Bounds: MIRAX and Leica SCN slides (and others where OpenSlide sets ``openslide.bounds-*``)
hold their tissue in a box inside a larger, empty level-0 plane. Everything here and in the
store stays in OpenSlide's level-0 px; :attr:`SlideInfo.bounds` records the box, and the
outputs written for viewers shift by it (:mod:`wsi_prune.outputs.frame`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from wsi_prune.errors import CorruptSlide, UnsupportedSlide
from wsi_prune.io.file_damage import missing_reason, not_a_file, tiff_damage
from wsi_prune.io.mpp import (  # noqa: F401 - the MPP names are this module's API too
    MPP_DISAGREEMENT,
    MPP_RANGE,
    float_property,
    implausible_mpp,
    metadata_mpp,
    plain_tiff_properties,
    plausible,
    resolve_mpp,
)
from wsi_prune.io.plain_image import PlainImage, head_repr, image_kind, is_tiff, not_a_slide
from wsi_prune.io.slide_info import SlideInfo, slide_bounds
from wsi_prune.io.tiff_levels import TiffLevels, open_levels

_logger = logging.getLogger(__name__)

#: file endings searched for in folders (OpenSlide's formats plus plain images)
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", ".czi",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# Largest region handed to OpenSlide in one call, px: bigger reads are split so a read never
# allocates gigabytes of RGBA at once.
_MAX_READ_PX = 4096
#: side, in level px, of the parts a damaged thumbnail is read in again
#: (:meth:`Slide.read_thumbnail`'s ``max_damaged``): two 256 px JPEG tiles, so that a damaged
#: tile blanks little more than its own area
_PATCH_LEVEL_PX = 512
#: smallest part, level px, a damaged part is split into before it is taken as glass
_PATCH_MIN_LEVEL_PX = 32
# Threads reading the blocks of one large read side by side (TIFF levels only; each block is
# then a quarter of _MAX_READ_PX², so the read's memory does not grow).
_READ_THREADS = 2


class Slide:
    """An open slide. Use as a context manager; not shareable across processes (open one per
    task: handles are never pickled).

    Args:
        path: slide file.
        mpp: the user's µm/px; wins over the metadata (see :func:`resolve_mpp`), and is needed
            to open plain images without one (a TIFF may state it in its resolution tags).
    """

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._osr: openslide.OpenSlide | None = None
        self._plain: PlainImage | None = None
        self._levels: TiffLevels | None = None
        self._shares_levels = False  # a sibling's: the handle it came from closes them
        self._user_mpp = mpp
        spath = str(self.path)
        if not self.path.exists():
            raise UnsupportedSlide(missing_reason(self.path), spath)
        if (why := not_a_file(self.path)) is not None:  # a folder, FIFO, socket, device
            raise UnsupportedSlide(why, spath)
        if self.path.stat().st_size == 0:
            raise UnsupportedSlide("empty file (0 bytes)", spath)
        try:  # OpenSlide would say "unsupported format" for a file it may not read
            with open(self.path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise UnsupportedSlide(f"cannot read the file ({exc.strerror})", spath) from exc
        try:
            self._osr = openslide.OpenSlide(spath)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            # OpenSlide says "unsupported" for a slide whose directories or tile data lie past
            # the end of the file (a truncated copy): a damaged TIFF is corrupt, not foreign,
            # and is not handed to the plain-image reader, which would fail or read a part.
            damage = tiff_damage(self.path) if is_tiff(self.path) else None
            if damage:
                raise CorruptSlide(f"damaged TIFF: {damage} (OpenSlide: {exc})", spath) from exc
            self._open_image(mpp)
            return
        except openslide.OpenSlideError as exc:
            raise CorruptSlide(f"OpenSlide cannot open it: {exc}", spath) from exc
        props = self._osr.properties
        mx, my, source = resolve_mpp(props, spath, mpp)
        vendor = str(props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"))
        width, height = (int(v) for v in self._osr.dimensions)
        dims = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)
        downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        power = float_property(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        bounds = slide_bounds(props)
        # TIFF pages read tile by tile, past OpenSlide's per-call cost; an OME-TIFF's SubIFD
        # pyramid, which OpenSlide does not follow, becomes levels (see tiff_levels)
        self._levels = open_levels(spath, vendor, dims)
        if self._levels is not None:
            dims += self._levels.extra
            # as OpenSlide computes a level's downsample: the mean of the two axes'
            downsamples += tuple((width / w + height / h) / 2.0 for w, h in self._levels.extra)
            # after every property is read: a failed read leaves OpenSlide's handle in an
            # error state, in which it answers every call with that error
            self._levels.check(self._openslide_box, downsamples)
            if not self._levels.levels:
                self._levels.close()
                self._levels = None
        self.info = SlideInfo(
            path=spath,
            reader="openslide" if self._levels is None else "openslide+tifffile",
            vendor=vendor,
            width=width,
            height=height,
            level_dimensions=dims,
            level_downsamples=downsamples,
            mpp_x=mx,
            mpp_y=my,
            mpp_source=source,
            objective_power=power,
            bounds=bounds,
        )

    def _open_image(self, mpp: float | None) -> None:
        spath = str(self.path)
        if self.path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UnsupportedSlide(not_a_slide(self.path), spath)
        kind = image_kind(self.path)
        if kind is None:
            # a text file or a download error page named .tif: no --mpp would make it readable
            raise UnsupportedSlide(
                f"not an image: named {self.path.suffix} but its first bytes "
                f"({head_repr(self.path)}) are no TIFF, PNG or JPEG header", spath)
        props = plain_tiff_properties(self.path) if kind == "TIFF" else {}
        if mpp is None and metadata_mpp(props) is None:
            found = implausible_mpp(props)
            raise UnsupportedSlide(
                "OpenSlide does not read this file; to read it as a plain image pass --mpp "
                "(µm/px), since "
                + (f"its resolution tags state no microscope's ({found})" if found else
                   "it carries no physical resolution"), spath,
            )
        mx, my, source = resolve_mpp(props, spath, mpp)
        self._plain = PlainImage(self.path)
        w, h = self._plain.width, self._plain.height
        self.info = SlideInfo(
            path=spath, reader="image", vendor="image", width=w, height=h,
            level_dimensions=((w, h),), level_downsamples=(1.0,), mpp_x=mx,
            mpp_y=my, mpp_source=source, objective_power=None,
        )

    # -- context management --------------------------------------------------------------------
    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None
        if self._plain is not None:
            self._plain.close()
            self._plain = None
        if self._levels is not None:
            if not self._shares_levels:
                self._levels.close()
            self._levels = None

    def sibling(self) -> Slide:
        """A second handle on this slide, for another thread.

        It has its own OpenSlide handle and its own read-failure state: a damaged tile breaks
        only the handle that read it, as with two :class:`Slide` objects. It shares this
        handle's TIFF level readers (thread-safe), so two threads reading neighbouring tiles
        decode each JPEG tile once, from one cache. Close it before this one.

        Raises:
            CorruptSlide / UnsupportedSlide: as opening the file does.
        """
        if self._levels is None:
            return Slide(self.path, self._user_mpp)
        other = Slide.__new__(Slide)
        other.path, other.info = self.path, self.info
        other._lock, other._broken, other._plain = threading.Lock(), None, None
        other._levels, other._shares_levels = self._levels, True
        other._user_mpp = self._user_mpp
        try:
            other._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as exc:
            raise CorruptSlide(f"OpenSlide cannot open it: {exc}", str(self.path)) from exc
        return other

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"Slide({str(self.path)!r}, {i.width}x{i.height}, {i.mpp:.3f} µm/px)"

    # -- geometry ------------------------------------------------------------------------------
    @property
    def mpp(self) -> float:
        """Level-0 resolution, µm/px."""
        return self.info.mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height), px."""
        return self.info.width, self.info.height

    def best_level(self, mpp: float) -> int:
        """The coarsest level at or finer than ``mpp`` µm/px (level 0 when all are coarser)."""
        level = self._coarsest_within(mpp / self.mpp)
        return 0 if level is None else level

    def averaging_level(self, mpp: float, oversample: float, max_ratio: float) -> int:
        """The level to area-average a whole-slide read at ``mpp`` µm/px from: the coarsest
        level at least ``oversample`` times finer than ``mpp`` when it holds at most
        ``max_ratio`` times the read's pixels, else :meth:`best_level`."""
        level = self._coarsest_within(mpp / self.mpp / oversample)
        if level is not None:
            w, h = self.info.level_dimensions[level]
            tw, th = self.size_at(mpp)
            if w * h <= max_ratio * tw * th:
                return level
        return self.best_level(mpp)

    def _coarsest_within(self, downsample: float) -> int | None:
        """The coarsest level whose downsample is at most ``downsample`` (None when none is)."""
        # 1 % slack: vendors round downsamples (4.0003), which must not push us a level finer
        ds = self.info.level_downsamples
        fits = [i for i, d in enumerate(ds) if d <= downsample * 1.01]
        return max(fits, key=lambda i: ds[i]) if fits else None

    def size_at(self, mpp: float) -> tuple[int, int]:
        """Whole-slide (width, height) in px at ``mpp`` µm/px."""
        f = self.mpp / mpp
        return max(1, round(self.info.width * f)), max(1, round(self.info.height * f))

    # -- pixels --------------------------------------------------------------------------------
    def read(
        self, level0_xy: tuple[int, int], level0_size: tuple[int, int], mpp: float,
        out_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Read a level-0 box at a physical resolution.

        Args:
            level0_xy: top-left (x, y), level-0 px. May lie partly outside the slide (outside is
                white background).
            level0_size: (width, height) of the box, level-0 px.
            mpp: output resolution, µm/px.
            out_size: output (width, height) px; default ``round(level0_size * slide_mpp / mpp)``.

        Returns:
            (H, W, 3) uint8 RGB; transparent pixels become white.

        Raises:
            CorruptSlide: a tile failed to decode. The handle is unusable afterwards and every
                later read raises too, so a slide never yields partial results.
        """
        if self._broken:
            raise CorruptSlide(f"an earlier read failed ({self._broken})", str(self.path))
        w0, h0 = int(level0_size[0]), int(level0_size[1])
        if out_size is None:
            f = self.mpp / mpp
            out_size = (max(1, round(w0 * f)), max(1, round(h0 * f)))
        return self._read_level(level0_xy, (w0, h0), self.best_level(mpp), out_size)

    def _read_level(self, xy: tuple[int, int], size0: tuple[int, int], level: int,
                    out_size: tuple[int, int]) -> np.ndarray:
        ds = self.info.level_downsamples[level]
        wl, hl = max(1, math.ceil(size0[0] / ds)), max(1, math.ceil(size0[1] / ds))
        if wl * hl > _MAX_READ_PX * _MAX_READ_PX:
            return self._read_blocks(xy, size0, level, out_size)
        region = self._read_region(xy, level, (wl, hl))
        return _resize(region, out_size)

    @property
    def broken(self) -> bool:
        """True after a read failed and until :meth:`reopen` succeeded."""
        return self._broken is not None

    def reopen(self) -> None:
        """Replace the OpenSlide handle with a fresh one and forget an earlier read failure.

        After a tile fails to decode, OpenSlide answers every later call on that handle with
        the same error; reading on past a damaged tile (``--on-corrupt-tile skip``) needs a
        new handle. Plain images have no handle to replace.
        """
        if self._osr is None:
            self._broken = None
            return
        with self._lock:
            self._osr.close()
            try:
                self._osr = openslide.OpenSlide(str(self.path))
            except openslide.OpenSlideError as exc:
                self._osr = None
                self._broken = str(exc)
                raise CorruptSlide(f"cannot reopen after a read failure: {exc}",
                                   str(self.path)) from exc
            self._broken = None

    def _read_region(self, xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if self._plain is not None:  # one level: level px are level-0 px
            return self._plain.read(int(xy[0]), int(xy[1]), int(size[0]), int(size[1]))
        assert self._osr is not None
        if self._levels is not None and self._levels.reads(level):
            return self._read_tiff_level(xy, level, size)
        try:
            with self._lock:
                rgba = self._osr.read_region((int(xy[0]), int(xy[1])), level, size)
        except openslide.OpenSlideError as exc:
            self._broken = str(exc)
            raise CorruptSlide(f"read failed at level-0 {tuple(xy)} level {level}: {exc}",
                               str(self.path)) from exc
        return _to_rgb(np.asarray(rgba))

    def _openslide_box(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """OpenSlide's RGB read of a box, for :meth:`TiffLevels.check`; a failed read gets
        the handle replaced (a failure is sticky) before it is raised."""
        assert self._osr is not None
        try:
            return _to_rgb(np.asarray(self._osr.read_region((x, y), level, (w, h))))
        except openslide.OpenSlideError:
            try:
                self.reopen()
            except CorruptSlide:
                pass  # _broken is set: every later read says so
            raise

    def _read_tiff_level(self, xy: tuple[int, int], level: int, size: tuple[int, int]
                         ) -> np.ndarray:
        # level-0 px to the level's nearest whole px (OpenSlide interpolates between them)
        assert self._levels is not None
        ds = self.info.level_downsamples[level]
        out = np.full((int(size[1]), int(size[0]), 3), 255, np.uint8)
        try:
            self._levels.paste(level, out, round(xy[0] / ds), round(xy[1] / ds))
        except CorruptSlide as exc:
            self._broken = exc.reason
            raise CorruptSlide(f"read failed at level-0 {tuple(xy)} level {level}: "
                               f"{exc.reason}", str(self.path)) from exc
        return out

    def _read_blocks(
        self, xy: tuple[int, int], size0: tuple[int, int], level: int,
        out_size: tuple[int, int],
    ) -> np.ndarray:
        # Output-space blocks mapped back to level-0 boxes, each read straight from ``level``
        # and resized: memory stays at one block of at most _MAX_READ_PX² level px plus the
        # output, whatever the box size and however far the level is from the request (a
        # single-level slide read at 16 µm/px). On TIFF levels (decoded outside their locks)
        # the blocks are read side by side, each a quarter of that, so memory stays the same.
        out_w, out_h = out_size
        sx, sy = size0[0] / out_w, size0[1] / out_h  # level-0 px per output px
        ds = self.info.level_downsamples[level]
        level_w, level_h = size0[0] / ds, size0[1] / ds
        threads = 1
        if self._plain is None and self._levels is not None and self._levels.reads(level):
            threads = min(_READ_THREADS, os.cpu_count() or 1)
            if level_w * level_h <= (_MAX_READ_PX // 2) ** 2:
                threads = 1  # one block: no pool for it
        max_px = _MAX_READ_PX if threads <= 1 else _MAX_READ_PX // 2
        if self._plain is not None:
            # bands across the whole width: an image stored in strips then decodes each strip
            # about once, where square blocks would decode a full-width strip per block
            step_x = out_w
            step_y = max(1, int(max_px**2 / (max(level_w, 1.0) * max(sy / ds, 1.0))))
        else:
            level_per_out = max(sx, sy) / ds
            # one px short of the limit: the rounded level-0 edges add up to one level px
            step_x = step_y = max(1, int((max_px - 1) / max(level_per_out, 1.0)))
        out = np.empty((out_h, out_w, 3), np.uint8)

        def block(oy: int, ox: int) -> None:
            box = (ox, oy, min(step_x, out_w - ox), min(step_y, out_h - oy))
            self._fill(out, box, level, xy, (sx, sy))

        starts = [(oy, ox) for oy in range(0, out_h, step_y) for ox in range(0, out_w, step_x)]
        if threads <= 1 or len(starts) <= 1:
            for oy, ox in starts:
                block(oy, ox)
            return out
        with ThreadPoolExecutor(threads, thread_name_prefix="wsi-prune-read") as pool:
            for job in [pool.submit(block, oy, ox) for oy, ox in starts]:
                job.result()
        return out

    def _fill(self, out: np.ndarray, box: tuple[int, int, int, int], level: int,
              xy: tuple[int, int], scale: tuple[float, float]) -> None:
        """Read the output box ``(ox, oy, bw, bh)`` of ``out`` from ``level``: output px
        ``(ox, oy)`` lies at level-0 ``xy + (ox, oy) * scale``; each box's level-0 edges are
        rounded, so neighbouring boxes share them (no gap, no overlap)."""
        ox, oy, bw, bh = box
        sx, sy = scale
        ds = self.info.level_downsamples[level]
        x0, y0 = xy[0] + round(ox * sx), xy[1] + round(oy * sy)
        x1, y1 = xy[0] + round((ox + bw) * sx), xy[1] + round((oy + bh) * sy)
        size = (max(1, math.ceil((x1 - x0) / ds)), max(1, math.ceil((y1 - y0) / ds)))
        out[oy:oy + bh, ox:ox + bw] = _resize(self._read_region((x0, y0), level, size),
                                              (bw, bh))

    def read_thumbnail(self, mpp: float, finer_on_error: bool = False,
                       level: int | None = None, max_damaged: float = 0.0) -> np.ndarray:
        """The whole slide at ``mpp`` µm/px, (H, W, 3) uint8, read in bounded blocks (never a
        full level at once) and area-averaged down.

        Args:
            finer_on_error: when a tile of that level fails to decode, read the thumbnail from
                the next finer level instead (each level is a separate encoding of the slide,
                so one damaged tile rarely spoils them all). Slower (a finer level is more to
                decode), and only on damage.
            level: the level read; default the smallest adequate one
                (:meth:`best_level`). A finer one costs more decoding and gives the average
                of its own pixels rather than the vendor's resampled, re-compressed level.
            max_damaged: with ``finer_on_error``, when every level fails too (a single-level
                slide with a damaged tile), the level is read again in parts of about
                :data:`_PATCH_LEVEL_PX` level px, and the parts that do not decode are white
                (glass), with a warning, as long as they are at most this share of the
                thumbnail's area; 0: the slide fails.

        Raises:
            CorruptSlide: the read failed, and could not be made another way.
        """
        out_size = self.size_at(mpp)
        start = self.best_level(mpp) if level is None else int(level)
        if not 0 <= start < self.info.level_count:
            raise ValueError(f"level {level} outside 0-{self.info.level_count - 1}")
        try:
            if self._broken:
                raise CorruptSlide(f"an earlier read failed ({self._broken})", str(self.path))
            return self._read_level((0, 0), self.dimensions, start, out_size)
        except CorruptSlide as exc:
            if not finer_on_error or self._osr is None:
                raise
            error = exc
        for level in range(start - 1, -1, -1):
            _logger.warning("%s: thumbnail level damaged (%s); reading level %d instead",
                            self.path, error.reason, level)
            self.reopen()
            try:
                return self._read_level((0, 0), self.dimensions, level, out_size)
            except CorruptSlide as exc:
                error = exc
        if max_damaged <= 0:
            raise error
        self.reopen()
        return self._read_patched(start, out_size, max_damaged, error)

    def _read_patched(self, level: int, out_size: tuple[int, int], max_damaged: float,
                      error: CorruptSlide) -> np.ndarray:
        """The whole slide at ``out_size`` from ``level`` in parts of about
        :data:`_PATCH_LEVEL_PX` level px. A part that does not decode is split in four, and
        the quarters that fail again are split further, down to one output px or
        :data:`_PATCH_MIN_LEVEL_PX` level px, so that only about the damaged tile's area stays
        white (glass); a warning names the first place. A quarter whose own four quarters all
        fail is taken whole (damage spread wide, not worth narrowing). Over ``max_damaged`` of
        the area fails at once."""
        out_w, out_h = out_size
        sx, sy = self.info.width / out_w, self.info.height / out_h  # level-0 px per output px
        ds = self.info.level_downsamples[level]
        per_out = max(max(sx, sy) / ds, 1.0)  # level px per output px
        out = np.full((out_h, out_w, 3), 255, np.uint8)
        first: list[tuple[tuple[int, int], str]] = []  # (level-0 xy, why) of the first damage
        area = 0  # damaged output px
        limit = max_damaged * out_w * out_h

        def read(box: tuple[int, int, int, int]) -> str | None:
            """Fill ``box`` (ox, oy, bw, bh); None, or why it does not decode."""
            try:
                self._fill(out, box, level, (0, 0), (sx, sy))
                return None
            except CorruptSlide as exc:
                self.reopen()
                return exc.reason

        def lost(box: tuple[int, int, int, int], why: str) -> None:
            nonlocal area
            if not first:
                first.append(((round(box[0] * sx), round(box[1] * sy)), why))
            area += box[2] * box[3]
            if area > limit:
                raise CorruptSlide(f"more than {max_damaged:.0%} of the slide's area does not "
                                   f"decode at level {level} (first at level-0 "
                                   f"{first[0][0]}: {first[0][1]})", str(self.path)) from error

        def narrow(box: tuple[int, int, int, int], why: str, depth: int) -> None:
            ox, oy, bw, bh = box
            if max(bw, bh) <= 1 or max(bw, bh) * per_out <= _PATCH_MIN_LEVEL_PX:
                lost(box, why)
                return
            hw, hh = max(1, bw // 2), max(1, bh // 2)
            kids = [(x, y, w, h) for y, h in ((oy, hh), (oy + hh, bh - hh))
                    for x, w in ((ox, hw), (ox + hw, bw - hw)) if w > 0 and h > 0]
            failed = [(k, r) for k in kids if (r := read(k)) is not None]
            if depth >= 1 and len(failed) == len(kids):
                lost(box, why)
                return
            for k, r in failed:
                narrow(k, r, depth + 1)

        step = max(1, int(_PATCH_LEVEL_PX / per_out))
        for oy in range(0, out_h, step):
            for ox in range(0, out_w, step):
                box = (ox, oy, min(step, out_w - ox), min(step, out_h - oy))
                why = read(box)
                if why is not None:
                    narrow(box, why, 0)
        if first:  # else the damage did not come back part by part
            _logger.warning("%s: %.2f%% of the slide's area does not decode at level %d (first "
                            "at level-0 %s: %s); masked as glass, so the tissue there is not "
                            "tiled", self.path, 100 * area / (out_w * out_h), level, *first[0])
        return out


def _to_rgb(rgba: np.ndarray) -> np.ndarray:
    """RGBA (H, W, 4) uint8 → RGB (H, W, 3) uint8 over a white background."""
    if rgba.ndim == 2:
        return np.repeat(rgba[..., None], 3, axis=2)
    if rgba.shape[2] == 3:
        return np.ascontiguousarray(rgba)
    rgb = np.ascontiguousarray(rgba[..., :3])
    part = rgba[..., 3] < 255
    if part.any():
        # blend only the pixels that need it: float temporaries over a whole 4096² block
        # (the edge of a slide read for its thumbnail) cost ~0.5 GB
        a = rgba[..., 3][part].astype(np.float32)[:, None] / 255.0
        rgb[part] = np.clip(rgb[part] * a + 255.0 * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)
    return rgb


def _resize(img: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    if (img.shape[1], img.shape[0]) == tuple(out_size):
        return img
    # BOX when shrinking is area averaging (no aliasing of nuclei texture); bilinear when growing.
    shrink = out_size[0] < img.shape[1]
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(img).resize(tuple(out_size), resample))


def open_slide(path: str | os.PathLike[str], mpp: float | None = None) -> Slide:
    """Open a slide (OpenSlide, or a plain image when ``mpp`` is given). See :class:`Slide`."""
    return Slide(path, mpp)
