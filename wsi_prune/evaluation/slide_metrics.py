"""Slide-level evaluation: ROC AUC with a percentile-bootstrap 95 % CI, and accuracy,
sensitivity and specificity at a threshold (scikit-learn).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score, roc_curve


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


def auc_difference(labels: Sequence[int], reference: Sequence[float], other: Sequence[float],
                   n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """AUC of ``other`` minus AUC of ``reference`` on the same slides, with bootstrap 95 % CIs.

    The paired CI resamples the slides once per round and scores both runs on that resample
    (the runs' errors are correlated, since they see the same slides, and pairing cancels what
    they share); the unpaired CI resamples each run on its own (seeds ``seed`` and
    ``seed + 1``), as two independent studies would, and is reported only to show how much
    pairing narrows the interval.

    Args:
        labels: (S,) 0/1.
        reference, other: (S,) probabilities of the two runs, same slide order.

    Returns:
        ``delta`` (None with one class only), ``ci`` (paired) and ``ci_unpaired`` ((lo, hi) or
        None), ``n_boot`` (resamples used), ``n`` slides.
    """
    y = np.asarray(labels, np.int64)
    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    out: dict[str, Any] = {"delta": None, "ci": None, "ci_unpaired": None, "n_boot": 0,
                           "n": len(y)}  # fmt: skip
    if not (y == 1).any() or not (y == 0).any():
        return out
    out["delta"] = float(roc_auc_score(y, b) - roc_auc_score(y, a))
    paired = _bootstrap_aucs(y, [a, b], n_boot, seed)
    if len(paired):
        ua = _bootstrap_aucs(y, [a], n_boot, seed)[:, 0]
        ub = _bootstrap_aucs(y, [b], n_boot, seed + 1)[:, 0]
        for key, d in (("ci", paired[:, 1] - paired[:, 0]), ("ci_unpaired", ub - ua)):
            lo, hi = np.percentile(d, [2.5, 97.5])
            out[key] = (float(lo), float(hi))
        out["n_boot"] = len(paired)
    return out


def threshold_at_specificity(normal_probabilities: Sequence[float], specificity: float = 0.95
                             ) -> float | None:
    """The lowest threshold ``t`` (a slide is positive when ``p >= t``) at which at least
    ``specificity`` of these normal slides are called normal; None without normal slides.

    With n normals that is just above the ``ceil(specificity * n)``-th lowest normal
    probability: with 2 normals and 0.95, above both.
    """
    s = np.sort(np.asarray(normal_probabilities, np.float64))
    if len(s) == 0:
        return None
    k = max(1, math.ceil(specificity * len(s) - 1e-9))
    return float(np.nextafter(s[k - 1], np.inf))
