"""Dense tissue scanned out of focus against the marker-ink tests of the tissue mask.

Haematoxylin-dense tissue (a lymph node's cortex) is made of nuclei of 5.6-7.2 µm packed over
50 % or 90 % of the area on pale eosin, drawn at 0.5 µm/px, blurred by a Gaussian of sigma 0-12
µm (a scan out of focus), placed on glass and shrunk (area average) to 8 µm/px (the slide
mask) and 2 µm/px (tiles). Printed: the share of the section the mask keeps, with the width
guard of mask version 4 (``ink.MAX_STROKE_UM``) and without it (version 3's behaviour).

    python benchmarks/bench_out_of_focus.py

Not a test (``tests/io/test_tissue.py`` holds the small cases). Deterministic.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from wsi_prune.io import ink
from wsi_prune.io.tissue import tissue_mask

H_OD = np.array([0.65, 0.70, 0.29])  # haematoxylin's optical density direction (RGB)
E_OD = np.array([0.07, 0.99, 0.11])  # eosin's
MPP = 0.5  # µm/px the field is drawn at
GLASS = 240


def lymphoid_field(side_um: float, cover: float, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB at 0.5 µm/px: nuclei (radius 2.8-3.6 µm, density 0.6-1.0) covering
    about ``cover`` of the area, over eosin of optical density ~0.15."""
    rng = np.random.default_rng(seed)
    px = int(side_um / MPP)
    od = np.zeros((px, px), np.float32)
    n = int(cover * side_um ** 2 / (np.pi * 3.2 ** 2))
    yy, xx = np.mgrid[-8:9, -8:9]
    dist = np.hypot(yy, xx)
    for _ in range(n):
        cy, cx = rng.integers(8, px - 8, 2)
        r = rng.uniform(2.8, 3.6) / MPP
        nucleus = np.clip(r - dist + 0.5, 0, 1) * rng.uniform(0.6, 1.0)
        window = od[cy - 8:cy + 9, cx - 8:cx + 9]
        np.maximum(window, nucleus, out=window)
    rgb_od = od[..., None] * H_OD * 1.3 + 0.15 * E_OD * rng.uniform(0.7, 1.3, (px, px, 1))
    return np.clip(GLASS * 10 ** (-rgb_od), 0, 255).astype(np.uint8)


def blurred(img: np.ndarray, sigma_um: float) -> np.ndarray:
    if not sigma_um:
        return img
    chans = [ndi.gaussian_filter(img[..., c].astype(np.float32), sigma_um / MPP)
             for c in range(3)]
    return np.round(np.stack(chans, -1)).astype(np.uint8)


def kept(section: np.ndarray, mpp: float, margin_px: int) -> float:
    """Share of the section (placed on glass with a margin) the mask keeps at ``mpp``."""
    h, w = section.shape[:2]
    img = np.full((h + 2 * margin_px, w + 2 * margin_px, 3), GLASS, np.uint8)
    img[margin_px:margin_px + h, margin_px:margin_px + w] = section
    f = int(round(mpp / MPP))
    small = np.asarray(Image.fromarray(img).resize((img.shape[1] // f, img.shape[0] // f),
                                                   Image.Resampling.BOX))
    m = margin_px // f
    return float(tissue_mask(small, mpp).mask[m:-m, m:-m].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides-um", type=float, nargs="+", default=[1600.0, 3200.0])
    ap.add_argument("--sigmas-um", type=float, nargs="+", default=[0, 4, 6, 8, 12])
    ap.add_argument("--covers", type=float, nargs="+", default=[0.5, 0.9])
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the guard warns once per section
    guard = ink.MAX_STROKE_UM
    print("| section | nuclei cover | blur sigma, µm | 8 µm/px: v3 | 8 µm/px: v4 | "
          "2 µm/px: v3 | 2 µm/px: v4 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for side in args.sides_um:
        for cover in args.covers:
            field = lymphoid_field(side, cover, seed=1)
            for sigma in args.sigmas_um:
                section = blurred(field, sigma)
                cells = []
                for mpp in (8.0, 2.0):
                    for cap in (float("inf"), guard):
                        ink.MAX_STROKE_UM = cap
                        cells.append(kept(section, mpp, margin_px=800))
                ink.MAX_STROKE_UM = guard
                print(f"| {side / 1000:.1f} mm | {cover:.0%} | {sigma:g} | "
                      + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
