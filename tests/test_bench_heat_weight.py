"""benchmarks/bench_heat_weight.py: the heat blend's Spearman per weight, from tile logits
recomputed out of slide stores (the stores here are small zarr groups on disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from safetensors.numpy import save_file
from scipy.stats import spearmanr

from tests._paths import benchmark_module


@pytest.fixture(scope="module")
def bench():
    return benchmark_module("bench_heat_weight")


def test_two_noisy_rankings_blended_follow_the_dense_one_closer_than_either(bench) -> None:
    rng = np.random.default_rng(0)
    n = 4000
    truth = rng.normal(size=n)
    vit = truth + rng.normal(scale=1.0, size=n)  # independent errors of equal size
    cnn = 1.0 / (1.0 + np.exp(-(truth + rng.normal(scale=1.0, size=n))))
    kept = np.ones(n, bool)
    rho = bench.blended_spearman(truth, vit, cnn, kept, (0.0, 0.5, 1.0))
    assert rho[1.0] == pytest.approx(spearmanr(truth, vit).statistic, abs=1e-5)
    assert rho[0.0] == pytest.approx(spearmanr(truth, cnn).statistic, abs=1e-5)
    assert rho[0.5] > max(rho[0.0], rho[1.0]) + 0.05


def _store(path: Path, xy: np.ndarray, emb: np.ndarray, tile_index: np.ndarray,
           score: np.ndarray) -> None:
    g = zarr.open_group(str(path), mode="w")
    kept = np.zeros(len(xy), bool)
    kept[tile_index] = True
    for name, a in (("tiles/coords", xy), ("vit/embedding", emb), ("vit/tile_index", tile_index),
                    ("triage/kept", kept), ("triage/tile_score", score)):
        g.create_array(name, data=a)


def test_runs_are_matched_tile_by_tile_by_their_level0_corners(bench, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 200
    xy = np.stack([np.arange(n) % 20, np.arange(n) // 20], 1).astype(np.int64) * 224
    emb = rng.normal(size=(n, 4)).astype(np.float32)
    head = tmp_path / "head.safetensors"
    save_file({"weight": np.array([[1.0, -0.5, 0.2, 0.0]], np.float32),
               "bias": np.zeros(1, np.float32)}, str(head))
    score = rng.uniform(0.05, 0.95, n).astype(np.float32)
    _store(tmp_path / "dense" / "s.zarr", xy, emb, np.arange(n), score)
    order = rng.permutation(n)  # the pruned run lists its tiles in another order
    kept = np.sort(rng.choice(n, 120, replace=False))
    _store(tmp_path / "pruned" / "s.zarr", xy[order], emb[order][kept], kept, score[order])
    per = bench.compare_runs(tmp_path / "dense", tmp_path / "pruned", head, head, (0.0, 1.0))
    assert list(per) == ["s"]
    # same embeddings: at weight 1 the kept tiles rank exactly as dense, the rest by the CNN
    # below them, so the ranking is the dense one wherever the dense logit agrees
    logit = emb.astype(np.float64) @ np.array([1.0, -0.5, 0.2, 0.0])
    want_kept = np.zeros(n, bool)
    want_kept[order[kept]] = True
    heat = np.where(want_kept, 10.0 + logit, score)
    assert per["s"][1.0] == pytest.approx(spearmanr(logit, heat).statistic, abs=1e-5)
    assert per["s"][0.0] == pytest.approx(
        spearmanr(logit, np.where(want_kept, 10.0 + score, score)).statistic, abs=1e-5)
    assert "| 1 |" in bench.table(per, (0.0, 1.0))
