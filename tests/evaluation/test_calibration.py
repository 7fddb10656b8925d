"""Calibration (Brier, ECE), the paired ΔAUC bootstrap and the 95 %-specificity threshold,
against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_prune.evaluation.calibration import calibration
from wsi_prune.evaluation.slide_metrics import auc_difference, threshold_at_specificity


def test_perfectly_calibrated_set_has_zero_ece_and_the_hand_brier():
    # 100 slides per bin centre q = 0.05, 0.15, ..., 0.95, exactly 100 q of them tumour
    q = np.arange(10) / 10 + 0.05
    p = np.repeat(q, 100)
    y = np.concatenate([np.arange(100) < round(100 * v) for v in q]).astype(int)
    c = calibration(p, y)
    assert c.ece == pytest.approx(0, abs=1e-12)
    # per bin: n q (1 - q)^2 + n (1 - q) q^2 = n q (1 - q)
    assert c.brier == pytest.approx(np.mean(q * (1 - q)))
    assert [b["n"] for b in c.bins] == [100] * 10 and c.n == 1000
    assert c.summary()["binning"] == "10 equal-width bins on [0, 1]"


def test_ece_and_brier_by_hand():
    # bin [0.2, 0.3): 0.2, 0.2 (one tumour): |0.2 - 0.5| = 0.3, weight 2/5
    # bin [0.9, 1.0]: 0.9, 1.0, 0.95 (all tumour): |0.95 - 1| = 0.05, weight 3/5
    p = [0.2, 0.2, 0.9, 1.0, 0.95]
    y = [1, 0, 1, 1, 1]
    c = calibration(p, y)
    assert c.ece == pytest.approx(2 / 5 * 0.3 + 3 / 5 * 0.05)
    assert c.brier == pytest.approx((0.64 + 0.04 + 0.01 + 0 + 0.0025) / 5)
    assert c.bins[2]["n"] == 2 and c.bins[9]["n"] == 3 and c.bins[0]["mean_probability"] is None
    # an edge value belongs to the bin it opens: 0.3 is in [0.3, 0.4), 1.0 in the last bin
    assert calibration([0.3, 1.0], [0, 1]).bins[3]["n"] == 1
    with pytest.raises(ValueError, match="equal-length"):
        calibration([0.5], [1, 0])


def test_threshold_at_specificity():
    normals = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.05, 0.15, 0.25, 0.35,
               0.45, 0.55, 0.65, 0.75, 0.85, 0.99]  # 20 normals: 19 must fall below t
    t = threshold_at_specificity(normals, 0.95)
    assert t > 0.95 and t == pytest.approx(0.95)  # just above the 19th lowest
    assert np.mean(np.asarray(normals) < t) == 0.95
    # 2 normals: 0.95 needs both below t, just above the larger
    t2 = threshold_at_specificity([0.3, 0.6])
    assert t2 > 0.6 and t2 == pytest.approx(0.6)
    assert threshold_at_specificity([]) is None


def test_paired_bootstrap_ci_contains_delta_and_is_narrower_on_correlated_runs():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    dense = np.clip(0.4 + 0.2 * y + rng.normal(0, 0.2, 60), 0, 1)
    pruned = np.clip(dense + rng.normal(0, 0.03, 60), 0, 1)  # follows dense closely
    d = auc_difference(y, dense, pruned, n_boot=500, seed=3)
    lo, hi = d["ci"]
    ulo, uhi = d["ci_unpaired"]
    assert lo <= d["delta"] <= hi and ulo <= d["delta"] <= uhi
    assert hi - lo < (uhi - ulo) / 3  # pairing cancels the slide sampling both runs share
    assert d["n_boot"] == 500 and d["n"] == 60
    same = auc_difference(y, dense, dense, n_boot=100)
    assert same["delta"] == 0 and same["ci"] == (0.0, 0.0)
    assert auc_difference([1, 1], [0.2, 0.4], [0.3, 0.1])["delta"] is None


def test_calibration_difference_resamples_both_runs_on_the_same_slides():
    from wsi_prune.evaluation.calibration import _ece, calibration_difference

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(30), np.zeros(30)].astype(int)
    a = np.clip(np.where(y == 1, 0.7, 0.3) + rng.normal(0, 0.15, 60), 0.01, 0.99)
    # the vectorised ECE is calibration()'s, row by row
    rows = rng.uniform(0, 1, (5, 60))
    want = [calibration(r, y).ece for r in rows]
    np.testing.assert_allclose(_ece(rows, np.tile(y, (5, 1)), 10), want, rtol=1e-12)
    # identical runs: zero deltas and zero-width intervals
    same = calibration_difference(y, a, a, n_boot=200)
    assert same["brier"] == 0 and same["ece"] == 0
    assert same["brier_ci"] == (0.0, 0.0) and same["ece_ci"] == (0.0, 0.0)
    # every probability pushed 0.15 toward the wrong label: Brier worse on every resample
    worse = np.clip(a + np.where(y == 1, -0.15, 0.15), 0, 1)
    d = calibration_difference(y, a, worse, n_boot=500, seed=1)
    assert d["brier"] == pytest.approx(calibration(worse, y).brier - calibration(a, y).brier)
    assert d["ece"] == pytest.approx(calibration(worse, y).ece - calibration(a, y).ece)
    assert 0 < d["brier_ci"][0] <= d["brier"] <= d["brier_ci"][1]
    assert d["ece_ci"][0] <= d["ece"] <= d["ece_ci"][1] and d["n"] == 60 and d["n_boot"] == 500
    # a small random change: the ECE interval spans 0 wider than the Brier one
    moved = np.clip(a + rng.normal(0, 0.01, 60), 0, 1)
    m = calibration_difference(y, a, moved, n_boot=500)
    assert m["ece_ci"][0] <= 0 <= m["ece_ci"][1]
    assert m["ece_ci"][1] - m["ece_ci"][0] > m["brier_ci"][1] - m["brier_ci"][0]
    assert calibration_difference(y, a, a, n_boot=0)["ece_ci"] is None
    with pytest.raises(ValueError, match="equal-length"):
        calibration_difference(y[:3], a, a)
