"""Calibration of slide probabilities: Brier score and expected calibration error (ECE).

AUC only says whether tumour slides rank above normal ones; a pruned run can keep the ranking
and still move every probability (a head trained on dense bags fed pruned ones called normal
slides 0.75 instead of 0.36, issue 11). The Brier score and the ECE see that.

Binning: ``n_bins`` (default 10) equal-width bins of the probability, ``[k/n, (k+1)/n)`` and the
last one closed, ``[(n-1)/n, 1]``. ECE is the slide-weighted mean over non-empty bins of
``|mean probability - fraction of tumour slides|`` (Naeini et al. 2015; Guo et al. 2017).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: equal-width probability bins of the ECE
N_BINS = 10


@dataclass(frozen=True)
class Calibration:
    """Brier score and ECE of a set of slides.

    Attributes:
        n: slides.
        brier: mean squared difference of probability and label (0 best, 0.25 a constant 0.5).
        ece: expected calibration error over ``n_bins`` equal-width bins (0 best).
        n_bins: bins of the ECE.
        bins: one dict per bin: ``lo``, ``hi`` (probability range), ``n`` (slides),
            ``mean_probability`` and ``fraction_tumour`` (None when the bin is empty).
    """

    n: int
    brier: float
    ece: float
    n_bins: int
    bins: tuple[dict[str, Any], ...]

    def summary(self) -> dict[str, Any]:
        """Everything, with the binning spelled out for ``metrics.json``."""
        return dataclasses.asdict(self) | {"binning": f"{self.n_bins} equal-width bins on [0, 1]"}


def calibration(probabilities: Sequence[float], labels: Sequence[int], n_bins: int = N_BINS
                ) -> Calibration:
    """Brier score and ECE.

    Args:
        probabilities: (S,) slide tumour probabilities in [0, 1].
        labels: (S,) true labels, 0/1.
        n_bins: equal-width bins of the ECE.
    """
    p = np.asarray(probabilities, np.float64)
    y = np.asarray(labels, np.float64)
    if p.shape != y.shape or p.ndim != 1 or len(p) == 0:
        raise ValueError(f"need equal-length non-empty 1-D inputs, got {p.shape} and {y.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    # edges k/n computed as a division, not by linspace, so that 0.3 falls in [0.3, 0.4)
    b = np.searchsorted(np.arange(1, n_bins) / n_bins, p, side="right")
    bins, ece = [], 0.0
    for k in range(n_bins):
        sel = b == k
        n = int(sel.sum())
        mp = float(p[sel].mean()) if n else None
        fy = float(y[sel].mean()) if n else None
        if n:
            ece += n / len(p) * abs(mp - fy)
        bins.append({"lo": k / n_bins, "hi": (k + 1) / n_bins, "n": n, "mean_probability": mp,
                     "fraction_tumour": fy})  # fmt: skip
    return Calibration(n=len(p), brier=float(np.mean((p - y) ** 2)), ece=float(ece),
                       n_bins=n_bins, bins=tuple(bins))


def _ece(p: np.ndarray, y: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of each row of (R, S) probabilities ``p`` against (R, S) labels ``y``, vectorised
    (the same bins as :func:`calibration`)."""
    b = np.searchsorted(np.arange(1, n_bins) / n_bins, p, side="right")
    out = np.zeros(p.shape[0])
    for k in range(n_bins):
        sel = b == k
        n = sel.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.abs((p * sel).sum(1) - (y * sel).sum(1)) / n
        out += np.where(n > 0, n / p.shape[1] * gap, 0.0)
    return out


def calibration_difference(labels: Sequence[int], reference: Sequence[float],
                           other: Sequence[float], n_boot: int = 1000, seed: int = 0,
                           n_bins: int = N_BINS) -> dict[str, Any]:
    """Brier score and ECE of ``other`` minus those of ``reference`` on the same slides, with
    paired bootstrap 95 % CIs (slides resampled once per round, both runs scored on it).

    The ECE of a few dozen slides in 10 bins moves when a slide crosses a bin edge: two runs
    whose probabilities differ by a mean 0.01 can differ in ECE by 0.03. The CI shows that
    resolution; the Brier score has no bins and resolves smaller changes.

    Args:
        labels: (S,) 0/1; reference, other: (S,) probabilities, same slide order.

    Returns:
        ``brier`` and ``ece`` (deltas), ``brier_ci`` and ``ece_ci`` ((lo, hi); None with
        ``n_boot`` 0), ``n_boot``, ``n`` slides.
    """
    y = np.asarray(labels, np.float64)
    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if not y.shape == a.shape == b.shape or y.ndim != 1 or len(y) == 0:
        raise ValueError(f"need equal-length non-empty 1-D inputs, got {y.shape}, {a.shape}, "
                         f"{b.shape}")
    ca, cb = calibration(a, y, n_bins), calibration(b, y, n_bins)
    out: dict[str, Any] = {"brier": cb.brier - ca.brier, "ece": cb.ece - ca.ece,
                           "brier_ci": None, "ece_ci": None, "n_boot": int(n_boot), "n": len(y)}
    if n_boot > 0:
        idx = np.random.default_rng(seed).integers(0, len(y), (n_boot, len(y)))
        yy, aa, bb = y[idx], a[idx], b[idx]
        d_brier = ((bb - yy) ** 2).mean(1) - ((aa - yy) ** 2).mean(1)
        d_ece = _ece(bb, yy, n_bins) - _ece(aa, yy, n_bins)
        for key, d in (("brier_ci", d_brier), ("ece_ci", d_ece)):
            lo, hi = np.percentile(d, [2.5, 97.5])
            out[key] = (float(lo), float(hi))
    return out
