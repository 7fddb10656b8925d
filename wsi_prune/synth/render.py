"""Rendering a synthetic slide's tiles: any tile of any level on its own, directly at the
level's resolution, from the layout's shapes plus hash-placed nuclei and lattice noise.
"""

from __future__ import annotations

import math

import numpy as np

from wsi_prune.synth.layout import _FULL, _hash32, _Layout

# Colours (RGB 0-255). Stroma is eosin pink, nuclei haematoxylin blue-purple; tumour cytoplasm
# and nuclei are darker so a CNN has something to learn.
_BACKGROUND = np.array([241.0, 240.0, 243.0], np.float32)


_STROMA = np.array([232.0, 162.0, 202.0], np.float32)


_TUMOUR_CYTO = np.array([200.0, 128.0, 186.0], np.float32)


_NUCLEUS_STROMA = np.array([98.0, 66.0, 150.0], np.float32)


_NUCLEUS_TUMOUR = np.array([66.0, 40.0, 122.0], np.float32)


_BORDER = np.array([22.0, 22.0, 26.0], np.float32)






# Nuclei layers: (cell side µm, probability of a nucleus per cell, radius range µm).
_STROMA_NUCLEI = (14.0, 0.35, 2.6, 3.8)


_TUMOUR_NUCLEI = (10.0, 0.92, 3.6, 4.6)


def _value_noise(x_um: np.ndarray, y_um: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Smooth lattice noise in [-1, 1], ``(M, N) float32``, from 1-D coordinates in µm.

    Bilinear interpolation is separable, so the field is two small matrix products.
    """

    def weights(t: np.ndarray) -> tuple[np.ndarray, int]:
        g = t / scale
        i = np.floor(g).astype(np.int64)
        f = (g - i).astype(np.float32)
        f = f * f * (3 - 2 * f)
        i0 = int(i.min())
        m = np.zeros((len(t), int(i.max()) - i0 + 2), np.float32)
        rows = np.arange(len(t))
        m[rows, i - i0] = 1 - f
        m[rows, i - i0 + 1] = f
        return m, i0

    wx, ix0 = weights(x_um)
    wy, iy0 = weights(y_um)
    gx = np.arange(ix0, ix0 + wx.shape[1])[None, :]
    gy = np.arange(iy0, iy0 + wy.shape[1])[:, None]
    lattice = (_hash32(gx, gy, salt) >> np.uint32(8)).astype(np.float32) * (2.0 / 2**24) - 1.0
    return wy @ lattice @ wx.T


def _cell_params(gx: np.ndarray, gy: np.ndarray, layer: tuple, salt: int):
    """Disc centre x, y and radius (µm; radius -100 where the cell holds no disc) of the grid
    cells ``(gx, gy)``, three ``float32`` arrays of their broadcast shape.

    Each cell's hash gives presence, radius and a jitter that keeps the disc inside its cell.
    """
    cell, prob, rmin, rmax = layer
    h = _hash32(gx, gy, salt)
    byte = [
        ((h >> np.uint32(8 * k)) & np.uint32(0xFF)).astype(np.float64) / 255.0 for k in range(4)
    ]
    r = rmin + (rmax - rmin) * byte[1]
    margin = r + 0.3
    ncx = gx * cell + margin + byte[2] * (cell - 2 * margin)
    ncy = gy * cell + margin + byte[3] * (cell - 2 * margin)
    r = np.where(byte[0] < prob, r, -100.0)
    return ncx.astype(np.float32), ncy.astype(np.float32), r.astype(np.float32)


def _nuclei(x_um: np.ndarray, y_um: np.ndarray, layer: tuple, edge_um: float, salt: int,
            rows_per_chunk: int = 128) -> np.ndarray:
    """Coverage ``(M, N) float32`` of hash-placed discs, at most one per grid cell.

    A pixel only ever looks at its own cell, so any tile renders independently. Fine levels
    evaluate each cell once and gather; on coarse levels of a large slide a tile spans more
    cells than it has samples (a 256 px tile at 64 µm/px covers ~1200² cells of 14 µm), so each
    sample evaluates its own cell instead. Either way the work runs in chunks of rows, which
    keeps temporaries at a few MB whatever the level.
    """
    cell = layer[0]
    cx = np.floor(x_um / cell).astype(np.int64)
    cy = np.floor(y_um / cell).astype(np.int64)
    xs, ys = x_um.astype(np.float32)[None, :], y_um.astype(np.float32)[:, None]
    n_cells = (int(cx.max() - cx.min()) + 1) * (int(cy.max() - cy.min()) + 1)
    by_cell = n_cells <= len(cx) * len(cy)
    if by_cell:
        gx0, gy0 = int(cx.min()), int(cy.min())
        grid = _cell_params(np.arange(gx0, cx.max() + 1)[None, :],
                            np.arange(gy0, cy.max() + 1)[:, None], layer, salt)
        ix = (cx - gx0)[None, :]
    out = np.empty((len(y_um), len(x_um)), np.float32)
    for r0 in range(0, len(y_um), rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        if by_cell:
            iy = (cy[rows] - gy0)[:, None]
            px, py, pr = (g[iy, ix] for g in grid)
        else:
            px, py, pr = _cell_params(cx[None, :], cy[rows, None], layer, salt)
        dx = xs - px
        dy = ys[rows] - py
        out[rows] = np.clip((pr - np.sqrt(dx * dx + dy * dy)) / edge_um + 0.5, 0.0, 1.0)
    return out


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t[..., None]


def render_tile(layout: _Layout, downsample: int, col0: int, row0: int, tw: int, th: int):
    """Render pixels ``[row0, row0+th) x [col0, col0+tw)`` of the level with this downsample.

    Coarse levels are supersampled (samples never more than ~1 µm apart up to 4x4 per pixel)
    so their mean colour matches a downsampled level 0.

    Returns:
        ``(th, tw, 3) uint8`` RGB.
    """
    spec = layout.spec
    px_um = downsample * spec.mpp
    s = int(min(4, max(1, math.ceil(px_um / 1.0))))
    # Level-0 px coordinates of the sample centres (1-D; fields broadcast them).
    xs = (col0 + (np.arange(tw * s) + 0.5) / s) * downsample
    ys = (row0 + (np.arange(th * s) + 0.5) / s) * downsample
    x, y = xs[None, :], ys[:, None]
    box = (col0 * downsample, row0 * downsample, (col0 + tw) * downsample, (row0 + th) * downsample)
    edge = downsample / s  # soft edges one sample wide, level-0 px
    edge_um = edge * spec.mpp
    out = np.broadcast_to(_BACKGROUND, (th * s, tw * s, 3)).copy()

    tissue = layout.tissue(x, y, box, edge)
    if tissue is not None:
        x_um, y_um = xs * spec.mpp, ys * spec.mpp
        salt = layout.salt
        tex = 0.07 * _value_noise(x_um, y_um, 40.0, salt + 1)
        tex += 0.05 * _value_noise(x_um, y_um, 9.0, salt + 2)
        tumour = layout.tumour(x, y, box, edge)
        if tumour is _FULL:  # inside a tumour: no stroma to blend with
            col = _TUMOUR_CYTO * (1.0 + tex)[..., None]
            cov = _nuclei(x_um, y_um, _TUMOUR_NUCLEI, edge_um, salt + 4)
            ncol = np.broadcast_to(_NUCLEUS_TUMOUR, col.shape)
        else:
            col = _STROMA * (1.0 + tex)[..., None]
            cov = _nuclei(x_um, y_um, _STROMA_NUCLEI, edge_um, salt + 3)
            ncol = np.broadcast_to(_NUCLEUS_STROMA, col.shape)
        if tumour is not None and tumour is not _FULL:
            col = _lerp(col, _TUMOUR_CYTO * (1.0 + tex)[..., None], tumour)
            cov_t = _nuclei(x_um, y_um, _TUMOUR_NUCLEI, edge_um, salt + 4)
            cov = cov + (cov_t - cov) * tumour
            ncol = _lerp(ncol, np.broadcast_to(_NUCLEUS_TUMOUR, col.shape), tumour)
        col = _lerp(col, ncol, cov)
        out = col if tissue is _FULL else _lerp(out, col, tissue)
    pen = layout.pen(x, y, box, edge)
    if pen is not None:
        alpha, trans = pen
        out *= 1.0 - alpha[..., None] * (1.0 - trans)
    border = layout.border(x, y, box, edge)
    if border is not None:
        out = _lerp(out, _BORDER, border)
    if s > 1:
        out = out.reshape(th, s, tw, s, 3).mean(axis=(1, 3))
    # Fine grain per output pixel; the offset per level keeps levels from sharing a pattern.
    off = 97 * downsample.bit_length()
    grain = layout.noise[np.ix_((np.arange(th) + row0 + off) % 512, (np.arange(tw) + col0) % 512)]
    out += 3.0 * grain[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
