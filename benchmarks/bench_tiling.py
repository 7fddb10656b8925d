"""Tiling benchmark: the pipeline's Dask->Zarr tiling against a bare OpenSlide loop, the tile
compressor, and peak memory per slide size.

Three measurements, all on synthetic slides written by :mod:`wsi_prune.synth` (svs flavour,
0.5 µm/px, default tissue fraction):

1. **Throughput** on one slide (``--size``): tissue tiles/s of
   :func:`wsi_prune.io.tiling.tile_slide`
   (threaded and synchronous schedulers; whole call: thumbnail, tissue mask, grid, Dask blocks,
   Zarr writes, completeness check, publish) against a bare loop of
   ``openslide.OpenSlide.read_region`` over the same tiles at the best level for the coarse
   resolution, converted to RGB and resized to the coarse tile with PIL (BOX), in one process.
   Settings are interleaved over ``--repeats`` rounds after one warm-up of the page cache; the
   best round is reported (the least disturbed on a shared machine) with the median.
2. **Compressor**: ``zstd`` (level 1) against ``none`` for the tile arrays, on the synthetic
   slide and on the real slide (``--real``, when present): bytes on disk per tile of
   ``tiles/coarse`` (and ``tiles/full`` with ``store_tiles``), tiling time, and the rate of
   reading every coarse tile back one by one.
3. **Peak RSS per slide size** (``--rss-sizes``): for each size a fresh process writes the slide
   and another fresh process tiles it (threads); each reports its own ``ru_maxrss``. A process
   that only imports the same modules gives the floor. Generation slower than
   ``--max-gen-seconds`` is stopped and reported as not measured.

    python benchmarks/bench_tiling.py --work bench-out/tiling
    python benchmarks/bench_tiling.py --work bench-out/tiling --rss-sizes 4000 20000 50000 100000

Slides are kept in ``--work`` and reused by later runs (same name = same spec), with the
measurement of the run that wrote them. Not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MPP = 0.5


# -- children: one measurement per fresh process -------------------------------------------------
def _maxrss_mib() -> float:
    """Peak resident memory of this process, MiB.

    VmHWM, not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries ru_maxrss over an exec, so a
    child forked from a big parent would report the parent's peak.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def _child(argv: list[str]) -> None:
    what = argv[0]
    if what == "import":
        import wsi_prune.io.tiling  # noqa: F401
        import wsi_prune.synth  # noqa: F401

        out = {"imports_mib": _maxrss_mib()}
        from wsi_prune.config import RunConfig

        RunConfig()  # what tile_slide's caller does first
        out["torch_loaded"] = "torch" in sys.modules
    elif what == "gen":
        from wsi_prune.synth import SynthSpec, write_slide

        size = int(argv[2])
        mpp = float(argv[3]) if len(argv) > 3 else MPP
        t0 = time.perf_counter()
        write_slide(argv[1], SynthSpec(width=size, height=size, mpp=mpp, seed=1))
        out = {"seconds": time.perf_counter() - t0}
    elif what == "tile":
        from wsi_prune.config import RunConfig
        from wsi_prune.io.tiling import tile_slide

        cfg = RunConfig()
        sampler = _RssSampler()
        t0 = time.perf_counter()
        res = tile_slide(argv[1], argv[2], cfg, scheduler="threads", force=True,
                         progress=sampler.blocks_running)
        out = {"seconds": time.perf_counter() - t0, "n_tiles": res.n_tiles, "n_grid": res.n_grid,
               "before_mib": sampler.start_mib, "blocks_peak_mib": sampler.stop()}
    else:
        raise SystemExit(f"unknown child task {what}")
    out["maxrss_mib"] = _maxrss_mib()
    if what == "tile":  # kept beside the store, for runs cut short
        Path(f"{argv[2]}.json").write_text(json.dumps(out))
    print("RESULT " + json.dumps(out), flush=True)


class _RssSampler:
    """Samples this process's RSS every 5 ms; keeps the peak seen once the first Dask block
    has finished (the streaming phase: every block reads and writes only its own tiles)."""

    def __init__(self) -> None:
        import threading

        self.start_mib = self._rss()
        self._blocks = False
        self._peak = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._done.wait(0.005):
            if self._blocks:
                self._peak = max(self._peak, self._rss())

    def blocks_running(self, done: int, total: int) -> None:
        self._blocks = True

    def stop(self) -> float | None:
        self._done.set()
        self._thread.join()
        return self._peak if self._blocks else None


def _run_child(args: list[str], timeout: float | None = None) -> dict | None:
    """Run one child measurement; None when it ran past ``timeout`` seconds."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _slide(work: Path, size: int, timeout: float | None = None, mpp: float = MPP
           ) -> tuple[Path, dict | None]:
    """The benchmark slide of this size (and level-0 µm/px), written by a child process unless
    already there."""
    path = work / (f"synth_{size}.svs" if mpp == MPP else f"synth_{size}_mpp{mpp:g}.svs")
    record = path.with_suffix(".gen.json")  # the measurement of the run that wrote it
    if path.exists():
        return path, json.loads(record.read_text()) if record.exists() else None
    print(f"  writing {path.name} ({size}² px)...", flush=True)
    gen = _run_child(["gen", str(path), str(size), str(mpp)], timeout)
    if gen is not None:
        record.write_text(json.dumps(gen))
    return path, gen


# -- 1. throughput -----------------------------------------------------------------------------
def _bare_loop(path: Path, xy, side: int, coarse_mpp: float, coarse_px: int) -> float:
    """Seconds for read_region + RGB + resize over the tiles, one handle, one thread."""
    import openslide
    from PIL import Image

    t0 = time.perf_counter()
    with openslide.OpenSlide(str(path)) as osr:
        mpp = float(osr.properties[openslide.PROPERTY_NAME_MPP_X])
        level = osr.get_best_level_for_downsample(coarse_mpp / mpp)
        size = math.ceil(side / osr.level_downsamples[level])
        for x, y in xy:
            region = osr.read_region((int(x), int(y)), level, (size, size)).convert("RGB")
            region.resize((coarse_px, coarse_px), Image.Resampling.BOX)
    return time.perf_counter() - t0


def _prepare(path: Path, cfg) -> float:
    """Seconds for the per-slide part of tile_slide before any tile: open, thumbnail, tissue
    mask, grid."""
    from wsi_prune.io.slide import Slide
    from wsi_prune.io.tiling import make_grid
    from wsi_prune.io.tissue import tissue_mask

    t0 = time.perf_counter()
    with Slide(path) as s:
        thumb = s.read_thumbnail(cfg.tissue.mask_mpp)
        mask_mpp = s.info.width * s.mpp / thumb.shape[1]
        make_grid(s.info, tissue_mask(thumb, mask_mpp, cfg.tissue).mask, mask_mpp, cfg.tiling)
    return time.perf_counter() - t0


def _blocks(slide: Path, work: Path, cfg, scheduler: str) -> float:
    """Seconds for the Dask blocks alone (read every tissue tile and write the tile store's
    shards) on a fresh store: what the bare loop is the lower bound of."""
    from wsi_prune.io import store
    from wsi_prune.io.slide import Slide
    from wsi_prune.io.tiling import _run_blocks, make_grid
    from wsi_prune.io.tissue import slide_tissue_mask

    with Slide(slide) as s:
        tm = slide_tissue_mask(s, cfg.tissue)
        grid = make_grid(s.info, tm.mask, tm.mpp, cfg.tiling)
    out = work / "blocks.zarr"
    shutil.rmtree(out, ignore_errors=True)
    group = store.create_store(out)
    cp = cfg.tiling.coarse_px
    store.create_tiles_array(group, "tiles/coarse", len(grid), (cp, cp, 3),
                             cfg.tiling.tiles_per_shard, cfg.tiling.compressor)
    t0 = time.perf_counter()
    _run_blocks(str(slide), None, str(out), grid, cfg.tiling, scheduler, None)
    return time.perf_counter() - t0


def throughput(slide: Path, work: Path, repeats: int) -> tuple[list[tuple], float]:
    """Rows (label, tiles, tiles/s best, tiles/s median, ratio to the bare loop in the same
    round: median, min, max) and the per-slide time before the first tile."""
    from wsi_prune.config import RunConfig
    from wsi_prune.io import store
    from wsi_prune.io.tiling import tile_slide

    cfg = RunConfig()
    out = work / "throughput.zarr"
    tile_slide(slide, out, cfg, force=True)  # warm-up: page cache, imports, the grid to replay
    g = store.open_store(out)
    xy = g["tiles/coords"][...]
    side = round(g.attrs["grid"]["tile_level0"])
    n = len(xy)
    names = ("bare", "threads", "sync", "blocks-threads", "blocks-sync")
    times: dict[str, list[float]] = {k: [] for k in (*names, "prepare")}
    _bare_loop(slide, xy, side, cfg.tiling.coarse_mpp, cfg.tiling.coarse_px)
    for _ in range(repeats):
        times["prepare"].append(_prepare(slide, cfg))
        times["bare"].append(_bare_loop(slide, xy, side, cfg.tiling.coarse_mpp,
                                        cfg.tiling.coarse_px))
        for sched in ("threads", "sync"):
            # a fresh build each time, as in a first run (not timing the old store's removal)
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            res = tile_slide(slide, out, cfg, scheduler=sched, force=True)
            times[sched].append(time.perf_counter() - t0)
            assert res.n_tiles == n
            times[f"blocks-{sched}"].append(_blocks(slide, work, cfg, sched))
    rows = []
    for name, label in (("bare", "bare OpenSlide read_region + resize loop"),
                        ("threads", "tile_slide, threaded scheduler"),
                        ("sync", "tile_slide, synchronous scheduler"),
                        ("blocks-threads", "Dask blocks only (read + write), threads"),
                        ("blocks-sync", "Dask blocks only (read + write), sync")):
        ratios = [b / t for b, t in zip(times["bare"], times[name], strict=True)]
        rows.append((label, n, n / min(times[name]), n / statistics.median(times[name]),
                     statistics.median(ratios), min(ratios), max(ratios)))
    return rows, min(times["prepare"])


def vit_reads(slide: Path, work: Path, repeats: int) -> tuple[int, int, list[float], list[float]]:
    """Full-resolution tiles (what the ViT reads: 224 px at 0.5 µm/px) for every tissue tile:
    seconds through ``read_tiles`` (the best pyramid level) and decoding level 0 and
    shrinking, interleaved. Returns (tiles, level used, best-level times, level-0 times)."""
    from wsi_prune.config import RunConfig
    from wsi_prune.io import store
    from wsi_prune.io.slide import Slide
    from wsi_prune.io.tiling import read_tiles

    cfg = RunConfig()
    g = store.open_store(work / "throughput.zarr")
    xy = g["tiles/coords"][...]
    side = float(g.attrs["grid"]["tile_level0"])
    px, mpp = cfg.tiling.tile_px, cfg.tiling.mpp
    best, level0 = [], []
    with Slide(slide) as s:
        level = s.best_level(mpp)
        for _ in range(repeats):
            t0 = time.perf_counter()
            read_tiles(s, xy, side, mpp, px)
            best.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for x, y in xy:
                s._read_level((int(x), int(y)), (round(side), round(side)), 0, (px, px))
            level0.append(time.perf_counter() - t0)
    return len(xy), level, best, level0


# -- 2. compressor -----------------------------------------------------------------------------
def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def compressors(slides: dict[str, Path], work: Path, repeats: int) -> list[tuple]:
    """Rows (slide, compressor, arrays, tiles, coarse KiB/tile, full KiB/tile, tile_slide s,
    coarse tiles/s read back one by one)."""
    from wsi_prune.config import RunConfig
    from wsi_prune.io import store
    from wsi_prune.io.tiling import tile_slide

    rows = []
    for name, slide in slides.items():
        for store_tiles in (False, True):
            times: dict[str, list[float]] = {"zstd": [], "none": []}
            reads: dict[str, list[float]] = {"zstd": [], "none": []}
            for _ in range(repeats):
                for comp in ("zstd", "none"):
                    cfg = RunConfig().replace(tiling={"compressor": comp,
                                                      "store_tiles": store_tiles})
                    out = work / f"comp-{comp}-{int(store_tiles)}.zarr"
                    t0 = time.perf_counter()
                    tile_slide(slide, out, cfg, force=True)
                    times[comp].append(time.perf_counter() - t0)
                    coarse = store.open_store(out)["tiles/coarse"]
                    t0 = time.perf_counter()
                    for i in range(coarse.shape[0]):
                        coarse[i]
                    reads[comp].append(time.perf_counter() - t0)
            for comp in ("zstd", "none"):
                out = work / f"comp-{comp}-{int(store_tiles)}.zarr"
                n = store.open_store(out)["tiles/coarse"].shape[0]
                coarse_kib = _dir_bytes(out / "tiles" / "coarse") / 1024 / n
                full_kib = _dir_bytes(out / "tiles" / "full") / 1024 / n if store_tiles else None
                rows.append((name, comp, "coarse + full" if store_tiles else "coarse", n,
                             coarse_kib, full_kib, min(times[comp]), n / min(reads[comp])))
    return rows


# -- 3. peak RSS -------------------------------------------------------------------------------
def rss(sizes: list[int], work: Path, max_gen_seconds: float) -> tuple[dict, list[tuple]]:
    floor = _run_child(["import"])
    rows = []
    for size in sizes:
        path, gen = _slide(work, size, max_gen_seconds)
        if not path.exists():
            print(f"  {size}²: generation ran past {max_gen_seconds:.0f} s, not measured",
                  flush=True)
            rows.append((size, None, None, None, None, None, None, None))
            continue
        print(f"  tiling {path.name}...", flush=True)
        tile = _run_child(["tile", str(path), str(work / f"rss_{size}.zarr")])
        shutil.rmtree(work / f"rss_{size}.zarr", ignore_errors=True)
        rows.append((size, path.stat().st_size / 2**20,
                     gen and gen["seconds"], gen and gen["maxrss_mib"],
                     tile["n_tiles"], tile["seconds"], tile["maxrss_mib"],
                     tile.get("blocks_peak_mib")))
    return floor, rows


# -- report ------------------------------------------------------------------------------------
def _f(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench-out/tiling", help="folder for slides and stores")
    ap.add_argument("--size", type=int, default=12288, help="side of the throughput slide, px")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mpp", type=float, default=MPP,
                    help="level-0 µm/px of the throughput and compressor slide (0.25: a 40x "
                         "scan, read at 2.0 µm/px from its 8x level)")
    ap.add_argument("--real", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                          / "cmu-1-small-region.svs"),
                    help="a real slide for the compressor table too (skipped if absent)")
    ap.add_argument("--rss-sizes", type=int, nargs="*", default=[4000, 20000, 50000],
                    help="slide sides for the peak-RSS table, px (100000 takes long to write)")
    ap.add_argument("--max-gen-seconds", type=float, default=1800.0,
                    help="stop writing a slide after this long and skip its row")
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "compressor", "rss"])
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"# bench_tiling {dt.date.today()} {platform.node()} {platform.processor() or ''} "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
          f"Python {platform.python_version()}")
    t_start = time.perf_counter()
    if "throughput" not in args.skip or "compressor" not in args.skip:
        slide, _ = _slide(work, args.size, mpp=args.mpp)
    if "throughput" not in args.skip:
        rows, prepare = throughput(slide, work, args.repeats)
        print(f"\n## Throughput: {args.size}² px slide at {args.mpp:g} µm/px, coarse tiles 56 px "
              f"at 2.0 µm/px, {args.repeats} interleaved rounds\n")
        print("| method | tiles | tiles/s best | tiles/s median | vs bare loop, same round: "
              "median (min-max) |")
        print("|---|---:|---:|---:|---:|")
        for label, n, best, med, ratio, lo, hi in rows:
            print(f"| {label} | {n} | {best:.0f} | {med:.0f} | {ratio:.2f}x "
                  f"({lo:.2f}-{hi:.2f}) |")
        print(f"\nOf tile_slide's time, {prepare:.2f} s per slide go before any tile "
              f"(open, thumbnail at 8 µm/px, tissue mask, grid).")
        n, level, best, level0 = vit_reads(slide, work, args.repeats)
        print(f"\nViT tiles (224 px at 0.5 µm/px) of the {n} tissue tiles: from level {level} "
              f"{n / min(best):.0f} tiles/s best, {n / statistics.median(best):.0f} median; "
              f"decoding level 0 and shrinking {n / min(level0):.0f} best, "
              f"{n / statistics.median(level0):.0f} median.")
    if "compressor" not in args.skip:
        slides = {f"synthetic {args.size}²": slide}
        if args.real and Path(args.real).is_file():
            slides[f"real: {Path(args.real).name}"] = Path(args.real)
        rows = compressors(slides, work, args.repeats)
        print(f"\n## Compressor (raw coarse tile: 9.2 KiB, full: 147 KiB), best of "
              f"{args.repeats}\n")
        print("| slide | compressor | arrays | tiles | tiles/coarse KiB per tile | "
              "tiles/full KiB per tile | tile_slide s | coarse tiles/s read one by one |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for name, comp, arrays, n, ckib, fkib, sec, rate in rows:
            print(f"| {name} | {comp} | {arrays} | {n} | {ckib:.2f} | {_f(fkib, '.1f')} | "
                  f"{sec:.2f} | {rate:.0f} |")
    if "rss" not in args.skip:
        floor, rows = rss(args.rss_sizes, work, args.max_gen_seconds)
        torch = ", which imports torch" if floor["torch_loaded"] else ""
        print(f"\n## Peak RSS per slide size (fresh process each)\n\nFloor: importing "
              f"wsi_prune.synth + wsi_prune.io.tiling "
              f"{floor['imports_mib']:.0f} MiB; then building "
              f"RunConfig(){torch}: {floor['maxrss_mib']:.0f} MiB.\n")
        print("| slide px | file MiB | write s | write peak RSS MiB | tissue tiles | "
              "tile_slide s | tile_slide peak RSS MiB | RSS while Dask blocks run, MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for size, mib, gsec, grss, n, tsec, trss, brss in rows:
            print(f"| {size}² | {_f(mib, '.0f')} | {_f(gsec, '.0f')} | {_f(grss, '.0f')} | "
                  f"{_f(n, 'd')} | {_f(tsec, '.1f')} | {_f(trss, '.0f')} | {_f(brss, '.0f')} |")
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
