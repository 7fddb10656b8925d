"""The fidelity benchmark's own arithmetic: the triage ceiling and the per-seed summary (the
benchmark itself takes hours and is not a test)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests._paths import benchmark_module


@pytest.fixture(scope="module")
def bench():
    return benchmark_module("bench_fidelity")


def _slide(tiles: int, kept: int) -> dict:
    return {"triage": {"all": {"tiles": tiles, "tiles_kept": kept}}}


def test_triage_ceiling_is_what_the_kept_tiles_allow(bench, tmp_path: Path) -> None:
    # a: 100 lesion tiles, 40 kept in all (30 of them lesion); b: 10 lesion tiles, 40 kept (10)
    (tmp_path / "predictions.csv").write_text(
        "id,status,kept_tiles\na,ok,40\nb,ok,40\nc,ok,40\n")
    metrics = {"lesion_recall": {"per_slide": {"a": _slide(100, 30), "b": _slide(10, 10),
                                               "c": {"triage": {}}}}}
    got = bench.triage_ceiling(metrics, tmp_path)
    assert got["slides"] == 2 and got["lesion_tiles"] == 110
    assert got["tile_recall"] == pytest.approx(40 / 110)
    assert got["ceiling"] == pytest.approx((40 + 10) / 110)  # a cannot keep more than 40
    empty = bench.triage_ceiling({"lesion_recall": {"per_slide": {}}}, tmp_path)
    assert math.isnan(empty["ceiling"])


def test_summary_aggregates_seeds_and_the_table_names_the_counts(bench) -> None:
    def one(d_auc: float, ceiling: float) -> dict:
        return {"difference": {"auc": d_auc, "auc_ci": [d_auc - 0.1, d_auc + 0.1],
                               "n_slides": 32},
                "triage_ceiling": {"tile_recall": 0.3, "ceiling": ceiling},
                "lesion_recall": {"triage": {"macro": {"lesions": 4, "area_recall": 0.5},
                                             "micro": {"lesions": 42}, "itc": {"lesions": 18}}}}
    s = bench.summarise({0: {"b0.05/as-infer": one(0.02, 0.4)},
                         1: {"b0.05/as-infer": one(-0.04, 0.5)}})
    row = s["b0.05/as-infer"]
    assert row["d_auc"] == {"mean": pytest.approx(-0.01), "min": -0.04, "max": 0.02, "n": 2}
    assert row["triage_ceiling"]["mean"] == pytest.approx(0.45)
    assert row["counts"] == {"slides": 32, "lesions": {"itc": 18, "micro": 42, "macro": 4}}
    assert row["auc_pruned"] is None  # absent everywhere: no number invented
    md = bench.markdown(s, type("A", (), {"seeds": [0, 1], "token_ratio": 0.5})())
    assert "-0.010 [-0.040, 0.020]" in md and "0.300 [0.300, 0.300] / 0.450 [0.400, 0.500]" in md
    assert "n/a×" not in md  # a missing speed-up is n/a, not "n/a×"
    assert "32 slides; lesions by class {'itc': 18, 'micro': 42, 'macro': 4}" in md


def test_adaptive_threshold_is_set_on_the_training_run_tiles(bench, tmp_path: Path) -> None:
    import numpy as np
    import zarr

    for name, scores in (("a", np.linspace(0.0, 0.49, 50)), ("b", np.linspace(0.5, 0.99, 50))):
        g = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w")
        g.create_array("triage/tile_score", data=scores.astype("float32"))
    t = bench.score_threshold(tmp_path, 0.1)  # 10 of the 100 pooled tiles lie above it
    assert 0.89 < t < 0.90
    pooled = np.concatenate([np.linspace(0.0, 0.49, 50), np.linspace(0.5, 0.99, 50)])
    assert (pooled > t).sum() == 10


def test_head_kinds_per_budget(bench) -> None:
    args = type("A", (), {"heads": ["topk", "as-infer", "dense-head"],
                          "dense_head_budgets": [0.05]})()
    # the dense-trained head (the trap) only where asked; the heads as inferred everywhere
    assert bench._heads(args, 0.05) == ("topk", "as-infer", "dense-head")
    assert bench._heads(args, 0.02) == ("topk", "as-infer")
    args.dense_head_budgets = []
    assert bench._heads(args, 0.05) == ("topk", "as-infer")
    # the ViT-taught scorer's settings are judged with the heads as inferred only
    args.dense_head_budgets = [0.05]
    assert bench._no_dense_head(args) == ("topk", "as-infer")
    assert bench.VIT_SCORER == "-vit-scorer"


def test_a_token_ratio_other_than_the_default_tags_its_settings(bench) -> None:
    # the same budget at another token ratio keeps other tiles: its runs must not be reused
    assert bench.ratio_tag(0.5) == ""
    assert bench.ratio_tag(0.25) == "-r0.25"
    assert bench.ratio_tag(0.125) == "-r0.125"
    assert bench.ratio_tag(0.125, "slide") == "-r0.125-slide"
    assert bench.ratio_tag(0.5, "slide") == "-slide"
    cfg = bench.budget_config(bench.RunConfig.from_dict(bench.BASE), 0.05, 0.25)
    assert cfg.tile_select.fraction == pytest.approx(0.2)
    assert cfg.token_select.keep_ratio == pytest.approx(0.25)
    assert cfg.token_select.scope == "tile"
    cfg = bench.budget_config(bench.RunConfig.from_dict(bench.BASE), 0.05, 0.125, "slide")
    assert cfg.token_select.scope == "slide" and cfg.tile_select.fraction == pytest.approx(0.4)


def test_a_longer_trained_vit_scorer_has_its_own_tag_and_weights(bench) -> None:
    # a scorer trained longer keeps other tiles: its runs, student and weights must not be reused
    import argparse

    def ns(vit_scorer_epochs):
        return argparse.Namespace(scorer_epochs=10, vit_scorer_epochs=vit_scorer_epochs)

    assert bench.epochs_tag(ns(None)) == ""
    assert bench.epochs_tag(ns(10)) == ""
    assert bench.epochs_tag(ns(30)) == "-e30"


def test_a_student_distilled_at_other_ratios_has_its_own_tag(bench) -> None:
    # a student taught at other token ratios is another ViT: its weights and runs are its own
    import argparse

    from wsi_prune.training.distill import DEFAULT_KEEP_RATIOS

    assert bench.student_tag(argparse.Namespace(student_ratios=list(DEFAULT_KEEP_RATIOS))) == ""
    assert bench.student_tag(argparse.Namespace(student_ratios=[1, 0.5, 0.25, 0.125])) == ""
    assert bench.student_tag(argparse.Namespace(
        student_ratios=[1, 0.5, 0.25, 0.125, 0.0612])) == "-sr1_0.5_0.25_0.125_0.0612"


def test_a_blended_heat_tags_its_test_runs_only(bench) -> None:
    # the weight changes the heat, never an embedding: training runs and heads are shared
    assert bench.heat_tag(1.0) == "" and bench.heat_tag(0.75) == "-hv0.75"
    assert bench.parse_args(["--heat-vit-weight", "0.75"]).heat_vit_weight == 0.75
    assert bench.parse_args([]).heat_vit_weight == 1.0


def test_dropping_a_compared_runs_stores_keeps_its_tables(bench, tmp_path: Path) -> None:
    run = tmp_path / "test-b0.05-topk"
    for name in ("a.zarr", "b.zarr"):
        (run / name / "tiles").mkdir(parents=True)
        (run / name / "zarr.json").write_text("{}")
    (run / "predictions.csv").write_text("id,kept_tiles\na,3\nb,4\n")
    (run / "manifest.json").write_text("{}")
    assert bench.drop_slide_stores(run) == 2
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "predictions.csv"]
    assert bench.drop_slide_stores(run) == 0


def test_summary_gives_the_mean_over_seeds_a_paired_interval(bench, tmp_path: Path) -> None:
    import numpy as np

    from wsi_prune.evaluation.seeds import seed_mean_differences

    ids = [f"s{i:02d}" for i in range(20)]
    labels = {i: n % 2 for n, i in enumerate(ids)}
    rng = np.random.default_rng(0)
    per_seed, probs = {}, []
    for seed in (0, 1):
        pair = []
        for kind in ("dense", "pruned"):
            p = np.clip(0.3 + 0.4 * np.array([labels[i] for i in ids])
                        + rng.normal(0, 0.15, len(ids)), 0.01, 0.99)
            d = tmp_path / f"seed{seed}-{kind}"
            d.mkdir()
            rows = [f"{i},ok,{float(v)!r}" for i, v in zip(ids, p, strict=True)]
            # a failed slide in one run only: left out of every seed's comparison
            rows.append("s99,failed," if kind == "pruned" else "s99,ok,0.5")
            (d / "predictions.csv").write_text("id,status,probability\n" + "\n".join(rows) + "\n")
            pair.append(p)
        probs.append(pair)
        per_seed[seed] = {"b0.05/topk": {"dense": str(tmp_path / f"seed{seed}-dense"),
                                         "pruned": str(tmp_path / f"seed{seed}-pruned"),
                                         "difference": {"n_slides": 20}}}
    row = bench.summarise(per_seed, labels | {"s99": 1})["b0.05/topk"]
    want = seed_mean_differences([labels[i] for i in ids], [probs[0][0], probs[1][0]],
                                 [probs[0][1], probs[1][1]])
    got = row["seed_mean"]
    assert got["n_seeds"] == 2 and got["n_slides"] == 20
    for k in ("auc", "ece", "brier"):
        assert got[k] == pytest.approx(want[k])
        assert got[f"{k}_ci"] == pytest.approx(want[f"{k}_ci"])
    md = bench.markdown({"b0.05/topk": row}, type("A", (), {"seeds": [0, 1],
                                                           "token_ratio": 0.5})())
    lo, hi = got["ece_ci"]
    assert f"| b0.05/topk | 2 | 20 | {got['auc']:+.3f}" in md
    assert f"{got['ece']:+.3f} [{lo:+.3f}, {hi:+.3f}]" in md
    # one seed: no mean over seeds
    assert bench.summarise({0: per_seed[0]}, labels)["b0.05/topk"]["seed_mean"] is None
