"""Writing a tiled JPEG pyramid whose reduced levels are downsampled from level 0 as written.

Level 0 is rendered tile by tile and written as it comes; each finished row of tiles is
box-averaged (``step x step`` pixels -> 1) and appended to an uncompressed scratch file, which
is then read back a band at a time to write level 1, and so on. Every level is therefore the
exact area average of the one above (before JPEG), whatever the content, and memory holds one
band of tiles per level, not a level: a 12288² px slide needs the same few MB of bands as a
2048² one. The scratch files (a quarter of the level above each, uncompressed) live in a
hidden folder next to the output and are removed in every case.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
import tifffile

_logger = logging.getLogger(__name__)


def prefetch_map(fn: Callable, items: list, workers: int) -> Iterator[np.ndarray]:
    """``map(fn, items)`` in order, computed by threads with a bounded look-ahead (``2 *
    workers`` items in flight). Both slide writers render tiles through it."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        it = iter(items)
        window = deque(pool.submit(fn, item) for item in islice(it, 2 * workers))
        while window:
            fut = window.popleft()
            nxt = next(it, None)
            if nxt is not None:
                window.append(pool.submit(fn, nxt))
            yield fut.result()


def downsample(band: np.ndarray, step: int) -> np.ndarray:
    """Box-average ``(H, W, 3) uint8`` by ``step``: ``(ceil(H/step), ceil(W/step), 3) uint8``;
    a partial block at the right or bottom edge averages the pixels it has."""
    h, w = band.shape[:2]
    ph, pw = -h % step, -w % step
    if ph or pw:
        band = np.pad(band, ((0, ph), (0, pw), (0, 0)), mode="edge")
    hh, ww = band.shape[0] // step, band.shape[1] // step
    mean = band.reshape(hh, step, ww, step, 3).mean(axis=(1, 3), dtype=np.float32)
    return np.clip(mean + 0.5, 0, 255).astype(np.uint8)


class _LevelSink:
    """Receives bands of one level, writes their downsampled rows to a scratch file."""

    def __init__(self, path: pathlib.Path, step: int) -> None:
        self.path, self.step = path, step
        self._fh = path.open("wb")

    def push(self, band: np.ndarray) -> None:
        downsample(band, self.step).tofile(self._fh)

    def close(self) -> None:
        self._fh.close()


def _band_tiles(band: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """The tiles of a ``(<= tile, W, 3)`` band, padded to ``(tile, tile, 3)`` at the edges."""
    h, w = band.shape[:2]
    for c in range(0, w, tile):
        t = band[:, c : c + tile]
        if t.shape[:2] != (tile, tile):
            t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
        yield t


def write_pyramid(path: str | os.PathLike[str], width: int, height: int,
                  render: Callable[[int, int, int, int], np.ndarray], *,
                  level_shapes: list[tuple[int, int, int]], tile: int = 256, quality: int = 80,
                  tags: Callable[[int, int], dict] | None = None, workers: int = 1) -> None:
    """Write a pyramidal tiled-JPEG TIFF, level 0 from ``render`` and the others by streaming
    downsampling; written next to ``path`` and renamed into place.

    Args:
        path: output file.
        width / height: level-0 size, px.
        render: ``render(x, y, w, h) -> (h, w, 3) uint8`` level-0 pixels of a box (boxes may
            reach past the slide's edge; that part is cropped).
        level_shapes: ``(width, height, downsample)`` per level, level 0 first, each
            downsample an integer multiple of the one before (2 or 4 times).
        tile: TIFF tile side, px (a multiple of 16 and of every level step).
        quality: JPEG quality.
        tags: ``tags(level, downsample) -> dict`` of extra ``tifffile.TiffWriter.write``
            arguments (description, resolution) per level.
        workers: threads rendering level-0 tiles ahead of the encoder.
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    scratch = path.with_name(f".{path.name}.levels")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        with tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**31) as tif:
            src: pathlib.Path | None = None
            for li, (lw, lh, ds) in enumerate(level_shapes):
                nxt = level_shapes[li + 1] if li + 1 < len(level_shapes) else None
                sink = None
                if nxt is not None:
                    sink = _LevelSink(scratch / f"level{li + 1}.raw", nxt[2] // ds)
                _logger.info("%s: level %d/%d %dx%d px", path.name, li + 1, len(level_shapes),
                             lw, lh)  # fmt: skip
                tiles = _level_tiles(lw, lh, tile, sink, render if li == 0 else None, src,
                                     workers)  # fmt: skip
                tif.write(tiles, shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                          photometric="rgb", compression="jpeg",
                          compressionargs={"level": quality}, subfiletype=1 if li else 0,
                          metadata=None, software=False, maxworkers=1,
                          **(tags(li, ds) if tags else {}))  # fmt: skip
                if sink is not None:
                    sink.close()
                if src is not None:
                    src.unlink()
                src = sink.path if sink is not None else None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _level_tiles(lw: int, lh: int, tile: int, sink: _LevelSink | None,
                 render: Callable | None, src: pathlib.Path | None,
                 workers: int) -> Iterator[np.ndarray]:
    """The tiles of one level in row-major order; each full band also goes to ``sink``.

    Level 0 comes from ``render`` (threads render ahead); reduced levels are read a band at a
    time from the scratch file ``src`` the level above wrote.
    """
    if render is not None:
        boxes = [(c, r) for r in range(0, lh, tile) for c in range(0, lw, tile)]
        rendered = prefetch_map(lambda b: render(b[0], b[1], tile, tile), boxes, workers)
        ncols = -(-lw // tile)
        for r in range(0, lh, tile):
            # The whole band first, then its tiles: tifffile may close this generator right
            # after the last tile, so nothing may wait until after a yield.
            band = np.concatenate([next(rendered) for _ in range(ncols)], axis=1)
            if sink is not None:
                sink.push(band[: min(tile, lh - r), :lw])
            yield from _band_tiles(band, tile)
        return
    assert src is not None
    row_bytes = lw * 3
    with src.open("rb") as fh:
        for r in range(0, lh, tile):
            rows = min(tile, lh - r)
            band = np.fromfile(fh, np.uint8, rows * row_bytes).reshape(rows, lw, 3)
            if sink is not None:
                sink.push(band)
            yield from _band_tiles(band, tile)
