"""A bank of real H&E texture patches cut from a real slide, for texture slides.

Patches are cut from the tissue of a real slide (by default the CMU-1 Aperio crop in
``../shared/data``) at random centres, each rotated by an arbitrary angle, scaled by a random
factor around the target resolution and maybe mirrored, so two patches cut at the same place
still differ. A render step then picks one of the 8 right-angle rotations/flips of each patch,
which gives ``8 * n_patches`` variants before any stain jitter.

Patches are sorted by nuclear density (mean haematoxylin concentration), so a renderer asks
for texture by a quantile in [0, 1]: 0 = the palest stroma, 1 = the densest cellular texture.
That one ordering is what tumour and its mimics shift.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pathlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from wsi_prune.errors import ConfigError, SlideError
from wsi_prune.io.ink import _strokes
from wsi_prune.io.slide import Slide
from wsi_prune.io.tissue import pen_mask, tissue_mask
from wsi_prune.synth.stain import rgb_to_conc

_logger = logging.getLogger(__name__)

#: The real slide texture slides are cut from, next to the repository (../shared/data).
DEFAULT_SOURCE = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / \
    "cmu-1-small-region.svs"

_MASK_MPP = 4.0  # µm/px of the tissue mask used to place patch centres
_MAX_SOURCE_MPX = 64  # read at most this many Mpx of the source (at the bank's resolution)
_MAX_GLASS = 0.25  # a patch may hold at most this fraction of near-white pixels ...
_MAX_INK = 0.002  # ... and almost no marker ink
_SCALE_RANGE = (0.85, 1.18)  # scale augmentation: source px per bank px, times mpp ratio


@dataclass(frozen=True, eq=False)
class TextureBank:
    """Real H&E patches at one resolution, sorted by nuclear density.

    Attributes:
        patches: ``(K, P, P, 3) uint8`` RGB patches at ``mpp``, palest first.
        density: ``(K,) float32`` mean H concentration of each patch (ascending).
        mpp: resolution of the patches, µm/px.
        source: the slide they were cut from.
    """

    patches: np.ndarray
    density: np.ndarray
    mpp: float
    source: pathlib.Path

    @property
    def patch_px(self) -> int:
        """Side of a patch, px at :attr:`mpp`."""
        return int(self.patches.shape[1])

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    def index(self, quantile: np.ndarray) -> np.ndarray:
        """Patch indices of density quantiles in [0, 1] (clipped), ``int64`` of their shape."""
        q = np.clip(np.asarray(quantile, np.float64), 0.0, 1.0)
        return np.minimum((q * len(self)).astype(np.int64), len(self) - 1)


def _read_source(source: pathlib.Path, mpp: float) -> tuple[np.ndarray, float]:
    """The whole source slide as ``(H, W, 3) uint8`` at about ``mpp / 1.2`` µm/px (never coarser
    than needed for the largest scale augmentation), and that resolution."""
    if not source.is_file():
        raise SlideError(
            "the real H&E slide that texture slides are cut from is missing; put "
            "cmu-1-small-region.svs (or any H&E slide, passed as `source`) there", str(source))
    with Slide(source) as slide:
        read_mpp = max(slide.mpp, mpp / _SCALE_RANGE[1])
        w, h = slide.size_at(read_mpp)
        if w * h > _MAX_SOURCE_MPX * 1e6:
            raise ConfigError(f"source is {w}x{h} px at {read_mpp:.3g} µm/px, over "
                              f"{_MAX_SOURCE_MPX} Mpx: pass a smaller crop", str(source))
        return slide.read((0, 0), slide.dimensions, read_mpp, out_size=(w, h)), read_mpp


def _cut(img: np.ndarray, cx: float, cy: float, angle: float, step: float, flip: bool,
         size: int) -> np.ndarray | None:
    """A ``(size, size, 3) uint8`` patch of ``img`` centred at (cx, cy) source px, rotated by
    ``angle`` rad, ``step`` source px per patch px, mirrored if ``flip`` (bilinear); ``None``
    if it would reach past the image."""
    t = (np.arange(size, dtype=np.float64) - (size - 1) / 2) * step
    u, v = np.meshgrid(t, -t if flip else t)
    c, s = math.cos(angle), math.sin(angle)
    coords = np.stack([cy + u * s + v * c, cx + u * c - v * s])
    if coords.min() < 0 or coords[0].max() > img.shape[0] - 1 or coords[1].max() > img.shape[1] - 1:
        return None  # would reach past the slide's edge
    out = np.empty((size, size, 3), np.uint8)
    for k in range(3):
        out[..., k] = np.clip(ndi.map_coordinates(img[..., k], coords, order=1,
                                                  mode="reflect") + 0.5, 0, 255)
    return out


def _ink(patch: np.ndarray) -> float:
    """Fraction of marker-ink pixels: the pen rules, plus faint teal or green ink (G > R),
    which H&E never makes (both stains absorb green more than red) but which the pen rules,
    tuned for solid strokes, let through at a stroke's thin edges."""
    r, g = patch[..., 0].astype(np.int16), patch[..., 1].astype(np.int16)
    greenish = (g > r + 8) & (patch.min(axis=-1) <= 215)
    return float((_strokes(pen_mask(patch)) | greenish).mean())


def build_texture_bank(source: str | os.PathLike[str] = DEFAULT_SOURCE, mpp: float = 0.5,
                       seed: int = 0, n_patches: int = 160, patch_px: int = 256) -> TextureBank:
    """Cut ``n_patches`` augmented tissue patches from a real H&E slide.

    Args:
        source: an H&E slide OpenSlide reads, with MPP metadata.
        mpp: resolution of the patches, µm/px (that of the slides they will texture).
        seed: which centres, angles, scales and flips.
        n_patches: number of patches (K).
        patch_px: side of each patch, px at ``mpp``.

    Raises:
        SlideError: ``source`` is missing or unreadable (the message names the path).
        ConfigError: the source holds too little tissue for patches this size.
    """
    source = pathlib.Path(source)
    img, src_mpp = _read_source(source, mpp)
    ds = max(1, round(_MASK_MPP / src_mpp))
    tissue = tissue_mask(img[::ds, ::ds], src_mpp * ds).mask
    # Centres whose whole (rotated, scaled-up) patch disc lies in tissue.
    step_max = mpp / src_mpp * _SCALE_RANGE[1]
    radius = patch_px / 2 * math.sqrt(2) * step_max / ds
    # Centres well inside tissue; the per-pixel glass check below decides the rest. Padding
    # with glass keeps patches off the slide's edge (no mirrored texture).
    inside = ndi.distance_transform_edt(np.pad(tissue, 1))[1:-1, 1:-1] > radius / 2
    ys, xs = np.nonzero(inside)
    if len(xs) < 16:
        raise ConfigError(f"too little tissue for {patch_px} px patches at {mpp} µm/px "
                          f"({len(xs)} candidate centres)", str(source))  # fmt: skip
    rng = np.random.default_rng([seed, 0x7E47])
    patches, density = [], []
    for _ in range(n_patches * 20):
        if len(patches) == n_patches:
            break
        i = int(rng.integers(len(xs)))
        cx, cy = (xs[i] + rng.uniform()) * ds, (ys[i] + rng.uniform()) * ds
        step = mpp / src_mpp * math.exp(rng.uniform(*np.log(_SCALE_RANGE)))
        patch = _cut(img, cx, cy, float(rng.uniform(0, 2 * np.pi)), step, bool(rng.integers(2)),
                     patch_px)
        # The mask is coarse: clefts, glass and marker ink inside it are checked per pixel.
        if patch is None or (patch.min(axis=-1) > 215).mean() > _MAX_GLASS \
                or _ink(patch) > _MAX_INK:
            continue
        patches.append(patch)
        density.append(float(rgb_to_conc(patch)[..., 0].mean()))
    if len(patches) < n_patches:
        raise ConfigError(f"only {len(patches)} of {n_patches} patches passed the glass and "
                          "ink checks", str(source))  # fmt: skip
    order = np.argsort(density, kind="stable")
    _logger.info("texture bank: %d patches of %d px from %s, H density %.2f-%.2f", n_patches,
                 patch_px, source.name, density[order[0]], density[order[-1]])  # fmt: skip
    return TextureBank(np.stack(patches)[order], np.asarray(density, np.float32)[order],
                       float(mpp), source)


@functools.lru_cache(maxsize=2)
def cached_texture_bank(source: pathlib.Path, mpp: float, seed: int, n_patches: int,
                        patch_px: int) -> TextureBank:
    """:func:`build_texture_bank`, remembered for the last two argument sets (a dataset writes
    many slides from few banks)."""
    return build_texture_bank(source, mpp, seed, n_patches, patch_px)
