"""Tile grids in level-0 coordinates and the Dask graph that writes a slide's tile store.

One Dask task per block of ``tiles_per_shard`` tiles: the task opens its own slide handle (no
handle is pickled), reads its tiles at the triage resolution and writes exactly one whole shard
of each tile array. Tasks never share a shard, because concurrent partial writes to one shard
lose data in Zarr v3 today (zarr-python #3682, dask #12583).

Memory is bounded by one block of tiles per worker thread plus the low-resolution tissue mask
(at most ``TissueConfig.max_mask_mpx``, coarser than 8 µm/px on slides larger than that), never
by slide size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr
from dask.callbacks import Callback

from wsi_prune import __version__
from wsi_prune._files import file_state
from wsi_prune.config import RunConfig, TilingConfig
from wsi_prune.errors import CorruptSlide, SlideChanged, StoreError
from wsi_prune.io import locks, store
from wsi_prune.io.slide import Slide, SlideInfo
from wsi_prune.io.tissue import MASK_VERSION, TissueMask, slide_tissue_mask, tile_fractions

_logger = logging.getLogger(__name__)

#: callback(done_tiles, total_tiles)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TileGrid:
    """Tiles kept for a slide, in level-0 coordinates.

    Attributes:
        level0_xy: (N, 2) int64 top-left (x, y) of each tile, level-0 px.
        grid_rc: (N, 2) int64 (row, col) of each tile in the full grid.
        tissue_fraction: (N,) float32 tissue fraction of each tile.
        tile_level0: side of a tile in level-0 px (float: 224 px at 0.5 µm/px on a 0.499 µm/px
            slide is 224.45 level-0 px).
        n_rows / n_cols: size of the full grid (whole tiles only).
    """

    level0_xy: np.ndarray
    grid_rc: np.ndarray
    tissue_fraction: np.ndarray
    tile_level0: float
    n_rows: int
    n_cols: int

    def __len__(self) -> int:
        return int(self.level0_xy.shape[0])


def make_grid(
    info: SlideInfo, mask: np.ndarray, mask_mpp: float, config: TilingConfig
) -> TileGrid:
    """The whole-tile grid at ``config.mpp``, filtered by tissue fraction.

    Args:
        info: the slide's metadata (level-0 size and MPP).
        mask: (H, W) bool tissue mask covering the slide at ``mask_mpp`` µm/px.
        mask_mpp: resolution of ``mask``, µm/px.
        config: tile size, resolution and tissue threshold.
    """
    tile_level0 = config.tile_px * config.mpp / info.mpp
    n_cols = int(math.floor(info.width / tile_level0 + 1e-9))
    n_rows = int(math.floor(info.height / tile_level0 + 1e-9))
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rc = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.int64)
    xy = np.round(rc[:, ::-1] * tile_level0).astype(np.int64)
    if len(rc):
        frac = tile_fractions(mask, mask_mpp, xy, tile_level0, info.mpp).astype(np.float32)
    else:
        frac = np.zeros(0, np.float32)
    keep = frac >= config.tissue_threshold
    if config.tissue_threshold <= 0:
        keep[:] = True
    return TileGrid(xy[keep], rc[keep], frac[keep], float(tile_level0), n_rows, n_cols)


def read_tiles(
    slide: Slide, level0_xy: np.ndarray, tile_level0: float, mpp: float, tile_px: int,
    skip_corrupt: bool = False,
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Read square tiles at a physical resolution.

    Args:
        slide: an open slide.
        level0_xy: (n, 2) top-left corners, level-0 px.
        tile_level0: tile side, level-0 px.
        mpp: output resolution, µm/px.
        tile_px: output side, px.
        skip_corrupt: a tile that fails to decode becomes white (background) and is reported
            instead of raising; the slide handle is reopened to read on.

    Returns:
        ``(tiles, failures)``: (n, tile_px, tile_px, 3) uint8, and (index in ``level0_xy``,
        reason) of each tile that failed (empty unless ``skip_corrupt``).

    Raises:
        CorruptSlide: a tile failed to decode and ``skip_corrupt`` is False.
    """
    side = max(1, round(tile_level0))
    out = np.empty((len(level0_xy), tile_px, tile_px, 3), np.uint8)
    failures: list[tuple[int, str]] = []
    for i, (x, y) in enumerate(np.asarray(level0_xy)):
        try:
            out[i] = slide.read((int(x), int(y)), (side, side), mpp,
                                out_size=(tile_px, tile_px))
        except CorruptSlide as exc:
            if not skip_corrupt:
                raise
            out[i] = 255
            failures.append((i, exc.reason))
            slide.reopen()
    return out, failures


def unreadable_records(failures: list[tuple[int, str]], level0_xy: np.ndarray, stage: str
                       ) -> list[dict[str, Any]]:
    """JSON records of unreadable tiles for the store: tile index, level-0 (x, y), the stage
    that found it and OpenSlide's reason."""
    return [{"tile": int(i), "level0_xy": [int(v) for v in level0_xy[i]], "stage": stage,
             "error": msg} for i, msg in failures]


def check_unreadable(n_bad: int, n_tiles: int, config: TilingConfig, path: str | os.PathLike,
                     first: str | None) -> None:
    """Fail a slide whose unreadable tiles exceed ``config.max_unreadable_fraction`` of its
    tissue tiles.

    Raises:
        CorruptSlide: too many unreadable tiles; names the counts, the limit and the first
            tile's reason.
    """
    if n_bad and n_bad > config.max_unreadable_fraction * max(n_tiles, 1):
        raise CorruptSlide(
            f"{n_bad} of {n_tiles} tissue tiles unreadable ({100 * n_bad / max(n_tiles, 1):.1f} "
            f"%, more than tiling.max_unreadable_fraction = "
            f"{100 * config.max_unreadable_fraction:g} %); first: {first}", path)


class _HandlePool:
    """Open slide handles of one build, lent to its blocks one at a time (local schedulers).

    Why: a block that opens its own handle starts with a cold OpenSlide tile cache, and one
    256 px JPEG tile of the triage level spans 4-5 grid rows, i.e. several 64-tile blocks; a
    handle reused by the next block in the same thread finds those tiles decoded. Each running
    block holds its own handle (a handle serialises its reads), so there are at most as many
    handles as threads. A handle whose read failed is closed, not lent again.
    """

    def __init__(self, slide_path: str, mpp: float | None) -> None:
        self._path, self._mpp = slide_path, mpp
        self._free: list[Slide] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Slide]:
        with self._lock:
            slide = self._free.pop() if self._free else None
        if slide is None:
            slide = Slide(self._path, self._mpp)
        try:
            yield slide
        except BaseException:
            slide.close()
            raise
        if slide.broken:
            slide.close()
            return
        with self._lock:
            self._free.append(slide)

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for slide in free:
            slide.close()


# pools of the builds running in this process, by temporary store path (unique per build)
_POOLS: dict[str, _HandlePool] = {}
_POOLS_LOCK = threading.Lock()


@contextlib.contextmanager
def _pooled_handles(slide_path: str, mpp: float | None, store_path: str) -> Iterator[None]:
    """Let the blocks of this build (run in this process) share slide handles."""
    pool = _HandlePool(slide_path, mpp)
    with _POOLS_LOCK:
        _POOLS[store_path] = pool
    try:
        yield
    finally:
        with _POOLS_LOCK:
            _POOLS.pop(store_path, None)
        pool.close()


def _handle(slide_path: str, mpp: float | None, store_path: str) -> Any:
    """A handle for one block: lent by its build's pool when the build runs in this process,
    else a fresh one (a distributed worker: closed when the block ends)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(store_path)
    return pool.borrow() if pool is not None else Slide(slide_path, mpp)


def _write_block(
    slide_path: str, mpp_override: float | None, store_path: str, start: int,
    level0_xy: np.ndarray, tile_level0: float, config: TilingConfig,
) -> tuple[int, list[tuple[int, str]]]:
    """Dask task: read one shard's worth of tiles and write them. Returns the tile count and
    the (tile index, reason) of tiles that failed to decode (``on_corrupt_tile: skip``)."""
    n = len(level0_xy)
    skip = config.on_corrupt_tile == "skip"
    group = zarr.open_group(store_path, mode="r+", zarr_format=3)
    with _handle(slide_path, mpp_override, store_path) as slide:
        coarse, bad = read_tiles(slide, level0_xy, tile_level0, config.coarse_mpp,
                                 config.coarse_px, skip)
        store.write_tile_shards(group["tiles/coarse"], start, coarse)
        if config.store_tiles:
            full, bad_full = read_tiles(slide, level0_xy, tile_level0, config.mpp,
                                        config.tile_px, skip)
            store.write_tile_shards(group["tiles/full"], start, full)
            seen = {i for i, _ in bad}
            bad += [(i, msg) for i, msg in bad_full if i not in seen]
    return n, sorted((start + i, msg) for i, msg in bad)


def slide_tile_hash(slide_path: str | os.PathLike[str], config: RunConfig,
                    mpp: float | None = None) -> str:
    """:func:`tile_store_hash` of a slide file as it is now (opens it to resolve the MPP).

    Raises:
        SlideError: the slide cannot be opened.
    """
    path = Path(os.path.abspath(slide_path))
    with Slide(path, mpp) as slide:
        return tile_store_hash(config, slide.info, path.stat())


def tile_store_hash(config: RunConfig, info: SlideInfo, slide_stat: os.stat_result) -> str:
    """The identity of a slide's tile store (SHA-256 hex), recorded as its ``tile_hash``.

    It covers what decides the tiles: the tissue and tiling config sections, the resolved MPP
    and its source (a re-run with another ``--mpp`` on a slide without metadata changes every
    tile's footprint), the slide file's size and mtime (a replaced slide), and the version of
    the tissue-mask algorithm (:data:`~wsi_prune.io.tissue.MASK_VERSION`: stores masked by an
    older algorithm are rebuilt). Model sections are left out, so changing only them reuses
    the store.
    """
    ident = {
        "sections": config.section_hash("tissue", "tiling"),
        "mask_version": MASK_VERSION,
        "mpp_x": info.mpp_x, "mpp_y": info.mpp_y, "mpp_source": info.mpp_source,
        "slide_bytes": slide_stat.st_size, "slide_mtime_ns": slide_stat.st_mtime_ns,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TilingResult:
    """What :func:`tile_slide` did.

    Attributes:
        store_path: the published store.
        n_tiles: tissue tiles written.
        n_grid: whole tiles in the grid.
        skipped: True when a complete store with the same tile hash (see
            :func:`tile_store_hash`) already existed.
        seconds: wall time.
        info: slide metadata.
    """

    store_path: Path
    n_tiles: int
    n_grid: int
    skipped: bool
    seconds: float
    info: SlideInfo | None


class _TaskProgress(Callback):
    """Dask local-scheduler callback reporting finished block tasks."""

    def __init__(self, sizes: dict[str, int], total: int, progress: Progress) -> None:
        super().__init__()
        self._sizes, self._total, self._progress, self._done = sizes, total, progress, 0

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if name in self._sizes:
            self._done += self._sizes[name]
            self._progress(self._done, self._total)


#: the mask the free-space check made of a run's first slide, kept until tiling takes it
#: (one mask: at most ``tissue.max_mask_mpx`` megapixels, a byte each):
#: ``{(path, tile hash): mask}``
_KEPT: dict[tuple[str, str], TissueMask] = {}
_KEPT_LOCK = threading.Lock()


def run_tissue_mask(slide: Slide, config: RunConfig, keep: bool = False) -> TissueMask:
    """The slide's tissue mask as a run makes it (``doctor`` and the free-space check too).

    With ``tiling.on_corrupt_tile: skip`` a damaged tile of the thumbnail's level is read from
    a finer level, and where no level decodes whole, up to ``tiling.max_unreadable_fraction``
    of the slide's area is masked as glass
    (:func:`~wsi_prune.io.tissue.slide_tissue_mask`); with ``fail`` the read fails.

    Args:
        slide: the open slide.
        config: the run config (its tissue and tiling sections).
        keep: keep the mask for the next call on the same slide file with the same tissue
            and tiling config (:func:`tile_store_hash`), which takes it instead of masking
            again: the free-space check masks a run's first slide just before the run tiles
            it (0.2-0.5 s on a 12 288² px slide, 1.2-1.6 s on a 50 000² px one, and a damaged
            slide's warnings twice). One mask is kept at a time; :func:`forget_kept_mask`
            drops it.
    """
    key = _kept_key(slide, config)
    with _KEPT_LOCK:
        tm = _KEPT.pop(key, None) if key is not None else None
    if tm is None:
        skip = config.tiling.on_corrupt_tile == "skip"
        tm = slide_tissue_mask(slide, config.tissue, finer_on_error=skip,
                               max_damaged=config.tiling.max_unreadable_fraction if skip
                               else 0.0)
    if keep and key is not None:
        with _KEPT_LOCK:
            _KEPT.clear()
            _KEPT[key] = tm
    return tm


def forget_kept_mask() -> None:
    """Drop the mask :func:`run_tissue_mask` kept, if any (the end of a run)."""
    with _KEPT_LOCK:
        _KEPT.clear()


def _kept_key(slide: Slide, config: RunConfig) -> tuple[str, str] | None:
    # the tile hash covers the sections, the mask version, the resolved MPP and the file's
    # size and mtime: a replaced slide or another config never takes a kept mask
    try:
        stat = os.stat(slide.path)
    except OSError:
        return None
    return os.path.realpath(slide.path), tile_store_hash(config, slide.info, stat)


def tile_slide(
    slide_path: str | os.PathLike[str],
    store_path: str | os.PathLike[str],
    config: RunConfig,
    mpp: float | None = None,
    scheduler: Any = "threads",
    progress: Progress | None = None,
    force: bool = False,
) -> TilingResult:
    """Build (or reuse) the tile store of one slide.

    Args:
        slide_path: the slide file; made absolute before it goes to Dask tasks, which may run
            in another working directory.
        store_path: final ``<id>.zarr`` path; built under a temporary name and renamed.
        config: run configuration (its tissue and tiling sections are used and hashed, with
            the resolved MPP and the slide file's size and mtime: :func:`tile_store_hash`).
        mpp: user MPP override (see :mod:`wsi_prune.io.slide`).
        scheduler: ``"threads"``, ``"sync"``, ``"processes"``, a ``distributed.Client``, or
            ``"dask-worker"`` when called from a task on a distributed worker (the blocks
            become tasks on that worker's cluster).
        progress: called with (tiles done, tiles total) as blocks finish.
        force: rebuild even when a complete store with the same tile hash exists.

    Raises:
        SlideError: the slide cannot be opened or read (the store is not published).
        OutputConflict: another run holds this store's lock.
    """
    t0 = time.perf_counter()
    # abspath, not resolve(): messages keep naming the file as the user sees it (a symlink)
    slide_path, store_path = Path(os.path.abspath(slide_path)), Path(store_path)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    # The file's state is taken before any handle opens it: a file replaced between the two
    # would leave handles on the old file (OpenSlide's, tifffile's) under the new file's size
    # and mtime, and a store of the old pixels would pass for the new file's.
    try:
        slide_stat: os.stat_result | None = slide_path.stat()
    except OSError:
        slide_stat = None  # Slide() says what is wrong with the path
    # the MPP is resolved before the skip test: it is part of the store's identity
    with Slide(slide_path, mpp) as slide, locks.locked(store_path):
        now = slide_path.stat()
        if slide_stat is None or file_state(now) != file_state(slide_stat):
            raise SlideChanged("slide file was replaced or modified while it was opened; "
                               "run again", slide_path)
        tile_hash = tile_store_hash(config, slide.info, slide_stat)
        if not force and store.is_complete(store_path, tile_hash):
            group = store.open_store(store_path)
            n = int(group["tiles/coords"].shape[0])
            _logger.info("%s: tile store complete for this config, skipping", store_path)
            return TilingResult(store_path, n, int(group.attrs["grid"]["n_grid"]), True,
                                time.perf_counter() - t0, None)
        store.remove_stale_tmp(store_path)
        tmp = store.tmp_path_for(store_path)
        try:
            info, n_grid, n = _build(slide, tmp, config, mpp, scheduler, progress, tile_hash,
                                     slide_stat)
            if file_state(slide_path.stat()) != file_state(slide_stat):
                raise SlideChanged("slide file was replaced or modified while its tiles were "
                                   "read; the tile store was not published: run again",
                                   slide_path)
            locks.verify(store_path)
            store.publish(tmp, store_path)
        except BaseException:
            # a failed or interrupted build must never look complete
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    dt = time.perf_counter() - t0
    _logger.info("%s: %d tissue tiles of %d in %.1f s", slide_path.name, n, n_grid, dt)
    return TilingResult(store_path, n, n_grid, False, dt, info)


def _build(
    slide: Slide, tmp: Path, config: RunConfig, mpp: float | None, scheduler: Any,
    progress: Progress | None, tile_hash: str, slide_stat: os.stat_result,
) -> tuple[SlideInfo, int, int]:
    tcfg = config.tiling
    slide_path = Path(slide.path)
    info = slide.info
    # thumbnail read, masked and released inside; bounded by TissueConfig.max_mask_mpx
    tm = run_tissue_mask(slide, config)
    mask_mpp = tm.mpp
    grid = make_grid(info, tm.mask, mask_mpp, tcfg)
    n = len(grid)

    group = store.create_store(tmp)
    cp, tp = tcfg.coarse_px, tcfg.tile_px
    store.create_tiles_array(group, "tiles/coarse", n, (cp, cp, 3), tcfg.tiles_per_shard,
                             tcfg.compressor)
    if tcfg.store_tiles:
        store.create_tiles_array(group, "tiles/full", n, (tp, tp, 3), tcfg.tiles_per_shard,
                                 tcfg.compressor)
    store.write_array(group, "tiles/coords", grid.level0_xy, units="level-0 px (x, y)")
    store.write_array(group, "tiles/grid", grid.grid_rc, units="(row, col)")
    store.write_array(group, "tiles/tissue_fraction", grid.tissue_fraction)
    store.write_array(group, "mask/tissue", tm.mask, mpp=mask_mpp, fraction=tm.fraction)

    bad = _run_blocks(str(slide_path), mpp, str(tmp), grid, tcfg, scheduler, progress)
    records = unreadable_records(bad, grid.level0_xy, "tiling")
    store.write_array(group, "tiles/unreadable", np.array([r["tile"] for r in records], np.int64),
                      records=records)
    if records:
        _logger.warning("%s: %d of %d tiles unreadable (first at level-0 %s: %s)", slide_path,
                        len(records), n, records[0]["level0_xy"], records[0]["error"])
    check_unreadable(len(records), n, tcfg, slide_path, records[0]["error"] if records else None)

    for name in ("tiles/coarse", "tiles/full") if tcfg.store_tiles else ("tiles/coarse",):
        lost = store.missing_chunks(group[name])
        if lost:
            raise StoreError(f"{name}: {len(lost)} tiles missing after writing (first: "
                             f"{lost[:5]}); was a shard written by two tasks?", tmp)
    group.attrs.update({
        "slide": info.to_dict(),
        "slide_file": {"path": str(slide_path), "size_bytes": slide_stat.st_size,
                       "mtime_ns": slide_stat.st_mtime_ns},
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "config": config.to_dict(),
        "config_hash": config.hash(),
        "tile_hash": tile_hash,
        "wsi_prune_version": __version__,
        "grid": {
            "tile_px": tp, "mpp": tcfg.mpp, "coarse_px": cp, "coarse_mpp": tcfg.coarse_mpp,
            "tile_level0": grid.tile_level0, "n_rows": grid.n_rows, "n_cols": grid.n_cols,
            "n_grid": grid.n_rows * grid.n_cols, "n_tiles": n,
        },
        "tissue": {"mask_mpp": mask_mpp, "fraction": tm.fraction},
        "complete": True,
    })
    return info, grid.n_rows * grid.n_cols, n


def _run_blocks(
    slide_path: str, mpp: float | None, tmp: str, grid: TileGrid, tcfg: TilingConfig,
    scheduler: Any, progress: Progress | None,
) -> list[tuple[int, str]]:
    """Run the block tasks; return (tile index, reason) of every tile that failed to decode."""
    n, step = len(grid), tcfg.tiles_per_shard
    if n == 0:
        return []
    tasks, sizes = [], {}
    for start in range(0, n, step):
        xy = grid.level0_xy[start:start + step]
        name = f"tile-block-{start}-{os.path.basename(tmp)}"
        # the key names the block on dashboards; the temporary store's unique name keeps keys
        # of two builds apart on a long-lived cluster
        task = dask.delayed(_write_block, pure=False)(
            slide_path, mpp, tmp, start, xy, grid.tile_level0, tcfg, dask_key_name=name
        )
        tasks.append(task)
        sizes[task.key] = len(xy)
    if hasattr(scheduler, "compute") and hasattr(scheduler, "gather"):  # distributed.Client
        return _run_distributed(scheduler, tasks, n, progress)
    if scheduler == "dask-worker":
        # Inside a task on a distributed worker (a slide of a batch): the blocks become tasks
        # on the same cluster, and this task leaves its worker thread while it waits, so the
        # blocks of one large slide spread over every worker instead of queueing behind it.
        from distributed import worker_client

        with worker_client() as client:
            return _run_distributed(client, tasks, n, progress)
    with contextlib.ExitStack() as stack:
        # blocks run in this process: they share slide handles (closed when all are done)
        stack.enter_context(_pooled_handles(slide_path, mpp, tmp))
        kwargs: dict[str, Any] = {}
        if scheduler == "threads":
            # Our own pool, so that on a failure we wait for blocks still running before the
            # caller deletes the temporary store (they would otherwise write into a deleted
            # directory, recreating parts of it) and drop the blocks not yet started.
            pool = ThreadPoolExecutor(usable_cores(), thread_name_prefix="wsi-prune-tiling")
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            kwargs["pool"] = pool
        if progress:
            stack.enter_context(_TaskProgress(sizes, n, progress))
        results = dask.compute(*tasks, scheduler=scheduler, **kwargs)
    return sorted(f for _, bad in results for f in bad)


def usable_cores() -> int:
    """The cores this process may run on (its CPU set, as a SLURM job's cgroup sets it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def _run_distributed(client: Any, tasks: list, n: int, progress: Progress | None
                     ) -> list[tuple[int, str]]:
    from distributed import as_completed

    futures = client.compute(tasks)
    done, failures = 0, []
    try:
        for fut in as_completed(futures):
            count, bad = fut.result()
            done += count
            failures.extend(bad)
            if progress:
                progress(done, n)
    except BaseException:
        # Blocks not started never start. Blocks already running on a worker cannot be
        # stopped; they may still write into the temporary store after the caller deleted it,
        # which leaves a hidden, incomplete directory that the next run removes
        # (store.remove_stale_tmp), never a store that looks complete.
        client.cancel(futures)
        raise
    return sorted(failures)
