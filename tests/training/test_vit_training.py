"""train-vit: a small ViT trained on lesion-labelled tiles of real synthetic slides, whose CLS
attention is taught to look at lesion patches, loaded back by run through vit.weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests._paths import REPO
from wsi_prune.cli.train import train_vit as train_vit_cmd
from wsi_prune.config import RunConfig, ViTConfig
from wsi_prune.errors import CheckpointRefused, ConfigError
from wsi_prune.io.tiling import tile_slide
from wsi_prune.models.factory import apply_trained_configs, build_models
from wsi_prune.models.pruned_vit import PrunedViT, build_vit
from wsi_prune.synth import SynthSpec, write_asap_xml, write_slide
from wsi_prune.training.tile_topk import load_tile_head, tile_head_of
from wsi_prune.training.vit import _attention_loss, _ClsRows, train_vit

TINY = ViTConfig(model="vit_tiny_patch16_224",
                 model_kwargs={"depth": 3, "embed_dim": 48, "num_heads": 2}, prune_blocks=(1,))


@pytest.fixture(scope="module")
def lesion_stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 2048² slides with tumour and one without, tiled, with their ASAP XML."""
    root = tmp_path_factory.mktemp("vit")
    (root / "slides").mkdir()
    (root / "xml").mkdir()
    cfg = RunConfig()
    for name, seed, tumour in (("a", 11, True), ("b", 12, True), ("c", 13, False)):
        s = write_slide(root / "slides" / f"{name}.svs",
                        SynthSpec(width=2048, height=2048, mpp=0.5, seed=seed, tumour=tumour,
                                  tissue_fraction=0.6))
        if tumour:
            write_asap_xml(root / "xml" / f"{name}.xml", s.tumour_polygons)
        tile_slide(s.path, root / "tiles" / f"{name}.zarr", cfg, scheduler="sync")
    return root


def test_cls_rows_are_the_attention_prunedvit_ranks_tokens_by() -> None:
    torch.manual_seed(0)
    vit = build_vit(TINY)
    rows = _ClsRows(vit, [2])
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        vit.forward_features(x)
        mine = rows.rows()[2]
        ref = PrunedViT(vit, ViTConfig(model=TINY.model, model_kwargs=TINY.model_kwargs,
                                       prune_blocks=()))(x).token_importance
    rows.close()
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-6)
    assert not vit.blocks[2].attn.qkv._forward_hooks  # hooks removed


def test_attention_loss_rewards_mass_on_lesion_patches() -> None:
    y = torch.zeros(2, 2, 2)
    y[0, 0, :] = 1.0  # tile 0: top row lesion; tile 1: no lesion (adds nothing)
    on = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25] * 4])
    uniform = torch.full((2, 4), 0.25)
    assert float(_attention_loss({1: on}, y)) == pytest.approx(0.0, abs=1e-6)
    assert float(_attention_loss({1: uniform}, y)) == pytest.approx(-np.log(0.5), rel=1e-6)
    assert float(_attention_loss({1: uniform}, torch.zeros(2, 2, 2))) == 0.0


def test_train_vit_then_run_loads_it(lesion_stores: Path, tmp_path: Path) -> None:
    out = tmp_path / "vit.safetensors"
    res = train_vit([lesion_stores / "tiles"], lesion_stores / "xml", out, config=TINY,
                    epochs=2, batch_size=8, max_tiles_per_store=24, val_fraction=0.34, lr=1e-3,
                    seed=0, threads=1, progress=False)
    assert res.n_positive > 0 and res.n_train + res.n_val == 72
    assert all(np.isfinite(res.losses))
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["kind"] == "wsi-prune-vit" and meta["model_kwargs"] == TINY.model_kwargs
    assert meta["tile_px"] == 224 and meta["mpp"] == 0.5
    assert meta["training"]["guided_blocks"] == [1, 2]
    assert set(meta["val"]) >= {"tile_auc", "patch_auc", "attention_auc", "lesion_token_recall"}
    # the tile head is saved beside the backbone, for train-mil --model tile-topk
    head = tile_head_of(out)
    assert head == tmp_path / "vit.tile-head.safetensors"
    assert meta["tile_head"]["in_dim"] == 48 and meta["tile_head"]["val_auc"] == meta["val"][
        "tile_auc"]
    assert load_tile_head(head, 48).weight.shape == (1, 48)

    # run names only the weights file: the architecture comes from the sidecar
    cfg = apply_trained_configs(RunConfig.from_yaml(REPO / "pipelines" / "demo.yaml").replace(
        vit={"weights": str(out), "prune_blocks": (1,)}))
    assert cfg.vit.model_kwargs == TINY.model_kwargs
    models = build_models(cfg)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        want = res.model.forward_head(res.model.forward_features(x), pre_logits=True)
        dense = dataclasses.replace(cfg.vit, prune_blocks=())
        got = PrunedViT(models.vit.model, dense)(x).embedding
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # trained on 224 px at 0.5 µm/px: another tiling is refused
    with pytest.raises(CheckpointRefused, match="trained on other tiles: mpp 0.5"):
        build_models(cfg.replace(tiling={"mpp": 0.25}))


def test_train_vit_is_deterministic_and_refuses_bad_input(lesion_stores: Path,
                                                           tmp_path: Path) -> None:
    kw = dict(config=TINY, epochs=1, batch_size=8, max_tiles_per_store=16, val_fraction=0.0,
              seed=3, threads=1, progress=False)
    a = train_vit([lesion_stores / "tiles"], lesion_stores / "xml", tmp_path / "a.safetensors",
                  **kw)
    b = train_vit([lesion_stores / "tiles"], lesion_stores / "xml", tmp_path / "b.safetensors",
                  **kw)
    assert a.losses == b.losses and a.val == {}
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "zzz.xml").write_text("<ASAP_Annotations><Annotations/></ASAP_Annotations>")
    with pytest.raises(ConfigError, match="none of the 3 stores has an annotation"):
        train_vit([lesion_stores / "tiles"], empty, tmp_path / "c.safetensors", **kw)
    with pytest.raises(ConfigError, match="safetensors"):
        train_vit([lesion_stores / "tiles"], lesion_stores / "xml", tmp_path / "c.pt", **kw)


def test_train_vit_command(lesion_stores: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("vit:\n  model: vit_tiny_patch16_224\n  prune_blocks: [1]\n  model_kwargs:\n"
                   "    depth: 2\n    embed_dim: 32\n    num_heads: 2\n")
    out = tmp_path / "v.safetensors"
    res = CliRunner().invoke(train_vit_cmd, [
        str(lesion_stores / "tiles"), "--annotations", str(lesion_stores / "xml"), "--out",
        str(out), "--config", str(cfg), "--epochs", "1", "--batch-size", "8",
        "--max-tiles-per-store", "16", "--threads", "1", "--val-fraction", "0.34"])
    assert res.exit_code == 0, res.output
    assert "training tiles" in res.output and "validation: tile_auc" in res.output
    assert out.is_file() and out.with_suffix(".json").is_file()


def test_scorer_learns_the_tile_targets_of_a_dense_run_with_a_trained_vit(
        lesion_stores: Path, tmp_path: Path) -> None:
    """train-scorer --tile-targets vit: tile targets are the ViT tile head's probabilities on the
    dense run's embeddings; the tiles the ViT rates highest are drawn like lesion tiles; a
    pruned run, or a ViT without a tile head, is refused by name."""
    from wsi_prune.cli.train import train_scorer as train_scorer_cmd
    from wsi_prune.errors import StoreError
    from wsi_prune.io.store import open_store
    from wsi_prune.pipeline.batch import run_batch
    from wsi_prune.training.scorer import _teacher_tile_targets, _teacher_top, train_scorer

    vit = tmp_path / "vit.safetensors"
    train_vit([lesion_stores / "tiles"], lesion_stores / "xml", vit, config=TINY, epochs=1,
              batch_size=8, max_tiles_per_store=16, val_fraction=0.0, seed=0, threads=1,
              progress=False)
    demo = apply_trained_configs(RunConfig.from_yaml(REPO / "pipelines" / "demo.yaml").replace(
        vit={"weights": str(vit), "prune_blocks": (1,)}))
    slides = [lesion_stores / "slides" / f"{n}.svs" for n in ("a", "c")]
    for name, cfg in (("dense", demo.dense()), ("pruned", demo)):
        rows = run_batch(slides, tmp_path / name, cfg, progress=False)
        assert [r["status"] for r in rows] == ["ok", "ok"], rows

    # the targets: the tile head on the stored embeddings, by hand
    store = tmp_path / "dense" / "a.zarr"
    g = open_store(store)
    head = load_tile_head(tile_head_of(vit), 48)
    with torch.no_grad():
        want = torch.sigmoid(head(torch.from_numpy(g["vit/embedding"][:]))[:, 0]).numpy()
    got = _teacher_tile_targets(g, store)
    assert got.shape == (g["tiles/coords"].shape[0],)
    np.testing.assert_allclose(got[g["vit/tile_index"][:]], want, rtol=1e-6)
    top = _teacher_top(got, share=0.05, least=4)  # ceil(0.05 * 43) = 3 < 4
    first4 = np.argsort(-got, kind="stable")[:4]
    assert set(np.flatnonzero(top)) == set(first4) | set(np.flatnonzero(got > 0.5))

    scfg = RunConfig.from_yaml(REPO / "pipelines" / "demo.yaml").scorer
    out = tmp_path / "scorer.safetensors"
    kw = dict(config=scfg, epochs=2, batch_size=16, max_tiles_per_store=None, seed=0,
              threads=1, progress=False)
    res = train_scorer([tmp_path / "dense"], lesion_stores / "xml", out, tile_teacher=True, **kw)
    n = sum(open_store(tmp_path / "dense" / f"{s}.zarr")["tiles/coords"].shape[0]
            for s in ("a", "c"))
    assert res.n_tiles == n and all(np.isfinite(res.losses))
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["targets"] == "annotations" and meta["tile_targets"] == "vit-tile-head"
    assert meta["training"]["tile_loss"] == "rank (tau 0.1)"

    with pytest.raises(StoreError, match="need a dense run store") as err:
        train_scorer([tmp_path / "pruned"], lesion_stores / "xml", tmp_path / "p.safetensors",
                     tile_teacher=True, **kw)
    assert err.value.path == str(tmp_path / "pruned" / "a.zarr")
    untrained = RunConfig.from_yaml(REPO / "pipelines" / "demo.yaml").dense()
    run_batch(slides[:1], tmp_path / "untrained", untrained, progress=False)
    res = CliRunner().invoke(train_scorer_cmd, [
        str(tmp_path / "untrained"), "--annotations", str(lesion_stores / "xml"),
        "--tile-targets", "vit", "--out", str(tmp_path / "u.safetensors")])
    assert res.exit_code == 1 and "has none" in res.output and "a.zarr" in res.output


def test_distill_vit_keeps_the_dense_answer_when_pruned(lesion_stores: Path,
                                                        tmp_path: Path) -> None:
    """distill-vit: a copy of the teacher, fine-tuned through the pipeline's own pruning
    (CNN prior at a token ratio, in-ViT pruning), ends closer to the teacher's dense tile
    logits than the teacher pruned the same way; its sidecar names the teacher, its tile head is
    the teacher's, `run` loads it; pruned runs and other ViTs' runs are refused by name."""
    from wsi_prune._files import file_sha256
    from wsi_prune.cli.train import distill_vit as distill_cmd
    from wsi_prune.errors import StoreError
    from wsi_prune.pipeline.batch import run_batch
    from wsi_prune.training.distill import distill_vit

    vit = tmp_path / "vit.safetensors"
    train_vit([lesion_stores / "tiles"], lesion_stores / "xml", vit, config=TINY, epochs=1,
              batch_size=8, max_tiles_per_store=16, val_fraction=0.0, seed=0, threads=1,
              progress=False)
    cfg = apply_trained_configs(RunConfig.from_yaml(REPO / "pipelines" / "demo.yaml").replace(
        vit={"weights": str(vit), "prune_blocks": (1,)},
        token_select={"policy": "ratio", "keep_ratio": 0.25}))
    slides = [lesion_stores / "slides" / f"{n}.svs" for n in ("a", "b", "c")]
    rows = run_batch(slides, tmp_path / "dense", cfg.dense(), progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 3, rows

    out = tmp_path / "student.safetensors"
    kw = dict(keep_ratios=(1.0, 0.25), epochs=20, lr=3e-3, embedding_weight=0.0, batch_size=8,
              max_tiles_per_store=12, val_fraction=0.0, seed=0, threads=1, progress=False)
    res = distill_vit([tmp_path / "dense"], out, cfg, **kw)
    assert res.n_train == 36 and res.n_val == 0 and res.val == {}
    assert all(np.isfinite(res.losses)) and res.losses[-1] < 0.5 * res.losses[0]
    # on the tiles it was fitted to, pruned at 0.25 (the prior keeps a quarter, block 1 prunes
    # more): the student's tile logits are nearer the teacher's dense logits than the
    # teacher's own, and dense the teacher matches its stored embeddings exactly
    from wsi_prune.models.checkpoints import load_into
    from wsi_prune.training._common import input_norm
    from wsi_prune.training.data import find_stores
    from wsi_prune.training.distill import _load_slide, _scorer, _validate

    head = load_tile_head(tile_head_of(vit), 48)
    rng = np.random.default_rng(0)  # the draw distill_vit made with seed 0
    data = [_load_slide(p, cfg, _scorer(cfg, 14), head, file_sha256(vit), 12, 0.5, rng)
            for p in find_stores([tmp_path / "dense"])]
    teacher = build_vit(dataclasses.replace(cfg.vit, pretrained=False), load_weights=load_into)
    fit = _validate(res.model, teacher, head, cfg, data, (1.0, 0.25), *input_norm(teacher),
                    (14, 14), 16)
    assert fit["r1"]["teacher_rmse"] < 1e-4
    assert fit["r0.25"]["teacher_rmse"] > 0.03  # pruning moved the teacher's logits
    # the student starts as the teacher (ratio 1); 0.57 here, and 0.49-0.81 over 2 ViT x 3
    # distillation seeds (a tiny ViT on 36 tiles: its training is sensitive to float
    # rounding, so the bound leaves room for another CPU's numbers)
    assert fit["r0.25"]["student_rmse"] < 0.9 * fit["r0.25"]["teacher_rmse"], fit
    assert fit["r0.25"]["student_tokens"] < 0.25 * 196 + 1

    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["kind"] == "wsi-prune-vit" and meta["targets"] == "distilled"
    assert meta["model_kwargs"] == TINY.model_kwargs
    assert meta["distilled_from"]["sha256"] == file_sha256(vit)
    assert meta["training"]["keep_ratios"] == [1.0, 0.25]
    assert tile_head_of(out).read_bytes() == tile_head_of(vit).read_bytes()
    student = apply_trained_configs(cfg.replace(vit={"weights": str(out)}))
    rows = run_batch(slides[:1], tmp_path / "pruned", student, progress=False)
    assert rows[0]["status"] == "ok", rows
    # a head fitted on the teacher's dense run reads the student's tile logits: accepted;
    # the same head with a ViT that only claims the teacher is refused
    from wsi_prune.errors import CheckpointRefused
    from wsi_prune.models.binding import check_bindings
    from wsi_prune.training.mil import train_mil

    (tmp_path / "labels.csv").write_text("slide,label\na,1\nb,1\nc,0\n")
    train_mil([tmp_path / "dense"], tmp_path / "labels.csv", tmp_path / "topk.safetensors",
              model="tile-topk", folds=1, progress=False)
    with_head = apply_trained_configs(student.replace(
        mil={"weights": str(tmp_path / "topk.safetensors")}))
    assert check_bindings(with_head, with_head.weight_digests()) == []
    with pytest.raises(CheckpointRefused, match="another ViT"):
        check_bindings(with_head, {**with_head.weight_digests(), "vit": "ab" * 32})

    with pytest.raises(StoreError, match="needs a dense run store") as err:
        distill_vit([tmp_path / "pruned"], tmp_path / "x.safetensors", cfg, **kw)
    assert err.value.path == str(tmp_path / "pruned" / "a.zarr")
    other = tmp_path / "other"
    run_batch(slides[:1], other, student.dense(), progress=False)
    with pytest.raises(StoreError, match="not the teacher"):
        distill_vit([other], tmp_path / "x.safetensors", cfg, **kw)
    with pytest.raises(ConfigError, match="needs vit.weights"):
        distill_vit([tmp_path / "dense"], tmp_path / "x.safetensors",
                    cfg.replace(vit={"weights": None}), **kw)

    # the command: two slides, one held out for the validation table
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text(cfg.to_yaml())
    res = CliRunner().invoke(distill_cmd, [
        str(tmp_path / "dense" / "c.zarr"), str(tmp_path / "dense" / "a.zarr"), "--config",
        str(yaml), "--out", str(tmp_path / "cli.safetensors"), "--keep-ratios", "1,0.25",
        "--epochs", "1", "--batch-size", "8", "--max-tiles-per-store", "0", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "r0.25: tile-logit RMSE" in res.output and "wrote" in res.output
    val = json.loads((tmp_path / "cli.json").read_text())["val"]
    assert val["r1"]["teacher_rmse"] < 1e-4 and len(val["r0.25"]) == 6
