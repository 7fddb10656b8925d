"""Fidelity metrics on constructed slide stores and run folders whose answers are known by hand:
triage and token recall per lesion size class, tile-heat Spearman over all tissue tiles, dense
hot spots kept, Δ sensitivity at 95 % specificity, Δ calibration, worst-case scoring of failed
and missing slides, and the official FROC protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from scipy.stats import spearmanr

from tests.evaluation._helpers import (
    ANNOTATIONS,
    CANDIDATES,
    rect,
    row,
    write_pipeline_store,
    write_run,
)
from tests.io.test_annotations import write_xml
from wsi_prune.cli.evaluate import evaluate as evaluate_cmd
from wsi_prune.errors import StoreError
from wsi_prune.evaluation.agreement import heatmap_agreement
from wsi_prune.evaluation.compare import compare_runs
from wsi_prune.evaluation.compare import lesion_recall as compare_lesion_recall
from wsi_prune.evaluation.froc import froc
from wsi_prune.evaluation.lesion_recall import (
    finish,
    lesions_from_annotations,
    size_class,
    slide_lesion_counts,
    slide_lesion_counts_for,
)
from wsi_prune.evaluation.runs import evaluate_run
from wsi_prune.io.annotations import Annotation, evaluation_mask

# A 24 x 24 grid of 224 px tiles at 0.5 µm/px (112 µm tiles, 14 x 14 patches of 8 µm), all
# tissue, with three lesions aligned to the 2 µm/px mask and to the patches:
MACRO = rect(0, 0, 4480, 448)  # tile rows 0-1, cols 0-19: 2240 x 224 µm, diameter 2251 µm
MICRO = rect(2240, 2240, 3136, 3136)  # tile rows 10-13, cols 10-13: 448 µm square, 634 µm
ITC = rect(4608, 2704, 4800, 2896)  # 96 µm square, 136 µm: half in tile (12, 20), half (12, 21)
HAND_ANNS = [Annotation(MACRO, "Tumor"), Annotation(MICRO, "_0"), Annotation(ITC, "_1")]
KEPT = np.zeros((24, 24), bool)
KEPT[0, :20] = KEPT[1, :10] = True  # macro: 30 of its 40 tiles
KEPT[10, 10:14] = True  # micro: 4 of 16
KEPT[12, 20] = True  # ITC: the tile holding half of it
REACHED = np.ones((24, 24, 196), bool)
REACHED[10, 10:14, 98:] = False  # micro: half the tokens of its kept tiles pruned in the ViT


def test_size_classes_follow_camelyon16():
    assert [size_class(d) for d in (10, 199.9, 200, 2000, 2000.1)] == [
        "itc", "itc", "micro", "micro", "macro"]
    les = lesions_from_annotations(HAND_ANNS, 0.5)
    assert les.size_class == ("macro", "micro", "itc")
    np.testing.assert_allclose(les.diameter_um, [np.hypot(2240, 224), 448 * 2**0.5,
                                                 96 * 2**0.5])  # fmt: skip
    np.testing.assert_allclose(les.area_um2, [2240 * 224, 448**2, 96**2])
    # an exclusion cutting a lesion in two makes two lesions; touching outlines make one
    cut = lesions_from_annotations([Annotation(rect(0, 0, 1000, 200), "Tumor"),
                                    Annotation(rect(400, 0, 600, 200), "_2")], 0.5)
    # two 200 x 100 µm pieces, 224 µm across each
    assert cut.size_class == ("micro", "micro")
    np.testing.assert_allclose(cut.diameter_um, [np.hypot(200, 100)] * 2)
    np.testing.assert_allclose(cut.area_um2, [200 * 100] * 2)
    touch = lesions_from_annotations([Annotation(rect(0, 0, 200, 200), "Tumor"),
                                      Annotation(rect(200, 0, 400, 200), "Tumor")], 0.5)
    assert len(touch.size_class) == 1 and touch.diameter_um[0] == pytest.approx(np.hypot(200, 100))


def test_triage_and_token_recall_by_hand(tmp_path):
    store = write_pipeline_store(tmp_path / "s.zarr", KEPT, REACHED)
    counts = slide_lesion_counts(store, HAND_ANNS)
    r = finish(counts)
    t, k = r["triage"], r["tokens"]
    assert t["macro"] == {
        "lesions": 1, "lesions_with_kept_tile": 1, "area_um2": 2240 * 224,
        "area_in_tissue_um2": 2240 * 224, "area_kept_um2": 2240 * 224 * 0.75, "tiles": 40,
        "tiles_kept": 30, "area_recall": 0.75, "tile_recall": 0.75}
    assert (t["micro"]["area_recall"], t["micro"]["tiles"], t["micro"]["tiles_kept"]) == (
        0.25, 16, 4)
    assert (t["itc"]["area_recall"], t["itc"]["tiles"], t["itc"]["tiles_kept"]) == (0.5, 2, 1)
    assert t["all"]["tiles"] == 58 and t["all"]["area_recall"] == pytest.approx(
        (0.75 * 501760 + 0.25 * 200704 + 0.5 * 9216) / (501760 + 200704 + 9216))
    # tokens: macro 40 tiles x 196 patches, 30 kept tiles fully reached; micro 16 tiles, 4 kept
    # with 98 of 196 reached; ITC 6 x 12 patches in each of its two tiles, one tile kept
    assert k["macro"] == {"patches": 40 * 196, "reached": 30 * 196, "recall": 0.75}
    assert k["micro"] == {"patches": 16 * 196, "reached": 4 * 98, "recall": 0.125}
    assert k["itc"] == {"patches": 144, "reached": 72, "recall": 0.5}
    assert k["all"]["patches"] == 40 * 196 + 16 * 196 + 144
    # a dense store keeps everything: every recall is 1
    dense = finish(slide_lesion_counts(write_pipeline_store(
        tmp_path / "d.zarr", np.ones((24, 24), bool), stages=1), HAND_ANNS))
    assert all(v["area_recall"] == 1 and v["tile_recall"] == 1 for v in dense["triage"].values())
    assert all(v["recall"] == 1 for v in dense["tokens"].values())


def test_several_selections_counted_in_one_pass_equal_one_by_one(tmp_path):
    """evaluate --compare counts a slide's own triage and the dense-ranking reference in one
    pass (the lesion masks drawn once): the same numbers as a call per selection."""
    store = write_pipeline_store(tmp_path / "s.zarr", KEPT, REACHED)
    rng = np.random.default_rng(0)
    other = rng.random(KEPT.size) < 0.3  # every tile of the 24 x 24 grid is a tissue tile
    both = slide_lesion_counts_for(store, HAND_ANNS, [None, other, np.zeros_like(other)])
    assert both[0] == slide_lesion_counts(store, HAND_ANNS)
    assert both[1] == slide_lesion_counts(store, HAND_ANNS, kept=other)
    assert both[2]["all"]["area_kept_um2"] == 0 and both[2]["all"]["tiles_kept"] == 0
    assert both[1]["macro"]["tiles_kept"] != both[0]["macro"]["tiles_kept"]
    # the token recall is the store's whatever the selection
    assert all(b[c]["patches_reached"] == both[0][c]["patches_reached"] for b in both
               for c in both[0])


def test_lesion_area_outside_tissue_tiles_is_reported_not_recalled(tmp_path):
    # the grid covers 24 x 24 tiles; a lesion half beyond its right edge (x > 5376 px)
    anns = [Annotation(rect(5152, 0, 5600, 224), "Tumor")]  # 224 x 112 µm, half outside
    t = finish(slide_lesion_counts(write_pipeline_store(tmp_path / "s.zarr", KEPT), anns))
    assert t["triage"]["all"]["area_um2"] == pytest.approx(224 * 112)
    assert t["triage"]["all"]["area_in_tissue_um2"] == pytest.approx(112 * 112)
    assert t["triage"]["all"]["tiles"] == 1 and t["triage"]["all"]["area_recall"] == 0


def test_heat_spearman_over_all_tiles_and_hot_spots_by_hand(tmp_path):
    rng = np.random.default_rng(1)
    dense_heat = rng.permutation(40).reshape(5, 8) / 40.0  # distinct values
    kept = np.zeros((5, 8), bool)
    top2 = np.argsort(-dense_heat.ravel())[:2]  # top 5 % of 40 tiles
    kept.ravel()[top2[0]] = True  # triage keeps one of the two hot spots...
    kept.ravel()[np.argsort(dense_heat.ravel())[:5]] = True  # ...and five cold tiles
    pruned_heat = np.where(kept, dense_heat, dense_heat[::-1, ::-1])  # CNN fill ranks otherwise
    write_pipeline_store(tmp_path / "d" / "x.zarr", np.ones((5, 8), bool), heat=dense_heat)
    write_pipeline_store(tmp_path / "p" / "x.zarr", kept, heat=pruned_heat)
    heat, hot = heatmap_agreement(tmp_path / "d", tmp_path / "p", ["x", "y"])
    s = heat["per_slide"]["x"]
    assert s["tiles"] == 40 and s["tiles_vit_both"] == 6
    assert s["spearman_all"] == pytest.approx(spearmanr(dense_heat.ravel(),
                                                        pruned_heat.ravel()).statistic)
    assert s["spearman_vit"] == pytest.approx(1.0)
    assert heat["all"]["median"] == heat["all"]["min"] == heat["all"]["max"] == pytest.approx(
        s["spearman_all"]) and heat["all"]["tiles"] == 40 and heat["all"]["slides"] == 1
    assert heat["per_slide"]["y"]["error"].endswith("no Zarr store here")
    assert hot["per_slide"]["x"] == {"hot": 2, "kept": 1, "recall": 0.5}
    assert (hot["hot"], hot["kept"], hot["recall"]) == (2, 1, 0.5)


@pytest.fixture()
def runs(tmp_path):
    """Dense and pruned runs of six slides, t1 with the hand-made store and lesions."""
    ann = tmp_path / "ann"
    ann.mkdir()
    write_xml(ann / "t1.xml", [("Tumor", MACRO), ("_0", MICRO), ("_1", ITC)])
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nt1,Tumor\nt2,Tumor\nt3,Tumor\nn1,Normal\nn2,Normal\n"
                      "n3,Normal\n")
    ids = ["t1", "t2", "t3", "n1", "n2", "n3"]
    dense_p = [0.9, 0.8, 0.6, 0.1, 0.3, 0.5]
    pruned_p = [0.85, 0.45, 0.7, 0.2, 0.3, 0.55]
    empty = {i: np.zeros((0, 3)) for i in ids}
    dense = write_run(tmp_path / "dense", [row(i, p) for i, p in zip(ids, dense_p, strict=True)],
                      empty)
    pruned = write_run(tmp_path / "pruned",
                       [row(i, p) for i, p in zip(ids, pruned_p, strict=True)], empty)
    write_pipeline_store(dense / "t1.zarr", np.ones((24, 24), bool), stages=1)
    write_pipeline_store(pruned / "t1.zarr", KEPT, REACHED)
    return {"dense": dense, "pruned": pruned, "labels": labels, "annotations": ann}


def test_compare_adds_recall_operating_point_and_calibration(runs, tmp_path):
    m = compare_runs(runs["dense"], runs["pruned"], tmp_path / "cmp", runs["labels"],
                     runs["annotations"], n_boot=300)
    d = m["difference"]
    # 3 normals: 95 % specificity needs all three below t, so t is just above 0.5
    a = d["at_95_specificity"]
    assert a["threshold"] == pytest.approx(0.5) and a["threshold"] > 0.5
    assert a["sensitivity_dense"] == 1 and a["sensitivity_pruned"] == pytest.approx(2 / 3)
    assert a["delta_sensitivity"] == pytest.approx(-1 / 3)
    assert a["specificity_dense"] == 1 and a["specificity_pruned"] == pytest.approx(2 / 3)
    # Brier: sums of squared errors 0.56 (dense) and 0.8475 (pruned) over 6 slides
    assert d["brier"] == pytest.approx((0.8475 - 0.56) / 6)
    # ECE: every slide alone in its bin: mean |p - y| = 1.6 / 6 (dense), 2.05 / 6 (pruned)
    ev = m["evaluation"]
    assert ev["dense"]["calibration"]["ece"] == pytest.approx(1.6 / 6)
    assert d["ece"] == pytest.approx(0.45 / 6)
    for key in ("brier", "ece"):  # paired bootstrap CIs around the deltas
        lo, hi = d[f"{key}_ci"]
        assert lo <= d[key] <= hi
    # AUC: dense 1.0; pruned ranks tumour 0.45 below normal 0.55: 8 of 9 pairs
    assert ev["dense"]["slide_level"]["auc"] == 1.0
    assert d["auc"] == pytest.approx(8 / 9 - 1)
    lo, hi = d["auc_ci"]
    assert lo <= d["auc"] <= hi and d["n_slides"] == 6 and d["n_boot"] == 300
    r = m["lesion_recall"]
    assert r["slides"] == 1 and r["tumour_slides_without_xml"] == ["t2", "t3"]
    assert r["triage"]["macro"]["area_recall"] == 0.75 and r["tokens"]["micro"]["recall"] == 0.125
    assert r["per_slide"]["t1"]["triage"]["itc"]["tile_recall"] == 0.5
    assert m["hot_spots"]["per_slide"]["t2"]["error"].endswith("no Zarr store here")
    saved = json.loads((tmp_path / "cmp" / "metrics.json").read_text())
    assert saved["lesion_recall"]["triage"]["all"]["tiles"] == 58
    report = (tmp_path / "cmp" / "report.md").read_text()
    for text in ("## Lesion recall of the pruned run", "| macro | 1 |", "95%-specificity",
                 "dense hot spots (top 5% tiles)", "ECE (10 bins)", "paired ["):
        assert text in report, text


def test_triage_recall_of_the_dense_ranking_at_the_same_budget(runs, tmp_path):
    # the dense model rates the macro lesion's 40 tiles highest, the micro lesion's next
    heat = np.zeros((24, 24))
    heat[:2, :20], heat[10:14, 10:14] = 1.0, 0.5
    d = write_pipeline_store(runs["dense"] / "t1.zarr", np.ones((24, 24), bool), stages=1,
                             heat=heat)
    m = compare_runs(runs["dense"], runs["pruned"], tmp_path / "cmp", runs["labels"],
                     runs["annotations"], n_boot=50)
    r = m["lesion_recall"]
    ref = r["triage_dense_rank"]
    # the triage kept 35 tiles; so does the reference: 35 of the 40 macro tiles (ties by
    # index: row 0, then row 1's first 15), nothing of the micro lesion or the ITC
    assert ref["all"]["tiles_kept"] == 35 and r["dense_rank_slides"] == 1
    assert ref["macro"]["tiles_kept"] == 35 and ref["macro"]["area_recall"] == pytest.approx(
        35 / 40)
    assert ref["micro"]["area_recall"] == 0 and ref["itc"]["tiles_kept"] == 0
    assert r["triage"]["macro"]["area_recall"] == 0.75  # the run's own triage, unchanged
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "area recall, dense ranking" in report and "| macro | 1 | 0.502 | 0.750 | 0.875 |" in (
        report)
    res = CliRunner().invoke(evaluate_cmd, [
        "--compare", str(runs["dense"]), str(runs["pruned"]), "--labels", str(runs["labels"]),
        "--annotations", str(runs["annotations"]), "--out", str(tmp_path / "cli"),
        "--bootstrap", "0"])
    assert res.exit_code == 0, res.output
    assert ("same tile budget, ranked by the dense heat: itc 0.000, micro 0.000, macro 0.875"
            in res.output)
    # a dense store of other tiles gives no reference, and says so
    zarr.open_group(str(d), mode="r+").attrs["tile_hash"] = "other"
    r = compare_lesion_recall(runs["pruned"], ["t1"], runs["annotations"], None,
                              dense_dir=runs["dense"])
    assert r["triage_dense_rank"] is None and r["dense_rank_slides"] == 0
    assert r["triage"]["macro"]["area_recall"] == 0.75
    with pytest.raises(StoreError, match="a reference selection of 3 tiles"):
        slide_lesion_counts(runs["pruned"] / "t1.zarr", HAND_ANNS, kept=np.ones(3, bool))


def test_failed_and_missing_labelled_slides_are_scored_as_the_worst_case(dataset, tmp_path):
    labels = tmp_path / "labels.csv"  # slide e failed (tumour), f never ran (normal)
    labels.write_text(dataset["labels"].read_text() + "f,Normal\n")
    m = evaluate_run(dataset["run"], labels, None, tmp_path / "ev", n_boot=100)
    s, w = m["slide_level"], m["worst_case"]
    assert s["labelled_failed"] == ["e"] and s["labelled_not_in_run"] == ["f"]
    assert s["auc"] == 1.0 and s["n"] == 4  # the slides with a result rank perfectly
    # worst case: e (tumour) at 0, f (normal) at 1 -> tumours a .9, d .7, e 0 over normals
    # b .6, c .1, f 1: 4 of 9 pairs
    assert w["n_imputed"] == 2 and w["imputed"] == ["e", "f"]
    assert w["slide_level"]["auc"] == pytest.approx(4 / 9) and w["slide_level"]["n"] == 6
    assert w["slide_level"]["accuracy"] == pytest.approx(3 / 6)
    assert w["calibration"]["brier"] > m["calibration"]["brier"]
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "1 failed (e), 1 not in the run (f)" in report and "AUC 0.444" in report
    res = CliRunner().invoke(evaluate_cmd, [str(dataset["run"]), "--labels", str(labels),
                                            "--bootstrap", "0"])
    assert res.exit_code == 0, res.output
    assert "1 labelled slide(s) failed, 1 missing from the run; worst case" in res.output
    assert "AUC 0.444" in res.output and "AUC 1.000" in res.output


def _script_froc(cands, les, fp_rates=(0.25, 0.5, 1, 2, 4, 8)):
    """Evaluation_FROC.py's compute_FP_TP_Probs, computeFROC and np.interp, transcribed, on
    evaluation masks built at the script's assumed 0.243 µm/px."""
    fp_probs, tp_probs, n_tumours = [], [], 0
    for sid, c in cands.items():
        if sid not in les:  # a normal slide: every candidate is a false positive
            fp_probs.extend(c[:, 0])
            continue
        m = les[sid]
        tp = np.zeros(m.labels.max(), np.float32)
        ids, _ = m.lookup(c[:, 1:])
        for p, i in zip(c[:, 0], ids, strict=True):
            if i == 0:
                fp_probs.append(p)
            elif i not in m.itc and p > tp[i - 1]:
                tp[i - 1] = p
        tp_probs.extend(tp)
        n_tumours += m.labels.max() - len(m.itc)
    all_probs = sorted(set(fp_probs + tp_probs))
    fps = [(np.asarray(fp_probs) >= t).sum() for t in all_probs[1:]] + [0]
    tps = [(np.asarray(tp_probs) >= t).sum() for t in all_probs[1:]] + [0]
    fps = np.asarray(fps) / len(cands)
    sens = np.asarray(tps) / n_tumours
    return np.interp(fp_rates, fps[::-1], sens[::-1])


def test_official_protocol_reproduces_the_challenge_script():
    mpps = {"a": 0.5}
    phys = froc(CANDIDATES, ANNOTATIONS, mpps)
    off = froc(CANDIDATES, ANNOTATIONS, {}, protocol="official")
    les = {"a": evaluation_mask(ANNOTATIONS["a"], 0.243)}
    np.testing.assert_allclose(off.sensitivities, _script_froc(CANDIDATES, les), rtol=1e-6)
    # Slide a is at 0.5 µm/px, the script assumes 0.243: its 37.5 µm margin spans 154 level-0
    # px instead of 75, so 0.7 (120 px right of L2) becomes a hit; the 0.95 in the exclusion
    # region is a false positive. FPs: 0.95, 0.5, 0.2 (physical: 0.7, 0.5, 0.2).
    assert (off.n_fp, phys.n_fp) == (3, 3) and off.n_ignored == 1 and phys.n_ignored == 2
    assert off.sensitivities[0] == 0 and phys.sensitivities[0] == 0.5
    assert off.per_slide["a"]["detected"] == 2 and off.per_slide["a"]["fp"] == 1
    with pytest.raises(ValueError, match="official protocol fixes"):
        froc(CANDIDATES, ANNOTATIONS, mpps, protocol="official", mask_mpp=2.0)
    with pytest.raises(ValueError, match="protocol must be"):
        froc(CANDIDATES, ANNOTATIONS, mpps, protocol="leaderboard")


def test_official_protocol_through_evaluate_and_cli(dataset, tmp_path):
    m = evaluate_run(dataset["run"], dataset["labels"], dataset["annotations"], tmp_path / "o",
                     n_boot=0, protocol="official")
    f = m["froc"]
    assert f["protocol"] == "official" and f["slides_off_official_mpp"] == 4
    assert "Protocol: official" in (tmp_path / "o" / "report.md").read_text()
    phys = evaluate_run(dataset["run"], dataset["labels"], dataset["annotations"], tmp_path / "p",
                        n_boot=0)
    assert phys["froc"]["protocol"] == "physical"
    assert phys["froc"]["slides_off_official_mpp"] is None
    assert f["sensitivities"] != phys["froc"]["sensitivities"]
    runner = CliRunner()
    base = [str(dataset["run"]), "--annotations", str(dataset["annotations"]), "--out",
            str(tmp_path / "c")]
    res = runner.invoke(evaluate_cmd, [*base, "--protocol", "official"])
    assert res.exit_code == 0 and "official protocol" in res.output, res.output
    res = runner.invoke(evaluate_cmd, [*base, "--protocol", "official", "--mask-mpp", "2"])
    assert res.exit_code == 2 and "fixes the mask" in res.output


def test_scanline_fill_matches_the_annotation_rasteriser():
    """The lesion masks' fast fill sets exactly the pixels io.annotations sets (centre inside),
    on irregular, concave and self-touching outlines at arbitrary offsets."""
    from wsi_prune.evaluation.lesion_recall import _fill
    from wsi_prune.io.annotations import region_masks

    rng = np.random.default_rng(5)
    th = np.linspace(0, 2 * np.pi, 97, endpoint=False)
    for i in range(6):
        r = rng.uniform(20, 60) * (1 + 0.4 * np.sin(rng.integers(2, 7) * th + rng.uniform(0, 6)))
        xy = np.stack([70 + r * np.cos(th), 65 + r * np.sin(th)], 1) + rng.uniform(0, 1, 2)
        if i == 5:  # a bow tie: the even-odd rule decides its crossing
            xy = np.array([[10, 10], [110, 90], [110, 10], [10, 90]], float) + 0.3
        want, _ = region_masks([Annotation(xy, "Tumor")], (0, 0), (140, 150), 1.0, 1.0)
        got = np.zeros((140, 150), bool)
        _fill(got, xy)
        np.testing.assert_array_equal(got, want)
        assert want.sum() > 500
