"""Pyramids whose reduced levels are made as scanners make them, from given pixels.

A scanner (or a converter) writes each reduced level by resampling the level before, as
decoded from the file, and compressing it again on its own: Aperio 20x slides have levels at
4x and 16x in JPEG Q=30 (``JPEG/RGB Q=30`` in their header), converters step by 2. Such a
level is blurrier and blockier than an area average of level 0, which is what every other
writer of :mod:`wsi_prune.synth` gives, and masks read from it lose dense and pale tissue
(``benchmarks/bench_mask_levels.py``). Tests and that benchmark make such slides here.
"""

from __future__ import annotations

import io
import os

import numpy as np
import tifffile
from PIL import Image

#: resampling filters a level can be made with
RESAMPLE = {"box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC}


def write_vendor_pyramid(path: str | os.PathLike[str], rgb: np.ndarray, mpp: float,
                         steps: tuple[int, ...] = (4, 4), resample: str = "bilinear",
                         quality: int = 30) -> None:
    """Write an Aperio-style SVS (vendor ``aperio`` for OpenSlide) of ``rgb``.

    Args:
        path: the file written.
        rgb: (H, W, 3) uint8 level 0, stored at JPEG Q 95 in 256² px tiles.
        mpp: level-0 µm/px (the header's ``MPP``).
        steps: each reduced level's downsample from the level before.
        resample: ``box``, ``bilinear`` or ``bicubic`` (:data:`RESAMPLE`).
        quality: JPEG quality of every reduced level (4:4:4); each level is made from the
            one before as decoded, so the losses add up level by level.
    """
    h, w = rgb.shape[:2]
    levels = [np.asarray(rgb, np.uint8)]
    for step in steps:
        prev = levels[-1]
        small = Image.fromarray(prev).resize((prev.shape[1] // step, prev.shape[0] // step),
                                             RESAMPLE[resample])
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=quality, subsampling=0)
        levels.append(np.asarray(Image.open(buf).convert("RGB")))
    with tifffile.TiffWriter(path) as tif:
        for i, lv in enumerate(levels):
            desc = (f"Aperio Image Library v12.0.0\n{w}x{h} [0,0 {w}x{h}] (256x256) "
                    f"JPEG/RGB Q={quality}|AppMag = 20|MPP = {mpp}") if i == 0 else \
                f"Aperio Image Library v12.0.0\n{w}x{h} -> {lv.shape[1]}x{lv.shape[0]}"
            tif.write(lv, tile=(256, 256), compression="jpeg", photometric="rgb",
                      compressionargs={"level": 95 if i == 0 else quality}, description=desc,
                      metadata=None, subfiletype=0 if i == 0 else 1)
