"""Tissue-mask benchmark: labelled images of the failures pathologists see (marker ink, near-empty
glass, faint tissue, fat, scanner borders) at tile and slide scale, for wsi-prune's
``tissue_mask`` now, as it was at a baseline commit, and for two peers; then the peak memory of
the slide-level mask stage on large synthetic slides.

1. **Accuracy** (``_tissue_cases.py`` builds the images and their labels, independently of the
   algorithm; ``_tissue_peers.py`` holds the peers). Three scales: single tiles of 224 px at
   0.5 µm/px and at 2 µm/px, and slide thumbnails at 8 µm/px. Per category, pooled over its
   images: pixel IoU of tissue (over tissue and background pixels; ink and ignored pixels left
   out), false tissue (share of background pixels more than 20 µm from tissue called tissue)
   and ink excluded (share of ink pixels not called tissue, over glass and over tissue).
2. **Tile counts**: tissue tiles of the default tiling on the real slide and on a synthetic
   slide with pen strokes and a black border, baseline against this tree.
3. **Memory** (``--memory-sizes``): for each side (level-0 px at 0.5 µm/px) a pyramidal TIFF
   whose level 0 and 1 repeat one stored JPEG tile of glass (fast to write) and whose 8 µm/px
   level holds copies of the real slide; a fresh process runs the mask stage (thumbnail, mask,
   tile grid) and reports its peak RSS above what it held before, for the baseline stage and
   for this tree's (``_tissue_memory.py``).

    python benchmarks/bench_tissue.py --out bench-out/tissue
    python benchmarks/bench_tissue.py --out bench-out/tissue --skip memory --overlays

Not a test. The same ``--seed`` gives the same images.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tissue_cases as C  # noqa: E402
import _tissue_peers as P  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO.parent / "shared" / "data" / "cmu-1-small-region.svs"
#: the last commit before the issue-16 changes to wsi_prune/io/tissue.py
BASELINE_REV = "f6f4c06"
#: background closer than this to tissue is left out of "false tissue" (it counts in the IoU)
NEAR_UM = 20.0


# -- methods ------------------------------------------------------------------------------------
def baseline_module(rev: str) -> types.ModuleType | None:
    """``wsi_prune.io.tissue`` as it was at git revision ``rev`` (None without git)."""
    try:
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:wsi_prune/io/tissue.py"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType(f"tissue_at_{rev}")
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:wsi_prune/io/tissue.py", "exec"), mod.__dict__)  # noqa: S102
    return mod


def methods(rev: str) -> dict[str, Callable[[np.ndarray, float, str], np.ndarray]]:
    """name -> f(rgb, mpp, scale) giving an (H, W) bool tissue mask."""
    from wsi_prune.io.tissue import tissue_mask

    out: dict[str, Callable] = {}
    old = baseline_module(rev)
    if old is not None:
        out[f"wsi-prune @{rev} (before)"] = lambda rgb, mpp, scale: old.tissue_mask(rgb, mpp).mask
    out["wsi-prune (this tree)"] = lambda rgb, mpp, scale: tissue_mask(rgb, mpp).mask
    out["histolab 0.7.0 TissueMask*"] = lambda rgb, mpp, scale: (
        P.histolab_slide(rgb) if scale.startswith("slide") else P.histolab_tile(rgb))
    out["TIAToolbox 2.1.3 Otsu*"] = lambda rgb, mpp, scale: P.tiatoolbox_otsu(rgb)
    return out


# -- metrics ------------------------------------------------------------------------------------
def score(cases: list[C.Case], preds: list[np.ndarray]) -> dict[str, float | None]:
    """Pooled metrics of one method on one category's cases."""
    from scipy import ndimage as ndi

    inter = union = bg = bg_hit = 0
    ink = {C.INK_GLASS: [0, 0], C.INK_TISSUE: [0, 0]}
    for case, pred in zip(cases, preds, strict=True):
        lab = case.label
        t, b = lab == C.TISSUE, lab == C.BG
        inter += np.count_nonzero(pred & t)
        union += np.count_nonzero((pred & (t | b)) | t)
        # False tissue counts background away from tissue: within NEAR_UM of it, where the
        # outline is drawn, is the IoU's business.
        far = b & (ndi.distance_transform_edt(~t) * case.mpp > NEAR_UM) if t.any() else b
        bg += np.count_nonzero(far)
        bg_hit += np.count_nonzero(pred & far)
        for code, acc in ink.items():
            m = lab == code
            acc[0] += np.count_nonzero(m)
            acc[1] += np.count_nonzero(m & ~pred)
    total = sum(c.label.size for c in cases)
    return {
        "iou": inter / union if union else None,
        # under 0.5 % of the pixels far from tissue is too few to give a share of
        "false_tissue": bg_hit / bg if bg >= 0.005 * total else None,
        "ink_excluded_glass": ink[C.INK_GLASS][1] / ink[C.INK_GLASS][0]
        if ink[C.INK_GLASS][0] else None,
        "ink_excluded_tissue": ink[C.INK_TISSUE][1] / ink[C.INK_TISSUE][0]
        if ink[C.INK_TISSUE][0] else None,
        "tissue_px": int(sum(np.count_nonzero(c.label == C.TISSUE) for c in cases)),
    }


def accuracy(real: str, counts: dict[str, int], seed: int, rev: str, overlays: Path | None):
    rgb = C.read_real(real)
    label = C.real_truth(rgb)
    srcs = {1: C.make_source(rgb, label, 1), 4: C.make_source(rgb, label, 4)}
    meths = methods(rev)
    results: dict = {}
    timing: dict = {}
    for scale, n in counts.items():
        t0 = time.perf_counter()
        cases = C.make_cases(srcs, scale, n, seed)
        print(f"  {scale}: {len(cases)} images made in {time.perf_counter() - t0:.0f} s",
              flush=True)
        if overlays:
            _contact_sheet(cases, overlays / f"cases-{scale.split()[1]}.png")
        for name, fn in meths.items():
            t0 = time.perf_counter()
            preds = [fn(c.rgb, c.mpp, scale) for c in cases]
            timing[(scale, name)] = (time.perf_counter() - t0) / len(cases)
            for cat in C.CATEGORIES:
                idx = [i for i, c in enumerate(cases) if c.category == cat]
                results[(scale, cat, name)] = score([cases[i] for i in idx],
                                                    [preds[i] for i in idx])
    if overlays:
        _truth_overlay(rgb, label, overlays / "real-truth.png")
    return results, timing, list(meths)


def _contact_sheet(cases: list[C.Case], path: Path) -> None:
    """Images over their labels (green tissue, blue ink over glass, magenta ink over tissue,
    yellow ignored), one column per image."""
    from PIL import Image

    colours = {C.TISSUE: (0, 160, 0), C.INK_GLASS: (0, 0, 255), C.INK_TISSUE: (255, 0, 255),
               C.IGNORE: (255, 200, 0)}
    cols = []
    for c in cases[:: max(1, len(cases) // 52)]:
        lab = np.zeros((*c.label.shape, 3), np.uint8)
        for code, col in colours.items():
            lab[c.label == code] = col
        im = Image.fromarray(np.concatenate([c.rgb, lab], 0)).resize((112, 224))
        cols.append(np.asarray(im))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(cols, 1)).save(path)


def _truth_overlay(rgb: np.ndarray, label: np.ndarray, path: Path) -> None:
    from PIL import Image
    from scipy import ndimage as ndi

    ov = rgb.copy()
    t = label == C.TISSUE
    ov[t & ~ndi.binary_erosion(t, iterations=2)] = (0, 200, 0)
    ign = label == C.IGNORE
    ov[ign] = (ov[ign] * 0.5 + np.array([255, 200, 0]) * 0.5).astype(np.uint8)
    Image.fromarray(ov).save(path)


# -- report -------------------------------------------------------------------------------------
def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _iou(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def report(results: dict, timing: dict, names: list[str], counts: dict[str, int]) -> None:
    short = {n: n.split(" (")[0].split(" TissueMask")[0].split(" Otsu")[0] for n in names}
    for scale, n in counts.items():
        print(f"\n## {scale}: {n} images per category\n")
        print("| category | metric | " + " | ".join(short[m] for m in names) + " |")
        print("|---|---|" + "---:|" * len(names))
        for cat in C.CATEGORIES:
            rows = []
            r0 = results[(scale, cat, names[0])]
            if r0["tissue_px"]:
                rows.append(("tissue IoU", "iou", _iou))
            if r0["false_tissue"] is not None:
                rows.append(("false tissue %", "false_tissue", _pct))
            if r0["ink_excluded_glass"] is not None:
                rows.append(("ink excluded %, on glass", "ink_excluded_glass", _pct))
            if r0["ink_excluded_tissue"] is not None:
                rows.append(("ink excluded %, on tissue", "ink_excluded_tissue", _pct))
            for label, key, fmt in rows:
                vals = " | ".join(fmt(results[(scale, cat, m)][key]) for m in names)
                print(f"| {cat} | {label} | {vals} |")
        ms = " | ".join(f"{1000 * timing[(scale, m)]:.1f}" for m in names)
        print(f"| (all) | ms per image | {ms} |")


def summary(results: dict, names: list[str]) -> None:
    """Condensed tables (the ones in docs/benchmarks.md): one metric per row, before and after
    at each scale; then the peers."""
    scales = list(dict.fromkeys(k[0] for k in results))
    rows = []
    for cat in C.CATEGORIES:
        r0 = results[(scales[0], cat, names[0])]
        if r0["tissue_px"] and cat not in ("empty glass", "glass + debris"):
            rows.append((cat, "tissue IoU", "iou", _iou))
        if cat in ("empty glass", "glass + debris", "glass + fragment", "scanner border"):
            rows.append((cat, "false tissue %", "false_tissue", _pct))
        if cat.startswith("ink"):
            rows.append((cat, "ink excluded %, on glass", "ink_excluded_glass", _pct))
            rows.append((cat, "ink excluded %, on tissue", "ink_excluded_tissue", _pct))
    for group, cols in (("before → after", names[:2]), ("peers", names[2:])):
        if not cols:
            continue
        print(f"\n### Summary, {group}: " + ", ".join(cols) + "\n")
        print("| category | metric | " + " | ".join(s.split(" µm")[0] + " µm/px" for s in scales)
              + " |")
        print("|---|---|" + "---:|" * len(scales))
        for cat, label, key, fmt in rows:
            cells = [" / ".join(fmt(results[(sc, cat, m)][key]) for m in cols) for sc in scales]
            print(f"| {cat} | {label} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out/tissue", help="folder for slides and pictures")
    ap.add_argument("--real", default=str(DEFAULT_REAL), help="the real slide")
    ap.add_argument("--n", type=int, nargs=3, default=[24, 12, 6], metavar=("T05", "T2", "S8"),
                    help="images per category at tile 0.5, tile 2 and slide 8 µm/px")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", default=BASELINE_REV, help="git revision of the 'before' row")
    ap.add_argument("--overlays", action="store_true",
                    help="write the ground-truth overlay and contact sheets of the images")
    ap.add_argument("--memory-sizes", type=int, nargs="*", default=[50000, 100000])
    ap.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "counts", "memory"])
    ap.add_argument("--summary-from", metavar="JSON",
                    help="print the summary tables of an earlier run's accuracy.json and stop")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.summary_from:
        raw = json.loads(Path(args.summary_from).read_text())
        results = {tuple(k.split(" / ")): v for k, v in raw.items()}
        summary(results, list(dict.fromkeys(k[2] for k in results)))
        return
    if args.child:
        import _tissue_memory as M

        M.child(args.child, baseline_module(args.baseline))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"# bench_tissue {dt.date.today()} {platform.node()} {os.cpu_count()} CPUs, load "
          f"average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, Python "
          f"{platform.python_version()}, baseline {args.baseline}")
    t_start = time.perf_counter()
    if "accuracy" not in args.skip:
        if not Path(args.real).is_file():
            raise SystemExit(f"the real slide is needed for the accuracy part: {args.real}")
        counts = dict(zip(C.SCALES, args.n, strict=True))
        results, timing, names = accuracy(args.real, counts, args.seed, args.baseline,
                                          out if args.overlays else None)
        report(results, timing, names, counts)
        summary(results, names)
        (out / "accuracy.json").write_text(json.dumps(
            {" / ".join(k): v for k, v in results.items()}, indent=1))
    if "counts" not in args.skip or "memory" not in args.skip:
        import _tissue_memory as M

        if "counts" not in args.skip:
            M.counts(args.real, out, baseline_module(args.baseline))
        if "memory" not in args.skip:
            M.run(args.memory_sizes, out, args.real, args.baseline, os.path.abspath(__file__))
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
