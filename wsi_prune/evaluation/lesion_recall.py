"""What pruning kept of the lesions: triage recall (lesion area and lesion tiles that the CNN
triage sent to the ViT) and token recall (lesion patches that reached the last ViT block), per
lesion size class, from a run's slide store and the ASAP lesion outlines.

Lesions are the 8-connected components of the lesion mask (positive groups minus exclusion
groups, :func:`wsi_prune.io.annotations.region_masks`) drawn at ``mask_mpp`` (default 2 µm/px,
so a 20 µm cluster of a few tumour cells is still ~100 px), without the FROC's 75 µm dilation.
A lesion's size class follows CAMELYON16 by its longest diameter (the largest distance between
two points of the component, measured on pixel corners, so at most one mask px, 2.8 µm,
above the polygon's): isolated tumour cells (ITC) below 200 µm, micro-metastases 200-2000 µm,
macro-metastases above 2000 µm.

Masks are drawn per cluster of annotations whose bounding boxes overlap, never over the whole
slide; a cluster wider than ``MAX_REGION_PX`` mask px is drawn coarser (its side over
``MAX_REGION_PX``), which bounds memory at ~200 MB (a 20 mm cluster: 3.3 µm/px).

Definitions, per slide and pooled over slides:

- **area recall**: lesion area inside tiles the triage kept over lesion area inside tissue
  tiles (the tiles the triage chose from; lesion area outside every tissue tile is reported
  apart, ``area_um2 - area_in_tissue_um2``, since no tile policy can keep it);
- **tile recall**: kept tiles over tissue tiles holding any lesion px of the class;
- **token recall**: over the patches of all tissue tiles that lie mostly (> 50 % of 4 x 4
  sample points) inside a lesion, the share whose token reached the last ViT block
  (``vit/kept_tokens[:, -1]``); a patch of a tile the triage dropped did not. A patch's class
  is that of the lesion holding most of its sample points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull

from wsi_prune.errors import StoreError
from wsi_prune.io.annotations import ITC_UM, Annotation, region_masks
from wsi_prune.io.store import open_store

SIZE_CLASSES = ("itc", "micro", "macro")
MACRO_UM = 2000.0  # CAMELYON16: macro-metastases are longer than 2 mm
LESION_MASK_MPP = 2.0  # µm/px of the lesion masks
MAX_REGION_PX = 6144  # longest side of one cluster's mask, px
PATCH_SAMPLES = 4  # sample points per patch side for "mostly inside a lesion"
_STRIP = 512  # mask rows per pass when matching lesion px to tiles (bounds temporaries)


def size_class(diameter_um: float) -> str:
    """``itc`` (< 200 µm), ``micro`` (200-2000 µm) or ``macro`` (> 2000 µm)."""
    if diameter_um < ITC_UM:
        return "itc"
    return "micro" if diameter_um <= MACRO_UM else "macro"


@dataclass(frozen=True)
class LesionRegion:
    """Lesion ids over one cluster's bounding box.

    Attributes:
        labels: (H, W) int32 lesion ids (global to the slide, from 1), 0 = none.
        origin: level-0 (x, y) of the top-left corner of ``labels[0, 0]``.
        scale: level-0 px per mask px.
    """

    labels: np.ndarray
    origin: tuple[float, float]
    scale: float


@dataclass(frozen=True)
class Lesions:
    """The lesions of one slide.

    Attributes:
        regions: masks of the annotation clusters.
        diameter_um, area_um2: (L,) float64, lesion ``i`` at index ``i - 1``.
        size_class: (L,) class names.
    """

    regions: tuple[LesionRegion, ...]
    diameter_um: np.ndarray
    area_um2: np.ndarray
    size_class: tuple[str, ...]

    def lookup(self, level0_xy: np.ndarray) -> np.ndarray:
        """(M,) int32 lesion id (0 = none) at (M, 2) level-0 (x, y) points."""
        xy = np.asarray(level0_xy, np.float64).reshape(-1, 2)
        out = np.zeros(len(xy), np.int32)
        for reg in self.regions:
            c = np.floor((xy[:, 0] - reg.origin[0]) / reg.scale).astype(np.int64)
            r = np.floor((xy[:, 1] - reg.origin[1]) / reg.scale).astype(np.int64)
            h, w = reg.labels.shape
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            out[inside] = np.maximum(out[inside], reg.labels[r[inside], c[inside]])
        return out


def _clusters(boxes: list[list[float]], gap: float) -> list[list[float]]:
    """Merge (x0, y0, x1, y1) boxes closer than ``gap`` until none are."""
    boxes = [list(b) for b in boxes]
    merged = True
    while merged:
        merged, out = False, []
        for b in boxes:
            for o in out:
                if b[0] <= o[2] + gap and o[0] <= b[2] + gap and b[1] <= o[3] + gap \
                        and o[1] <= b[3] + gap:
                    o[:] = [min(o[0], b[0]), min(o[1], b[1]), max(o[2], b[2]), max(o[3], b[3])]
                    merged = True
                    break
            else:
                out.append(b)
        boxes = out
    return boxes


def _diameter_px(component: np.ndarray) -> float:
    """Longest distance between two corners of a component's pixels, in mask px."""
    rows = np.flatnonzero(component.any(1))
    sub = component[rows]
    left = sub.argmax(1)
    right = sub.shape[1] - 1 - sub[:, ::-1].argmax(1)
    r = rows.astype(np.float64)
    pts = np.concatenate([np.stack([r, left], 1), np.stack([r + 1, left], 1),
                          np.stack([r, right + 1.0], 1), np.stack([r + 1, right + 1.0], 1)])
    if len(pts) > 16:
        pts = pts[ConvexHull(pts).vertices]
    d = pts[:, None, :] - pts[None, :, :]
    return float(np.sqrt((d**2).sum(-1)).max())


def lesions_from_annotations(annotations: Sequence[Annotation], level0_mpp: float,
                             mask_mpp: float = LESION_MASK_MPP) -> Lesions:
    """Lesion masks, diameters, areas and size classes of one slide.

    Args:
        annotations: from :func:`wsi_prune.io.annotations.read_asap_xml`.
        level0_mpp: the slide's level-0 µm/px.
        mask_mpp: mask resolution, µm/px (coarser for clusters wider than ``MAX_REGION_PX``).
    """
    areas = [a for a in annotations if a.is_area and a.role != "other"]
    pos = [a for a in areas if a.role == "positive"]
    boxes = [[*a.coords.min(0), *a.coords.max(0)] for a in pos]
    regions, diam, area, cls = [], [], [], []
    next_id = 0
    for x0, y0, x1, y1 in _clusters(boxes, 2 * mask_mpp / level0_mpp):
        extent_um = max(x1 - x0, y1 - y0) * level0_mpp
        mpp = max(mask_mpp, extent_um / MAX_REGION_PX)
        scale = mpp / level0_mpp
        c0, r0 = max(0, math.floor(x0 / scale) - 1), max(0, math.floor(y0 / scale) - 1)
        c1, r1 = math.ceil(x1 / scale) + 1, math.ceil(y1 / scale) + 1
        # this cluster's lesions (inside its box; another cluster's never is) and the
        # exclusions that reach into its mask
        mine = [a for a in pos if a.coords[:, 0].min() >= x0 and a.coords[:, 0].max() <= x1
                and a.coords[:, 1].min() >= y0 and a.coords[:, 1].max() <= y1]  # fmt: skip
        cut = [a for a in areas if a.role == "exclusion"
               and a.coords[:, 0].max() >= c0 * scale and a.coords[:, 0].min() <= c1 * scale
               and a.coords[:, 1].max() >= r0 * scale and a.coords[:, 1].min() <= r1 * scale]
        near = mine + cut
        p, e = region_masks(near, (c0 * scale, r0 * scale), (r1 - r0, c1 - c0), mpp, level0_mpp)
        labels, n = ndi.label(p & ~e, structure=np.ones((3, 3), bool), output=np.int32)
        if not n:
            continue
        counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        for k, sl in enumerate(ndi.find_objects(labels), start=1):
            d_um = _diameter_px(labels[sl] == k) * mpp
            diam.append(d_um)
            area.append(float(counts[k - 1]) * mpp**2)
            cls.append(size_class(d_um))
        labels[labels > 0] += next_id
        next_id += n
        regions.append(LesionRegion(labels, (c0 * scale, r0 * scale), scale))
    return Lesions(tuple(regions), np.asarray(diam, np.float64), np.asarray(area, np.float64),
                   tuple(cls))


def _empty_counts() -> dict[str, dict[str, Any]]:
    keys = ("lesions", "lesions_with_kept_tile", "area_um2", "area_in_tissue_um2",
            "area_kept_um2", "tiles", "tiles_kept", "patches", "patches_reached")
    return {c: dict.fromkeys(keys, 0) for c in (*SIZE_CLASSES, "all")}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def finish(counts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Recalls from summed counts: ``triage[class]`` and ``tokens[class]`` for each size class
    and ``all``."""
    triage, tokens = {}, {}
    for c, v in counts.items():
        triage[c] = {k: v[k] for k in ("lesions", "lesions_with_kept_tile", "area_um2",
                                        "area_in_tissue_um2", "area_kept_um2", "tiles",
                                        "tiles_kept")}  # fmt: skip
        triage[c]["area_recall"] = _ratio(v["area_kept_um2"], v["area_in_tissue_um2"])
        triage[c]["tile_recall"] = _ratio(v["tiles_kept"], v["tiles"])
        tokens[c] = {"patches": v["patches"], "reached": v["patches_reached"],
                     "recall": _ratio(v["patches_reached"], v["patches"])}
    return {"triage": triage, "tokens": tokens}


def slide_lesion_counts(store: str | Path, annotations: Sequence[Annotation],
                        mask_mpp: float = LESION_MASK_MPP) -> dict[str, dict[str, Any]]:
    """Summable counts behind the triage and token recall of one slide (see the module
    docstring; :func:`finish` turns them into recalls).

    Args:
        store: a complete slide store (``tiles/coords``, ``tiles/grid``, ``triage/kept``,
            ``vit/tile_index``, ``vit/kept_tokens``; attrs ``mpp``, ``grid``).
        annotations: the slide's lesion outlines, level-0 px.

    Returns:
        ``{class: {lesions, lesions_with_kept_tile, area_um2, area_in_tissue_um2,
        area_kept_um2, tiles, tiles_kept, patches, patches_reached}}`` for each size class and
        ``all``.
    """
    g = open_store(store)
    try:
        level0_mpp = float(g.attrs["mpp"])
        grid = g.attrs["grid"]
        t = float(grid["tile_level0"])
        n_rows, n_cols = int(grid["n_rows"]), int(grid["n_cols"])
        coords = np.asarray(g["tiles/coords"][:], np.int64)
        rc = np.asarray(g["tiles/grid"][:], np.int64)
        kept = np.asarray(g["triage/kept"][:], bool)
        tile_index = np.asarray(g["vit/tile_index"][:], np.int64)
        reached_last = np.asarray(g["vit/kept_tokens"][:], bool)
    except KeyError as exc:
        raise StoreError(f"store lacks {exc}", store) from None
    n_p = reached_last.shape[2]
    gp = math.isqrt(n_p)
    if gp * gp != n_p:
        raise StoreError(f"vit/kept_tokens has {n_p} patches per tile, not a square grid", store)
    reached_last = reached_last[:, -1]
    les = lesions_from_annotations(annotations, level0_mpp, mask_mpp)
    n_les = len(les.size_class)
    n = len(coords)
    tile_of = np.full((n_rows + 1, n_cols + 1), -1, np.int64)  # last row/col: off the grid
    tile_of[rc[:, 0], rc[:, 1]] = np.arange(n)
    px = np.zeros((3, n_les + 1))  # lesion px area (µm²): all, in tissue tiles, in kept tiles
    pairs = []  # lesion id * (n + 1) + tile index, for every (lesion, tissue tile) overlap
    for reg in les.regions:
        h, w = reg.labels.shape
        a_px = (reg.scale * level0_mpp) ** 2
        cx = reg.origin[0] + (np.arange(w) + 0.5) * reg.scale
        tc = np.minimum(np.floor(cx / t).astype(np.int64), n_cols)
        for r0 in range(0, h, _STRIP):
            cy = reg.origin[1] + (np.arange(r0, min(h, r0 + _STRIP)) + 0.5) * reg.scale
            tr = np.minimum(np.floor(cy / t).astype(np.int64), n_rows)
            lab = reg.labels[r0:r0 + _STRIP]
            tid = tile_of[tr[:, None], tc[None, :]]
            tissue = (lab > 0) & (tid >= 0)
            in_kept = tissue.copy()
            in_kept[tissue] = kept[tid[tissue]]
            for i, sel in enumerate((lab > 0, tissue, in_kept)):
                px[i] += np.bincount(lab[sel], minlength=n_les + 1) * a_px
            pairs.append(np.unique(lab[tissue].astype(np.int64) * (n + 1) + tid[tissue]))
    pair = np.unique(np.concatenate(pairs)) if pairs else np.zeros(0, np.int64)
    p_les, p_tile = pair // (n + 1), pair % (n + 1)
    counts = _empty_counts()
    cls_of = np.array(("",) + les.size_class)
    for c in (*SIZE_CLASSES, "all"):
        ids = np.arange(1, n_les + 1) if c == "all" else np.flatnonzero(cls_of == c)
        v = counts[c]
        tiles = np.unique(p_tile[np.isin(p_les, ids)])
        kept_pairs = np.isin(p_les, ids) & kept[p_tile]
        v.update(lesions=len(ids), lesions_with_kept_tile=len(np.unique(p_les[kept_pairs])),
                 area_um2=float(px[0, ids].sum()), area_in_tissue_um2=float(px[1, ids].sum()),
                 area_kept_um2=float(px[2, ids].sum()), tiles=len(tiles),
                 tiles_kept=int(kept[tiles].sum()))
    # token recall: sample points of every patch of every tissue tile that touches a lesion
    s = PATCH_SAMPLES
    side = max(1, round(t))  # a tile is read as round(tile_level0) level-0 px (tiling.py)
    off = (np.arange(gp * s) + 0.5) * side / (gp * s)
    k_of = {int(i): k for k, i in enumerate(tile_index)}
    for i in np.unique(p_tile):
        x, y = coords[i]
        xx, yy = np.meshgrid(x + off, y + off)
        lab = les.lookup(np.stack([xx.ravel(), yy.ravel()], 1))
        lab = lab.reshape(gp, s, gp, s).transpose(0, 2, 1, 3).reshape(n_p, s * s)
        inside = (lab > 0).sum(1) > s * s / 2
        if not inside.any():
            continue
        u = np.unique(lab[lab > 0])
        major = u[np.argmax([(lab == v).sum(1) for v in u], axis=0)]
        reached = reached_last[k_of[int(i)]] if int(i) in k_of else np.zeros(n_p, bool)
        for c in SIZE_CLASSES:
            sel = inside & (cls_of[major] == c)
            counts[c]["patches"] += int(sel.sum())
            counts[c]["patches_reached"] += int((sel & reached).sum())
        counts["all"]["patches"] += int(inside.sum())
        counts["all"]["patches_reached"] += int((inside & reached).sum())
    return counts
