"""Fidelity on real runs: synthetic pyramidal slides with ASAP lesion outlines, run pruned and
dense with the demo models (``pipelines/demo.yaml``), compared by ``evaluate --compare``; the
label-free audit of ``wsi-prune run --audit-fraction``; a run with a failed slide evaluated."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from scipy.stats import spearmanr

from tests._paths import REPO
from wsi_prune.cli import main
from wsi_prune.config import load_config
from wsi_prune.evaluation.audit import AUDIT_DIR, choose_audit_slides
from wsi_prune.evaluation.compare import compare_runs
from wsi_prune.evaluation.runs import evaluate_run
from wsi_prune.io.annotations import lesion_mask, read_asap_xml
from wsi_prune.pipeline.batch import run_batch

DEMO_YAML = REPO / "pipelines" / "demo.yaml"


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> dict[str, Path]:
    """Two 2048² px slides at 0.5 µm/px (one with tumour and its XML), run pruned and dense."""
    from wsi_prune.synth import write_dataset

    d = tmp_path_factory.mktemp("fidelity")
    write_dataset(d / "slides", n=2, seed=0, size=2048)
    cfg = load_config(DEMO_YAML)
    run_batch([d / "slides"], d / "pruned", cfg, progress=False)
    run_batch([d / "slides"], d / "dense", cfg.dense(), progress=False)
    return {"slides": d / "slides", "labels": d / "slides" / "labels.csv",
            "pruned": d / "pruned", "dense": d / "dense"}  # fmt: skip


def _csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def test_compare_real_runs(real_runs, tmp_path):
    m = compare_runs(real_runs["dense"], real_runs["pruned"], tmp_path / "cmp",
                     real_runs["labels"], real_runs["slides"], n_boot=200)
    ids = sorted(_csv(real_runs["pruned"] / "predictions.csv"))
    assert m["n_slides"] == 2
    # triage area recall against a whole-slide lesion mask at level 0 (0.5 µm/px, 4x finer
    # than the recall's 2 µm/px cluster masks), summed tile by tile
    kept_area = tissue_area = 0.0
    lesion_tiles = 0
    for sid in ids:
        xml = real_runs["slides"] / f"{sid}.xml"
        if not xml.is_file():
            continue
        mask = lesion_mask(read_asap_xml(xml), (2048, 2048), 0.5, 0.5)
        g = zarr.open_group(str(real_runs["pruned"] / f"{sid}.zarr"), mode="r")
        t = round(float(g.attrs["grid"]["tile_level0"]))
        for (r, c), k in zip(g["tiles/grid"][:], g["triage/kept"][:], strict=True):
            a = mask[r * t:(r + 1) * t, c * t:(c + 1) * t].sum() * 0.25  # µm²
            tissue_area += a
            kept_area += a * k
            lesion_tiles += a > 4  # more than one 2 µm mask px
    tri = m["lesion_recall"]["triage"]["all"]
    assert tri["area_in_tissue_um2"] == pytest.approx(tissue_area, rel=0.01)
    assert tri["area_recall"] == pytest.approx(kept_area / tissue_area, abs=0.01)
    assert abs(tri["tiles"] - lesion_tiles) <= 1 and tri["lesions"] >= 1
    assert m["lesion_recall"]["slides"] == 1
    assert 0 < m["lesion_recall"]["tokens"]["all"]["recall"] < 1
    # tile heat over all tissue tiles and the dense hot spots, recomputed from the stores
    for sid in ids:
        gd = zarr.open_group(str(real_runs["dense"] / f"{sid}.zarr"), mode="r")
        gp = zarr.open_group(str(real_runs["pruned"] / f"{sid}.zarr"), mode="r")
        np.testing.assert_array_equal(gd["tiles/coords"][:], gp["tiles/coords"][:])
        hd, hp = gd["heatmap/tile"][:], gp["heatmap/tile"][:]
        s = m["heatmap"]["per_slide"][sid]
        assert s["tiles"] == len(hd)
        assert s["spearman_all"] == pytest.approx(spearmanr(hd, hp).statistic)
        n_hot = math.ceil(0.05 * len(hd))
        hot = m["hot_spots"]["per_slide"][sid]
        assert hot["hot"] == n_hot
        assert hot["kept"] == int(gp["triage/kept"][:][np.argsort(-hd)[:n_hot]].sum())
    assert m["heatmap"]["all"]["slides"] == 2
    # pruned versus dense: pruning was at work, the probabilities moved
    assert m["cost"]["pruned"]["kept_tiles"] < m["cost"]["dense"]["kept_tiles"]
    d = m["difference"]
    assert d["brier"] == pytest.approx(m["evaluation"]["pruned"]["calibration"]["brier"]
                                       - m["evaluation"]["dense"]["calibration"]["brier"])
    assert d["at_95_specificity"]["n_pos"] == 1 and d["at_95_specificity"]["n_neg"] == 1
    # a dense run against itself keeps everything and agrees perfectly
    same = compare_runs(real_runs["dense"], real_runs["dense"], tmp_path / "same",
                        real_runs["labels"], real_runs["slides"], n_boot=50)
    r = same["lesion_recall"]
    assert r["triage"]["all"]["area_recall"] == 1 and r["tokens"]["all"]["recall"] == 1
    # the lesion patches do not depend on the run; only how many reached the end does
    assert r["tokens"]["all"]["patches"] == m["lesion_recall"]["tokens"]["all"]["patches"]
    assert same["heatmap"]["all"]["pooled"] == pytest.approx(1)
    assert same["hot_spots"]["recall"] == 1 and same["difference"]["auc"] in (0.0, None)
    assert same["difference"]["brier"] == 0 and same["probability"]["max_abs_diff"] == 0


def test_choose_audit_slides_is_seeded_and_takes_at_least_one():
    ids = [f"s{i}" for i in range(10)]
    a = choose_audit_slides(ids, 0.3, seed=4)
    assert len(a) == 3 and a == choose_audit_slides(ids[::-1], 0.3, seed=4)
    assert a != choose_audit_slides(ids, 0.3, seed=5) and a == sorted(a)
    assert len(choose_audit_slides(ids, 0.01, seed=0)) == 1
    assert choose_audit_slides(ids, 1.0, seed=0) == ids and choose_audit_slides([], 0.5, 0) == []


def test_run_audit_fraction_writes_audit_and_leaves_predictions_alone(real_runs, tmp_path):
    slides = sorted(real_runs["slides"].glob("*.svs"))
    bad = tmp_path / "empty.svs"
    bad.write_bytes(b"")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", *map(str, slides), str(bad), "--out", str(out),
                                    "--config", str(DEMO_YAML), "--audit-fraction", "0.5",
                                    "--audit-seed", "7", "--quiet"])
    assert res.exit_code == 3, res.output  # the empty file failed, the others are ok
    audit = json.loads((out / "audit.json").read_text())
    ok_ids = sorted(p.stem for p in slides)
    (chosen,) = audit["slides_chosen"]  # half of the two ok slides; the failed one not drawn
    assert chosen == choose_audit_slides(ok_ids, 0.5, 7)[0]
    assert (audit["fraction"], audit["seed"], audit["slides_eligible"]) == (0.5, 7, 2)
    assert audit["dense_failed"] == [] and audit["n_slides"] == 1
    # the dense path ran on the chosen slide only, beside the run, with every tile kept
    dense_rows = _csv(out / AUDIT_DIR / "predictions.csv")
    assert list(dense_rows) == [chosen]
    assert dense_rows[chosen]["kept_tiles"] == dense_rows[chosen]["tissue_tiles"]
    # the run's own outputs are those of a run without an audit
    rows = _csv(out / "predictions.csv")
    assert sorted(rows) == sorted([*ok_ids, "empty"]) and rows["empty"]["status"] == "failed"
    reference = _csv(real_runs["pruned"] / "predictions.csv")
    for sid in ok_ids:
        assert rows[sid]["probability"] == reference[sid]["probability"]
        assert rows[sid]["kept_tiles"] == reference[sid]["kept_tiles"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run_hash"] == load_config(DEMO_YAML).run_hash()
    assert set(manifest["slides"]) == {*ok_ids, "empty"}
    p = audit["probability"]
    dp = abs(float(rows[chosen]["probability"]) - float(dense_rows[chosen]["probability"]))
    assert p["max_abs_diff"] == pytest.approx(dp, abs=1e-5)
    assert audit["heatmap"]["per_slide"][chosen]["tiles"] == int(rows[chosen]["tissue_tiles"])
    assert 0 <= audit["hot_spots"]["recall"] <= 1
    md = (out / "audit.md").read_text()
    assert "seed 7" in md and chosen in md and "tile-heat Spearman, all tissue tiles" in md
    # evaluating this run: the failed slide is reported and scored as the worst case
    labels = tmp_path / "labels.csv"  # plus the failed slide, and one that was never run
    labels.write_text(real_runs["labels"].read_text() + "empty,Normal\nghost,Tumor\n")
    m = evaluate_run(out, labels, n_boot=0)
    assert m["slide_level"]["labelled_failed"] == ["empty"]
    assert m["slide_level"]["labelled_not_in_run"] == ["ghost"]
    w = m["worst_case"]
    assert w["imputed"] == ["empty", "ghost"] and w["slide_level"]["n"] == 4
    # the normal slide scored 1 is a false positive, the tumour scored 0 a false negative
    assert w["slide_level"]["fp"] == m["slide_level"]["fp"] + 1
    assert w["slide_level"]["fn"] == m["slide_level"]["fn"] + 1
    assert w["calibration"]["brier"] > m["calibration"]["brier"]


def test_audit_usage_errors(tmp_path, real_runs):
    slide = str(next(real_runs["slides"].glob("*.svs")))
    base = ["run", slide, "--out", str(tmp_path / "o"), "--config", str(DEMO_YAML), "--quiet"]
    for extra in (["--audit-fraction", "0"], ["--audit-fraction", "1.5"],
                  ["--audit-fraction", "0.5", "--shard", "0/2"],
                  ["--audit-fraction", "0.5", "--dense"]):
        res = CliRunner().invoke(main, [*base, *extra])
        assert res.exit_code == 2, (extra, res.output)
    assert not (tmp_path / "o" / "predictions.csv").exists()
