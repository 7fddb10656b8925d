"""Peak memory of the slide-level tissue-mask stage, and tissue tile counts, for
``bench_tissue.py``.

**Memory.** Writing a 100k² synthetic slide with :mod:`wsi_prune.synth` takes ~18 min on two
cores, and the mask stage only reads the level nearest 8 µm/px. So the slides here are generic
pyramidal TIFFs (0.5 µm/px, resolution tags) whose levels 0 and 1 repeat one stored JPEG tile of
glass (written in seconds) and whose levels from 8 µm/px down hold copies of the real slide on
glass (about a third tissue, as in ``bench_tiling.py``'s slides). A fresh process opens the
slide, resets its peak-RSS counter (``/proc/self/clear_refs``), runs the stage as the baseline
commit did (``read_thumbnail`` at 8 µm/px, then ``tissue_mask``) or as this tree does
(:func:`wsi_prune.io.tissue.slide_tissue_mask`), then the tile grid, and reports ``VmHWM`` minus
its RSS before the stage.

**Counts.** Tissue tiles (``make_grid`` with the default tiling config) on the real slide and
on a synthetic slide with pen strokes and a black border, baseline and this tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TILE = 256
LEVEL0_MPP = 0.5


def _status(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# -- the light slide ----------------------------------------------------------------------------
def _jpeg_tile(colour: tuple[int, int, int], quality: int = 80) -> bytes:
    """One 256 px tile of ``colour`` encoded exactly as tifffile encodes tiles."""
    import tempfile

    import tifffile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.tif"
        tile = np.empty((TILE, TILE, 3), np.uint8)
        tile[:] = colour
        tifffile.imwrite(path, tile, tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                         compressionargs={"level": quality}, metadata=None)
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            with open(path, "rb") as fh:
                fh.seek(page.dataoffsets[0])
                return fh.read(page.databytecounts[0])


def _content(real: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side, 3) uint8 at 8 µm/px: copies of the real slide on its glass in a grid."""
    glass = np.median(real[:8, :8].reshape(-1, 3), axis=0).astype(np.uint8)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = glass
    h, w = real.shape[:2]
    step = int(max(h, w) * 1.3)
    for y in range(0, side - h, step):
        for x in range(0, side - w, step):
            piece = real if rng.random() < 0.5 else real[::-1, ::-1]
            out[y:y + h, x:x + w] = piece
    return out


def write_light_slide(path: Path, side: int, real_rgb: np.ndarray) -> None:
    """A ``side``² px pyramidal TIFF at 0.5 µm/px; see the module docstring."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(side)
    ds_content = 16  # 8 µm/px
    small = np.asarray(Image.fromarray(real_rgb).resize(
        (max(1, round(real_rgb.shape[1] * 0.499 / 8)),
         max(1, round(real_rgb.shape[0] * 0.499 / 8))),
        Image.Resampling.BOX))
    content = _content(small, -(-side // ds_content), rng)
    white = _jpeg_tile(tuple(int(v) for v in content[0, 0]))
    px_per_cm = 1e4 / LEVEL0_MPP
    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, ds in enumerate((1, 4, 16, 64, 256)):
            lw = -(-side // ds)
            kw = dict(tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                      subfiletype=1 if i else 0, metadata=None, software=False,
                      resolution=(px_per_cm / ds, px_per_cm / ds), resolutionunit="CENTIMETER")
            if ds < ds_content:
                n = (-(-lw // TILE)) ** 2
                tif.write((white for _ in range(n)), shape=(lw, lw, 3), dtype=np.uint8, **kw)
            else:
                f = ds // ds_content
                level = content if f == 1 else np.asarray(Image.fromarray(content).resize(
                    (lw, lw), Image.Resampling.BOX))
                tif.write(level[:lw, :lw], compressionargs={"level": 80}, **kw)
    os.replace(tmp, path)


# -- children -----------------------------------------------------------------------------------
def child(argv: list[str], baseline) -> None:
    """``mask <slide> <before|after>``: peak RSS of the mask stage; prints one JSON line."""
    what, slide_path, which = argv
    assert what == "mask"
    from wsi_prune.config import RunConfig
    from wsi_prune.io.slide import Slide
    from wsi_prune.io.tiling import make_grid
    from wsi_prune.io.tissue import slide_tissue_mask

    cfg = RunConfig()
    with Slide(slide_path) as slide:
        before = _status("VmRSS")
        reset = _reset_peak()
        t0 = time.perf_counter()
        if which == "before":
            thumb = slide.read_thumbnail(cfg.tissue.mask_mpp)
            mask_mpp = slide.info.width * slide.mpp / thumb.shape[1]
            tm = baseline.tissue_mask(thumb, mask_mpp, cfg.tissue)
            del thumb
        else:
            tm = slide_tissue_mask(slide, cfg.tissue)
            mask_mpp = tm.mpp
        grid = make_grid(slide.info, tm.mask, mask_mpp, cfg.tiling)
        out = {"seconds": time.perf_counter() - t0, "rss_before_mib": before,
               "peak_mib": _status("VmHWM"), "peak_reset": reset, "mask_px": int(tm.mask.size),
               "mask_mpp": mask_mpp, "tissue_tiles": len(grid)}
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(script: str, args: list[str]) -> dict:
    cmd = [sys.executable, script, "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def run(sizes: list[int], out: Path, real: str, rev: str, script: str) -> None:
    import _tissue_cases as C

    real_rgb = C.read_real(real)
    print(f"\n## Mask stage peak memory (fresh process per cell; baseline {rev})\n")
    print("| slide px at 0.5 µm/px | thumbnail px (before → after) | mask µm/px (after) | "
          "peak above start, MiB, before | after | tissue tiles before | after | s before | "
          "after |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for side in sizes:
        path = out / f"light_{side}.tif"
        if not path.exists():
            t0 = time.perf_counter()
            write_light_slide(path, side, real_rgb)
            print(f"  wrote {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        b = _run_child(script, ["mask", str(path), "before"])
        a = _run_child(script, ["mask", str(path), "after"])
        pb = b["peak_mib"] - b["rss_before_mib"]
        pa = a["peak_mib"] - a["rss_before_mib"]
        print(f"| {side}² | {b['mask_px'] / 1e6:.1f} M → {a['mask_px'] / 1e6:.1f} M | "
              f"{a['mask_mpp']:.2f} | {pb:.0f} | {pa:.0f} | {b['tissue_tiles']} | "
              f"{a['tissue_tiles']} | {b['seconds']:.1f} | {a['seconds']:.1f} |", flush=True)
        if not (a["peak_reset"] and b["peak_reset"]):
            print("  (peak counter could not be reset: peaks include the imports)")


def counts(real: str, work: Path, baseline) -> None:
    """Tissue tiles on the real slide and on a synthetic slide with pen and border."""
    from wsi_prune.config import RunConfig
    from wsi_prune.io.slide import Slide
    from wsi_prune.io.tiling import make_grid
    from wsi_prune.io.tissue import slide_tissue_mask
    from wsi_prune.synth import SynthSpec, tissue_truth, write_slide

    cfg = RunConfig()
    spec = SynthSpec(width=8192, height=8192, mpp=0.5, seed=3, pen=True, border=True)
    synth = work / "synth_8192_pen_border.svs"
    if not synth.exists():
        write_slide(synth, spec)
    print("\n## Tissue tiles (224 px at 0.5 µm/px, tissue fraction >= 0.25)\n")
    print("| slide | grid tiles | tissue tiles before | after | kept by only one | drawn truth | "
          "after vs truth: missed / extra |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, path in (("real cmu-1-small-region", real), ("synthetic 8192², pen + border",
                                                            str(synth))):
        with Slide(path) as s:
            thumb = s.read_thumbnail(cfg.tissue.mask_mpp)
            mpp = s.info.width * s.mpp / thumb.shape[1]
            old = make_grid(s.info, baseline.tissue_mask(thumb, mpp, cfg.tissue).mask, mpp,
                            cfg.tiling)
            tm = slide_tissue_mask(s, cfg.tissue)
            new = make_grid(s.info, tm.mask, tm.mpp, cfg.tiling)
            a, b = set(map(tuple, old.grid_rc)), set(map(tuple, new.grid_rc))
            truth = vs = "–"
            if path == str(synth):
                t = tissue_truth(spec, 4.0)  # 28 x 28 px per tile
                n = old.n_rows, old.n_cols
                frac = t[:n[0] * 28, :n[1] * 28].reshape(n[0], 28, n[1], 28).mean(axis=(1, 3))
                true = set(zip(*np.nonzero(frac >= cfg.tiling.tissue_threshold), strict=True))
                truth, vs = str(len(true)), f"{len(true - b)} / {len(b - true)}"
        print(f"| {name} | {old.n_rows * old.n_cols} | {len(old)} | {len(new)} | {len(a ^ b)} | "
              f"{truth} | {vs} |")
