"""Slide metrics, CAMELYON16 FROC, run evaluation, pruned-vs-dense comparison and the CLI, on
real files: predictions/candidates CSVs, ASAP XML and Zarr v3 stores written here."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.evaluation._helpers import (
    ANNOTATIONS,
    CANDIDATES,
    row,
    write_run,
)
from tests.io.test_annotations import square
from wsi_prune.cli.evaluate import evaluate as evaluate_cmd
from wsi_prune.evaluation.compare import compare_runs
from wsi_prune.evaluation.froc import froc
from wsi_prune.evaluation.plots import roc_figure
from wsi_prune.evaluation.runs import EvaluationError, evaluate_run, read_candidates
from wsi_prune.evaluation.slide_metrics import slide_metrics
from wsi_prune.io.annotations import Annotation, evaluation_mask
from wsi_prune.outputs.candidates import write_candidates

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- slide level ---------------------------------------------------------------------------------


@pytest.mark.parametrize("probs, labels, auc", [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 3 / 4),  # pairs (pos > neg): 3 of 4
    ([0.2, 0.6, 0.6, 0.9], [0, 0, 1, 1], 3.5 / 4),  # a tie counts one half
    ([0.9, 0.8, 0.1, 0.2, 0.3], [0, 0, 1, 1, 1], 0.0),
])  # fmt: skip
def test_auc_matches_hand_count(probs, labels, auc):
    m = slide_metrics(probs, labels, n_boot=0)
    assert m.auc == pytest.approx(auc) and m.auc_ci is None and m.n_boot == 0


def test_threshold_metrics():
    m = slide_metrics([0.1, 0.4, 0.35, 0.8, 0.5], [0, 0, 1, 1, 0], threshold=0.5, n_boot=0)
    # called positive: 0.8 (tumour) and 0.5 (normal: at the threshold counts as positive)
    assert (m.tp, m.fp, m.tn, m.fn) == (1, 1, 2, 1)
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.sensitivity == pytest.approx(1 / 2) and m.specificity == pytest.approx(2 / 3)
    assert (m.n, m.n_pos, m.n_neg) == (5, 2, 3)
    assert m.fpr[0] == 0 and m.tpr[-1] == 1


def test_bootstrap_ci_contains_auc_and_is_seeded():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 20)
    p = np.clip(0.35 + 0.3 * y + rng.normal(0, 0.2, 40), 0, 1)
    a = slide_metrics(p, y, n_boot=300, seed=7)
    b = slide_metrics(p, y, n_boot=300, seed=7)
    c = slide_metrics(p, y, n_boot=300, seed=8)
    lo, hi = a.auc_ci
    assert lo < a.auc < hi and 0.5 < lo and hi <= 1.0
    assert a.auc_ci == b.auc_ci and a.auc_ci != c.auc_ci
    assert a.n_boot == 300  # stratified: every resample has both classes


def test_single_class_has_no_auc():
    m = slide_metrics([0.2, 0.7], [0, 0], n_boot=50)
    assert m.auc is None and m.auc_ci is None and m.sensitivity is None
    assert m.specificity == 0.5
    with pytest.raises(ValueError, match="0 or 1"):
        slide_metrics([0.2, 0.7], [0, 2])


# -- FROC ----------------------------------------------------------------------------------------



def test_froc_hand_computed():
    r = froc(CANDIDATES, ANNOTATIONS, {"a": 0.5, "b": 0.5})
    # Lesion confidences L1 0.9, L2 0.3; false positives 0.7, 0.5, 0.2 over 2 slides.
    # Thresholds 0.9, 0.7, 0.5, 0.3, 0.2 give (FP/slide, sensitivity) = (0, .5), (.5, .5),
    # (1, .5), (1, 1), (1.5, 1).
    assert (r.n_slides, r.n_lesions, r.n_itc, r.n_fp, r.n_ignored) == (2, 2, 1, 3, 2)
    assert r.curve_fp == (0, 0, 0.5, 1, 1, 1.5)
    assert r.curve_sensitivity == (0, 0.5, 0.5, 0.5, 1, 1)
    assert r.sensitivities == pytest.approx((0.5, 0.5, 1, 1, 1, 1))
    assert r.average == pytest.approx(5 / 6)
    assert r.per_slide["a"] == {"lesions": 2, "itc": 1, "detected": 2, "fp": 1, "ignored": 2}
    assert r.per_slide["b"] == {"lesions": 0, "itc": 0, "detected": 0, "fp": 2, "ignored": 0}


def test_froc_interpolates_between_operating_points():
    # Only L1 is found (0.9); false positives 0.8 and 0.1: (0, .5), (.5, .5), (1, .5).
    cands = {"a": np.array([[0.8, 100, 100], [0.9, 3000, 3000], [0.1, 200, 200]]),
             "b": np.zeros((0, 3))}  # fmt: skip
    r = froc(cands, ANNOTATIONS, {"a": 0.5})
    assert r.curve_fp == (0, 0, 0.5, 1.0) and r.curve_sensitivity == (0, 0.5, 0.5, 0.5)
    assert r.sensitivities == pytest.approx((0.5,) * 6)
    # with no lesion anywhere the sensitivity is undefined
    none = froc({"b": CANDIDATES["b"]}, {}, {})
    assert none.sensitivities is None and none.average is None and none.n_fp == 2


def test_froc_equals_the_challenge_script_when_a_lesion_is_missed():
    """Same lesions and hits: the curve read as Evaluation_FROC.py reads it (np.interp over its
    thresholds, all_probs[1:] harmless because a missed lesion puts a 0 in the list)."""
    rng = np.random.default_rng(0)
    lesions = [Annotation(square(x, y, 600), "_0") for x, y in
               [(1000, 1000), (4000, 1000), (7000, 1000), (1000, 6000), (7000, 7000)]]
    les = evaluation_mask(lesions, 0.5)
    cands = {}
    for s in range(3):
        xy = rng.uniform(0, 9000, (40, 2))
        hits = np.array([[1300, 1300], [4300, 1300], [1300, 6300]])[: 3 - s]
        xy = np.concatenate([xy, hits])
        cands[f"s{s}"] = np.column_stack([rng.uniform(0.01, 1, len(xy)), xy])
    r = froc(cands, {k: lesions for k in cands}, {k: 0.5 for k in cands})
    # the script, on the lesion ids of the same mask
    fp_probs, tp_probs, n_tumours = [], [], 0
    for c in cands.values():
        ids, _ = les.lookup(c[:, 1:])
        tp = np.zeros(les.labels.max(), np.float32)
        for p, i in zip(c[:, 0], ids, strict=True):
            if i == 0:
                fp_probs.append(p)
            else:
                tp[i - 1] = max(p, tp[i - 1])
        tp_probs.extend(tp.tolist())
        n_tumours += les.n_lesions
    all_probs = sorted(set(fp_probs + tp_probs))
    assert all_probs[0] == 0  # a lesion is missed somewhere
    fps = [(np.asarray(fp_probs) >= t).sum() for t in all_probs[1:]] + [0]
    tps = [(np.asarray(tp_probs) >= t).sum() for t in all_probs[1:]] + [0]
    fps = np.asarray(fps) / len(cands)
    sens = np.asarray(tps) / n_tumours
    expected = np.interp([0.25, 0.5, 1, 2, 4, 8], fps[::-1], sens[::-1])
    np.testing.assert_allclose(r.sensitivities, expected, rtol=1e-6)
    assert r.n_lesions == n_tumours == 15 and 0 < r.average < 1


def test_read_candidates(tmp_path):
    p = tmp_path / "c.csv"
    # the challenge's own format, as the pipeline writes it: no header, integer X, Y
    write_candidates(p, [(0.5, 10, 20), (0.25, 30, 40)])
    assert p.read_text() == "0.500000,10,20\n0.250000,30,40\n"
    np.testing.assert_array_equal(read_candidates(p), [[0.5, 10, 20], [0.25, 30, 40]])
    # files of older versions: a header naming the columns (any order), float coordinates
    p.write_text("confidence,X,Y\n0.5,10.0,20.5\n")
    np.testing.assert_array_equal(read_candidates(p), [[0.5, 10, 20.5]])
    p.write_text("X,Y,confidence\n10,20,0.5\n30,40,0.25\n")
    np.testing.assert_array_equal(read_candidates(p), [[0.5, 10, 20], [0.25, 30, 40]])
    for empty in ("", "confidence,X,Y\n"):  # a slide without candidates
        p.write_text(empty)
        assert read_candidates(p).shape == (0, 3)
    p.write_text("confidence,X,Y\n0.5,ten,20\n")
    with pytest.raises(EvaluationError, match="row 1 is not confidence,X,Y") as err:
        read_candidates(p)
    assert err.value.path == str(p)
    p.write_text("0.5,10\n")
    with pytest.raises(EvaluationError, match="row 1 is not confidence,X,Y"):
        read_candidates(p)


def test_roc_is_drawn_as_straight_lines_between_the_points():
    # tied scores (4 slides at 0.5) are one diagonal segment of the ROC, not a staircase
    m = slide_metrics([0.1, 0.5, 0.5, 0.5, 0.5, 0.9], [0, 0, 1, 0, 1, 1], n_boot=0)
    fig = roc_figure({"run": m})
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("run"))
    assert line.get_drawstyle() == "default"
    np.testing.assert_array_equal(line.get_xdata(), m.fpr)
    np.testing.assert_array_equal(line.get_ydata(), m.tpr)
    assert m.fpr == pytest.approx((0, 0, 2 / 3, 1)) and m.tpr == pytest.approx((0, 1 / 3, 1, 1))
    assert m.auc == pytest.approx(0.5 * (1 / 3 + 1) * 2 / 3 + 1 / 3)  # trapezoid of the tie


# -- run folders ---------------------------------------------------------------------------------


def test_evaluate_run_writes_report_metrics_and_plots(dataset, tmp_path):
    out = tmp_path / "eval"
    m = evaluate_run(dataset["run"], dataset["labels"], dataset["annotations"], out, n_boot=200)
    s = m["slide_level"]
    # a .9 T, d .7 T, b .6 N, c .1 N: AUC 1; at 0.5 b is a false positive
    assert s["auc"] == 1.0 and (s["tp"], s["fp"], s["tn"], s["fn"]) == (2, 1, 1, 0)
    assert s["n"] == 4 and s["unlabelled"] == [] and s["labelled_not_in_run"] == []
    assert m["slides"]["failed"] == 1 and m["slides"]["not_ok"] == ["e"]
    f = m["froc"]
    # FROC example plus slide d (one lesion hit at 0.4) and c (nothing): 3 lesions, 4 slides.
    # Points: (0,1/3) (.25,1/3) (.5,1/3) (.5,2/3)@0.4 (.5,1)@0.3 (.75,1)@0.2
    assert (f["n_slides"], f["n_lesions"], f["n_fp"]) == (4, 3, 3)
    assert f["sensitivities"] == pytest.approx([1 / 3, 1, 1, 1, 1, 1])
    assert m["cost"]["gmacs"] == 40.0 and m["cost"]["token_fraction_mean"] == 0.05
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["froc"]["average"] == pytest.approx(8 / 9)
    report = (out / "report.md").read_text()
    assert "| AUC | 1.000 |" in report and "![FROC](froc.png)" in report and "Not ok: e" in report
    for png in ("roc.png", "froc.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*partial*"))


def test_evaluate_run_without_annotation_for_a_tumour_slide(dataset):
    (dataset["annotations"] / "d.xml").unlink()
    m = evaluate_run(dataset["run"], dataset["labels"], dataset["annotations"], n_boot=0)
    assert m["froc"]["tumour_slides_without_xml"] == ["d"] and m["froc"]["n_slides"] == 3
    assert (dataset["run"] / "evaluation" / "report.md").is_file()
    # without labels, a slide without XML is simply normal
    m = evaluate_run(dataset["run"], None, dataset["annotations"], n_boot=0)
    assert m["froc"]["n_slides"] == 4 and m["slide_level"] is None


def test_evaluate_run_errors(dataset, tmp_path):
    with pytest.raises(EvaluationError, match="not a wsi-prune run folder"):
        evaluate_run(tmp_path, dataset["labels"])
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "predictions.shard-0-of-2.csv").write_text("id,status\n")
    with pytest.raises(EvaluationError, match="wsi-prune merge"):
        evaluate_run(shard, dataset["labels"])
    (dataset["run"] / "c" / "candidates.csv").unlink()
    with pytest.raises(EvaluationError, match="candidates file missing") as err:
        evaluate_run(dataset["run"], dataset["labels"], dataset["annotations"])
    assert err.value.path.endswith("c/candidates.csv")
    other = tmp_path / "other.csv"
    other.write_text("slide,label\nzz,Tumor\n")
    with pytest.raises(EvaluationError, match="no successful slide of the run has a label"):
        evaluate_run(dataset["run"], other)


def _statuses(run: Path, status: str) -> None:
    """Rewrite the run's ok rows with another status (what a re-run over a finished OUT
    writes: every complete slide ``skipped``, its stored result in the row)."""
    with (run / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    write_run(run, [r | {"status": status} if r["status"] == "ok" else r for r in rows])


def test_skipped_slides_are_evaluated_like_ok_ones(dataset, tmp_path):
    first = evaluate_run(dataset["run"], dataset["labels"], dataset["annotations"],
                         tmp_path / "first", n_boot=100)
    _statuses(dataset["run"], "skipped")
    again = evaluate_run(dataset["run"], dataset["labels"], dataset["annotations"],
                         tmp_path / "again", n_boot=100)
    assert again["slides"]["skipped"] == 4 and again["slides"]["ok"] == 0
    assert again["slides"]["not_ok"] == ["e"]  # only the failed slide is left out
    for key in ("slide_level", "froc", "cost"):
        assert again[key] == first[key], key
    assert again["slide_level"]["n"] == 4 and again["froc"]["average"] == pytest.approx(8 / 9)
    # a re-run compared with the first run: every slide is shared
    m = compare_runs(dataset["run"], dataset["run"], tmp_path / "cmp", dataset["labels"],
                     n_boot=0)
    assert m["n_slides"] == 4 and m["probability"]["max_abs_diff"] == 0
    assert m["evaluation"]["pruned"]["slide_level"]["auc"] == 1.0
    other = write_run(tmp_path / "mixed", [row("a", 0.9, "skipped"), row("b", 0.6),
                                           row("c", 0.1, "skipped"), row("d", 0.7)])
    m = compare_runs(dataset["run"], other, tmp_path / "cmp2", dataset["labels"], n_boot=0)
    assert m["n_slides"] == 4 and m["difference"]["auc"] == 0.0
    (dataset["run"] / "predictions.csv").write_text(
        "id,status,probability\na,skipped,\n")
    with pytest.raises(EvaluationError, match="row 2 \\(a\\) is skipped but has no probability"):
        evaluate_run(dataset["run"], dataset["labels"])


def test_labels_and_annotations_match_ids_case_insensitively(dataset, tmp_path):
    """CAMELYON16: reference.csv says Test_001 and the XML may be Test_001.xml, for a slide
    test_001.tif whose run id is test_001."""
    want = evaluate_run(dataset["run"], dataset["labels"], dataset["annotations"],
                        tmp_path / "want", n_boot=100)
    labels = tmp_path / "reference.csv"
    labels.write_text("A.tif,Tumor\nB.tif,Normal\nC.tif,Normal\nD.tif,Tumor\nE.tif,Tumor\n"
                      "F.tif,Normal\n")
    ann = tmp_path / "upper"
    ann.mkdir()
    for xml in dataset["annotations"].glob("*.xml"):
        shutil.copy(xml, ann / f"{xml.stem.upper()}.xml")
    got = evaluate_run(dataset["run"], labels, ann, tmp_path / "got", n_boot=100)
    assert got["slide_level"] == want["slide_level"] | {"labelled_not_in_run": ["F"]}
    assert got["froc"]["average"] == want["froc"]["average"] == pytest.approx(8 / 9)
    assert got["froc"]["n_lesions"] == 3 and got["froc"]["tumour_slides_without_xml"] == []
    m = compare_runs(dataset["run"], dataset["run"], tmp_path / "cmp", labels, n_boot=50)
    assert m["evaluation"]["dense"]["slide_level"]["n"] == 4
    assert m["difference"]["auc"] == 0.0 and m["difference"]["auc_ci"] == (0.0, 0.0)


# -- pruned versus dense -------------------------------------------------------------------------


def _tiles(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(np.arange(n) * 448, [0, 448]), -1).reshape(-1, 2)[:n]
    return rng.uniform(0, 1, n), coords


def test_compare_identical_runs(tmp_path):
    stores = {}
    for sid, seed in (("a", 1), ("b", 2)):
        heat, coords = _tiles(30, seed)
        stores[sid] = (heat, np.ones(30), coords)
    rows = [row("a", 0.8), row("b", 0.3)]
    dense = write_run(tmp_path / "dense", rows, stores=stores)
    pruned = write_run(tmp_path / "pruned", rows, stores=stores)
    m = compare_runs(dense, pruned, tmp_path / "cmp")
    assert m["n_slides"] == 2
    assert m["probability"]["max_abs_diff"] == 0 and m["probability"]["label_agreement"] == 1
    h = m["heatmap"]
    assert h["vit"]["mean"] == pytest.approx(1) and h["all"]["pooled"] == pytest.approx(1)
    assert h["per_slide"]["a"] == {"tiles": 30, "tiles_vit_both": 30,
                                   "spearman_vit": pytest.approx(1),
                                   "spearman_all": pytest.approx(1)}  # fmt: skip
    assert m["cost"]["gmacs_ratio"] == 1 and "difference" not in m
    assert "# Pruned versus dense" in (tmp_path / "cmp" / "report.md").read_text()


def test_compare_pruned_run(dataset, tmp_path):
    """A pruned run: other tile order, CNN-only tiles with other heat, nearby probabilities."""
    heat, coords = _tiles(40, 5)
    kept = np.arange(40) % 4 == 0  # 10 tiles reach the ViT
    cnn_heat = np.where(kept, heat, 1 - heat)  # CNN-only tiles rank the other way
    order = np.random.default_rng(0).permutation(40)
    dense_rows = [row("a", 0.9, gmacs=200.0, sec_total=20.0), row("b", 0.6, gmacs=200.0),
                  row("c", 0.1, gmacs=200.0), row("d", 0.7, gmacs=200.0)]
    pruned_rows = [row("a", 0.85), row("b", 0.4), row("c", 0.12), row("d", 0.75),
                   row("e", 0.9)]  # fmt: skip
    cands = dict(CANDIDATES, c=np.zeros((0, 3)), d=np.array([[0.4, 3500, 3500]]))
    dense = write_run(tmp_path / "dense", dense_rows, cands,
                      {"a": (heat, np.ones(40), coords)})  # fmt: skip
    pcands = dict(cands, d=np.zeros((0, 3)))  # the pruned run misses slide d's lesion
    pruned = write_run(tmp_path / "pruned", pruned_rows, pcands,
                       {"a": (cnn_heat[order], kept[order], coords[order])})  # fmt: skip
    out = tmp_path / "cmp"
    m = compare_runs(dense, pruned, out, dataset["labels"], dataset["annotations"], n_boot=200)
    p = m["probability"]
    assert m["n_slides"] == 4 and m["only_pruned"] == ["e"]
    assert p["max_abs_diff"] == pytest.approx(0.2) and p["mean_abs_diff"] == pytest.approx(
        (0.05 + 0.2 + 0.02 + 0.05) / 4)  # fmt: skip
    assert p["label_agreement"] == 0.75 and p["disagreeing"] == ["b"]
    h = m["heatmap"]["per_slide"]
    assert h["a"]["tiles"] == 40 and h["a"]["tiles_vit_both"] == 10
    assert h["a"]["spearman_vit"] == pytest.approx(1) and h["a"]["spearman_all"] < 0.5
    assert h["b"]["error"].endswith("no Zarr store here")
    c = m["cost"]
    assert c["gmacs_ratio"] == pytest.approx(20) and c["speedup"] == pytest.approx(26 / 8)
    d = m["difference"]
    assert d["auc"] == pytest.approx(0.0)  # both rank the tumours first
    lo, hi = d["auc_ci"]
    assert lo <= 0 <= hi
    # dense: sensitivities as in the run evaluation; pruned misses d's lesion
    ev = m["evaluation"]
    assert ev["dense"]["froc"]["average"] == pytest.approx(8 / 9)
    assert ev["pruned"]["froc"]["n_lesions"] == 3
    assert d["froc"] == pytest.approx(ev["pruned"]["froc"]["average"] - 8 / 9) and d["froc"] < 0
    for f in ("report.md", "metrics.json", "roc.png", "froc.png"):
        assert (out / f).is_file()
    assert "pruned - dense" in (out / "report.md").read_text()


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_evaluate_and_compare(dataset, tmp_path):
    runner = CliRunner()
    res = runner.invoke(evaluate_cmd, [str(dataset["run"]), "--labels", str(dataset["labels"]),
                                       "--annotations", str(dataset["annotations"]),
                                       "--out", str(tmp_path / "e"), "--bootstrap", "50"])
    assert res.exit_code == 0, res.output
    assert "AUC 1.000" in res.output and "FROC 0.889" in res.output
    assert (tmp_path / "e" / "metrics.json").is_file()
    res = runner.invoke(evaluate_cmd, ["--compare", str(dataset["run"]), str(dataset["run"]),
                                       "--bootstrap", "0"])
    assert res.exit_code == 0, res.output
    assert "label agreement 1.000" in res.output
    assert (dataset["run"] / "comparison" / "report.md").is_file()


def test_cli_usage_and_errors(dataset, tmp_path):
    runner = CliRunner()
    res = runner.invoke(evaluate_cmd, ["--help"])
    assert res.exit_code == 0 and "wsi-prune evaluate --compare" in res.output
    assert runner.invoke(evaluate_cmd, []).exit_code == 2
    assert runner.invoke(evaluate_cmd, [str(dataset["run"])]).exit_code == 2
    both = [str(dataset["run"]), "--compare", str(dataset["run"]), str(dataset["run"])]
    assert runner.invoke(evaluate_cmd, both).exit_code == 2
    res = runner.invoke(evaluate_cmd, [str(tmp_path), "--labels", str(dataset["labels"])])
    assert res.exit_code == 1 and "error:" in res.output and "predictions.csv" in res.output
