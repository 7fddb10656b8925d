"""Heat: where the model looked, per tile and per patch, from a slide's triage, ViT and MIL
results (``heatmap/tile``, ``heatmap/patch`` in the store), and the slide-wide heat map the
pictures and regions are drawn from.

Coordinates: the tile grid starts at level-0 (0, 0) and a tile is ``tile_level0`` level-0 px a
side, so a patch-level map pixel (y, x) covers level-0 ``[x, x + 1) * tile_level0 / G`` (same
for y). GeoJSON and candidates are in level-0 px, as QuPath and the CAMELYON16 evaluation
expect.

Heat and lesion confidence:

- **Heat** (``heatmap/tile``, ``heatmap/patch``, ``heatmap.png``) is *relative*: where the model
  looked within this slide, in [0, 1]. A kept tile's heat is its MIL attention over the most
  attended tile's (with the ``tile-topk`` head the "attention" is the tile's lesion probability
  over the bag's sum, so heat is its lesion probability over the slide's highest; with
  ``mil.heat_vit_weight`` < 1 it is a weighted geometric mean of that and the CNN's odds,
  see :func:`tile_heat`); inside it, a
  patch that reached the ViT gets its token importance over the tile's most important token, and
  a patch the CNN prior kept out of the ViT gets its CNN patch importance, scaled so that it
  never exceeds the tile's least important ViT patch (so the map has no holes and never ranks a
  patch the ViT did not see above one it saw). Tiles dropped by the triage get their CNN score
  scaled below the least attended kept tile. Some tile of every slide reaches heat 1, tumour or
  not.
- **Lesion confidence** (``regions.geojson``, ``candidates.csv``) is *absolute*: heat times the
  slide's tumour probability. A slide the model calls normal has low confidences everywhere,
  so it yields few or no regions above the threshold (``REGION_THRESHOLD``, 0.5: only slides
  with probability >= 0.5 can have regions) and its candidates rank below those of tumour
  slides, which is what the CAMELYON16 FROC needs since it pools candidates over slides.
"""

from __future__ import annotations

import numpy as np
import zarr

#: longest side of the patch-level heat map used for regions (caps memory on huge slides)
MAX_MAP_PX = 4096
#: CNN scores are clipped to [_EPS, 1 - _EPS] before their logit; attention to >= _TINY
_EPS, _TINY = 1e-6, 1e-30


def tile_heat(tile_score: np.ndarray, kept: np.ndarray, attention: np.ndarray,
              vit_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile heat in [0, 1] and its source (1: ViT/MIL, 0: CNN only).

    Args:
        tile_score: (N,) float CNN tile scores in [0, 1].
        kept: (N,) bool, tiles that reached the ViT.
        attention: (K,) float MIL attention of the kept tiles, K = ``kept.sum()``.
        vit_weight: the MIL attention's share of a kept tile's heat (``mil.heat_vit_weight``);
            the rest is the CNN's. 1 (default): the attention alone.

    Kept tiles get their MIL attention relative to the slide's most attended tile. With
    ``vit_weight`` w < 1 a kept tile's heat is ``exp(w * log(attention) + (1 - w) *
    logit(tile_score))``, relative to the slide's highest: a weighted geometric mean of the
    attention and the CNN's odds ``p / (1 - p)``, two estimates of the same ranking, the ViT's
    from the tokens it kept and the CNN's from the whole tile at low magnification (with the
    ``tile-topk`` head and a scorer taught by the ViT both come from lesion probabilities).
    Dropped tiles get their CNN score scaled below the lowest kept tile's heat, so the picture
    never ranks a tile the triage dropped above one it kept.

    Returns:
        ``(heat, source)``: (N,) float32 and (N,) uint8.
    """
    if not 0.0 <= vit_weight <= 1.0:
        raise ValueError(f"vit_weight must be in [0, 1], got {vit_weight}")
    heat = np.zeros(tile_score.shape, np.float32)
    source = kept.astype(np.uint8)
    if kept.any():
        att = np.asarray(attention, np.float64)
        if vit_weight < 1.0:
            p = np.clip(np.asarray(tile_score, np.float64)[kept], _EPS, 1.0 - _EPS)
            log_att = np.log(np.maximum(att, _TINY))
            s = vit_weight * log_att + (1.0 - vit_weight) * np.log(p / (1.0 - p))
            att = np.exp(s - s.max())
        else:
            att = att / max(float(att.max()), 1e-12)
        heat[kept] = att
        floor = float(heat[kept].min())
    else:
        floor = 1.0
    heat[~kept] = tile_score[~kept] * floor
    return heat, source


def patch_heat(token_importance: np.ndarray, entered: np.ndarray, cnn_importance: np.ndarray,
               heat: np.ndarray) -> np.ndarray:
    """Patch-level heat of the kept tiles, without holes where the CNN prior pruned tokens.

    Within a tile, a patch that entered the ViT gets ``r = importance / max importance``; a
    patch the CNN prior kept out (token importance 0) gets ``floor * cnn / ref``, where
    ``floor`` is the tile's smallest ``r`` and ``ref`` its CNN importance at the boundary
    (the largest of: the smallest CNN importance of a patch that entered, the largest of one
    that did not). The fill thus rises with the CNN importance and stays at or below every
    ViT patch, as dropped tiles stay below kept ones in :func:`tile_heat`. A tile without any
    token importance (no CLS token) takes its CNN map over its maximum. Each tile's map is
    then multiplied by its heat.

    Args:
        token_importance: (K, P) float ViT token importance (``vit/token_importance``).
        entered: (K, P) bool, tokens that entered the ViT (``vit/kept_tokens[:, 0]``).
        cnn_importance: (K, G, G) float CNN patch importance of the same tiles
            (``triage/patch_importance[tile_index]``), P = G * G.
        heat: (K,) float tile heat of the same tiles (:func:`tile_heat`).

    Returns:
        (K, G, G) float32 in [0, 1].
    """
    k, g = cnn_importance.shape[0], cnn_importance.shape[-1]
    imp = np.asarray(token_importance, np.float64)
    ent = np.asarray(entered, bool)
    cnn = np.clip(np.asarray(cnn_importance, np.float64).reshape(k, g * g), 0, None)
    if imp.shape != cnn.shape or ent.shape != cnn.shape:
        raise ValueError(f"token importance {imp.shape}, entered {ent.shape} and CNN map "
                         f"{cnn.shape} must all be (K, G*G)")
    if not k:
        return np.zeros((0, g, g), np.float32)
    vit_imp = np.where(ent, np.clip(imp, 0, None), 0.0)
    peak = vit_imp.max(axis=1, keepdims=True)
    has_vit = peak[:, 0] > 1e-12
    rel = np.divide(vit_imp, peak, out=np.zeros_like(vit_imp), where=peak > 1e-12)
    # the smallest positive r (an underflowed 0 must not turn the whole fill into holes)
    floor = np.where(ent & (rel > 0), rel, np.inf).min(axis=1, keepdims=True)
    floor[~np.isfinite(floor)] = 1.0
    lo_in = np.where(ent, cnn, np.inf).min(axis=1, keepdims=True)
    hi_out = np.where(ent, -np.inf, cnn).max(axis=1, keepdims=True)
    ref = np.maximum(np.where(np.isfinite(lo_in), lo_in, 0.0),
                     np.where(np.isfinite(hi_out), hi_out, 0.0))
    fill = floor * np.divide(cnn, ref, out=np.zeros_like(cnn), where=ref > 0)
    out = np.where(ent, rel, np.minimum(fill, floor))
    cnn_peak = cnn.max(axis=1, keepdims=True)
    cnn_only = np.divide(cnn, cnn_peak, out=np.zeros_like(cnn), where=cnn_peak > 0)
    out[~has_vit] = cnn_only[~has_vit]
    out *= np.asarray(heat, np.float64).reshape(k, 1)
    return np.clip(out, 0.0, 1.0).astype(np.float32).reshape(k, g, g)


def heat_map(group: zarr.Group, max_px: int = MAX_MAP_PX) -> tuple[np.ndarray, float]:
    """The slide's heat at patch resolution inside kept tiles, tile resolution elsewhere.

    Returns:
        ``(map, px_level0)``: (H, W) float32 heat in [0, 1], NaN where no tissue tile is;
        ``px_level0`` is the side of one map pixel in level-0 px. When the patch-level map
        would be larger than ``max_px`` a side, it is built with fewer px per tile.
    """
    grid = group.attrs["grid"]
    n_rows, n_cols = int(grid["n_rows"]), int(grid["n_cols"])
    rc = np.asarray(group["tiles/grid"][:])
    heat = np.asarray(group["heatmap/tile"][:])
    patch = np.asarray(group["heatmap/patch"][:]) if "patch" in group["heatmap"] else None
    tidx = np.asarray(group["vit/tile_index"][:]) if "vit" in group else np.zeros(0, int)
    g = patch.shape[1] if patch is not None and patch.size else 1
    per_tile = max(1, min(g, max_px // max(n_rows, n_cols, 1)))
    out = np.full((n_rows * per_tile, n_cols * per_tile), np.nan, np.float32)
    if len(rc):
        paste_tiles(out, per_tile, rc, np.asarray(heat, np.float32)[:, None, None])
    if patch is not None and patch.size and len(tidx):
        paste_tiles(out, per_tile, rc[tidx],
                    patch if per_tile == g else block_mean(patch, per_tile))
    return out, float(grid["tile_level0"]) / per_tile


def paste_tiles(image: np.ndarray, per: int, rc: np.ndarray, blocks: np.ndarray) -> None:
    """Write every tile's block of a slide-wide map at once (a CAMELYON16-size slide has
    20 000-50 000 tissue tiles).

    Args:
        image: (rows * per, cols * per, ...) C-contiguous map, changed in place.
        per: map px per tile side.
        rc: (K, 2) grid (row, col) of the tiles.
        blocks: (K, per, per, ...) or anything that broadcasts to it.
    """
    rows, cols = image.shape[0] // per, image.shape[1] // per
    # (row, px in tile, col, px in tile, ...): tile (r, c)'s block is view[r, :, c, :]
    view = image.reshape(rows, per, cols, per, *image.shape[2:])
    view[rc[:, 0], :, rc[:, 1], :] = blocks


def block_mean(a: np.ndarray, n: int) -> np.ndarray:
    """Resample a (G, G) map, or a stack of them (K, G, G), to (n, n) each by area averaging
    (n <= G): output px (i, j) is the mean of the input px in rows ``e[i]:e[i + 1]`` and
    columns ``e[j]:e[j + 1]``, ``e`` the rounded edges of n equal parts (at least one px)."""
    a = np.asarray(a)
    g = a.shape[-1]
    edges = np.linspace(0, g, n + 1).round().astype(int)
    lo, hi = edges[:-1], np.maximum(edges[1:], edges[:-1] + 1)
    # sums over any box from a zero-padded 2-D cumulative sum (float64: exact enough for
    # float32 output whatever the order of summation)
    c = np.zeros(a.shape[:-2] + (g + 1, g + 1), np.float64)
    c[..., 1:, 1:] = a.astype(np.float64).cumsum(-2).cumsum(-1)
    box = (c[..., hi[:, None], hi[None, :]] - c[..., lo[:, None], hi[None, :]]
           - c[..., hi[:, None], lo[None, :]] + c[..., lo[:, None], lo[None, :]])
    area = (hi - lo)[:, None] * (hi - lo)[None, :]
    return (box / area).astype(np.float32)

