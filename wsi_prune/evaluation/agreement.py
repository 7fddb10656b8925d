"""Label-free agreement of a pruned run with a dense run of the same slides: what
``evaluate --compare`` and ``run --audit-fraction`` (:mod:`wsi_prune.evaluation.audit`) report
when no one has labelled the slides.

- slide probabilities: largest and mean absolute difference, agreement of the labels at the
  threshold;
- tile heat: Spearman rank correlation per slide (and pooled) over the tiles both runs scored
  with the ViT (``heatmap/source == 1`` in both) and over **all** tissue tiles, where the pruned
  heat of a dropped tile is its CNN fill (``wsi_prune.outputs.heat.tile_heat``); tiles are
  matched by level-0 coordinates;
- hot spots: the share of the dense run's hottest tiles (top ``hot_fraction``, default 5 %, at
  least one per slide) that the pruned run's triage kept (``triage/kept``): the triage recall of
  what the dense model looked at.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from wsi_prune.errors import StoreError
from wsi_prune.io.store import open_store

_logger = logging.getLogger(__name__)

#: share of a slide's tissue tiles, by dense heat, that are its hot spots
HOT_FRACTION = 0.05


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None  # undefined: scipy would warn and return nan
    return float(spearmanr(a, b).statistic)


def _heat(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tile heat (N,) float64, ViT-scored (N,) bool, kept by triage (N,) bool, coords key
    (N,) int64) of a complete slide store."""
    g = open_store(path)
    try:
        heat = np.asarray(g["heatmap/tile"][:], np.float64)
        vit = np.asarray(g["heatmap/source"][:]) == 1
        xy = np.asarray(g["tiles/coords"][:], np.int64)
    except KeyError as exc:
        raise StoreError(f"store lacks {exc}", path) from None
    # heatmap/source == 1 is exactly the kept tiles (tile_heat); triage/kept says it first-hand
    kept = np.asarray(g["triage/kept"][:], bool) if "triage/kept" in g else vit
    return heat, vit, kept, tile_keys(xy)


def tile_keys(xy: np.ndarray) -> np.ndarray:
    """(N,) int64 keys of (N, 2) level-0 tile corners (x, y): equal keys, same tile, so two
    runs' stores of one slide can be matched with ``np.intersect1d``."""
    xy = np.asarray(xy, np.int64)
    return (xy[:, 0] << 32) | xy[:, 1]


def _stats(vals: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(vals, np.float64)
    if not len(v):
        return {"mean": None, "median": None, "min": None, "max": None, "slides": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()),
            "max": float(v.max()), "slides": len(v)}  # fmt: skip


def heatmap_agreement(dense: Path, pruned: Path, ids: Sequence[str],
                      hot_fraction: float = HOT_FRACTION) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tile-heat Spearman and hot-spot recall per slide and pooled.

    Returns:
        ``(heatmap, hot_spots)``. ``heatmap``: ``per_slide[id]`` (``tiles`` matched,
        ``tiles_vit_both``, ``spearman_vit``, ``spearman_all``, or ``error``) and for ``vit``
        and ``all`` the mean, median, min, max over slides, ``slides``, ``tiles`` (pooled) and
        ``pooled`` (one Spearman over the tiles of every slide). ``hot_spots``:
        ``per_slide[id]`` (``hot`` tiles, ``kept``, ``recall``), ``hot_fraction``, ``hot``,
        ``kept``, ``recall`` (pooled: kept / hot) and the per-slide statistics.
    """
    per, hot_per = {}, {}
    pooled: dict[str, tuple[list, list]] = {"vit": ([], []), "all": ([], [])}
    for sid in ids:
        try:
            hd, vd, _, kd = _heat(dense / f"{sid}.zarr")
            hp, vp, keptp, kp = _heat(pruned / f"{sid}.zarr")
        except StoreError as exc:
            _logger.warning("%s", exc)
            per[sid] = hot_per[sid] = {"error": exc.one_line()}
            continue
        _, i, j = np.intersect1d(kd, kp, assume_unique=True, return_indices=True)
        vit = vd[i] & vp[j]
        per[sid] = {"tiles": len(i), "tiles_vit_both": int(vit.sum()),
                    "spearman_vit": _spearman(hd[i][vit], hp[j][vit]),
                    "spearman_all": _spearman(hd[i], hp[j])}  # fmt: skip
        for key, sel in (("vit", vit), ("all", slice(None))):
            pooled[key][0].append(hd[i][sel])
            pooled[key][1].append(hp[j][sel])
        n_hot = max(1, math.ceil(hot_fraction * len(i) - 1e-9)) if len(i) else 0
        top = np.argsort(-hd[i], kind="stable")[:n_hot]
        kept = int(keptp[j][top].sum())
        hot_per[sid] = {"hot": n_hot, "kept": kept, "recall": kept / n_hot if n_hot else None}
    heat: dict[str, Any] = {"per_slide": per}
    for key, (a, b) in pooled.items():
        vals = [v[f"spearman_{key}"] for v in per.values() if v.get(f"spearman_{key}") is not None]
        heat[key] = _stats(vals) | {
            "tiles": int(sum(len(x) for x in a)),
            "pooled": _spearman(np.concatenate(a), np.concatenate(b)) if a else None}
    ok = [v for v in hot_per.values() if v.get("recall") is not None]
    n_hot, n_kept = sum(v["hot"] for v in ok), sum(v["kept"] for v in ok)
    hot = {"per_slide": hot_per, "hot_fraction": hot_fraction, "hot": n_hot, "kept": n_kept,
           "recall": n_kept / n_hot if n_hot else None,
           "per_slide_stats": _stats([v["recall"] for v in ok])}  # fmt: skip
    return heat, hot


def probability_agreement(dense: Mapping[str, float], pruned: Mapping[str, float],
                          ids: Sequence[str], threshold: float) -> dict[str, Any]:
    """Slide probabilities of the two runs on ``ids``: max and mean absolute difference, share
    of slides called the same at ``threshold`` (``p >= threshold`` is tumour) and the slides
    called differently."""
    pd_ = np.array([dense[i] for i in ids], np.float64)
    pp = np.array([pruned[i] for i in ids], np.float64)
    diff = np.abs(pd_ - pp)
    same = (pd_ >= threshold) == (pp >= threshold)
    return {"n": len(ids), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "label_agreement": float(same.mean()), "threshold": threshold,
            "disagreeing": [i for i, s in zip(ids, same, strict=True) if not s]}  # fmt: skip
