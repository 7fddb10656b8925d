"""Peer tissue maskers for ``bench_tissue.py``, re-implemented from their published source.

Neither peer installs cleanly next to wsi-prune (checked 2026-12-01 with ``pip install
--dry-run``): histolab 0.7.0 pins ``scikit-image<0.19.4`` (pip would build 0.19.3 from source
and downgrade ours, 0.26), and TIAToolbox 2.1.3 pins ``numpy<2.4.4``, ``pillow<12.2``,
``openslide-python<1.4.6``, ``timm<1.0.28``, ``dask<2026.7.1`` and ``tifffile<2026.3.3``, all
below what the project runs. So both are written out here from the wheels' code, step by step,
with the defaults those libraries use:

- **histolab** ``masks.TissueMask`` (``filters/compositions.py``). On a *tile*
  (``Tile.calculate_tissue_mask``): pad 10 px of white, ``RgbToGrayscale`` (PIL ``L``),
  ``OtsuThreshold`` (skimage Otsu, tissue = grey < t), ``BinaryDilation(disk_size=2)``,
  ``BinaryFillHoles(structure=np.ones((20, 20)))``, crop the pad. On a *slide* thumbnail:
  grey, Otsu, ``BinaryDilation(disk_size=5)``, ``RemoveSmallHoles(area_threshold=3000)``,
  ``RemoveSmallObjects(min_size=3000, avoid_overmask=True, overmask_thresh=95)``.
  Its pen filters are not in the default chain, so they are not used here either.
- **TIAToolbox** ``tools.tissuemask.OtsuTissueMasker``: ``fit`` on the image itself, grey by
  OpenCV's ``COLOR_RGB2GRAY`` (fixed-point BT.601), Otsu, tissue = grey < t.

The skimage calls are replaced by their 0.19 semantics (connectivity 1, "smaller than"), since
``remove_small_objects`` and ``remove_small_holes`` changed their size arguments since then.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import disk


def _otsu_below(grey: np.ndarray) -> np.ndarray:
    if grey.min() == grey.max():  # skimage's Otsu returns the single value: nothing below it
        return np.zeros(grey.shape, bool)
    return grey < threshold_otsu(grey)


def _remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """skimage 0.19 ``remove_small_objects`` (4-connected, drop components < min_size)."""
    labels, n = ndi.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def _histolab_remove_small_objects(mask: np.ndarray, min_size: int = 3000,
                                   overmask_thresh: float = 95) -> np.ndarray:
    out = _remove_small(mask, min_size)
    # histolab's mask_percent is the share of *background*; above the threshold it halves
    # min_size and tries again
    if 100 - np.count_nonzero(out) / out.size * 100 >= overmask_thresh and min_size >= 1:
        return _histolab_remove_small_objects(mask, min_size // 2, overmask_thresh)
    return out


def histolab_tile(rgb: np.ndarray) -> np.ndarray:
    """histolab's default ``TissueMask`` of a ``Tile``: (H, W) bool."""
    pad = 10
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    grey = np.asarray(Image.fromarray(padded).convert("L"))
    mask = _otsu_below(grey)
    mask = ndi.binary_dilation(mask, disk(2), 1)
    mask = ndi.binary_fill_holes(mask, np.ones((20, 20)))
    return mask[pad:-pad, pad:-pad]


def histolab_slide(rgb: np.ndarray) -> np.ndarray:
    """histolab's default ``TissueMask`` of a ``Slide`` (applied to its thumbnail)."""
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    mask = _otsu_below(grey)
    mask = ndi.binary_dilation(mask, disk(5), 1)
    mask = ~_remove_small(~mask, 3000)  # RemoveSmallHoles(area_threshold=3000)
    return _histolab_remove_small_objects(mask)


def tiatoolbox_otsu(rgb: np.ndarray) -> np.ndarray:
    """TIAToolbox ``OtsuTissueMasker().fit_transform([rgb])[0]``: (H, W) bool."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    # OpenCV's RGB2GRAY in 14-bit fixed point, rounded
    grey = ((r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14).astype(np.uint8)
    return _otsu_below(grey)
