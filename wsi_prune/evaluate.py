"""Evaluation of runs the way CAMELYON16 measured them, and pruned-versus-dense fidelity.

* Slide level (:func:`slide_metrics`): ROC AUC with a percentile-bootstrap 95 % CI, and
  accuracy, sensitivity and specificity at a threshold (scikit-learn).
* Lesion level (:func:`froc`): the FROC of the CAMELYON16 evaluation script
  (``Evaluation_FROC.py``), from each slide's ``candidates.csv`` (confidence, X, Y level-0 px):

  1. the lesion mask (positive groups minus exclusion groups) is drawn at ``mask_mpp``
     (7.776 µm/px, level 5 of the 0.243 µm/px CAMELYON16 scans), every pixel closer than
     ``margin_um / 2`` = 37.5 µm to a lesion joins it (the script's "75 µm, the size of five
     tumour cells", applied as a distance threshold of half that), holes are filled and
     8-connected components are the lesions (so lesions closer than 75 µm merge);
  2. a lesion is an isolated tumour cell cluster (ITC) when the major axis of that dilated
     component is shorter than ``itc_um + margin_um`` = 275 µm (200 µm before dilation);
  3. a candidate inside a lesion is a hit on it; a lesion counts once, with its highest
     candidate confidence; hits on ITCs are neither true nor false positives and ITCs are not
     counted among the lesions to find; a candidate in no lesion is a false positive;
  4. sensitivity is read off the curve at 1/4, 1/2, 1, 2, 4, 8 mean false positives per slide
     by linear interpolation, as ``np.interp`` does in the script, and averaged.

  Deviations from the script, on purpose: (a) candidates in an exclusion region (``_2``) that
  lies outside every dilated lesion are ignored instead of counted as false positives;
  (b) every distinct confidence is an operating point: the script drops its lowest threshold
  (``all_probs[1:]``) to hide undetected lesions stored as confidence 0, which also drops a
  real operating point whenever every lesion is hit; (c) lesions come from ASAP XML at the
  slide's own level-0 µm/px rather than from mask TIFFs at a fixed 0.243 µm/px, and masks are
  built only over the annotations' bounding box (plus the margin), so memory does not grow
  with slide size; (d) normal slides are those without an annotation file, not those whose
  name starts with ``Normal``.
* Fidelity (:func:`compare_runs`): agreement of a pruned run with a dense run of the same
  slides, and what each spent.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu, spearmanr
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score, roc_curve

from wsi_prune._files import write_text_atomic
from wsi_prune._ids import lookup_slide
from wsi_prune.errors import EvaluationError, StoreError
from wsi_prune.io.annotations import (
    CAMELYON16_MASK_MPP,
    ITC_UM,
    MARGIN_UM,
    Annotation,
    evaluation_mask,
    read_asap_xml,
)
from wsi_prune.io.labels import read_labels
from wsi_prune.io.store import open_store

_logger = logging.getLogger(__name__)

FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)




# -- slide level ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideMetrics:
    """Slide-level metrics; ``None`` where undefined (one class only).

    ``auc_ci`` is the percentile 95 % interval over ``n_boot`` stratified bootstrap resamples
    of the slides; ``fpr``/``tpr`` is the ROC curve.
    """

    n: int
    n_pos: int
    n_neg: int
    threshold: float
    auc: float | None
    auc_ci: tuple[float, float] | None
    n_boot: int
    accuracy: float
    sensitivity: float | None
    specificity: float | None
    tp: int
    fp: int
    tn: int
    fn: int
    fpr: tuple[float, ...] = field(repr=False)
    tpr: tuple[float, ...] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """Everything but the curve."""
        d = dataclasses.asdict(self)
        del d["fpr"], d["tpr"]
        return d


def _bootstrap_aucs(y: np.ndarray, scores: Sequence[np.ndarray], n_boot: int, seed: int
                    ) -> np.ndarray:
    """(n_boot, len(scores)) AUCs over the same resamples of the slides (paired).

    The bootstrap is stratified, as pROC's ``ci.auc`` is by default: tumour and normal slides
    are resampled separately, so every resample has both classes and the same prevalence. The
    AUC of a resample is the Mann-Whitney U of the tumour scores over n_pos * n_neg, computed
    by scipy for all resamples at once (sklearn's ``roc_auc_score`` one resample at a time
    costs seconds for 1000 resamples).
    """
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if n_boot <= 0 or len(pos) == 0 or len(neg) == 0:
        return np.zeros((0, len(scores)))
    rng = np.random.default_rng(seed)
    ip = pos[rng.integers(0, len(pos), (n_boot, len(pos)))]
    ineg = neg[rng.integers(0, len(neg), (n_boot, len(neg)))]
    aucs = [mannwhitneyu(s[ip], s[ineg], axis=1, method="asymptotic").statistic
            / (len(pos) * len(neg)) for s in scores]  # fmt: skip
    return np.stack(aucs, axis=1)


def slide_metrics(probabilities: Sequence[float], labels: Sequence[int], threshold: float = 0.5,
                  n_boot: int = 1000, seed: int = 0) -> SlideMetrics:
    """AUC with bootstrap CI and threshold metrics.

    Args:
        probabilities: (S,) slide tumour probabilities.
        labels: (S,) true labels, 0/1.
        threshold: probability at or above which a slide is called positive.
        n_boot: bootstrap resamples for the CI (0: no CI).
        seed: bootstrap seed; the same seed gives the same CI.
    """
    p = np.asarray(probabilities, np.float64)
    y = np.asarray(labels, np.int64)
    if p.shape != y.shape or p.ndim != 1 or len(p) == 0:
        raise ValueError(f"need equal-length non-empty 1-D inputs, got {p.shape} and {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    auc = ci = None
    fpr = tpr = np.zeros(0)
    boots = np.zeros((0, 1))
    if n_pos and n_neg:
        auc = float(roc_auc_score(y, p))
        fpr, tpr, _ = roc_curve(y, p)
        boots = _bootstrap_aucs(y, [p], n_boot, seed)
        if len(boots):
            lo, hi = np.percentile(boots[:, 0], [2.5, 97.5])
            ci = (float(lo), float(hi))
    return SlideMetrics(
        n=len(y), n_pos=n_pos, n_neg=n_neg, threshold=float(threshold), auc=auc, auc_ci=ci,
        n_boot=len(boots), accuracy=float(accuracy_score(y, pred)),
        sensitivity=tp / n_pos if n_pos else None, specificity=tn / n_neg if n_neg else None,
        tp=tp, fp=fp, tn=tn, fn=fn, fpr=tuple(map(float, fpr)), tpr=tuple(map(float, tpr)))


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(5, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def roc_figure(curves: SlideMetrics | Mapping[str, SlideMetrics]):
    """A matplotlib ``Figure`` of one or more ROC curves (``{name: metrics}``)."""
    if isinstance(curves, SlideMetrics):
        curves = {"run": curves}
    fig, ax = _figure("Slide-level ROC", "1 - specificity", "sensitivity")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    for name, m in curves.items():
        if m.auc is not None:
            # straight lines between roc_curve's points: a run of tied scores is one diagonal
            # segment, which a step plot would draw as a staircase
            ax.plot(m.fpr, m.tpr, label=f"{name} (AUC {m.auc:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return fig


def roc_png(path: str | os.PathLike[str], curves: SlideMetrics | Mapping[str, SlideMetrics]
            ) -> Path:
    """Draw one or more ROC curves (``{name: metrics}``) into a PNG."""
    return _save(roc_figure(curves), Path(path))


# -- lesion level (FROC) -------------------------------------------------------------------------


@dataclass(frozen=True)
class FrocResult:
    """FROC of a set of slides.

    ``sensitivities`` (one per ``fp_rates``) and ``average`` are ``None`` when no slide has a
    lesion to find. ``curve_fp``/``curve_sensitivity`` are the operating points by falling
    threshold, starting at (0, 0). ``per_slide[id]`` = lesions, itc, detected, fp, ignored.
    """

    n_slides: int
    n_lesions: int
    n_itc: int
    n_candidates: int
    n_fp: int
    n_ignored: int
    fp_rates: tuple[float, ...]
    sensitivities: tuple[float, ...] | None
    average: float | None
    curve_fp: tuple[float, ...] = field(repr=False)
    curve_sensitivity: tuple[float, ...] = field(repr=False)
    per_slide: dict[str, dict[str, int]] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """Everything but the curve and the per-slide table."""
        d = dataclasses.asdict(self)
        for k in ("curve_fp", "curve_sensitivity", "per_slide"):
            del d[k]
        return d


def _sensitivity_at(fps: np.ndarray, sens: np.ndarray, rate: float) -> float:
    """Piecewise-linear FROC at ``rate``: the best point at exactly that rate, linear between.

    ``fps`` and ``sens`` are non-decreasing. This is ``np.interp`` on the script's curve, written
    out because several points can share a false-positive rate.
    """
    j = int(np.searchsorted(fps, rate, side="right")) - 1
    if j >= len(fps) - 1 or fps[j] == rate:
        return float(sens[j])
    t = (rate - fps[j]) / (fps[j + 1] - fps[j])
    return float(sens[j] + t * (sens[j + 1] - sens[j]))


def froc(candidates: Mapping[str, np.ndarray], annotations: Mapping[str, Sequence[Annotation]],
         level0_mpp: Mapping[str, float], *, mask_mpp: float = CAMELYON16_MASK_MPP,
         margin_um: float = MARGIN_UM, itc_um: float = ITC_UM,
         fp_rates: Sequence[float] = FP_RATES) -> FrocResult:
    """CAMELYON16 FROC over the slides in ``candidates``.

    Args:
        candidates: slide id -> (M, 3) float (confidence, X, Y), X/Y in level-0 px.
        annotations: slide id -> annotations; a slide absent or without lesions is normal.
        level0_mpp: slide id -> level-0 µm/px (needed for annotated slides).
        mask_mpp, margin_um, itc_um: evaluation mask resolution (µm/px), lesion margin and ITC
            size (µm); the defaults are the challenge's.
        fp_rates: mean false positives per slide at which sensitivity is read.
    """
    if not candidates:
        raise ValueError("froc needs at least one slide")
    fp_conf, tp_conf = [], []
    per_slide: dict[str, dict[str, int]] = {}
    n_lesions = n_itc = n_cand = n_ign = 0
    for sid in sorted(candidates):
        cand = np.asarray(candidates[sid], np.float64).reshape(-1, 3)
        anns = annotations.get(sid, ())
        if anns and sid not in level0_mpp:
            raise ValueError(f"slide {sid!r} has annotations but no level-0 mpp")
        les = evaluation_mask(anns, level0_mpp.get(sid, 1.0), mask_mpp, margin_um, itc_um)
        ids, excl = les.lookup(cand[:, 1:3])
        is_itc = np.isin(ids, np.fromiter(les.itc, np.int32, len(les.itc)))
        hit = (ids > 0) & ~is_itc
        false = (ids == 0) & ~excl
        best = [cand[hit & (ids == i), 0].max() for i in np.unique(ids[hit])]
        fp_conf.append(cand[false, 0])
        tp_conf.extend(best)
        per_slide[sid] = {"lesions": les.n_lesions, "itc": len(les.itc), "detected": len(best),
                          "fp": int(false.sum()), "ignored": int((~hit & ~false).sum())}
        n_lesions += les.n_lesions
        n_itc += len(les.itc)
        n_cand += len(cand)
        n_ign += per_slide[sid]["ignored"]
    fps_c = np.sort(np.concatenate(fp_conf))
    tps_c = np.sort(np.asarray(tp_conf, np.float64))
    thresholds = np.unique(np.concatenate([fps_c, tps_c]))[::-1]
    n_slides = len(candidates)
    fps = np.concatenate([[0.0], (len(fps_c) - np.searchsorted(fps_c, thresholds)) / n_slides])
    hits = np.concatenate([[0], len(tps_c) - np.searchsorted(tps_c, thresholds)])
    sens = hits / n_lesions if n_lesions else np.zeros_like(fps)
    at = tuple(_sensitivity_at(fps, sens, r) for r in fp_rates) if n_lesions else None
    return FrocResult(
        n_slides=n_slides, n_lesions=n_lesions, n_itc=n_itc, n_candidates=n_cand,
        n_fp=len(fps_c), n_ignored=n_ign, fp_rates=tuple(map(float, fp_rates)),
        sensitivities=at, average=float(np.mean(at)) if at else None,
        curve_fp=tuple(map(float, fps)), curve_sensitivity=tuple(map(float, sens)),
        per_slide=per_slide)


def froc_png(path: str | os.PathLike[str], curves: FrocResult | Mapping[str, FrocResult]
             ) -> Path:
    """Draw one or more FROC curves (``{name: result}``) into a PNG, log FP axis."""
    if isinstance(curves, FrocResult):
        curves = {"run": curves}
    fig, ax = _figure("Lesion-level FROC (CAMELYON16)", "mean false positives per slide",
                      "lesion sensitivity")  # fmt: skip
    for name, r in curves.items():
        if r.average is not None:
            # beyond its last point the curve stays flat, as the interpolation reads it
            fp = np.append(np.maximum(r.curve_fp, 1 / 8), max(16.0, r.curve_fp[-1]))
            ax.plot(fp, np.append(r.curve_sensitivity, r.curve_sensitivity[-1]),
                    label=f"{name} (FROC {r.average:.3f})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set(xlim=(1 / 8, 16), ylim=(0, 1.01))
    for rate in FP_RATES:
        ax.axvline(rate, color="grey", lw=0.5, ls=":")
    if any(r.average is not None for r in curves.values()):
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "FROC undefined: no annotated lesion", transform=ax.transAxes,
                ha="center", va="center")
    return _save(fig, Path(path))


# -- run folders ---------------------------------------------------------------------------------


def read_predictions(run_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of ``run_dir/predictions.csv`` (see docs/layout: id, status, probability, ...)."""
    path = Path(run_dir) / "predictions.csv"
    if not path.is_file():
        shards = sorted(Path(run_dir).glob("predictions.shard-*-of-*.csv"))
        why = (f"missing; {len(shards)} shard files found: run `wsi-prune merge {run_dir}` first"
               if shards else "missing: not a wsi-prune run folder")  # fmt: skip
        raise EvaluationError(why, path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"id", "status", "probability"} - set(reader.fieldnames or ())
        if missing:
            raise EvaluationError(f"columns {sorted(missing)} missing", path)
        return list(reader)


def _float(row: Mapping[str, str], col: str) -> float | None:
    v = (row.get(col) or "").strip()
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


#: statuses whose row carries a result: ``skipped`` is a slide a re-run found complete for the
#: same config, so its row holds the stored result, as good as ``ok``
DONE = ("ok", "skipped")


def _ok_rows(run_dir: Path) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """Rows with a result (status ok or skipped) by id, and counts by status; ``not_ok``
    lists the slides without a result."""
    rows = read_predictions(run_dir)
    ok = {}
    for n, r in enumerate(rows, start=2):
        if r["status"] in DONE:
            if _float(r, "probability") is None:
                raise EvaluationError(f"row {n} ({r['id']}) is {r['status']} but has no "
                                      f"probability", run_dir / "predictions.csv")  # fmt: skip
            ok[r["id"]] = r
    status = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    status["total"] = len(rows)
    status["not_ok"] = sorted(r["id"] for r in rows if r["status"] not in DONE)
    return ok, status


def read_candidates(path: str | os.PathLike[str]) -> np.ndarray:
    """``candidates.csv`` as (M, 3) float64 (confidence, X, Y level-0 px).

    Reads the CAMELYON16 format that
    :func:`wsi_prune.outputs.candidates.write_candidates` writes (no
    header, ``confidence,X,Y`` lines) and files of older versions that start with a header
    row naming the columns (any order).
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError("candidates file missing", path)
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    cols = [0, 1, 2]
    if rows and _float({"v": rows[0][0]}, "v") is None:
        low = [c.strip().lower() for c in rows.pop(0)]
        if {"confidence", "x", "y"} <= set(low):
            cols = [low.index("confidence"), low.index("x"), low.index("y")]
    out = np.zeros((len(rows), 3), np.float64)
    for i, r in enumerate(rows):
        try:
            out[i] = [float(r[c]) for c in cols]
        except (ValueError, IndexError):
            raise EvaluationError(f"row {i + 1} is not confidence,X,Y: {r}", path) from None
    return out


def _cost(rows: Mapping[str, Mapping[str, str]]) -> dict[str, float | None]:
    """Tokens, MACs and seconds spent on the successful slides of a run."""

    def col(name: str) -> list[float]:
        return [v for v in (_float(r, name) for r in rows.values()) if v is not None]

    def total(name: str, kind: type = float) -> float | None:
        v = col(name)
        return kind(sum(v)) if v else None

    tf = col("token_fraction")
    return {"token_fraction_mean": float(np.mean(tf)) if tf else None,
            "tissue_tiles": total("tissue_tiles", int), "kept_tiles": total("kept_tiles", int),
            "gmacs": total("gmacs"), "gmacs_dense": total("gmacs_dense"),
            "seconds": total("sec_total")}  # fmt: skip


@dataclass
class _RunEval:
    metrics: dict[str, Any]
    slide: SlideMetrics | None = None
    froc: FrocResult | None = None


def _evaluate(run_dir: Path, labels: Mapping[str, int] | None, annotations_dir: Path | None,
              only: set[str] | None, threshold: float, n_boot: int, seed: int,
              mask_mpp: float) -> _RunEval:
    ok, status = _ok_rows(run_dir)
    if only is not None:
        ok = {k: v for k, v in ok.items() if k in only}
    ev = _RunEval({"run": str(run_dir), "slides": status, "cost": _cost(ok),
                   "slide_level": None, "froc": None})  # fmt: skip
    lab = None if labels is None else run_labels(labels, ok)
    if labels is not None:
        ids = sorted(lab)
        if not ids:
            raise EvaluationError("no successful slide of the run has a label", run_dir)
        ev.slide = slide_metrics([_float(ok[i], "probability") for i in ids],
                                 [lab[i] for i in ids], threshold, n_boot, seed)
        in_run = {i.casefold() for i in (*ok, *status["not_ok"])}
        ev.metrics["slide_level"] = ev.slide.summary() | {
            "unlabelled": sorted(set(ok) - set(lab)),
            "labelled_not_in_run": sorted(k for k in labels if k.casefold() not in in_run)}
    if annotations_dir is not None:
        ev.froc, skipped = _run_froc(run_dir, ok, lab, annotations_dir, mask_mpp)
        ev.metrics["froc"] = ev.froc.summary() | {"tumour_slides_without_xml": skipped,
                                                  "mask_mpp": mask_mpp}
    return ev


def _run_froc(run_dir: Path, ok: Mapping[str, Mapping[str, str]],
              labels: Mapping[str, int] | None, annotations_dir: Path, mask_mpp: float
              ) -> tuple[FrocResult, list[str]]:
    cands, anns, mpps, skipped = {}, {}, {}, []
    xmls = {p.stem: p for p in sorted(annotations_dir.glob("*.xml")) if p.is_file()}
    for sid, row in ok.items():
        xml = lookup_slide(xmls, sid)
        if xml is not None:
            anns[sid] = read_asap_xml(xml)
        elif labels is not None and labels.get(sid) == 1:
            # A tumour slide without its lesions would turn every hit into a false positive.
            skipped.append(sid)
            continue
        mpp = _float(row, "mpp")
        if anns.get(sid) and mpp is None:
            raise EvaluationError(f"slide {sid} has no mpp in predictions.csv",
                                  run_dir / "predictions.csv")  # fmt: skip
        mpps[sid] = mpp
        cands[sid] = read_candidates(run_dir / sid / "candidates.csv")
    if skipped:
        _logger.warning("%s: %d tumour slides have no annotation XML in %s and are left out of "
                        "the FROC", run_dir, len(skipped), annotations_dir)  # fmt: skip
    if not cands:
        raise EvaluationError("no slide to compute a FROC on", run_dir)
    mpps = {k: v for k, v in mpps.items() if v is not None}
    return froc(cands, anns, mpps, mask_mpp=mask_mpp), sorted(skipped)


def run_labels(labels: Mapping[str, int], ids: Iterable[str]) -> dict[str, int]:
    """Labels of a run's slide ids, matched as :func:`~wsi_prune._ids.lookup_slide`
    matches them (case-insensitively: CAMELYON16's reference.csv says Test_001 for
    test_001.tif); ids without a label are left out."""
    found = {i: lookup_slide(labels, i) for i in ids}
    return {i: v for i, v in found.items() if v is not None}


def _load_labels(labels_csv: str | os.PathLike[str] | None) -> dict[str, int] | None:
    return None if labels_csv is None else read_labels(labels_csv)


def evaluate_run(run_dir: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None,
                 annotations_dir: str | os.PathLike[str] | None = None,
                 out: str | os.PathLike[str] | None = None, *, threshold: float = 0.5,
                 n_boot: int = 1000, seed: int = 0, mask_mpp: float = CAMELYON16_MASK_MPP
                 ) -> dict[str, Any]:
    """Evaluate a run folder; write ``report.md``, ``metrics.json`` and plots to ``out``.

    Args:
        run_dir: folder holding ``predictions.csv`` and ``<id>/candidates.csv``.
        labels_csv: slide labels (see :func:`wsi_prune.io.labels.read_labels`): slide-level
            metrics.
        annotations_dir: ``<id>.xml`` ASAP annotations: lesion-level FROC. Slides without an
            XML are normal, unless the labels call them tumour (then they are left out).
        out: output folder (default ``run_dir/evaluation``).
        threshold, n_boot, seed: see :func:`slide_metrics`.
        mask_mpp: FROC evaluation-mask resolution, µm/px.

    Returns:
        The metrics written to ``metrics.json``.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "evaluation"
    ann = None if annotations_dir is None else Path(annotations_dir)
    ev = _evaluate(run_dir, _load_labels(labels_csv), ann, None, threshold, n_boot, seed,
                   mask_mpp)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if ev.slide is not None:
        roc_png(out / "roc.png", ev.slide)
    if ev.froc is not None:
        froc_png(out / "froc.png", ev.froc)
    _write(out / "metrics.json", json.dumps(_jsonable(ev.metrics), indent=2))
    _write(out / "report.md", _run_report(ev))
    return ev.metrics


# -- pruned versus dense -------------------------------------------------------------------------


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


# -- reports -------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write(path: Path, text: str) -> None:
    write_text_atomic(path, text if text.endswith("\n") else text + "\n")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _ci(ci: Sequence[float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _slide_section(s: Mapping[str, Any]) -> str:
    rows = [("AUC", s["auc"]), ("AUC 95 % CI (bootstrap)", _ci(s["auc_ci"])),
            ("bootstrap resamples", s["n_boot"]), (f"accuracy @ {s['threshold']}", s["accuracy"]),
            ("sensitivity", s["sensitivity"]), ("specificity", s["specificity"]),
            ("TP / FP / TN / FN", f"{s['tp']} / {s['fp']} / {s['tn']} / {s['fn']}")]
    text = (f"## Slide level ({s['n']} slides: {s['n_pos']} tumour, {s['n_neg']} normal)\n\n"
            + _table(("metric", "value"), rows) + "\n\n![ROC](roc.png)\n")
    if s["unlabelled"]:
        text += f"\nSlides without a label (left out): {', '.join(s['unlabelled'])}\n"
    return text


def _froc_rows(f: Mapping[str, Any]) -> list[Any]:
    sens = f["sensitivities"] or [None] * len(f["fp_rates"])
    return [*sens, f["average"]]


def _froc_header(f: Mapping[str, Any]) -> list[str]:
    return ["", *(f"{r:g} FP" for r in f["fp_rates"]), "average (FROC score)"]


def _froc_section(f: Mapping[str, Any]) -> str:
    text = (f"## Lesion level: FROC ({f['n_slides']} slides, {f['n_lesions']} lesions to find, "
            f"{f['n_itc']} ITC ignored)\n\n" + _table(_froc_header(f), [["sensitivity",
                                                                          *_froc_rows(f)]])
            + f"\n\n{f['n_candidates']} candidates: {f['n_fp']} false positives, "
            f"{f['n_ignored']} on ITCs or exclusion regions. Protocol: CAMELYON16 (lesions grown "
            f"by 37.5 µm, the challenge's 75 µm rule, at {f['mask_mpp']:.3f} µm/px; ITCs "
            f"ignored; see wsi_prune/evaluate.py for the deviations from the challenge "
            f"script).\n\n![FROC](froc.png)\n")  # fmt: skip
    if f["tumour_slides_without_xml"]:
        text += ("\nTumour slides without annotations (left out): "
                 + ", ".join(f["tumour_slides_without_xml"]) + "\n")
    return text


def _cost_rows(c: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [("mean token fraction", c["token_fraction_mean"]), ("tissue tiles", c["tissue_tiles"]),
            ("kept tiles", c["kept_tiles"]), ("GMACs", c["gmacs"]),
            ("GMACs of a dense run", c["gmacs_dense"]), ("seconds", c["seconds"])]


def _run_report(ev: _RunEval) -> str:
    m = ev.metrics
    s = m["slides"]
    parts = [f"# Evaluation of {m['run']}\n",
             f"{s['total']} slides: {s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped "
             "(ok and skipped slides, whose results a re-run found complete, are "
             "evaluated).\n"]  # fmt: skip
    if s["not_ok"]:
        parts.append(f"Not ok: {', '.join(s['not_ok'])}\n")
    if m["slide_level"]:
        parts.append(_slide_section(m["slide_level"]))
    if m["froc"]:
        parts.append(_froc_section(m["froc"]))
    parts.append("## Cost\n\n" + _table(("", "value"), _cost_rows(m["cost"])) + "\n")
    return "\n".join(parts)


def _compare_report(m: Mapping[str, Any], with_auc: bool, with_froc: bool) -> str:
    p, h, c = m["probability"], m["heatmap"], m["cost"]
    parts = [f"# Pruned versus dense\n\ndense: `{m['dense']}`  \npruned: `{m['pruned']}`  \n"
             f"{m['n_slides']} slides ok in both.\n",
             "## Slide probabilities\n\n" + _table(("", "value"), [
                 ("max abs difference", p["max_abs_diff"]),
                 ("mean abs difference", p["mean_abs_diff"]),
                 (f"label agreement @ {p['threshold']}", p["label_agreement"]),
                 ("disagreeing slides", ", ".join(p["disagreeing"]) or "none")]) + "\n",
             "## Tile heatmap Spearman\n\n" + _table(
                 ("tiles", "mean over slides", "min", "pooled", "slides"),
                 [(name, h[k]["mean"], h[k]["min"], h[k]["pooled"], h[k]["slides"])
                  for name, k in (("ViT-scored in both", "vit"), ("all", "all"))]) + "\n"
             + "".join(f"\n- not compared: {v['error']}\n" for v in h["per_slide"].values()
                       if "error" in v),
             "## Cost\n\n" + _table(("", "dense", "pruned"), [
                 (n, a, b) for (n, a), (_, b) in zip(_cost_rows(c["dense"]),
                                                     _cost_rows(c["pruned"]), strict=True)])
             + f"\n\nGMACs dense/pruned: {_fmt(c['gmacs_ratio'], 2)}; "
             f"speed-up (seconds dense/pruned): {_fmt(c['speedup'], 2)}\n"]  # fmt: skip
    ev, diff = m.get("evaluation"), m.get("difference")
    if with_auc:
        sl = {k: v["slide_level"] for k, v in ev.items()}
        parts.append("## AUC\n\n" + _table(("run", "AUC", "95 % CI", "accuracy"), [
            (k, v["auc"], _ci(v["auc_ci"]), v["accuracy"]) for k, v in sl.items()])
            + f"\n\npruned - dense: {_fmt(diff['auc'])} (paired bootstrap 95 % CI "
            f"{_ci(diff['auc_ci'])})\n\n![ROC](roc.png)\n")  # fmt: skip
    if with_froc:
        fr = {k: v["froc"] for k, v in ev.items()}
        header = _froc_header(fr["dense"])
        rows = [[k, *_froc_rows(v)] for k, v in fr.items()]
        if diff["sensitivities"] is not None:
            rows.append(["pruned - dense", *diff["sensitivities"], diff["froc"]])
        parts.append("## FROC\n\n" + _table(header, rows) + "\n\n![FROC](froc.png)\n")
    return "\n".join(parts)
