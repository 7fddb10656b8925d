"""Dense-versus-pruned differences averaged over training seeds, with one paired bootstrap.

A benchmark that trains its models with several seeds and tests every seed on the same slides
gets one (dense, pruned) pair of slide probabilities per seed. Targets such as "ΔECE within
0.02" are stated for the mean over seeds; each seed's own CI (from
:func:`~wsi_prune.evaluation.slide_metrics.auc_difference` and
:func:`~wsi_prune.evaluation.calibration.calibration_difference`) says nothing about that mean.
:func:`seed_mean_differences` resamples the *slides* once per round, the same resample for
every seed (they share the test set), and averages the seeds' differences on it: the interval
is that of the mean over seeds, for the slide sampling it still carries. The seeds'
min-max spread is reported beside it.

With one seed the numbers equal those of the per-seed functions with the same ``seed``
(same resamples): stratified for the AUC, plain for the Brier score and the ECE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from wsi_prune.evaluation.calibration import N_BINS, _ece
from wsi_prune.evaluation.slide_metrics import _bootstrap_aucs


def _interval(d: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(lo), float(hi)


def seed_mean_differences(labels: Sequence[int], reference: Sequence[Sequence[float]],
                          other: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0,
                          n_bins: int = N_BINS) -> dict[str, Any]:
    """AUC, ECE and Brier score of ``other`` minus ``reference``, averaged over seeds.

    Args:
        labels: (S,) 0/1 labels of the test slides.
        reference: (R, S) probabilities of the reference (dense) run of each of R seeds, the
            slides in the order of ``labels``.
        other: (R, S) probabilities of the compared (pruned) run of the same seeds.
        n_boot: bootstrap rounds (0: no CIs).
        seed: bootstrap seed.
        n_bins: equal-width bins of the ECE.

    Returns:
        ``n_seeds``, ``n_slides``, ``n_boot``; for each of ``auc``, ``ece`` and ``brier``: the
        mean difference over seeds, ``<name>_ci`` (paired 95 % CI of that mean, None without
        resamples or, for the AUC, with one class only) and ``<name>_seeds`` (each seed's
        difference, in the given order). ``auc`` is None with one class only.
    """
    y = np.asarray(labels, np.float64)
    a = np.asarray(reference, np.float64)
    b = np.asarray(other, np.float64)
    if a.ndim != 2 or a.shape != b.shape or y.shape != (a.shape[1],) or a.size == 0:
        raise ValueError(f"need (R, S) reference and other and (S,) labels, got {a.shape}, "
                         f"{b.shape} and {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    r, s = a.shape
    out: dict[str, Any] = {"n_seeds": r, "n_slides": s, "n_boot": int(max(n_boot, 0))}
    yi = y.astype(np.int64)
    two_classes = bool((yi == 1).any() and (yi == 0).any())
    auc_seeds = ([float(roc_auc_score(yi, b[i]) - roc_auc_score(yi, a[i])) for i in range(r)]
                 if two_classes else None)
    ece_seeds = [float(_ece(b[i][None], y[None], n_bins)[0] - _ece(a[i][None], y[None],
                                                                    n_bins)[0])
                 for i in range(r)]
    brier_seeds = [float(np.mean((b[i] - y) ** 2) - np.mean((a[i] - y) ** 2)) for i in range(r)]
    for name, vals in (("auc", auc_seeds), ("ece", ece_seeds), ("brier", brier_seeds)):
        out[name] = None if vals is None else float(np.mean(vals))
        out[f"{name}_seeds"] = vals
        out[f"{name}_ci"] = None
    if n_boot <= 0:
        return out
    if two_classes:
        aucs = _bootstrap_aucs(yi, [*a, *b], n_boot, seed)  # (n_boot, 2R): references first
        out["auc_ci"] = _interval((aucs[:, r:] - aucs[:, :r]).mean(1))
    idx = np.random.default_rng(seed).integers(0, s, (n_boot, s))
    yy = y[idx]
    d_ece = np.zeros(n_boot)
    d_brier = np.zeros(n_boot)
    for i in range(r):
        aa, bb = a[i][idx], b[i][idx]
        d_ece += _ece(bb, yy, n_bins) - _ece(aa, yy, n_bins)
        d_brier += ((bb - yy) ** 2).mean(1) - ((aa - yy) ** 2).mean(1)
    out["ece_ci"] = _interval(d_ece / r)
    out["brier_ci"] = _interval(d_brier / r)
    return out
