"""``make demo`` on tiny sizes: it trains the scorer and MIL head, runs and evaluates a test
set, and says plainly which models are trained (the ViT never is)."""

from __future__ import annotations

import csv
import json

from wsi_prune.pipeline.demo import demo_config, model_note, run_demo


def test_run_demo_trains_runs_evaluates_and_says_what_is_trained(tmp_path, capsys):
    from wsi_prune._files import file_sha256

    rows = run_demo(tmp_path, n_train=6, n_test=2, size=2048, real=False, quiet=True)
    printed = capsys.readouterr().out
    weights = {name: tmp_path / "weights" / f"{name}.safetensors" for name in ("scorer", "mil")}
    assert all(p.is_file() for p in weights.values())
    assert "training the CNN scorer on 6 slides" in printed
    # train as you infer: the head learned the pruned bags the test run feeds it
    assert "(pruned bags)" in printed
    mil_meta = json.loads((tmp_path / "weights" / "mil.json").read_text())
    assert mil_meta["regime"] == "pruned" and mil_meta["vit"]["model"] == "vit_small_patch16_224"
    # the note names each model and its state; the demo ViT is random-init
    assert f"CNN scorer (mobilenetv3_small_100): trained ({weights['scorer']})" in printed
    assert f"MIL slide head: trained ({weights['mil']})" in printed
    assert "ViT (vit_small_patch16_224, depth=4, embed_dim=96, num_heads=2): " \
           "UNTRAINED (random init)" in printed
    assert "not a diagnosis" in printed

    run = tmp_path / "run"
    assert [r["status"] for r in rows] == ["ok", "ok"]
    with open(run / "predictions.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["id"] for r in table] == [r["id"] for r in rows]
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in table)
    # trained on 6 slides, the demo already tells its tumour test slide from the normal one
    with open(tmp_path / "slides" / "labels.csv", newline="") as fh:
        truth = {r["slide"]: r["label"] for r in csv.DictReader(fh)}
    prob = {r["id"]: float(r["probability"]) for r in table}
    (tumour,) = [k for k, v in truth.items() if v == "Tumor"]
    (normal,) = [k for k, v in truth.items() if v == "Normal"]
    assert prob[tumour] > 0.5 > prob[normal], prob
    report = (run / "evaluation" / "report.md").read_text()
    assert "AUC" in report
    assert "test set: AUC" in printed and str(run / "predictions.csv") in printed
    # the run used the trained weights, and its manifest says which files they were
    m = json.loads((run / "manifest.json").read_text())
    for name, path in weights.items():
        assert m["config"][name]["weights"] == str(path)
        assert m["models"][name]["sha256"] == file_sha256(path)
    assert m["models"]["vit"]["trained"] is False


def test_model_note_untrained():
    note = model_note(demo_config())
    assert note.count("UNTRAINED (random init)") == 3 and "not a diagnosis" in note
    all_trained = demo_config().replace(scorer={"weights": "s.safetensors"},
                                        vit={"weights": "v.safetensors"},
                                        mil={"weights": "m.safetensors"})
    assert "UNTRAINED" not in model_note(all_trained)
    assert "not a diagnosis" not in model_note(all_trained)
