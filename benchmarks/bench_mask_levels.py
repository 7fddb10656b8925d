"""Slide masks from a vendor's reduced level against masks averaged from a finer one.

A scanner writes each reduced level of its pyramid by resampling the level before and
compressing it again (Aperio: JPEG Q=30). Masked on its own, the level at the mask's scale
(8 µm/px) has lost the texture the ink test reads (dense tissue passes for purple marker) and
some of the pale tissue. ``tissue.slide_tissue_mask`` therefore averages its thumbnail from a
level ``tissue.MASK_OVERSAMPLE`` times finer (mask version 5). Two parts:

1. **Pyramids made as scanners make them** from the real slide's pixels (mirrored 2 x 2 to
   4440 x 5934 px at 0.499 µm/px): steps of 4 (Aperio 20x) or 2 (converters), each level
   resampled from the one before (box, bilinear or bicubic) and JPEG-compressed at Q 30, 75
   or 90. The truth is the mask of the same pixels in a single-level lossless TIFF (its
   thumbnail averages level 0). Reported: tissue share and IoU with the truth for the mask of
   the level at the mask's scale (before), averaged from 2x and from 4x finer (now).
2. **A texture benchmark set** (``--texture DIR``, from ``wsi-prune synth --preset
   texture``): per slide the share of lesion area (ASAP outlines) inside the mask, before
   and now, the tissue share, and the mask's time.

Usage: ``python benchmarks/bench_mask_levels.py [--texture DIR] [--out bench-out/mask-levels]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests._paths import SHARED_SLIDE  # noqa: E402
from wsi_prune.config import TissueConfig  # noqa: E402
from wsi_prune.io.slide import Slide  # noqa: E402
from wsi_prune.io.tissue import (  # noqa: E402
    MASK_OVERSAMPLE,
    MASK_SOURCE_MAX_RATIO,
    mask_mpp_for,
    slide_tissue_mask,
    tissue_mask,
)
from wsi_prune.synth.vendor import RESAMPLE, write_vendor_pyramid  # noqa: E402


def _mirrored(path: Path) -> tuple[np.ndarray, float]:
    with Slide(path) as s:
        rgb = s.read((0, 0), s.dimensions, s.mpp)
        mpp = s.mpp
    top = np.concatenate([rgb, rgb[:, ::-1]], 1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], 0)), mpp


def _mask_from(s: Slide, level: int | None, config: TissueConfig) -> tuple[np.ndarray, float]:
    """``(mask, µm/px)`` of the slide's thumbnail at the mask's resolution read from
    ``level`` (None: the level at the mask's scale, as mask version 4 read it)."""
    mpp = mask_mpp_for(s.info.width, s.info.height, s.mpp, config)
    thumb = s.read_thumbnail(mpp, level=s.best_level(mpp) if level is None else level)
    real = s.info.width * s.mpp / thumb.shape[1]
    return tissue_mask(thumb, real, config).mask, real


def _masks(path: Path, config: TissueConfig) -> dict[str, np.ndarray]:
    """The slide's masks: 'before' (the level at the mask's scale), 'x2' and 'x4' (averaged
    from a level that many times finer, when there is one within the pixel budget)."""
    with Slide(path) as s:
        mpp = mask_mpp_for(s.info.width, s.info.height, s.mpp, config)
        return {name: _mask_from(s, level, config)[0] for name, level in (
            ("before", None),
            ("x2", s.averaging_level(mpp, 2.0, MASK_SOURCE_MAX_RATIO)),
            ("x4", s.averaging_level(mpp, 4.0, MASK_SOURCE_MAX_RATIO)))}


def part_pyramids(work: Path, config: TissueConfig) -> list[dict]:
    rgb, mpp = _mirrored(SHARED_SLIDE)
    single = work / "single.tif"
    tifffile.imwrite(single, rgb, tile=(256, 256), compression="zlib", photometric="rgb",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                     metadata=None)
    with Slide(single) as s:
        truth = slide_tissue_mask(s, config).mask
    rows = []
    for steps in ((4, 4), (2, 2, 2, 2)):
        for resample in RESAMPLE:
            for quality in (30, 75, 90):
                path = work / f"vendor-{'x'.join(map(str, steps))}-{resample}-q{quality}.svs"
                write_vendor_pyramid(path, rgb, mpp, steps, resample, quality)
                row = {"steps": "x".join(map(str, steps)), "resample": resample,
                       "quality": quality, "truth": float(truth.mean())}
                for name, m in _masks(path, config).items():
                    row[name] = float(m.mean())
                    row[f"{name}_iou"] = float((m & truth).sum() / max((m | truth).sum(), 1))
                rows.append(row)
                path.unlink()
                print(json.dumps(row), flush=True)
    return rows


def part_texture(folder: Path, config: TissueConfig) -> list[dict]:
    from wsi_prune.io.annotations import lesion_mask, read_asap_xml

    rows = []
    for slide in sorted(folder.glob("*.svs")):
        xml = slide.with_suffix(".xml")
        with Slide(slide) as s:
            t = time.perf_counter()
            now = slide_tissue_mask(s, config).mask
            seconds = time.perf_counter() - t
            t = time.perf_counter()
            before, real = _mask_from(s, None, config)
            seconds_before = time.perf_counter() - t
            row = {"slide": slide.stem, "tissue_before": float(before.mean()),
                   "tissue_now": float(now.mean()), "s_before": seconds_before, "s_now": seconds}
            if xml.is_file():
                les = lesion_mask(read_asap_xml(xml), s.dimensions, real, s.mpp)
                les = np.asarray(les)[: now.shape[0], : now.shape[1]]
                n = int(les.sum())
                row.update(lesion_px=n, lesion_in_before=float((les & before).sum() / max(n, 1)),
                           lesion_in_now=float((les & now).sum() / max(n, 1)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _table(rows: list[dict]) -> str:
    out = ["| steps | resample | JPEG Q | truth | level at the mask's scale (IoU) | from 2x finer "
           "(IoU) | from 4x finer (IoU) |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['steps']} | {r['resample']} | {r['quality']} | {r['truth']:.3f} | "
                   f"{r['before']:.3f} ({r['before_iou']:.3f}) | {r['x2']:.3f} "
                   f"({r['x2_iou']:.3f}) | {r['x4']:.3f} ({r['x4_iou']:.3f}) |")
    return "\n".join(out)


def _texture_summary(rows: list[dict]) -> str:
    les = [r for r in rows if "lesion_px" in r]
    tot = sum(r["lesion_px"] for r in les)
    before = sum(r["lesion_in_before"] * r["lesion_px"] for r in les) / max(tot, 1)
    now = sum(r["lesion_in_now"] * r["lesion_px"] for r in les) / max(tot, 1)
    hit = [r for r in les if r["lesion_in_before"] < 0.99]
    worst = min((r["lesion_in_before"] for r in les), default=1.0)
    gain = [r["tissue_now"] / max(r["tissue_before"], 1e-9) - 1 for r in rows]
    return (f"{len(rows)} slides ({len(les)} with lesions): lesion area inside the mask "
            f"{before:.3f} before, {now:.3f} now; {len(hit)} tumour slides lost over 1 % of their "
            f"lesion area before (worst {worst:.3f}); "
            f"tissue share now / before - 1: median {np.median(gain):+.3f}, max "
            f"{max(gain):+.3f}, min {min(gain):+.3f}; mask s per slide, median: before "
            f"{np.median([r['s_before'] for r in rows]):.3f}, now "
            f"{np.median([r['s_now'] for r in rows]):.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "mask-levels")
    ap.add_argument("--texture", type=Path, help="a texture set's folder (part 2)")
    ap.add_argument("--skip-pyramids", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = TissueConfig()
    print(f"mask oversample {MASK_OVERSAMPLE:g}, pixel budget {MASK_SOURCE_MAX_RATIO:g}x")
    result = {}
    if not args.skip_pyramids:
        result["pyramids"] = part_pyramids(args.out, config)
        print(_table(result["pyramids"]))
    if args.texture:
        result["texture"] = part_texture(args.texture, config)
        print(_texture_summary(result["texture"]))
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
