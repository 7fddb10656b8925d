"""What pruning kept of the lesions: triage recall (lesion area and lesion tiles that the CNN
triage sent to the ViT) and token recall (lesion patches that reached the last ViT block), per
lesion size class, from a run's slide store and the ASAP lesion outlines.

Lesions are the 8-connected components of the lesion mask (positive groups minus exclusion
groups; a pixel is in a polygon when its centre is, as in
:func:`wsi_prune.io.annotations.region_masks`) drawn at ``mask_mpp`` (default 2 µm/px,
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
  is the size class holding most of its sample points.
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
from wsi_prune.io.annotations import Annotation, size_class
from wsi_prune.io.store import open_store
from wsi_prune.selection.tiles import _rank

SIZE_CLASSES = ("itc", "micro", "macro")
LESION_MASK_MPP = 2.0  # µm/px of the lesion masks
MAX_REGION_PX = 6144  # longest side of one cluster's mask, px
PATCH_SAMPLES = 4  # sample points per patch side for "mostly inside a lesion"
_STRIP = 512  # mask rows per pass when matching lesion px to tiles (bounds temporaries)


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


def _fill(mask: np.ndarray, xy: np.ndarray) -> None:
    """Set the pixels of ``mask`` whose centre lies inside the polygon ``xy`` ((K, 2) x, y in
    mask px, even-odd rule), row by row from the edge crossings of each row's centre line.

    The pixel-centre rule of :func:`wsi_prune.io.annotations.region_masks`, without its cost:
    skimage tests every pixel of the bounding box against every vertex (O(H W K) time and
    O(H W) index arrays), where a 10 mm lesion at 2 µm/px is 25 M pixels.
    """
    h, w = mask.shape
    x1, y1 = xy[:, 0], xy[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    flat = y1 == y2  # never crossed by a row's centre line under the half-open rule below
    slope = np.where(flat, 0.0, (x2 - x1) / np.where(flat, 1.0, y2 - y1))
    r_lo = max(0, math.floor(y1.min() - 0.5))
    r_hi = min(h, math.ceil(y1.max() + 0.5))
    for r0 in range(r_lo, r_hi, 256):
        yc = (np.arange(r0, min(r_hi, r0 + 256)) + 0.5)[:, None]
        # half-open in y, so a vertex on the line is crossed once
        cross = ((y1 <= yc) & (yc < y2)) | ((y2 <= yc) & (yc < y1))
        xi = np.where(cross, x1 + (yc - y1) * slope, np.inf)
        xi.sort(axis=1)
        xi = xi[:, : int(cross.sum(1).max(initial=0))]
        a, b = xi[:, 0::2], xi[:, 1::2]  # inside between each pair of crossings
        ok = np.isfinite(a) & np.isfinite(b)
        rows = np.broadcast_to(np.arange(len(yc))[:, None], a.shape)[ok]
        # pixel c is inside when a < c + 0.5 < b
        start = np.clip(np.floor(a[ok] - 0.5) + 1, 0, w).astype(np.int64)
        stop = np.clip(np.ceil(b[ok] - 0.5), 0, w).astype(np.int64)
        diff = np.zeros((len(yc), w + 1), np.int32)
        np.add.at(diff, (rows, start), 1)
        np.add.at(diff, (rows, np.maximum(start, stop)), -1)
        mask[r0:r0 + len(yc)] |= np.cumsum(diff[:, :w], axis=1) % 2 == 1


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
        lesion = np.zeros((r1 - r0, c1 - c0), bool)
        for a in mine:
            _fill(lesion, a.coords / scale - (c0, r0))
        if cut:
            excluded = np.zeros_like(lesion)
            for a in cut:
                _fill(excluded, a.coords / scale - (c0, r0))
            lesion &= ~excluded
        labels, n = ndi.label(lesion, structure=np.ones((3, 3), bool), output=np.int32)
        del lesion
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


def rank_keep(scores: np.ndarray, n: int) -> np.ndarray:
    """(N,) bool: the ``n`` tiles of highest ``scores``, ranked as the triage ranks them
    (:func:`wsi_prune.selection.tiles._rank`: ties by index), NaN lowest."""
    s = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    keep = np.zeros(s.size, bool)
    keep[_rank(s)[:max(0, n)]] = True
    return keep


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
                        mask_mpp: float = LESION_MASK_MPP, kept: np.ndarray | None = None
                        ) -> dict[str, dict[str, Any]]:
    """Summable counts behind the triage and token recall of one slide (see the module
    docstring; :func:`finish` turns them into recalls).

    Args:
        store: a complete slide store (``tiles/coords``, ``tiles/grid``, ``triage/kept``,
            ``vit/tile_index``, ``vit/kept_tokens``; attrs ``mpp``, ``grid``).
        annotations: the slide's lesion outlines, level-0 px.
        kept: (N,) bool tiles to count as kept instead of the store's ``triage/kept`` (a
            reference selection, e.g. :func:`rank_keep` of another run's tile heat); the token
            recall stays the store's.

    Returns:
        ``{class: {lesions, lesions_with_kept_tile, area_um2, area_in_tissue_um2,
        area_kept_um2, tiles, tiles_kept, patches, patches_reached}}`` for each size class and
        ``all``.
    """
    return slide_lesion_counts_for(store, annotations, [kept], mask_mpp)[0]


def slide_lesion_counts_for(store: str | Path, annotations: Sequence[Annotation],
                            selections: Sequence[np.ndarray | None],
                            mask_mpp: float = LESION_MASK_MPP) -> list[dict[str, dict[str, Any]]]:
    """:func:`slide_lesion_counts` for several tile selections of one store, in one pass (the
    lesion masks are drawn and the patches voted once).

    Args:
        selections: each an (N,) bool selection, or None for the store's ``triage/kept``.

    Returns:
        One counts dict per selection, in order; they differ only in the kept counts.

    Raises:
        StoreError: the store lacks an array, or a selection is not (N,).
    """
    g = open_store(store)
    try:
        level0_mpp = float(g.attrs["mpp"])
        grid = g.attrs["grid"]
        t = float(grid["tile_level0"])
        n_rows, n_cols = int(grid["n_rows"]), int(grid["n_cols"])
        coords = np.asarray(g["tiles/coords"][:], np.int64)
        rc = np.asarray(g["tiles/grid"][:], np.int64)
        stored = np.asarray(g["triage/kept"][:], bool)
        tile_index = np.asarray(g["vit/tile_index"][:], np.int64)
        reached_last = np.asarray(g["vit/kept_tokens"][:], bool)
    except KeyError as exc:
        raise StoreError(f"store lacks {exc}", store) from None
    sels = []
    for kept in selections:
        kept = stored if kept is None else np.asarray(kept, bool)
        if kept.shape != stored.shape:
            raise StoreError(f"a reference selection of {kept.shape[0]} tiles for a store of "
                             f"{stored.shape[0]} tissue tiles", store)
        sels.append(kept)
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
    px = np.zeros((2, n_les + 1))  # lesion px area (µm²): all, in tissue tiles
    px_kept = np.zeros((len(sels), n_les + 1))  # ... in each selection's kept tiles
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
            for i, sel in enumerate((lab > 0, tissue)):
                px[i] += np.bincount(lab[sel], minlength=n_les + 1) * a_px
            lab_t, tid_t = lab[tissue], tid[tissue]
            for i, kept in enumerate(sels):
                px_kept[i] += np.bincount(lab_t[kept[tid_t]], minlength=n_les + 1) * a_px
            pairs.append(np.unique(lab[tissue].astype(np.int64) * (n + 1) + tid[tissue]))
    pair = np.unique(np.concatenate(pairs)) if pairs else np.zeros(0, np.int64)
    p_les, p_tile = pair // (n + 1), pair % (n + 1)
    out = [_empty_counts() for _ in sels]
    cls_of = np.array(("",) + les.size_class)
    for c in (*SIZE_CLASSES, "all"):
        ids = np.arange(1, n_les + 1) if c == "all" else np.flatnonzero(cls_of == c)
        of_class = np.isin(p_les, ids)
        tiles = np.unique(p_tile[of_class])
        for counts, kept, pk in zip(out, sels, px_kept, strict=True):
            kept_pairs = of_class & kept[p_tile]
            counts[c].update(
                lesions=len(ids), lesions_with_kept_tile=len(np.unique(p_les[kept_pairs])),
                area_um2=float(px[0, ids].sum()), area_in_tissue_um2=float(px[1, ids].sum()),
                area_kept_um2=float(pk[ids].sum()), tiles=len(tiles),
                tiles_kept=int(kept[tiles].sum()))
    # token recall: class votes of 4 x 4 sample points per patch, over every tissue tile that
    # holds lesion px, region by region (a tile may straddle two; their px never overlap)
    s = PATCH_SAMPLES
    side = max(1, round(t))  # a tile is read as round(tile_level0) level-0 px (tiling.py)
    off = (np.arange(gp * s) + 0.5) * side / (gp * s)
    class_of = np.zeros(n_les + 1, np.int8)  # 0 none, 1 + index in SIZE_CLASSES
    class_of[1:] = [1 + SIZE_CLASSES.index(c) for c in les.size_class]
    touched = np.unique(p_tile)
    votes = np.zeros((len(touched), n_p, len(SIZE_CLASSES) + 1), np.int16)
    for reg in les.regions:
        h, w = reg.labels.shape
        x0, y0 = reg.origin
        x1, y1 = x0 + w * reg.scale, y0 + h * reg.scale
        xy = coords[touched]
        near = np.flatnonzero((xy[:, 0] < x1) & (xy[:, 0] + side > x0) & (xy[:, 1] < y1)
                              & (xy[:, 1] + side > y0))  # fmt: skip
        for b0 in range(0, len(near), 64):
            idx = near[b0:b0 + 64]
            c = np.floor((xy[idx, 0, None] + off - x0) / reg.scale).astype(np.int64)
            r = np.floor((xy[idx, 1, None] + off - y0) / reg.scale).astype(np.int64)
            inside = ((r >= 0) & (r < h))[:, :, None] & ((c >= 0) & (c < w))[:, None, :]
            lab = reg.labels[np.clip(r, 0, h - 1)[:, :, None], np.clip(c, 0, w - 1)[:, None, :]]
            cls = np.where(inside, class_of[lab], 0)  # (B, G*s rows, G*s cols)
            cls = cls.reshape(len(idx), gp, s, gp, s).transpose(0, 1, 3, 2, 4)
            cls = cls.reshape(len(idx), n_p, s * s)
            for k in range(1, len(SIZE_CLASSES) + 1):
                votes[idx, :, k] += (cls == k).sum(-1, dtype=np.int16)
    n_in = votes[:, :, 1:].sum(-1)
    lesion_patch = n_in > s * s / 2  # mostly inside a lesion
    patch_class = votes[:, :, 1:].argmax(-1)  # the class holding most sample points
    k_of = np.full(n, -1, np.int64)
    k_of[tile_index] = np.arange(len(tile_index))
    reached = np.zeros((len(touched), n_p), bool)
    has = k_of[touched] >= 0
    reached[has] = reached_last[k_of[touched][has]]
    sels_by_class = {c: lesion_patch & (patch_class == j) for j, c in enumerate(SIZE_CLASSES)}
    sels_by_class["all"] = lesion_patch
    for c, sel in sels_by_class.items():
        tokens = {"patches": int(sel.sum()), "patches_reached": int((sel & reached).sum())}
        for counts in out:  # the token recall is the store's, whatever the selection
            counts[c].update(tokens)
    return out
