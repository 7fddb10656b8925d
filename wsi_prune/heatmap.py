"""Pictures and files a pathologist opens: heatmap overlay, token QC picture, QuPath GeoJSON
and CAMELYON16 lesion candidates, all rendered from a slide's store (so ``wsi-prune heatmap``
re-renders them without recomputing anything).

Coordinates: the tile grid starts at level-0 (0, 0) and a tile is ``tile_level0`` level-0 px a
side, so a patch-level map pixel (y, x) covers level-0 ``[x, x + 1) * tile_level0 / G`` (same
for y). GeoJSON and candidates are in level-0 px, as QuPath and the CAMELYON16 evaluation
expect.

Heat and lesion confidence:

- **Heat** (``heatmap/tile``, ``heatmap/patch``, ``heatmap.png``) is *relative*: where the model
  looked within this slide, in [0, 1]. A kept tile's heat is its MIL attention over the most
  attended tile's; inside it, a patch that reached the ViT gets its token importance over the
  tile's most important token, and a patch the CNN prior kept out of the ViT gets its CNN patch
  importance, scaled so that it never exceeds the tile's least important ViT patch (so the map
  has no holes and never ranks a patch the ViT did not see above one it saw). Tiles dropped by
  the triage get their CNN score scaled below the least attended kept tile. Some tile of every
  slide reaches heat 1, tumour or not.
- **Lesion confidence** (``regions.geojson``, ``candidates.csv``) is *absolute*: heat times the
  slide's tumour probability. A slide the model calls normal has low confidences everywhere,
  so it yields few or no regions above the threshold (``REGION_THRESHOLD``, 0.5: only slides
  with probability >= 0.5 can have regions) and its candidates rank below those of tumour
  slides, which is what the CAMELYON16 FROC needs since it pools candidates over slides.

``candidates.csv`` is in the format CAMELYON16's ``Evaluation_FROC.py`` reads: no header, one
``confidence,X,Y`` line per candidate, X and Y integer level-0 px.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_prune.config import RunConfig
from wsi_prune.errors import SlideError, StoreError
from wsi_prune.io import store

_logger = logging.getLogger(__name__)

#: longest side of the rendered pictures, px
PICTURE_PX = 1100
#: longest side of the patch-level heat map used for regions (caps memory on huge slides)
MAX_MAP_PX = 4096
# zlib level 1: a 1200 px picture encodes in ~0.05 s instead of ~0.25 s at PIL's default 6,
# for files about 30 % larger; pictures are written once per slide, on the critical path.
_PNG = {"compress_level": 1}
REGION_THRESHOLD = 0.5
REGION_CLASS = {"name": "Tumor", "color": [200, 0, 0]}


def tile_heat(tile_score: np.ndarray, kept: np.ndarray, attention: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile heat in [0, 1] and its source (1: ViT/MIL, 0: CNN only).

    Args:
        tile_score: (N,) float CNN tile scores in [0, 1].
        kept: (N,) bool, tiles that reached the ViT.
        attention: (K,) float MIL attention of the kept tiles, K = ``kept.sum()``.

    Kept tiles get their MIL attention relative to the slide's most attended tile. Dropped
    tiles get their CNN score scaled below the lowest kept tile's heat, so the picture never
    ranks a tile the triage dropped above one it kept.

    Returns:
        ``(heat, source)``: (N,) float32 and (N,) uint8.
    """
    heat = np.zeros(tile_score.shape, np.float32)
    source = kept.astype(np.uint8)
    if kept.any():
        att = attention / max(float(attention.max()), 1e-12)
        heat[kept] = att
        floor = float(att.min())
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
    for (r, c), h in zip(rc, heat, strict=True):
        out[r * per_tile:(r + 1) * per_tile, c * per_tile:(c + 1) * per_tile] = h
    if patch is not None and patch.size and len(tidx):
        for k, i in enumerate(tidx):
            r, c = rc[i]
            block = patch[k]
            if per_tile != g:
                block = _block_mean(block, per_tile)
            out[r * per_tile:(r + 1) * per_tile, c * per_tile:(c + 1) * per_tile] = block
    return out, float(grid["tile_level0"]) / per_tile


def _block_mean(a: np.ndarray, n: int) -> np.ndarray:
    """Resample a (G, G) map to (n, n) by area averaging (n <= G)."""
    g = a.shape[0]
    edges = np.linspace(0, g, n + 1).round().astype(int)
    return np.array([[a[edges[i]:max(edges[i + 1], edges[i] + 1),
                        edges[j]:max(edges[j + 1], edges[j] + 1)].mean()
                      for j in range(n)] for i in range(n)], np.float32)


def regions_geojson(confidence: np.ndarray, px_level0: float,
                    threshold: float = REGION_THRESHOLD,
                    slide_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Polygons around map regions with lesion confidence >= ``threshold``, as a QuPath
    FeatureCollection.

    Args:
        confidence: (H, W) lesion confidence (heat times slide probability), NaN off tissue.
        px_level0: side of one map pixel, level-0 px.
        threshold: confidence at or above which a pixel belongs to a region.
        slide_size: (width, height) level-0 px to clip the polygons to.

    Each feature is a level-0 px polygon with ``objectType: annotation``, a classification
    (name, colour as QuPath's ``[r, g, b]``) and measurements (mean and max confidence, area in
    level-0 px²).
    """
    from skimage import measure

    conf = np.nan_to_num(confidence, nan=0.0)
    labels = measure.label(conf >= threshold, connectivity=2)
    features = []
    for region in measure.regionprops(labels, intensity_image=conf):
        sub = np.pad(labels[region.slice] == region.label, 1)
        contours = measure.find_contours(sub.astype(np.float32), 0.5)
        if not contours:
            continue
        ring = max(contours, key=len)
        y0, x0 = region.slice[0].start - 1, region.slice[1].start - 1
        # contour points are at pixel centres; +0.5 puts them on the map's pixel grid
        xy = np.stack([(ring[:, 1] + x0 + 0.5) * px_level0, (ring[:, 0] + y0 + 0.5) * px_level0],
                      axis=1)
        if slide_size is not None:
            xy[:, 0] = np.clip(xy[:, 0], 0, slide_size[0])
            xy[:, 1] = np.clip(xy[:, 1], 0, slide_size[1])
        coords = [[round(float(x), 1), round(float(y), 1)] for x, y in xy]
        if coords[0] != coords[-1]:
            coords.append(coords[0])
        if len(coords) < 4:
            continue
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [coords]},
            "properties": {
                "objectType": "annotation",
                "name": f"region {len(features) + 1}",
                "classification": {"name": REGION_CLASS["name"],
                                   "color": list(REGION_CLASS["color"])},
                "measurements": {
                    "mean_confidence": round(float(region.intensity_mean), 4),
                    "max_confidence": round(float(region.intensity_max), 4),
                    "area_level0_px2": round(float(region.area) * px_level0**2, 1),
                },
            },
        })
    return {"type": "FeatureCollection", "features": features}


def candidates(group: zarr.Group, probability: float) -> list[tuple[float, int, int]]:
    """CAMELYON16 lesion candidates: one per kept tile at its hottest patch.

    Confidence is the patch heat times the slide probability (the lesion confidence of the
    module docstring), so candidates compare across slides (the FROC pools them). Returns
    (confidence, X, Y) with X, Y the patch centre in integer level-0 px, sorted by
    decreasing confidence.
    """
    if "vit" not in group or "patch" not in group["heatmap"]:
        return []
    tidx = np.asarray(group["vit/tile_index"][:])
    if not len(tidx):
        return []
    patch = np.asarray(group["heatmap/patch"][:])
    coords = np.asarray(group["tiles/coords"][:])
    g = patch.shape[1]
    side = float(group.attrs["grid"]["tile_level0"]) / g
    out = []
    for k, i in enumerate(tidx):
        flat = int(np.argmax(patch[k]))
        pr, pc = divmod(flat, g)
        # floor, not round: the pixel that holds the centre, so it stays inside the tile
        x = int(coords[i][0] + (pc + 0.5) * side)
        y = int(coords[i][1] + (pr + 0.5) * side)
        out.append((float(probability) * float(patch[k].max()), x, y))
    out.sort(key=lambda t: -t[0])
    return out


def write_candidates(path: str | os.PathLike[str],
                     rows: Iterable[tuple[float, float, float]]) -> Path:
    """Write candidates as CAMELYON16's ``Evaluation_FROC.py`` reads them: no header, one
    ``confidence,X,Y`` line each, X and Y integer level-0 px (the script calls ``int()`` on
    them, which refuses ``12.0``)."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        for conf, x, y in rows:
            fh.write(f"{float(conf):.6f},{int(round(float(x)))},{int(round(float(y)))}\n")
    return path


def _thumbnail(group: zarr.Group, slide_path: str | os.PathLike[str] | None,
               mpp: float | None) -> tuple[np.ndarray, float]:
    """(H, W, 3) uint8 picture of the slide and its level-0 px per picture px. Falls back to
    the tissue mask (grey on white) when the slide file cannot be read."""
    from wsi_prune.io.slide import Slide

    info = group.attrs["slide"]
    width, height = int(info["width"]), int(info["height"])
    level0_mpp = float(group.attrs["mpp"])
    pic_mpp = level0_mpp * max(width, height) / PICTURE_PX
    path = slide_path or info.get("path")
    if path and Path(path).exists():
        try:
            with Slide(path, mpp if mpp is not None else level0_mpp) as s:
                img = s.read_thumbnail(max(pic_mpp, level0_mpp))
            return img, width / img.shape[1]
        except SlideError as exc:
            _logger.warning("%s: thumbnail unreadable (%s); drawing on the mask", path, exc)
    mask = np.asarray(group["mask/tissue"][:])
    img = np.where(mask[..., None], 200, 255).astype(np.uint8).repeat(3, axis=2)
    return img, width / mask.shape[1]


def render_heatmap(path: Path, thumb: np.ndarray, thumb_px0: float, heat: np.ndarray,
                   heat_px0: float, tissue: np.ndarray, title: str) -> None:
    """Heat overlaid on the thumbnail: smooth (bilinear from the patch map), colour bar,
    tissue contour, title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    h, w = thumb.shape[:2]
    extent_map = (0, heat.shape[1] * heat_px0 / thumb_px0, heat.shape[0] * heat_px0 / thumb_px0, 0)
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.6), dpi=150)
    # the thumbnail is read at about the axes' size (PICTURE_PX): nearest is then a near 1:1
    # copy, where matplotlib's default antialiasing filter costs ~0.1 s per picture
    ax.imshow(thumb, extent=(0, w, h, 0), interpolation="nearest")
    masked = np.ma.masked_invalid(heat)
    im = ax.imshow(masked, cmap="inferno", vmin=0, vmax=1, alpha=0.55, extent=extent_map,
                   interpolation="bilinear")
    if tissue.any():
        from skimage import measure

        # the mask is resized to the thumbnail, so contour (row, col) are picture px
        for ring in measure.find_contours(np.pad(tissue, 1).astype(np.float32), 0.5):
            ax.plot(ring[:, 1] - 1, ring[:, 0] - 1, color="lime", lw=0.6)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    cbar = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    cbar.set_label("heat (ViT/MIL in kept tiles, scaled CNN elsewhere)", fontsize=7)
    ax.legend(handles=[Line2D([0], [0], color="lime", lw=1, label="tissue contour")],
              loc="lower right", fontsize=7, framealpha=0.7)
    fig.savefig(path, bbox_inches="tight", pil_kwargs=_PNG)
    plt.close(fig)


def render_tokens(path: Path, thumb: np.ndarray, thumb_px0: float, group: zarr.Group,
                  title: str) -> None:
    """QC picture: tissue tiles dropped by the triage (grey), tokens pruned before or inside
    the ViT (orange), tokens that reached the last stage (green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    grid = group.attrs["grid"]
    n_rows, n_cols = int(grid["n_rows"]), int(grid["n_cols"])
    rc = np.asarray(group["tiles/grid"][:])
    kept_tokens = np.asarray(group["vit/kept_tokens"][:]) if "vit" in group else None
    tidx = np.asarray(group["vit/tile_index"][:]) if "vit" in group else np.zeros(0, int)
    g = int(round(np.sqrt(kept_tokens.shape[2]))) if kept_tokens is not None and \
        kept_tokens.size else 1
    per = max(1, min(g, MAX_MAP_PX // max(n_rows, n_cols, 1)))
    rgba = np.zeros((n_rows * per, n_cols * per, 4), np.float32)
    grey, orange, green = (0.5, 0.5, 0.5, 0.6), (1.0, 0.55, 0.0, 0.7), (0.0, 0.8, 0.2, 0.8)
    for r, c in rc:
        rgba[r * per:(r + 1) * per, c * per:(c + 1) * per] = grey
    for k, i in enumerate(tidx):
        r, c = rc[i]
        final = kept_tokens[k, -1].reshape(g, g)
        if per != g:
            final = _block_mean(final.astype(np.float32), per) >= 0.5
        block = np.where(final[..., None], np.array(green), np.array(orange))
        rgba[r * per:(r + 1) * per, c * per:(c + 1) * per] = block
    h, w = thumb.shape[:2]
    px0 = float(grid["tile_level0"]) / per
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.6), dpi=150)
    # the thumbnail is read at about the axes' size (PICTURE_PX): nearest is then a near 1:1
    # copy, where matplotlib's default antialiasing filter costs ~0.1 s per picture
    ax.imshow(thumb, extent=(0, w, h, 0), interpolation="nearest")
    ax.imshow(rgba, extent=(0, rgba.shape[1] * px0 / thumb_px0, rgba.shape[0] * px0 / thumb_px0,
                            0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[Patch(color=grey, label="tile dropped by CNN triage"),
                       Patch(color=orange, label="token pruned"),
                       Patch(color=green, label="token reached last ViT block")],
              loc="lower right", fontsize=7, framealpha=0.8)
    fig.savefig(path, bbox_inches="tight", pil_kwargs=_PNG)
    plt.close(fig)


def write_outputs(group: zarr.Group, dest: Path, slide_id: str, probability: float,
                  config: RunConfig | None = None, slide_path: str | os.PathLike | None = None,
                  mpp: float | None = None) -> Path:
    """Write ``heatmap.png``, ``tokens.png``, ``regions.geojson`` and ``candidates.csv`` into
    ``dest`` atomically (built in a temporary folder, then renamed)."""
    dest = Path(dest)
    tmp = store.tmp_path_for(dest)
    tmp.mkdir(parents=True)
    try:
        heat, heat_px0 = heat_map(group)
        thumb, thumb_px0 = _thumbnail(group, slide_path, mpp)
        tissue = np.asarray(group["mask/tissue"][:])
        tissue = _resize_mask(tissue, thumb.shape[:2])
        thr = config.mil.threshold if config is not None else 0.5
        call = "tumour" if probability >= thr else "normal"
        title = f"{slide_id}: p(tumour) = {probability:.3f} ({call})"
        render_heatmap(tmp / "heatmap.png", thumb, thumb_px0, heat, heat_px0, tissue, title)
        render_tokens(tmp / "tokens.png", thumb, thumb_px0, group, f"{slide_id}: token QC")
        info = group.attrs["slide"]
        gj = regions_geojson(heat * float(probability), heat_px0,
                             slide_size=(int(info["width"]), int(info["height"])))
        (tmp / "regions.geojson").write_text(json.dumps(gj), encoding="utf-8")
        write_candidates(tmp / "candidates.csv", candidates(group, probability))
        store.publish(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 127


def rerender(store_path: str | os.PathLike[str], slide_path: str | None = None,
             mpp: float | None = None) -> Path:
    """Re-draw a slide's pictures and files from its store (``wsi-prune heatmap``)."""
    store_path = Path(store_path)
    try:
        group = zarr.open_group(str(store_path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError("not a wsi-prune store", store_path) from exc
    result = group.attrs.get("result")
    if not result:
        raise StoreError("store has no finished run (run `wsi-prune run` first)", store_path)
    cfg = RunConfig.from_dict(group.attrs["run_config"]) if "run_config" in group.attrs else None
    slide_id = store_path.name.removesuffix(".zarr")
    return write_outputs(group, store_path.parent / slide_id, slide_id, result["probability"],
                         cfg, slide_path, mpp)
