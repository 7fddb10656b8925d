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

from wsi_prune._ids import lookup_slide
from wsi_prune.errors import EvaluationError, StoreError
from wsi_prune.evaluation.agreement import (
    HOT_FRACTION,
    heatmap_agreement,
    probability_agreement,
)
from wsi_prune.evaluation.calibration import calibration_difference
from wsi_prune.evaluation.lesion_recall import (
    LESION_MASK_MPP,
    SIZE_CLASSES,
    finish,
    rank_keep,
    slide_lesion_counts_for,
)
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
from wsi_prune.evaluation.slide_metrics import auc_difference, threshold_at_specificity
from wsi_prune.io.annotations import CAMELYON16_MASK_MPP, read_asap_xml
from wsi_prune.io.store import open_store

_logger = logging.getLogger(__name__)

#: specificity of the dense run at which the sensitivity of both runs is compared
SPECIFICITY = 0.95


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare_runs(dense_dir: str | os.PathLike[str], pruned_dir: str | os.PathLike[str],
                 out: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None,
                 annotations_dir: str | os.PathLike[str] | None = None, *,
                 threshold: float = 0.5, n_boot: int = 1000, seed: int = 0,
                 mask_mpp: float = CAMELYON16_MASK_MPP, protocol: str = "physical",
                 lesion_mask_mpp: float = LESION_MASK_MPP,
                 hot_fraction: float = HOT_FRACTION) -> dict[str, Any]:
    """How closely a pruned run follows a dense run of the same slides, and at what cost.

    Compares the slides that succeeded in both (label-free, :mod:`.agreement`): slide
    probabilities (max/mean absolute difference, agreement of the labels at ``threshold``),
    tile heat (Spearman over tiles both runs scored with the ViT and over all tissue tiles),
    the dense run's hot spots kept by the pruned triage, and tokens, GMACs and seconds spent.

    With labels: each run's AUC, calibration (Brier, ECE) and worst-case metrics, and pruned
    minus dense: ΔAUC with a paired bootstrap 95 % CI (the unpaired one beside it), Δ
    sensitivity and specificity at the dense run's 95 %-specificity threshold, ΔBrier, ΔECE.
    With annotations: each run's FROC and ΔFROC, and the pruned run's triage and token recall
    per lesion size class (:mod:`.lesion_recall`). Writes ``report.md``, ``metrics.json`` and
    plots to ``out``.
    """
    dense, pruned, out = Path(dense_dir), Path(pruned_dir), Path(out)
    ok_d, _ = _ok_rows(dense)
    ok_p, _ = _ok_rows(pruned)
    ids = sorted(set(ok_d) & set(ok_p))
    if not ids:
        raise EvaluationError(f"the runs share no successful slide (dense run: {dense})", pruned)
    prob_d = {i: _float(ok_d[i], "probability") for i in ids}
    prob_p = {i: _float(ok_p[i], "probability") for i in ids}
    cost = {"dense": _cost({i: ok_d[i] for i in ids}), "pruned": _cost({i: ok_p[i] for i in ids})}
    cd, cp = cost["dense"], cost["pruned"]
    heat, hot = heatmap_agreement(dense, pruned, ids, hot_fraction)
    metrics: dict[str, Any] = {
        "dense": str(dense), "pruned": str(pruned), "n_slides": len(ids),
        "only_dense": sorted(set(ok_d) - set(ok_p)), "only_pruned": sorted(set(ok_p) - set(ok_d)),
        "probability": probability_agreement(prob_d, prob_p, ids, threshold),
        "heatmap": heat, "hot_spots": hot,
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
        evs = {name: _evaluate(d, labels, ann, set(ids), threshold, n_boot, seed, mask_mpp,
                               protocol)
               for name, d in (("dense", dense), ("pruned", pruned))}  # fmt: skip
        metrics["evaluation"] = {k: {key: v.metrics[key] for key in ("slide_level", "calibration",
                                                                    "worst_case", "froc")}
                                 for k, v in evs.items()}  # fmt: skip
        metrics["difference"] = _differences(evs, labels, prob_d, prob_p, ids, n_boot, seed)
        if labels is not None:
            roc_png(out / "roc.png", {k: v.slide for k, v in evs.items()})
        if ann is not None:
            froc_png(out / "froc.png", {k: v.froc for k, v in evs.items()})
    if ann is not None:
        metrics["lesion_recall"] = lesion_recall(pruned, ids, ann, labels, lesion_mask_mpp,
                                                 dense_dir=dense)
    _write(out / "metrics.json", json.dumps(_jsonable(metrics), indent=2))
    _write(out / "report.md", _compare_report(metrics, bool(evs) and labels is not None,
                                              bool(evs) and ann is not None))  # fmt: skip
    return metrics


def lesion_recall(run_dir: Path, ids: Sequence[str], annotations_dir: Path,
                  labels: Mapping[str, int] | None, mask_mpp: float = LESION_MASK_MPP,
                  dense_dir: Path | None = None) -> dict[str, Any]:
    """Triage and token recall of a run's slides ``ids`` that have an annotation XML, pooled
    over slides (counts summed, then divided) and per slide.

    With ``dense_dir`` (a dense run of the same slides), also the triage recall of a
    reference selection: on each slide, as many tiles as the run's triage kept, ranked by the
    dense run's tile heat. It says how much of the lesions the dense model's own ranking
    would keep at the same budget, which no triage that imitates the dense model can beat.

    Returns:
        ``triage[class]`` and ``tokens[class]`` (see :func:`.lesion_recall.finish`) for each
        size class and ``all``, ``slides`` (with an XML and a readable store),
        ``slides_with_lesions``, ``per_slide[id]`` (the same, or ``error``),
        ``tumour_slides_without_xml``, ``lesion_mask_mpp``; with ``dense_dir``,
        ``triage_dense_rank[class]`` (None when no slide could be ranked) and
        ``dense_rank_slides``.
    """
    xmls = {p.stem: p for p in sorted(annotations_dir.glob("*.xml")) if p.is_file()}
    known = run_labels(labels, ids) if labels is not None else {}
    total = ref_total = None
    per, missing, n_les, n_ref = {}, [], 0, 0
    for sid in ids:
        xml = lookup_slide(xmls, sid)
        if xml is None:
            if known.get(sid) == 1:
                missing.append(sid)
            continue
        store = run_dir / f"{sid}.zarr"
        selections: list[np.ndarray | None] = [None]  # the run's own triage
        if dense_dir is not None:
            try:
                selections.append(_dense_rank_keep(dense_dir / f"{sid}.zarr", store))
            except StoreError as exc:
                _logger.warning("no dense-ranking reference: %s", exc)
        try:
            annotations = read_asap_xml(xml)
            counts, *ref = slide_lesion_counts_for(store, annotations, selections, mask_mpp)
        except StoreError as exc:
            _logger.warning("%s", exc)
            per[sid] = {"error": exc.one_line()}
            continue
        per[sid] = finish(counts)
        n_les += counts["all"]["lesions"] > 0
        total = _add_counts(total, counts)
        if ref:
            ref_total = _add_counts(ref_total, ref[0])
            n_ref += 1
    if missing:
        _logger.warning("%d tumour slides have no annotation XML in %s: left out of the lesion "
                        "recall", len(missing), annotations_dir)  # fmt: skip
    res = finish(total) if total is not None else {"triage": None, "tokens": None}
    if dense_dir is not None:
        res["triage_dense_rank"] = None if ref_total is None else finish(ref_total)["triage"]
        res["dense_rank_slides"] = n_ref
    return res | {"slides": sum("error" not in v for v in per.values()),
                  "slides_with_lesions": n_les, "size_classes": list(SIZE_CLASSES),
                  "per_slide": per, "tumour_slides_without_xml": missing,
                  "lesion_mask_mpp": mask_mpp}  # fmt: skip


def _add_counts(total: dict[str, dict[str, Any]] | None, counts: dict[str, dict[str, Any]]
                ) -> dict[str, dict[str, Any]]:
    if total is None:
        return counts
    for c, v in counts.items():
        for k in v:
            total[c][k] += v[k]
    return total


def _dense_rank_keep(dense_store: Path, store: Path) -> np.ndarray:
    """(N,) bool: as many tiles as ``store``'s triage kept, the highest of ``dense_store``'s
    tile heat (``heatmap/tile``; the two stores must hold the same tiles)."""
    try:
        d, g = open_store(dense_store), open_store(store)
        heat = np.asarray(d["heatmap/tile"][:], np.float64)
        n_kept = int(np.count_nonzero(g["triage/kept"][:]))
        same = d.attrs.get("tile_hash") == g.attrs.get("tile_hash")
    except KeyError as exc:
        raise StoreError(f"store lacks {exc}", dense_store) from None
    if not same or heat.shape[0] != g["tiles/coords"].shape[0]:
        raise StoreError(f"its tiles are not those of {store}", dense_store)
    return rank_keep(heat, n_kept)


def _at_specificity(y: np.ndarray, pd_: np.ndarray, pp: np.ndarray) -> dict[str, Any] | None:
    """Sensitivity and specificity of both runs at the dense run's 95 %-specificity threshold
    (the threshold a deployment calibrated on the dense model would use)."""
    t = threshold_at_specificity(pd_[y == 0], SPECIFICITY)
    if t is None or not (y == 1).any():
        return None
    sens = [float((p[y == 1] >= t).mean()) for p in (pd_, pp)]
    spec = [float((p[y == 0] < t).mean()) for p in (pd_, pp)]
    return {"specificity_target": SPECIFICITY, "threshold": t, "n_pos": int((y == 1).sum()),
            "n_neg": int((y == 0).sum()), "sensitivity_dense": sens[0],
            "sensitivity_pruned": sens[1], "specificity_dense": spec[0],
            "specificity_pruned": spec[1], "delta_sensitivity": sens[1] - sens[0],
            "delta_specificity": spec[1] - spec[0]}  # fmt: skip


def _differences(evs: Mapping[str, _RunEval], labels: Mapping[str, int] | None,
                 prob_d: Mapping[str, float], prob_p: Mapping[str, float], ids: Sequence[str],
                 n_boot: int, seed: int) -> dict[str, Any]:
    """Pruned minus dense on the slides ok in both: AUC, Brier and ECE (paired bootstrap 95 %
    CIs), FROC, sensitivity at the dense run's 95 % specificity; and AUC in the worst case."""
    d, p = evs["dense"], evs["pruned"]
    res: dict[str, Any] = {"n_slides": None, "auc": None, "auc_ci": None, "auc_ci_unpaired": None,
                           "n_boot": 0, "brier": None, "brier_ci": None, "ece": None,
                           "ece_ci": None, "at_95_specificity": None,
                           "auc_worst_case": None, "froc": None,
                           "sensitivities": None}  # fmt: skip
    if labels is not None:
        known = run_labels(labels, ids)
        lab = [i for i in ids if i in known]
        y = np.array([known[i] for i in lab])
        pd_ = np.array([prob_d[i] for i in lab])
        pp = np.array([prob_p[i] for i in lab])
        ad = auc_difference(y, pd_, pp, n_boot, seed)
        res.update(n_slides=len(lab), auc=ad["delta"], auc_ci=ad["ci"],
                   auc_ci_unpaired=ad["ci_unpaired"], n_boot=ad["n_boot"],
                   at_95_specificity=_at_specificity(y, pd_, pp))
        cal = (d.metrics["calibration"], p.metrics["calibration"])
        res["brier"] = cal[1]["brier"] - cal[0]["brier"]
        res["ece"] = cal[1]["ece"] - cal[0]["ece"]
        cd = calibration_difference(y, pd_, pp, n_boot, seed)
        res.update(brier_ci=cd["brier_ci"], ece_ci=cd["ece_ci"])
        wd, wp = (e.metrics["worst_case"]["slide_level"]["auc"] for e in (d, p))
        res["auc_worst_case"] = wp - wd if wd is not None and wp is not None else None
    if d.froc and p.froc and d.froc.average is not None and p.froc.average is not None:
        res["froc"] = p.froc.average - d.froc.average
        pairs = zip(d.froc.sensitivities, p.froc.sensitivities, strict=True)
        res["sensitivities"] = [b - a for a, b in pairs]
    return res
