"""Fidelity: agreement of a pruned run with a dense run of the same slides, and what each
spent (:func:`compare_runs`, ``wsi-prune evaluate --compare DENSE PRUNED``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from wsi_prune.errors import EvaluationError, StoreError
from wsi_prune.evaluation.plots import froc_png, roc_png
from wsi_prune.evaluation.report import _compare_report, _jsonable, _write
from wsi_prune.evaluation.runs import (
    _cost,
    _evaluate,
    _float,
    _load_labels,
    _ok_rows,
    _RunEval,
    run_labels,
)
from wsi_prune.evaluation.slide_metrics import _bootstrap_aucs
from wsi_prune.io.annotations import CAMELYON16_MASK_MPP
from wsi_prune.io.store import open_store

_logger = logging.getLogger(__name__)


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None  # undefined: scipy would warn and return nan
    return float(spearmanr(a, b).statistic)


def _heat(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tile heat (N,), source (N,), coords key (N,)) of a complete slide store."""
    g = open_store(path)
    try:
        heat = np.asarray(g["heatmap/tile"][:], np.float64)
        src = np.asarray(g["heatmap/source"][:])
        xy = np.asarray(g["tiles/coords"][:], np.int64)
    except KeyError as exc:
        raise StoreError(f"store lacks {exc}", path) from None
    return heat, src, (xy[:, 0] << 32) | xy[:, 1]


def _heatmap_agreement(dense: Path, pruned: Path, ids: Sequence[str]) -> dict[str, Any]:
    """Tile-heat Spearman per slide, on tiles both runs scored with the ViT and on all tiles."""
    per, pooled = {}, {"vit": ([], []), "all": ([], [])}
    for sid in ids:
        try:
            hd, sd, kd = _heat(dense / f"{sid}.zarr")
            hp, sp, kp = _heat(pruned / f"{sid}.zarr")
        except StoreError as exc:
            _logger.warning("%s", exc)
            per[sid] = {"error": exc.one_line()}
            continue
        _, i, j = np.intersect1d(kd, kp, assume_unique=True, return_indices=True)
        vit = (sd[i] == 1) & (sp[j] == 1)
        per[sid] = {"tiles": len(i), "tiles_vit_both": int(vit.sum()),
                    "spearman_vit": _spearman(hd[i][vit], hp[j][vit]),
                    "spearman_all": _spearman(hd[i], hp[j])}  # fmt: skip
        for key, sel in (("vit", vit), ("all", slice(None))):
            pooled[key][0].append(hd[i][sel])
            pooled[key][1].append(hp[j][sel])
    out: dict[str, Any] = {"per_slide": per}
    for key, (a, b) in pooled.items():
        vals = [v[f"spearman_{key}"] for v in per.values() if v.get(f"spearman_{key}") is not None]
        out[key] = {"mean": float(np.mean(vals)) if vals else None,
                    "min": float(np.min(vals)) if vals else None, "slides": len(vals),
                    "pooled": _spearman(np.concatenate(a), np.concatenate(b)) if a else None}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare_runs(dense_dir: str | os.PathLike[str], pruned_dir: str | os.PathLike[str],
                 out: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None,
                 annotations_dir: str | os.PathLike[str] | None = None, *,
                 threshold: float = 0.5, n_boot: int = 1000, seed: int = 0,
                 mask_mpp: float = CAMELYON16_MASK_MPP) -> dict[str, Any]:
    """How closely a pruned run follows a dense run of the same slides, and at what cost.

    Compares the slides that succeeded in both: slide probabilities (max/mean absolute
    difference, agreement of the labels at ``threshold``), tile heatmaps (Spearman on tiles
    matched by level-0 coords, over tiles both runs scored with the ViT, ``source == 1``, and
    over all tiles), tokens, GMACs and seconds spent, and with labels/annotations the AUC (with
    a paired bootstrap CI of the difference) and FROC of each. Writes ``report.md``,
    ``metrics.json`` and plots to ``out``.
    """
    dense, pruned, out = Path(dense_dir), Path(pruned_dir), Path(out)
    ok_d, _ = _ok_rows(dense)
    ok_p, _ = _ok_rows(pruned)
    ids = sorted(set(ok_d) & set(ok_p))
    if not ids:
        raise EvaluationError(f"the runs share no successful slide (dense run: {dense})", pruned)
    pd_ = np.array([_float(ok_d[i], "probability") for i in ids])
    pp = np.array([_float(ok_p[i], "probability") for i in ids])
    diff = np.abs(pd_ - pp)
    same = (pd_ >= threshold) == (pp >= threshold)
    cost = {"dense": _cost({i: ok_d[i] for i in ids}), "pruned": _cost({i: ok_p[i] for i in ids})}
    cd, cp = cost["dense"], cost["pruned"]
    metrics: dict[str, Any] = {
        "dense": str(dense), "pruned": str(pruned), "n_slides": len(ids),
        "only_dense": sorted(set(ok_d) - set(ok_p)), "only_pruned": sorted(set(ok_p) - set(ok_d)),
        "probability": {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                        "label_agreement": float(same.mean()), "threshold": threshold,
                        "disagreeing": [i for i, s in zip(ids, same, strict=True) if not s]},
        "heatmap": _heatmap_agreement(dense, pruned, ids),
        "cost": cost | {"gmacs_ratio": _ratio(cd["gmacs"], cp["gmacs"]),
                        "token_ratio": _ratio(cd["token_fraction_mean"],
                                              cp["token_fraction_mean"]),
                        "speedup": _ratio(cd["seconds"], cp["seconds"])},
    }  # fmt: skip
    labels = _load_labels(labels_csv)
    ann = None if annotations_dir is None else Path(annotations_dir)
    evs = {}
    out.mkdir(parents=True, exist_ok=True)
    if labels is not None or ann is not None:
        evs = {name: _evaluate(d, labels, ann, set(ids), threshold, n_boot, seed, mask_mpp)
               for name, d in (("dense", dense), ("pruned", pruned))}  # fmt: skip
        metrics["evaluation"] = {k: {"slide_level": v.metrics["slide_level"],
                                     "froc": v.metrics["froc"]} for k, v in evs.items()}
        metrics["difference"] = _differences(evs, labels, ok_d, ok_p, ids, n_boot, seed)
        if labels is not None:
            roc_png(out / "roc.png", {k: v.slide for k, v in evs.items()})
        if ann is not None:
            froc_png(out / "froc.png", {k: v.froc for k, v in evs.items()})
    _write(out / "metrics.json", json.dumps(_jsonable(metrics), indent=2))
    _write(out / "report.md", _compare_report(metrics, bool(evs) and labels is not None,
                                              bool(evs) and ann is not None))  # fmt: skip
    return metrics


def _differences(evs: Mapping[str, _RunEval], labels: Mapping[str, int] | None,
                 ok_d: Mapping, ok_p: Mapping, ids: Sequence[str], n_boot: int, seed: int
                 ) -> dict[str, Any]:
    """Pruned minus dense: AUC (paired bootstrap 95 % CI) and FROC."""
    d, p = evs["dense"], evs["pruned"]
    res: dict[str, Any] = {"auc": None, "auc_ci": None, "froc": None, "sensitivities": None}
    if d.slide and p.slide and d.slide.auc is not None and p.slide.auc is not None:
        res["auc"] = p.slide.auc - d.slide.auc
        known = run_labels(labels, ids)
        lab = [i for i in ids if i in known]
        y = np.array([known[i] for i in lab])
        boots = _bootstrap_aucs(y, [np.array([_float(ok[i], "probability") for i in lab])
                                    for ok in (ok_d, ok_p)], n_boot, seed)  # fmt: skip
        if len(boots):
            lo, hi = np.percentile(boots[:, 1] - boots[:, 0], [2.5, 97.5])
            res["auc_ci"] = (float(lo), float(hi))
    if d.froc and p.froc and d.froc.average is not None and p.froc.average is not None:
        res["froc"] = p.froc.average - d.froc.average
        pairs = zip(d.froc.sensitivities, p.froc.sensitivities, strict=True)
        res["sensitivities"] = [b - a for a, b in pairs]
    return res
