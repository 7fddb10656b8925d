"""Rendering a texture slide's level-0 pixels: any box on its own, from the layout and the bank.

Texture is a jittered lattice of bank patches (one per 64 µm node at 0.5 µm/px, each patch
twice the node spacing) blended with sharpened cos² windows of random weight: each pixel is
mostly one patch, seams are soft, irregular and narrow. Which patch a node takes follows a smooth
*density field* (dense cellular zones and pale stroma zones several hundred µm across, as a
lymph node has cortex and medulla), plus the density shift of the lesion or mimic it lies in;
each node also takes one of the 8 rotations/flips. A lesion or mimic is a second texture layer
(its own patch choices, shifted denser, then its nuclear effects) blended in by its soft
outline. The slide's stain vectors and a smooth stain field (H and E +-10 % over ~600 µm)
then turn concentrations into RGB, and tissue is laid over glass.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import disk

from wsi_prune.synth.layout import _FULL, _hash32, _Layout
from wsi_prune.synth.lesions import Effects, Region
from wsi_prune.synth.render import _value_noise
from wsi_prune.synth.stain import conc_to_rgb, od_to_conc, rgb_to_conc
from wsi_prune.synth.texture_layout import TextureLayout

NUCLEUS_H = (1.2, 2.0)  # H concentration ramp from "not nucleus" to "nucleus"
_GROW_UM = 1.5  # nuclear growth: radius of the grey dilation, µm
_DENSITY_FIELD_UM = 400.0  # scale of the normal tissue's density field
_STAIN_FIELD_UM = 600.0  # scale of the stain field
_STAIN_FIELD_AMP = 0.10
_REGION_EDGE_UM = 10.0  # soft edge of a lesion or mimic (its outline is where alpha = 0.5)
_TISSUE_EDGE_UM = 2.0
_SHARPEN = 3  # exponent of the blending windows: higher = narrower seams
_SUPPORT = 0.8  # windows are cut at this distance / spacing (cos^6 is < 1e-3 there)


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _d4(patch: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 rotations/flips of a ``(P, P, 3)`` patch (a view)."""
    patch = np.rot90(patch, k & 3)
    return patch[:, ::-1] if k & 4 else patch


@functools.lru_cache(maxsize=4)
def _footprint(radius: int) -> np.ndarray:
    return disk(radius).astype(bool)


def _texture(layout: TextureLayout, x0: int, y0: int, w: int, h: int, shift: float,
             salt: int) -> np.ndarray:
    """Blended bank texture over level-0 box ``[x0, x0+w) x [y0, y0+h)``,
    ``(h, w, 3) float32`` optical density under the reference stains."""
    bank = layout.bank
    p = bank.patch_px
    c = p // 2  # node spacing
    reach = int(c * _SUPPORT)  # a window is below 1e-3 beyond this, px from its node
    mpp = layout.spec.mpp
    gi = np.arange(x0 // c - 2, (x0 + w) // c + 2)
    gj = np.arange(y0 // c - 2, (y0 + h) // c + 2)
    h1 = _hash32(gi[None, :], gj[:, None], salt)
    h2 = _hash32(gi[None, :], gj[:, None], salt ^ 0x5BD1E995)

    def byte(hh: np.ndarray, k: int) -> np.ndarray:
        return ((hh >> np.uint32(8 * k)) & np.uint32(0xFF)).astype(np.float64) / 255.0

    # Centres jittered by up to a fifth of the spacing: every pixel stays within 0.7 spacing
    # of a node, inside its window's reach, so the weights never all vanish.
    cx = np.rint((gi[None, :] + 0.5) * c + (byte(h1, 0) - 0.5) * c * 0.4).astype(np.int64)
    cy = np.rint((gj[:, None] + 0.5) * c + (byte(h1, 1) - 0.5) * c * 0.4).astype(np.int64)
    field = _value_noise((gi + 0.5) * c * mpp, (gj + 0.5) * c * mpp, _DENSITY_FIELD_UM,
                         layout.salt + 11)  # fmt: skip
    q = 0.5 + 0.75 * field + (byte(h1, 3) - 0.5) * 0.3 + shift
    idx = bank.index(q)
    k8 = (h1 >> np.uint32(16)).astype(np.int64) & 7
    wfac = 0.6 + 0.8 * byte(h2, 0)
    acc = np.zeros((h, w, 3), np.float32)
    wsum = np.zeros((h, w), np.float32)
    for j in range(len(gj)):
        for i in range(len(gi)):
            ncx, ncy = int(cx[j, i]), int(cy[j, i])
            ox0, ox1 = max(x0, ncx - reach), min(x0 + w, ncx + reach)
            oy0, oy1 = max(y0, ncy - reach), min(y0 + h, ncy + reach)
            if ox0 >= ox1 or oy0 >= oy1:
                continue
            patch = _d4(bank.patches[idx[j, i]], int(k8[j, i]))
            patch = patch[oy0 - ncy + c : oy1 - ncy + c, ox0 - ncx + c : ox1 - ncx + c]
            wx = _window((np.arange(ox0, ox1) + 0.5 - ncx) / c)
            wy = _window((np.arange(oy0, oy1) + 0.5 - ncy) / c)
            wgt = np.outer(wy * np.float32(wfac[j, i]), wx)
            sl = (slice(oy0 - y0, oy1 - y0), slice(ox0 - x0, ox1 - x0))
            # Blended in RGB, one log afterwards: with sharpened windows a pixel is mostly one
            # patch, so this differs from blending densities only inside the narrow seams.
            acc[sl] += wgt[..., None] * patch
            wsum[sl] += wgt
    acc /= wsum[..., None]
    return -np.log((acc + 1.0) * (1.0 / 256.0))


def _window(t: np.ndarray) -> np.ndarray:
    """Sharpened cos² window of ``t`` (node distance / spacing), ``float32``."""
    return (np.cos(np.clip(t, -1.0, 1.0) * (np.pi / 2)) ** (2 * _SHARPEN)).astype(np.float32)


def apply_effects(conc: np.ndarray, eff: Effects, mpp: float, noise: np.ndarray) -> None:
    """Apply a region's nuclear and stain effects to ``(H, W, 3)`` concentrations in place.

    Args:
        noise: ``(H, W) float32`` in [-1, 1], the chromatin clumps.
    """
    hc = conc[..., 0]
    if eff.growth > 0:
        grown = ndi.grey_dilation(hc, footprint=_footprint(max(1, round(_GROW_UM / mpp))))
        # grow only into nuclear values, so stroma next to a nucleus turns nucleus, not grey
        hc += eff.growth * (grown - hc) * _smoothstep(grown, *NUCLEUS_H)
    nuc = _smoothstep(hc, *NUCLEUS_H)
    hc *= 1.0 + eff.gain * nuc
    hc += eff.chromatin * nuc * noise
    hc *= 1.0 + eff.h_shift
    conc[..., 1] *= 1.0 + eff.e_shift


def _noise(layout: TextureLayout, x0: int, y0: int, w: int, h: int, cell: int) -> np.ndarray:
    """Layout noise in [-1, 1] over a level-0 box, constant over ``cell``-px squares."""
    rows = ((np.arange(y0, y0 + h) // cell) % 512)[:, None]
    cols = ((np.arange(x0, x0 + w) // cell) % 512)[None, :]
    return layout.noise[rows, cols]


def _layer(layout: TextureLayout, region: Region | None, x0: int, y0: int, w: int,
           h: int) -> np.ndarray:
    """Concentrations ``(h, w, 3) float32`` of normal tissue or of one region's texture."""
    if region is None:
        return od_to_conc(_texture(layout, x0, y0, w, h, 0.0, layout.salt))
    conc = od_to_conc(_texture(layout, x0, y0, w, h, region.effects.density, region.salt))
    cell = max(1, round(1.0 / layout.spec.mpp))  # chromatin clumps of about 1 µm
    apply_effects(conc, region.effects, layout.spec.mpp, _noise(layout, x0, y0, w, h, cell))
    return conc


def render_region(layout: TextureLayout, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Level-0 pixels ``[y0, y0+h) x [x0, x0+w)`` of a texture slide.

    Returns:
        ``(h, w, 3) uint8`` RGB.
    """
    spec = layout.spec
    mpp = spec.mpp
    xs, ys = np.arange(x0, x0 + w) + 0.5, np.arange(y0, y0 + h) + 0.5
    x, y = xs[None, :], ys[:, None]
    box = (float(x0), float(y0), float(x0 + w), float(y0 + h))
    out = layout.glass + 2.0 * _noise(layout, x0 + 7, y0 + 3, w, h, 1)[..., None]
    tissue = _Layout._alpha(layout.islands, x, y, box, _TISSUE_EDGE_UM / mpp)
    if tissue is None:
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)
    # Nuclear growth reads neighbours: regions render with a margin, cropped after.
    m = max(1, round(_GROW_UM / mpp)) + 1
    edge = _REGION_EDGE_UM / mpp
    conc = None
    for reg in (*layout.lesions, *layout.mimics):
        # Only the part of the box the region's soft outline can reach.
        bx0, by0, bx1, by1 = reg.shape.bbox(edge)
        sx0, sy0 = max(x0, math.floor(bx0)), max(y0, math.floor(by0))
        sx1, sy1 = min(x0 + w, math.ceil(bx1)), min(y0 + h, math.ceil(by1))
        if sx0 >= sx1 or sy0 >= sy1:
            continue
        sub = (float(sx0), float(sy0), float(sx1), float(sy1))
        alpha = _Layout._alpha([reg.shape], xs[None, sx0 - x0 : sx1 - x0],
                               ys[sy0 - y0 : sy1 - y0, None], sub, edge)  # fmt: skip
        if alpha is None:
            continue
        sw, sh = sx1 - sx0, sy1 - sy0
        layer = _layer(layout, reg, sx0 - m, sy0 - m, sw + 2 * m, sh + 2 * m)[m:-m, m:-m]
        if alpha is _FULL and (sw, sh) == (w, h):
            conc = layer  # regions never overlap: nothing else reaches this box
            break
        if conc is None:
            conc = _layer(layout, None, x0, y0, w, h)
        part = conc[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
        part += (layer - part) * (alpha if alpha is _FULL else alpha[..., None])
    if conc is None:
        conc = _layer(layout, None, x0, y0, w, h)
    x_um, y_um = xs * mpp, ys * mpp
    stain = layout.stain
    conc[..., 0] *= stain.h_gain * (1.0 + _STAIN_FIELD_AMP * _value_noise(
        x_um, y_um, _STAIN_FIELD_UM, layout.salt + 21))
    conc[..., 1] *= stain.e_gain * (1.0 + _STAIN_FIELD_AMP * _value_noise(
        x_um, y_um, _STAIN_FIELD_UM, layout.salt + 22))
    rgb = conc_to_rgb(conc, stain.stains)
    out = rgb if tissue is _FULL else out + (rgb - out) * tissue[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def nuclear_darkness(rgb: np.ndarray) -> np.ndarray:
    """Share of nuclear haematoxylin per pixel, ``(H, W) float32`` in [0, 1]: the ramp of
    :data:`NUCLEUS_H` over the reference-stain H concentration (a statistic for checks)."""
    return _smoothstep(rgb_to_conc(rgb)[..., 0], *NUCLEUS_H).astype(np.float32)
