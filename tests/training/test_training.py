"""Training the triage scorer and the MIL head on real Zarr stores (synthetic data)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from tests._paths import REPO as ROOT
from wsi_prune._ids import slide_id
from wsi_prune.cli.train import train_mil as train_mil_cmd
from wsi_prune.cli.train import train_scorer as train_scorer_cmd
from wsi_prune.config import MILConfig, RunConfig, ScorerConfig
from wsi_prune.errors import (
    CheckpointRefused,
    ConfigError,
    StoreError,
    TrainingError,
    WsiPruneError,
)
from wsi_prune.io.annotations import Annotation
from wsi_prune.io.labels import parse_label
from wsi_prune.io.store import open_store
from wsi_prune.io.tiling import tile_slide
from wsi_prune.models.checkpoints import load_state_dict
from wsi_prune.models.mil import build_mil, trained_mil_config
from wsi_prune.models.scorer import build_scorer, score_tiles, trained_scorer_config
from wsi_prune.pipeline.batch import run_batch
from wsi_prune.synth import SynthSpec, write_asap_xml, write_slide
from wsi_prune.training.data import find_stores, load_annotations, patch_targets
from wsi_prune.training.mil import train_mil
from wsi_prune.training.scorer import train_scorer

D = 16  # embedding width of the synthetic MIL stores


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models train fastest on one thread, and many times faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- patch targets -------------------------------------------------------------------------------
XY = np.array([[1000.0, 2000.0]])  # one tile, 224 level-0 px: 16 px patches at grid 14


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


def test_patch_targets_left_half_and_aligned_square() -> None:
    half = patch_targets(XY, 224.0, 14, [_rect(900, 1900, 1112, 2300)])
    assert half.shape == (1, 14, 14) and half.dtype == np.float32
    assert np.all(half[0, :, :7] == 1.0) and np.all(half[0, :, 7:] == 0.0)
    # patches rows 2-3, cols 3-4 exactly: rows are y, columns x, row 0 at the top
    sq = patch_targets(XY, 224.0, 14, [_rect(1048, 2032, 1080, 2064)])[0]
    want = np.zeros((14, 14), np.float32)
    want[2:4, 3:5] = 1.0
    np.testing.assert_array_equal(sq, want)
    # half of the first patch column
    strip = patch_targets(XY, 224.0, 14, [_rect(1000, 2000, 1008, 2224)])[0]
    np.testing.assert_allclose(strip[:, 0], 0.5)
    assert strip[:, 1:].sum() == 0


def test_patch_targets_area_union_exclusion_and_grid16() -> None:
    tri = np.array([[1000.0, 2000.0], [1224.0, 2000.0], [1000.0, 2224.0]])
    t = patch_targets(XY, 224.0, 14, [tri], supersample=16)[0]
    # the mean fraction is the covered area over the tile area (1/2), within rasterisation error
    assert t.mean() == pytest.approx(0.5, abs=0.01)
    # overlapping polygons count once; a tile far away gets nothing
    two = patch_targets(np.array([[1000.0, 2000.0], [5000.0, 5000.0]]), 224.0, 14,
                        [_rect(900, 1900, 1112, 2300), _rect(1000, 1900, 1100, 2300)])
    np.testing.assert_array_equal(two[0], patch_targets(XY, 224.0, 14,
                                                        [_rect(900, 1900, 1112, 2300)])[0])
    assert two[1].sum() == 0
    # an exclusion (_2) cuts its area out of the lesion, as in CAMELYON16 masks
    whole = Annotation(_rect(900, 1900, 1300, 2300), "Tumor")
    hole = Annotation(_rect(1112, 1900, 1300, 2300), "_2")
    cut = patch_targets(XY, 224.0, 14, [whole, hole])[0]
    assert np.all(cut[:, :7] == 1.0) and np.all(cut[:, 7:] == 0.0)
    assert patch_targets(XY, 224.0, 14, [hole]).sum() == 0
    assert patch_targets(XY, 224.0, 14, []).sum() == 0
    g16 = patch_targets(XY, 224.0, 16, [_rect(1000, 2000, 1014, 2014)])[0]  # 14 px patches
    assert g16.shape == (16, 16) and g16[0, 0] == 1.0 and g16.sum() == 1.0


# -- labels and ids ------------------------------------------------------------------------------
@pytest.mark.parametrize("value,label", [
    ("Tumor", 1), ("normal", 0), ("1", 1), ("0", 0), ("pN0", 0), ("pN0(i+)", 0),
    ("pN1mi", 1), ("pN1", 1), ("pN2", 1), ("itc", 0), ("macro", 1),
])
def test_parse_label(value: str, label: int) -> None:
    assert parse_label(value) == label


def test_parse_label_refuses_unknown() -> None:
    with pytest.raises(ValueError, match="maybe"):
        parse_label("maybe")


def test_slide_ids_and_store_discovery(tmp_path: Path) -> None:
    assert slide_id("run/tumor_001.zarr") == "tumor_001"
    assert slide_id("ann/tumor_001.xml") == "tumor_001"
    for name in ("b.zarr", "a.zarr"):
        zarr.open_group(str(tmp_path / name), mode="w", zarr_format=3)
    (tmp_path / "a").mkdir()  # the run's picture folder is not a store
    assert find_stores([tmp_path]) == [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    assert find_stores([tmp_path / "b.zarr"]) == [tmp_path / "b.zarr"]
    with pytest.raises(StoreError, match="no \\*.zarr"):
        find_stores([tmp_path / "a"])
    with pytest.raises(StoreError, match="not a Zarr store"):
        find_stores([tmp_path / "missing"])


# -- MIL -----------------------------------------------------------------------------------------
def _mil_store(path: Path, emb: np.ndarray) -> None:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("vit/embedding", data=emb.astype(np.float32))
    group.attrs["complete"] = True


@pytest.fixture(scope="module")
def mil_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 slides, half tumour: a tumour bag has an eighth of its tiles shifted by +2 on 4 of 16
    dimensions; plus one store with no label."""
    root = tmp_path_factory.mktemp("mil")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        tumour = i % 2 == 1
        k = int(rng.integers(20, 60))
        emb = rng.normal(size=(k, D))
        if tumour:
            emb[: max(2, k // 8), :4] += 2.0
        _mil_store(root / "run" / f"slide_{i:02d}.zarr", emb)
        rows.append((f"Slide_{i:02d}.tif", "Tumor" if tumour else "Normal"))
    _mil_store(root / "run" / "unlabelled.zarr", rng.normal(size=(10, D)))
    with open(root / "labels.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["slide", "label"])
        wr.writerows(rows)
    return root


def test_mil_cross_validation_separates_and_saves(mil_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "mil.safetensors"
    res = train_mil([mil_data / "run"], mil_data / "labels.csv", out, folds=3, epochs=40,
                    lr=5e-3, patience=5, hidden=16, dropout=0.0, seed=0, progress=False)
    assert len(res.fold_auc) == 3 and min(res.fold_auc) > 0.9, res.fold_auc
    assert res.oof_auc > 0.9
    # ids match case-insensitively and without the slide suffix; unlabelled stores are skipped
    assert len(res.slides) == 24 and "unlabelled" not in res.slides
    assert sum(res.slides.values()) == 12
    assert 1 <= res.final_epochs <= 40
    assert res.summary().startswith("24 slides (12 positive); val AUC per fold [")
    meta = json.loads((tmp_path / "models" / "mil.json").read_text())
    assert res.config == tmp_path / "models" / "mil.json"
    assert {k: meta[k] for k in ("kind", "in_dim", "hidden", "n_classes", "weights")} == {
        "kind": "wsi-prune-mil", "in_dim": D, "hidden": 16, "n_classes": 1,
        "weights": "mil.safetensors"}
    assert meta["cv"]["val_auc"] == res.fold_auc and meta["training"]["n_slides"] == 24

    cfg, in_dim, n_classes = trained_mil_config(str(out))
    loaded = build_mil(cfg, in_dim, n_classes)
    also = build_mil(MILConfig(hidden=16, weights=str(out)), D)
    bag = torch.from_numpy(open_store(mil_data / "run" / "slide_01.zarr")["vit/embedding"][:])
    with torch.no_grad():
        want = res.model(bag).prob
        torch.testing.assert_close(loaded(bag).prob, want)
        torch.testing.assert_close(also(bag).prob, want)
    # the final model separates the training slides
    probs, ys = [], []
    with torch.no_grad():
        for sid, y in res.slides.items():
            emb = open_store(mil_data / "run" / f"{sid.lower()}.zarr")["vit/embedding"][:]
            probs.append(float(loaded(torch.from_numpy(emb)).prob))
            ys.append(y)
    assert roc_auc_score(ys, probs) > 0.95


def test_mil_early_stopping_stops(mil_data: Path, tmp_path: Path) -> None:
    res = train_mil([mil_data / "run"], mil_data / "labels.csv", tmp_path / "m.safetensors",
                    folds=2, epochs=300, lr=3e-2, patience=3, hidden=16, seed=0, progress=False)
    for best, ran in zip(res.best_epochs, res.stopped_epochs, strict=True):
        assert ran == best + 3 and ran < 300
    assert res.final_epochs == round(float(np.median(res.best_epochs)))


def test_mil_is_deterministic_for_a_seed(mil_data: Path, tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    kw = dict(folds=2, epochs=4, lr=1e-2, patience=2, hidden=16, dropout=0.25,
              max_instances=16, progress=False)
    a = train_mil([mil_data / "run"], mil_data / "labels.csv", tmp_path / "a.safetensors",
                  seed=3, **kw)
    b = train_mil([mil_data / "run"], mil_data / "labels.csv", tmp_path / "b.safetensors",
                  seed=3, **kw)
    c = train_mil([mil_data / "run"], mil_data / "labels.csv", tmp_path / "c.safetensors",
                  seed=4, **kw)
    assert _state_equal(a.model, b.model) and a.fold_auc == b.fold_auc
    assert not _state_equal(a.model, c.model)
    saved_a, saved_b = (load_state_dict(tmp_path / f"{n}.safetensors") for n in "ab")
    assert all(torch.equal(saved_a[k], saved_b[k]) for k in saved_a)
    # the caller's random stream is left alone
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_mil_platt_scaling_is_folded_into_the_head(mil_data: Path, tmp_path: Path) -> None:
    kw = dict(folds=3, epochs=30, lr=5e-3, patience=5, hidden=16, dropout=0.0, seed=1,
              progress=False)
    raw = train_mil([mil_data / "run"], mil_data / "labels.csv", tmp_path / "raw.safetensors",
                    calibrate=False, **kw)
    cal = train_mil([mil_data / "run"], mil_data / "labels.csv", tmp_path / "cal.safetensors",
                    **kw)
    meta = json.loads((tmp_path / "cal.json").read_text())["calibration"]
    assert meta["applied"] and meta["a"] > 0 and meta["fitted_on"] == "out-of-fold logits"
    assert "calibration" not in json.loads((tmp_path / "raw.json").read_text())
    assert cal.fold_auc == raw.fold_auc  # the folds are untouched; only the final model moves
    bag = torch.from_numpy(open_store(mil_data / "run" / "slide_03.zarr")["vit/embedding"][:])
    with torch.no_grad():
        want = meta["a"] * raw.model(bag).logit + meta["c"]
        torch.testing.assert_close(cal.model(bag).logit, want, rtol=1e-5, atol=1e-5)
        # the ranking (and so the attention heat) is unchanged
        torch.testing.assert_close(cal.model(bag).attention, raw.model(bag).attention)


def test_mil_reads_camelyon17_stages(mil_data: Path, tmp_path: Path) -> None:
    stages = ["pN0", "pN0(i+)", "pN1mi", "pN1", "pN2", "pN0"]
    labels = tmp_path / "stage_labels.csv"
    labels.write_text("patient,stage\npatient_000.zip,pN1\n" + "".join(
        f"slide_{i:02d}.tif,{s}\n" for i, s in enumerate(stages)))
    res = train_mil([mil_data / "run" / f"slide_{i:02d}.zarr" for i in range(6)], labels,
                    tmp_path / "m.safetensors", folds=1, epochs=1, progress=False)
    assert res.slides == {f"slide_{i:02d}": y for i, y in enumerate([0, 0, 1, 1, 1, 0])}
    assert res.fold_auc == [] and np.isnan(res.oof_auc) and res.final_epochs == 1


def test_mil_refuses_bad_inputs(mil_data: Path, tmp_path: Path) -> None:
    run = mil_data / "run"
    out = tmp_path / "m.safetensors"
    with pytest.raises(ConfigError, match="both classes"):
        train_mil([run / "slide_00.zarr", run / "slide_02.zarr"], mil_data / "labels.csv", out,
                  folds=1, progress=False)
    with pytest.raises(ConfigError, match=r"\.safetensors"):
        train_mil([run], mil_data / "labels.csv", tmp_path / "m.pth", progress=False)
    with pytest.raises(ConfigError, match="maybe"):
        train_mil([run], {"slide_00": "maybe"}, out, progress=False)
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,label\nslide_00,Tumor\nslide_01,perhaps\n")
    with pytest.raises(WsiPruneError, match="perhaps"):
        train_mil([run], bad, out, progress=False)
    tiles_only = tmp_path / "slide_00.zarr"
    zarr.open_group(str(tiles_only), mode="w", zarr_format=3).attrs["complete"] = True
    with pytest.raises(StoreError, match="vit/embedding"):
        train_mil([tiles_only], {"slide_00": 1}, out, progress=False)
    wide = tmp_path / "wide" / "slide_01.zarr"
    _mil_store(wide, np.zeros((3, D + 1)))
    with pytest.raises(StoreError, match="embedding width"):
        train_mil([run / "slide_00.zarr", wide], mil_data / "labels.csv", out, folds=1,
                  progress=False)
    assert not out.exists()


def test_mil_fold_whose_validation_loss_is_never_finite(tmp_path: Path) -> None:
    """A store with a non-finite embedding makes every validation loss NaN (through the
    validation bag, or through the weights it poisons in training): no epoch is ever best, so
    there is no state to restore, and the error says so instead of load_state_dict(None)."""
    rng = np.random.default_rng(1)
    labels = {}
    for i in range(6):
        emb = rng.normal(size=(12, D))
        if i == 3:
            emb[5, 2] = np.nan
        _mil_store(tmp_path / "run" / f"s{i}.zarr", emb)
        labels[f"s{i}"] = i % 2
    out = tmp_path / "m.safetensors"
    with pytest.raises(TrainingError, match="validation loss was never finite") as err:
        train_mil([tmp_path / "run"], labels, out, folds=2, epochs=3, patience=2, hidden=8,
                  progress=False)
    # patience 2: stopped after 2 epochs without a best one
    assert isinstance(err.value, WsiPruneError) and "nan after 2 epoch(s)" in str(err.value)
    assert not out.exists()
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(labels.items())
    res = CliRunner().invoke(train_mil_cmd, [str(tmp_path / "run"), "--labels",
                                             str(tmp_path / "labels.csv"), "--out", str(out),
                                             "--folds", "2", "--epochs", "2", "--hidden", "8"])
    assert res.exit_code == 1 and "error: validation loss was never finite" in res.output


def test_train_mil_command(mil_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "mil.safetensors"
    result = CliRunner().invoke(train_mil_cmd, [
        str(mil_data / "run"), "--labels", str(mil_data / "labels.csv"), "--out", str(out),
        "--folds", "2", "--epochs", "20", "--lr", "5e-3", "--patience", "4", "--hidden", "16",
        "--threads", "1", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "24 slides (12 positive)" in result.output
    assert "fold 2: val AUC" in result.output and "out-of-fold AUC" in result.output
    assert out.is_file() and (tmp_path / "mil.json").is_file()
    bad = CliRunner().invoke(train_mil_cmd, [str(mil_data / "run"), "--labels",
                                             str(mil_data / "labels.csv"), "--out",
                                             str(tmp_path / "m.pt")])
    assert bad.exit_code == 1 and "error:" in bad.output and ".safetensors" in bad.output


# -- scorer --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """A real synthetic slide with two tumours, tiled into a store: (store, tumour polygons)."""
    root = tmp_path_factory.mktemp("scorer")
    slide = write_slide(root / "tumour_slide.svs", SynthSpec(
        width=3072, height=3072, mpp=0.5, seed=5, tumour=True, n_tumours=2,
        tumour_radius_um=(200.0, 400.0)))
    store = root / "run" / "tumour_slide.zarr"
    tile_slide(slide.path, store, RunConfig(), scheduler="sync")
    return store, slide.tumour_polygons


def _lesion_tiles(store: Path, polygons: list[np.ndarray]) -> np.ndarray:
    group = open_store(store)
    t = patch_targets(group["tiles/coords"][:], group.attrs["grid"]["tile_level0"], 14, polygons)
    return t.reshape(len(t), -1).max(axis=1)


def test_scorer_training_learns_the_lesions(synth_store, tmp_path: Path) -> None:
    store, polygons = synth_store
    out = tmp_path / "scorer.safetensors"
    res = train_scorer([store], {"tumour_slide": polygons}, out, epochs=4, lr=3e-3,
                       batch_size=32, seed=0, progress=False)
    frac = _lesion_tiles(store, polygons)
    assert res.n_tiles == len(frac) and res.n_positive == int((frac > 0).sum()) >= 5
    assert res.losses[-1] < 0.7 * res.losses[0], res.losses
    # the trained scorer ranks lesion tiles above the rest
    scores = score_tiles(res.model, open_store(store)["tiles/coarse"], 64).tile.numpy()
    assert roc_auc_score(frac > 0.25, scores) > 0.75

    meta = json.loads((tmp_path / "scorer.json").read_text())
    assert {k: meta[k] for k in ("kind", "model", "feature_levels", "head_channels", "grid",
                                 "pooling", "targets", "coarse_px", "coarse_mpp")} == {
        "kind": "wsi-prune-scorer", "model": "mobilenetv3_small_100", "feature_levels": [2, 4],
        "head_channels": 64, "grid": 14, "pooling": "max", "targets": "annotations",
        "coarse_px": 56, "coarse_mpp": 2.0}
    assert meta["training"]["losses"] == res.losses
    cfg, grid = trained_scorer_config(str(out), ScorerConfig(batch_size=16))
    loaded = build_scorer(cfg, grid)
    coarse = open_store(store)["tiles/coarse"][:8]
    torch.testing.assert_close(score_tiles(loaded, coarse, 8).patch,
                               score_tiles(res.model, coarse, 8).patch)


def test_scorer_training_is_deterministic(synth_store, tmp_path: Path) -> None:
    store, polygons = synth_store
    kw = dict(epochs=1, batch_size=6, max_tiles_per_store=12, progress=False,
              config=ScorerConfig(model="resnet18", feature_levels=(1, 2), head_channels=8))
    a = train_scorer([store], {"tumour_slide": polygons}, tmp_path / "a.safetensors", seed=7, **kw)
    b = train_scorer([store], {"tumour_slide": polygons}, tmp_path / "b.safetensors", seed=7, **kw)
    c = train_scorer([store], {"tumour_slide": polygons}, tmp_path / "c.safetensors", seed=8, **kw)
    assert a.n_tiles == 12 and a.n_positive == 6  # half the capped draw has lesion
    assert _state_equal(a.model, b.model) and a.losses == b.losses
    assert not _state_equal(a.model, c.model)


def _dense_run_store(src: Path, dst: Path, polygons: list[np.ndarray], grid: int) -> None:
    """A copy of the tile store with what a dense ViT run adds: every tile kept, token
    importance peaking on the lesions, MIL attention, a dense run config."""
    shutil.copytree(src, dst)
    group = zarr.open_group(str(dst), mode="r+", zarr_format=3)
    group.attrs["run_config"] = RunConfig().dense().to_dict()
    coords = group["tiles/coords"][:]
    imp = patch_targets(coords, group.attrs["grid"]["tile_level0"], grid, polygons)
    imp = imp.reshape(len(imp), -1) * 0.02 + 1e-3  # attention-like scale, not [0, 1]
    group.create_array("vit/tile_index", data=np.arange(len(coords), dtype=np.int64))
    group.create_array("vit/token_importance", data=imp.astype(np.float32))
    att = imp.sum(axis=1)
    group.create_array("mil/attention", data=(att / att.sum()).astype(np.float32))


def test_scorer_distillation_from_a_dense_run(synth_store, tmp_path: Path) -> None:
    store, polygons = synth_store
    dense = tmp_path / "dense" / "tumour_slide.zarr"
    _dense_run_store(store, dense, polygons, grid=16)
    res = train_scorer([dense.parent], None, tmp_path / "d.safetensors", distill=True,
                       epochs=2, lr=3e-3, batch_size=16, max_tiles_per_store=32, seed=0,
                       progress=False)
    assert res.grid == 16  # taken from the store's (K, 256) token importance
    assert res.model(torch.zeros(1, 3, 56, 56, dtype=torch.uint8)).patch.shape == (1, 16, 16)
    assert res.losses[-1] < 0.8 * res.losses[0], res.losses
    meta = json.loads((tmp_path / "d.json").read_text())
    assert meta["targets"] == "distill" and meta["grid"] == 16
    with pytest.raises(ConfigError, match="grid 14 asked, but the store's ViT grid is 16"):
        train_scorer([dense], None, tmp_path / "e.safetensors", distill=True, grid=14,
                     progress=False)
    with pytest.raises(StoreError, match="vit/token_importance"):
        train_scorer([store], None, tmp_path / "e.safetensors", distill=True, progress=False)
    del zarr.open_group(str(dense), mode="r+").attrs["run_config"]
    with pytest.raises(StoreError, match="but this run pruned: no run_config attribute"):
        train_scorer([dense], None, tmp_path / "e.safetensors", distill=True, progress=False)
    with pytest.raises(ConfigError, match="needs annotations"):
        train_scorer([store], None, tmp_path / "e.safetensors", progress=False)


def test_train_scorer_command_with_asap_xml(synth_store, tmp_path: Path) -> None:
    store, polygons = synth_store
    ann = tmp_path / "lesions"
    ann.mkdir()
    write_asap_xml(ann / "tumour_slide.xml", polygons)
    loaded = load_annotations(ann)["tumour_slide"]
    np.testing.assert_allclose(
        patch_targets(open_store(store)["tiles/coords"][:], 224.0, 14, loaded),
        patch_targets(open_store(store)["tiles/coords"][:], 224.0, 14, polygons), atol=0.02)
    out = tmp_path / "s.safetensors"
    runner = CliRunner()
    result = runner.invoke(train_scorer_cmd, [
        str(store.parent), "--annotations", str(ann), "--out", str(out), "--epochs", "1",
        "--batch-size", "8", "--max-tiles-per-store", "16", "--grid", "16", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "16 tiles (8 with target mass), grid 16" in result.output
    assert json.loads((tmp_path / "s.json").read_text())["grid"] == 16
    neither = runner.invoke(train_scorer_cmd, [str(store), "--out", str(out)])
    assert neither.exit_code == 2 and "--annotations" in neither.output
    both = runner.invoke(train_scorer_cmd, [str(store), "--annotations", str(ann), "--distill",
                                            "--out", str(out)])
    assert both.exit_code == 2
    missing = runner.invoke(train_scorer_cmd, [str(tmp_path), "--annotations", str(ann),
                                               "--out", str(out)])
    assert missing.exit_code == 1 and "no *.zarr slide stores" in missing.output


@pytest.fixture(scope="module")
def run_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(pruned store, dense store): one small synthetic tumour slide through ``run_batch`` with
    ``pipelines/demo.yaml`` and with its ``RunConfig.dense()``."""
    root = tmp_path_factory.mktemp("distill")
    slide = write_slide(root / "small.svs", SynthSpec(width=2048, height=2048, mpp=0.5, seed=4,
                                                      tumour=True, tissue_fraction=0.5))
    cfg = RunConfig.from_yaml(ROOT / "pipelines" / "demo.yaml")
    for name, c in (("pruned", cfg), ("dense", cfg.dense())):
        rows = run_batch([slide.path], root / name, c, progress=False)
        assert rows[0]["status"] == "ok", rows[0]["error"]
    return root / "pruned" / "small.zarr", root / "dense" / "small.zarr"


def test_distillation_takes_a_real_dense_run_and_refuses_a_pruned_one(run_stores, tmp_path):
    pruned, dense = run_stores
    g = open_store(dense)
    n = g["tiles/coords"].shape[0]
    assert np.array_equal(g["vit/tile_index"][:], np.arange(n)) and g["vit/kept_tokens"][:].all()
    cfg = RunConfig.from_yaml(ROOT / "pipelines" / "demo.yaml")
    res = train_scorer([dense.parent], None, tmp_path / "d.safetensors", distill=True,
                       config=cfg.scorer, epochs=2, batch_size=8, max_tiles_per_store=16,
                       seed=0, progress=False)
    assert res.grid == 14 and res.n_tiles == 16 == res.n_positive  # every tile has a ranking
    assert all(np.isfinite(res.losses)) and res.losses[-1] < res.losses[0], res.losses
    assert json.loads((tmp_path / "d.json").read_text())["targets"] == "distill"

    # the demo run pruned tiles (nucleus), CNN-prior tokens (ratio 0.5) and ViT tokens
    assert open_store(pruned)["vit/tile_index"].shape[0] < n
    out = tmp_path / "p.safetensors"
    for stores in ([pruned], [dense, pruned]):
        with pytest.raises(StoreError, match="needs a dense run store") as err:
            train_scorer(stores, None, out, distill=True, progress=False)
        msg = str(err.value)
        assert err.value.path == str(pruned)
        for why in ("tile_select.policy is 'nucleus'", "token_select.policy is 'ratio'",
                    "vit.prune_blocks is [1, 2, 3]", "of 43 tissue tiles reached the ViT"):
            assert why in msg, msg
    assert not out.exists()
    res = CliRunner().invoke(train_scorer_cmd, [str(pruned), "--distill", "--out", str(out)])
    assert res.exit_code == 1 and "needs a dense run store" in res.output


def test_mil_folds_fall_to_what_the_smaller_class_allows(mil_data: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    run = mil_data / "run"
    with caplog.at_level("WARNING", logger="wsi_prune.training.mil"):
        res = train_mil([run / f"slide_{i:02d}.zarr" for i in range(4)], mil_data / "labels.csv",
                        tmp_path / "m.safetensors", folds=5, epochs=2, patience=1, hidden=8,
                        progress=False)
    assert len(res.fold_auc) == 2  # 2 slides per class: 2 folds, not an error
    assert "5-fold cross-validation needs >= 5 slides per class, got 2 negative and 2 positive: " \
           "using 2 folds" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="wsi_prune.training.mil"):
        res = train_mil([run / f"slide_{i:02d}.zarr" for i in range(3)], mil_data / "labels.csv",
                        tmp_path / "m1.safetensors", folds=3, epochs=2, hidden=8, progress=False)
    assert res.fold_auc == [] and "using no validation (1 fold)" in caplog.text


@pytest.fixture(scope="module")
def two_class_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tumour and a normal 2048² slide through run_batch with pipelines/demo.yaml (pruned)
    and its dense() twin: ``root/{pruned,dense}/``, ``root/labels.csv``."""
    root = tmp_path_factory.mktemp("regimes")
    (root / "slides").mkdir()
    for name, tumour, seed in (("t1", True, 4), ("n1", False, 5)):
        write_slide(root / "slides" / f"{name}.svs",
                    SynthSpec(width=2048, height=2048, mpp=0.5, seed=seed, tumour=tumour,
                              tissue_fraction=0.5))
    (root / "labels.csv").write_text("slide,label\nt1,Tumor\nn1,Normal\n")
    cfg = RunConfig.from_yaml(ROOT / "pipelines" / "demo.yaml")
    for name, c in (("pruned", cfg), ("dense", cfg.dense())):
        rows = run_batch([root / "slides"], root / name, c, progress=False)
        assert [r["status"] for r in rows] == ["ok", "ok"], rows
    return root


def test_mil_sidecar_records_the_regime_and_the_vit(two_class_runs: Path, tmp_path: Path) -> None:
    from wsi_prune.models.binding import check_bindings
    from wsi_prune.models.factory import build_models

    root = two_class_runs
    kw = dict(folds=2, epochs=2, hidden=8, progress=False)
    pruned = train_mil([root / "pruned"], root / "labels.csv", tmp_path / "p.safetensors", **kw)
    both = train_mil([root / "dense", root / "pruned"], root / "labels.csv",
                     tmp_path / "b.safetensors", **kw)
    dense = train_mil([root / "dense"], root / "labels.csv", tmp_path / "d.safetensors", **kw)
    assert (pruned.regime, both.regime, dense.regime) == ("pruned", "dense+pruned", "dense")
    meta = json.loads((tmp_path / "b.json").read_text())
    assert meta["training"]["n_slides"] == 2 and meta["training"]["n_bags"] == 4
    cfg = RunConfig.from_yaml(ROOT / "pipelines" / "demo.yaml")
    assert meta["vit"] == {"model": cfg.vit.model, "model_kwargs": cfg.vit.model_kwargs,
                           "pooling": "model", "sha256": None, "pretrained": False,
                           "init_seed": 0, "mean": None, "std": None,
                           "tile_mpp": cfg.tiling.mpp, "tile_px": cfg.tiling.tile_px}

    digests = {"scorer": None, "vit": None, "mil": None}
    with_head = cfg.replace(mil={"weights": str(tmp_path / "p.safetensors"), "hidden": 8})
    assert check_bindings(with_head, digests) == []
    # a head trained on dense bags, fed pruned ones: a warning, not an error
    dense_head = cfg.replace(mil={"weights": str(tmp_path / "d.safetensors"), "hidden": 8})
    (warning,) = check_bindings(dense_head, digests)
    assert "trained on dense bags" in warning and "pruned" in warning
    assert check_bindings(dense_head.dense(), digests) == []
    # another ViT of the same width: refused, naming what differs ...
    other = with_head.replace(vit={"model_kwargs": {**cfg.vit.model_kwargs, "mlp_ratio": 2.0}})
    with pytest.raises(CheckpointRefused, match="model_kwargs") as err:
        build_models(other)
    assert "mil.allow_vit_mismatch" in str(err.value)
    with pytest.raises(CheckpointRefused, match="sha256 None .this run: 'ab"):
        check_bindings(with_head, {**digests, "vit": "ab" * 32})
    # the same ViT fed differently normalised or scaled tiles: another embedding space
    with pytest.raises(CheckpointRefused, match=r"std None \(this run: \[0.2"):
        check_bindings(with_head.replace(vit={"std": (0.2, 0.2, 0.2)}), digests)
    with pytest.raises(CheckpointRefused, match="tile_mpp"):
        check_bindings(with_head.replace(tiling={"mpp": 2 * cfg.tiling.mpp}), digests)
    # a head whose sidecar predates these keys is judged on the keys it has
    legacy = json.loads((tmp_path / "p.json").read_text())
    for k in ("mean", "std", "tile_mpp", "tile_px"):
        del legacy["vit"][k]
    (tmp_path / "p.json").write_text(json.dumps(legacy))
    assert check_bindings(with_head.replace(vit={"std": (0.2, 0.2, 0.2)}), digests) == []
    # ... unless the user says so
    models = build_models(other.replace(mil={"allow_vit_mismatch": True}))
    assert models.mil.in_dim == both.model.in_dim


def test_mixing_vits_in_one_training_set_is_refused(two_class_runs: Path, tmp_path: Path) -> None:
    root = two_class_runs
    other = tmp_path / "other"
    shutil.copytree(root / "pruned" / "n1.zarr", other / "n1.zarr")
    group = zarr.open_group(str(other / "n1.zarr"), mode="r+")
    cfg = dict(group.attrs["run_config"])
    cfg["vit"] = {**cfg["vit"], "pooling": "cls+mean"}
    group.attrs["run_config"] = cfg
    with pytest.raises(StoreError, match="another ViT"):
        train_mil([root / "pruned" / "t1.zarr", other / "n1.zarr"], root / "labels.csv",
                  tmp_path / "m.safetensors", folds=1, epochs=1, progress=False)


def test_rank_loss_numbers() -> None:
    from wsi_prune.training.scorer import _rank_loss

    z, t = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 0.5])
    want = []
    for i in range(3):
        for j in range(3):
            if i != j:
                d, q = float(z[i] - z[j]), float(torch.sigmoid(t[i] - t[j]))
                want.append(-(q * np.log(1 / (1 + np.exp(-d))) + (1 - q) * np.log(
                    1 / (1 + np.exp(d)))))
    assert float(_rank_loss(z, t, tau=1.0)) == pytest.approx(np.mean(want), rel=1e-6)
    # the order the teacher gives costs less than the reverse, whatever the scale
    assert float(_rank_loss(3 * t, t)) < float(_rank_loss(-3 * t, t))
    assert float(_rank_loss(t - 5, t)) == pytest.approx(float(_rank_loss(t, t)), rel=1e-6)
    # a lower temperature sharpens the preferences: the right order costs less still
    assert float(_rank_loss(3 * t, t, tau=0.1)) < float(_rank_loss(3 * t, t, tau=1.0))


def test_scorer_fits_a_teachers_tile_order_with_the_rank_loss(synth_store) -> None:
    """The tile loss of ``train-scorer --tile-targets vit`` on one batch: given the order of a
    teacher that sees something in the coarse tiles (their mean optical density, squeezed into
    the narrow probability band a ViT gives normal tissue) and no lesion anywhere, the scorer
    fits that order; the soft-target BCE of the same steps does not."""
    from scipy.stats import spearmanr

    from wsi_prune.models.scorer import PatchScorer, pool_patch_map
    from wsi_prune.training.scorer import _scorer_loss

    store, _ = synth_store
    x = open_store(store)["tiles/coarse"][:32]
    od = -np.log((x.astype(np.float32) + 1) / 256).mean(axis=(1, 2, 3))
    teacher = (0.2 + 0.1 / (1 + np.exp(-(od - od.mean()) / od.std()))).astype(np.float32)
    zeros = np.zeros((len(x), 14, 14), np.float32)  # no lesion anywhere
    cfg = ScorerConfig()
    rho: dict[bool, list[float]] = {True: [], False: []}
    # three initialisations: what the BCE reaches in 25 steps swings with float rounding (0.18
    # to 0.82 over initialisations, threads and CPU kernels), the rank loss's does not
    # (0.93-0.98)
    for seed in range(3):
        for rank in (True, False):
            torch.manual_seed(seed)
            model = PatchScorer(cfg, 14).train()
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            for _ in range(25):
                loss = _scorer_loss(model, x, zeros, teacher, cfg, 1.0, rank=rank)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                logits, _ = model.forward_logits(torch.from_numpy(x).permute(0, 3, 1, 2))
            score = pool_patch_map(torch.sigmoid(logits), cfg.pooling, cfg.topk).numpy()
            rho[rank].append(spearmanr(score, teacher).statistic)
    assert min(rho[True]) > 0.9 and np.mean(rho[True]) > np.mean(rho[False]) + 0.2, rho
