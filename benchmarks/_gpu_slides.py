"""Synthetic 0.25 µm/px slides for bench_gpu.py: the tissue tiles of a CAMELYON-sized slide, as
the pipeline would read them (224 px at 0.5 µm/px for the ViT, 56 px at 2.0 µm/px for the
scorer).

Two sources, same slide definition (:class:`wsi_prune.synth.SynthSpec`, flavour svs, level-0
0.25 µm/px):

* ``render`` (default for the full-size run): the tiles are drawn directly at their working
  resolution by the synthetic renderer (:func:`wsi_prune.synth.render_tile` at downsample 2
  and 8), in parallel processes, into ``.npy`` files in the work folder (reused by a second
  run). Writing the SVS itself is what costs: :func:`wsi_prune.synth.write_slide` ran at 3.0
  Mpx/s on the 2-core development machine (a 8192² px slide in 22 s), so a 20 000-tile slide
  (about 120k x 96k px, 11.5 Gpx) would take an hour there and several minutes on 16 cores,
  more than the 5-minute budget; rendering only the tissue tiles is 1.3 Gpx.
* ``svs``: the slide is written with :func:`wsi_prune.synth.write_slide` and its tiles read
  back through OpenSlide and the package's tissue mask and tile grid (``--tiny``, and any
  size when there is time).

The tissue tiles of ``render`` come from the synthetic layout's tissue truth at 8 µm/px through
the package's tile grid (:func:`wsi_prune.io.tiling.make_grid`, tissue threshold 0.25).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wsi_prune.config import TilingConfig, TissueConfig
from wsi_prune.io.slide import Slide, SlideInfo
from wsi_prune.io.tiling import TileGrid, make_grid
from wsi_prune.io.tissue import tissue_mask
from wsi_prune.synth import SynthSpec, tissue_truth, write_slide

MPP = 0.25  # level-0 µm/px: CAMELYON16's 40x scanners give 0.243
MASK_MPP = 8.0
TILING = TilingConfig(mpp=0.5, tile_px=224, coarse_factor=4, tissue_threshold=0.25)


@dataclass
class SlideTiles:
    """One slide's tissue tiles in memory.

    Attributes:
        name: slide name; source: ``render`` or ``svs``.
        full: (N, 224, 224, 3) uint8 at 0.5 µm/px; coarse: (N, 56, 56, 3) uint8 at 2.0 µm/px.
        grid_rc: (N, 2) int64 (row, col) in the tile grid.
        width / height: level-0 size, px at 0.25 µm/px.
        seconds: time to make the tiles (render, or write + read).
    """

    name: str
    source: str
    full: np.ndarray
    coarse: np.ndarray
    grid_rc: np.ndarray
    width: int
    height: int
    seconds: float

    def __len__(self) -> int:
        return int(self.full.shape[0])


def _info(spec: SynthSpec) -> SlideInfo:
    return SlideInfo("synthetic", "synthetic", "aperio", spec.width, spec.height,
                     ((spec.width, spec.height),), (1.0,), spec.mpp, spec.mpp, "metadata", 40.0)


def truth_grid(spec: SynthSpec) -> TileGrid:
    """The tissue tiles of ``spec`` from its tissue truth, through the package's tile grid."""
    return make_grid(_info(spec), tissue_truth(spec, MASK_MPP), MASK_MPP, TILING)


def sized_spec(target_tiles: int, seed: int, tissue_fraction: float = 0.35) -> SynthSpec:
    """A 4:3 slide at 0.25 µm/px sized to hold about ``target_tiles`` tissue tiles (one
    correction after measuring the first guess's grid)."""
    tile0 = TILING.tile_px * TILING.mpp / MPP  # 448 level-0 px
    side = math.sqrt(target_tiles / tissue_fraction / (4 / 3)) * tile0

    def spec_for(h: float) -> SynthSpec:
        h = max(512, int(round(h / 64)) * 64)
        return SynthSpec(width=int(round(h * 4 / 3 / 64)) * 64, height=h, mpp=MPP,
                         flavour="svs", seed=seed, tissue_fraction=tissue_fraction)

    first = spec_for(side)
    found = max(1, len(truth_grid(first)))
    return spec_for(first.height * math.sqrt(target_tiles / found))


_LAYOUT = None


def _init_worker(spec_json: str) -> None:
    global _LAYOUT
    from wsi_prune.synth.layout import _Layout

    _LAYOUT = _Layout(SynthSpec(**json.loads(spec_json)))


def _render_chunk(args: tuple[str, str, np.ndarray, int]) -> None:
    from wsi_prune.synth.render import render_tile

    full_path, coarse_path, xy, start = args
    full = np.load(full_path, mmap_mode="r+")
    coarse = np.load(coarse_path, mmap_mode="r+")
    fs, cs = TILING.tile_px, TILING.coarse_px
    fd, cd = round(TILING.mpp / MPP), round(TILING.coarse_mpp / MPP)  # downsamples 2 and 8
    for i, (x, y) in enumerate(xy):
        full[start + i] = render_tile(_LAYOUT, fd, int(x) // fd, int(y) // fd, fs, fs)
        coarse[start + i] = render_tile(_LAYOUT, cd, int(x) // cd, int(y) // cd, cs, cs)
    full.flush()
    coarse.flush()


def render_tiles(spec: SynthSpec, work: Path, processes: int) -> SlideTiles:
    """The tissue tiles of ``spec`` drawn directly (no slide file), cached in ``work``."""
    import time

    t0 = time.perf_counter()
    key = f"render-{spec.width}x{spec.height}-s{spec.seed}-f{spec.tissue_fraction}"
    full_path, coarse_path = work / f"{key}-full.npy", work / f"{key}-coarse.npy"
    rc_path, done = work / f"{key}-rc.npy", work / f"{key}.done"
    grid = truth_grid(spec)
    n = len(grid)
    if not done.is_file():
        work.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(full_path, "w+", np.uint8, (n, TILING.tile_px,
                                                              TILING.tile_px, 3)).flush()
        np.lib.format.open_memmap(coarse_path, "w+", np.uint8, (n, TILING.coarse_px,
                                                                TILING.coarse_px, 3)).flush()
        step = 64
        jobs = [(str(full_path), str(coarse_path), grid.level0_xy[s:s + step], s)
                for s in range(0, n, step)]
        spec_json = json.dumps(asdict(spec))
        with ProcessPoolExecutor(processes, initializer=_init_worker,
                                 initargs=(spec_json,)) as pool:
            list(pool.map(_render_chunk, jobs))
        np.save(rc_path, grid.grid_rc)
        done.write_text("ok\n")
    full = np.load(full_path, mmap_mode="r")
    coarse = np.load(coarse_path, mmap_mode="r")
    # in memory: the benchmark times the models and the transfers, not the page cache
    return SlideTiles(f"synth-{spec.seed}", "render", np.ascontiguousarray(full),
                      np.ascontiguousarray(coarse), np.load(rc_path), spec.width, spec.height,
                      time.perf_counter() - t0)


def svs_tiles(spec: SynthSpec, work: Path, threads: int) -> SlideTiles:
    """Write ``spec`` as an SVS (once) and read its tissue tiles back through OpenSlide, the
    package's tissue mask on the thumbnail and its tile grid."""
    import time

    t0 = time.perf_counter()
    path = work / f"synth-{spec.width}x{spec.height}-s{spec.seed}.svs"
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        write_slide(path, spec, workers=max(1, threads))
    tissue = TissueConfig()
    with Slide(path) as slide:
        info = slide.info
        thumb = slide.read_thumbnail(tissue.mask_mpp)
        mask_mpp = info.width * info.mpp / thumb.shape[1]
        grid = make_grid(info, tissue_mask(thumb, mask_mpp, tissue).mask, mask_mpp, TILING)
    chunks = [grid.level0_xy[s:s + 64] for s in range(0, len(grid), 64)]

    side = max(1, round(grid.tile_level0))

    def read(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # what the tiling stage reads, tile by tile: the same level-0 box at both resolutions
        with Slide(path) as s:  # one handle per thread: OpenSlide handles are not shared
            return tuple(np.stack([s.read((int(x), int(y)), (side, side), mpp, out_size=(px, px))
                                   for x, y in xy])
                         for mpp, px in ((TILING.mpp, TILING.tile_px),
                                         (TILING.coarse_mpp, TILING.coarse_px)))

    with ThreadPoolExecutor(max(1, threads)) as pool:
        parts = list(pool.map(read, chunks))
    full = np.concatenate([p[0] for p in parts]) if parts else \
        np.zeros((0, TILING.tile_px, TILING.tile_px, 3), np.uint8)
    coarse = np.concatenate([p[1] for p in parts]) if parts else \
        np.zeros((0, TILING.coarse_px, TILING.coarse_px, 3), np.uint8)
    return SlideTiles(f"synth-{spec.seed}", "svs", full, coarse, grid.grid_rc, info.width,
                      info.height, time.perf_counter() - t0)


def make_slides(n: int, target_tiles: int, source: str, work: Path,
                workers: int | None = None) -> list[SlideTiles]:
    """``n`` slides of about ``target_tiles`` tissue tiles each."""
    workers = workers or os.cpu_count() or 1
    out = []
    for seed in range(n):
        spec = sized_spec(target_tiles, seed)
        make = render_tiles if source == "render" else svs_tiles
        out.append(make(spec, work, workers))
    return out
