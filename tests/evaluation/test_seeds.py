"""Differences averaged over seeds with one paired bootstrap over the slides."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_prune.evaluation.calibration import calibration, calibration_difference
from wsi_prune.evaluation.seeds import seed_mean_differences
from wsi_prune.evaluation.slide_metrics import auc_difference


def _runs(seed: int, n: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    dense = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, n), 0.01, 0.99)
    pruned = np.clip(dense + rng.normal(0, 0.1, n), 0.01, 0.99)
    return y, dense, pruned


def test_one_seed_gives_the_per_seed_functions_numbers() -> None:
    y, d, p = _runs(0)
    got = seed_mean_differences(y, [d], [p], n_boot=500, seed=3)
    auc = auc_difference(y, d, p, n_boot=500, seed=3)
    cal = calibration_difference(y, d, p, n_boot=500, seed=3)
    assert got["n_seeds"] == 1 and got["n_slides"] == 40 and got["n_boot"] == 500
    assert got["auc"] == pytest.approx(auc["delta"]) and got["auc_ci"] == pytest.approx(auc["ci"])
    assert got["ece"] == pytest.approx(cal["ece"]) and got["ece_ci"] == pytest.approx(cal["ece_ci"])
    assert got["brier"] == pytest.approx(cal["brier"])
    assert got["brier_ci"] == pytest.approx(cal["brier_ci"])


def test_the_mean_is_over_seeds_and_its_interval_is_the_means() -> None:
    y, d0, p0 = _runs(1)
    _, d1, p1 = _runs(2)
    got = seed_mean_differences(y, [d0, d1], [p0, p1], n_boot=1000, seed=0)
    e0 = calibration(p0, y).ece - calibration(d0, y).ece
    e1 = calibration(p1, y).ece - calibration(d1, y).ece
    assert got["ece_seeds"] == pytest.approx([e0, e1])
    assert got["ece"] == pytest.approx((e0 + e1) / 2)
    one = [auc_difference(y, d, p, n_boot=0)["delta"] for d, p in ((d0, p0), (d1, p1))]
    assert got["auc_seeds"] == pytest.approx(one)
    assert got["auc"] == pytest.approx(np.mean(one))
    # the same seed twice is that seed: the interval of a mean of equal numbers is theirs
    twice = seed_mean_differences(y, [d0, d0], [p0, p0], n_boot=1000, seed=0)
    once = seed_mean_differences(y, [d0], [p0], n_boot=1000, seed=0)
    for k in ("auc", "ece", "brier"):
        assert twice[k] == pytest.approx(once[k])
        assert twice[f"{k}_ci"] == pytest.approx(once[f"{k}_ci"])
    # two seeds whose errors partly cancel give a narrower interval than either alone
    w = [np.diff(seed_mean_differences(y, [d], [p], n_boot=1000)["brier_ci"])[0]
         for d, p in ((d0, p0), (d1, p1))]
    assert np.diff(got["brier_ci"])[0] < max(w)
    lo, hi = got["ece_ci"]
    assert lo <= got["ece"] <= hi


def test_a_pruned_run_that_moves_every_probability_is_seen() -> None:
    # normal slides called 0.75 instead of 0.35 (the README-recipe trap of issue 11)
    y = np.array([0] * 20 + [1] * 20)
    dense = np.where(y == 1, 0.8, 0.35)
    pruned = np.where(y == 1, 0.8, 0.75)
    got = seed_mean_differences(y, [dense, dense], [pruned, pruned], n_boot=200)
    assert got["auc"] == pytest.approx(0.0)  # the ranking holds
    # ECE: 0.5 * |0.35 - 0| + 0.5 * |0.8 - 1| = 0.275 -> 0.5 * 0.75 + 0.5 * 0.2 = 0.475
    assert got["ece"] == pytest.approx(0.2)
    assert got["brier"] == pytest.approx(0.5 * (0.75 ** 2 - 0.35 ** 2))
    assert got["ece_ci"][0] > 0.1


def test_bad_shapes_and_one_class() -> None:
    y, d, p = _runs(0)
    with pytest.raises(ValueError, match="need"):
        seed_mean_differences(y, d, p)  # 1-D: not (seeds, slides)
    with pytest.raises(ValueError, match="need"):
        seed_mean_differences(y[:-1], [d], [p])
    with pytest.raises(ValueError, match="0 or 1"):
        seed_mean_differences(y * 2, [d], [p])
    only = seed_mean_differences(np.ones(40), [d], [p], n_boot=50)
    assert only["auc"] is None and only["auc_ci"] is None and only["ece_ci"] is not None
