"""The tile-topk slide head (issue 11): a slide score from the top-k tile lesion logits, fitted
from the tile head train-vit saves (k by cross-validated log loss, scale and bias by logistic
regression), and its answer on a pruned bag that keeps the top tiles."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from wsi_prune._files import file_sha256
from wsi_prune.cli.train import train_mil as train_mil_cmd
from wsi_prune.config import MILConfig, RunConfig
from wsi_prune.errors import CheckpointRefused, ConfigError
from wsi_prune.models.checkpoints import save_safetensors
from wsi_prune.models.mil import TileTopK, build_mil, trained_mil_config
from wsi_prune.models.sidecars import VIT_KIND, write_sidecar
from wsi_prune.training.mil import train_mil
from wsi_prune.training.tile_topk import fit_tile_topk, load_tile_head, tile_head_of

D = 8


def _head(path: Path) -> Path:
    """A tile head whose lesion logit is 3 * x[0] - 3."""
    lin = torch.nn.Linear(D, 1)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 0] = 3.0
        lin.bias.fill_(-3.0)
    save_safetensors(lin, path)
    return path


def _bags(n: int, seed: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """n bags of 30-80 tiles, half tumour: a tumour bag has 1-3 tiles with x[0] near 2.5;
    normal tiles have x[0] near 0 (a few near 1: mimics)."""
    rng = np.random.default_rng(seed)
    bags, y = [], []
    for i in range(n):
        k = int(rng.integers(30, 80))
        x = rng.normal(0, 0.4, size=(k, D))
        x[rng.choice(k, 3, replace=False), 0] += 1.0
        if i % 2:
            x[rng.choice(k, int(rng.integers(1, 4)), replace=False), 0] = rng.normal(2.5, 0.4)
        bags.append(torch.from_numpy(x).float())
        y.append(i % 2)
    return bags, np.asarray(y)


def test_the_head_reads_only_the_top_tiles() -> None:
    torch.manual_seed(0)
    head = TileTopK(D, top_k=3)
    bag = torch.randn(40, D)
    s = head.tile_logits(bag)
    top = torch.topk(s, 3).indices
    with torch.no_grad():
        head.scale.fill_(2.0)
        head.bias.fill_(-1.0)
        full = head(bag)
        # a pruned bag that kept the top tiles (and any others) gets the same slide answer
        keep = torch.cat([top, torch.arange(30, 40)]).unique()
        pruned = head(bag[keep])
    torch.testing.assert_close(pruned.logit, full.logit)
    torch.testing.assert_close(full.logit, 2.0 * s[top].mean() - 1.0)
    # attention: lesion probability over its sum, so heat / max heat = sigmoid ratio
    p = torch.sigmoid(s)
    torch.testing.assert_close(full.attention, p / p.sum())
    # a bag smaller than k averages what it has; padding is ignored and gets no attention
    with torch.no_grad():
        two = head(bag[:2])
        batch = torch.zeros(2, 5, D)
        batch[0, :2] = bag[:2]
        batch[1] = bag[:5]
        batch[0, 2:] = float("nan")
        mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
        out = head(batch, mask)
    torch.testing.assert_close(two.logit, 2.0 * s[:2].mean() - 1.0)
    torch.testing.assert_close(out.logit[0], two.logit)
    assert torch.isfinite(out.logit).all() and float(out.attention[0, 2:].abs().sum()) == 0.0
    with pytest.raises(ConfigError, match="binary"):
        build_mil(MILConfig(model="tile-topk"), D, n_classes=2)


def test_fit_chooses_k_by_cross_validation_and_calibrates(tmp_path: Path) -> None:
    from sklearn.model_selection import StratifiedKFold

    bags, y = _bags(40, seed=1)
    head = load_tile_head(_head(tmp_path / "h.safetensors"), D)
    splits = list(StratifiedKFold(4, shuffle=True, random_state=0).split(np.zeros(len(y)), y))
    fit = fit_tile_topk(bags, y, splits, head, candidates=(1, 2, 16))
    # 1-3 lesion tiles per tumour bag: averaging 16 tiles dilutes them below the mimics
    assert fit.search[16]["oof_log_loss"] > fit.search[fit.top_k]["oof_log_loss"]
    assert fit.top_k in (1, 2) and fit.search[fit.top_k]["oof_auc"] > 0.95
    assert len(fit.fold_auc) == 4 and fit.model.scale.item() > 0
    # the tile head stays as given
    torch.testing.assert_close(fit.model.tile.weight, head.weight)
    # calibrated on the training bags: mean probability near the positive share
    with torch.no_grad():
        probs = np.array([float(fit.model(b).prob) for b in bags])
    assert abs(probs.mean() - y.mean()) < 0.05
    assert probs[y == 1].min() > probs[y == 0].max() - 0.5
    with pytest.raises(ConfigError, match="both classes"):
        fit_tile_topk(bags[::2], y[::2], [], head)
    with pytest.raises(CheckpointRefused, match=r"weight: model \(1, 16\) vs file \(1, 8\)"):
        load_tile_head(tmp_path / "h.safetensors", 16)


def _fake_vit(tmp_path: Path) -> Path:
    """A ViT weights file whose sidecar names a tile head beside it (as train-vit writes)."""
    vit = tmp_path / "vit.safetensors"
    save_safetensors({"w": torch.zeros(1)}, vit)
    head = _head(tmp_path / "vit.tile-head.safetensors")
    write_sidecar(vit, {"kind": VIT_KIND, "model": "vit_tiny_patch16_224",
                        "tile_head": {"weights": head.name, "sha256": file_sha256(head)}})
    return vit


def _run_stores(root: Path, vit: Path, n: int = 24) -> Path:
    bags, y = _bags(n, seed=2)
    cfg = RunConfig().replace(vit={"weights": str(vit)}).to_dict()
    rows = []
    for i, (b, label) in enumerate(zip(bags, y, strict=True)):
        g = zarr.open_group(str(root / "run" / f"s{i:02d}.zarr"), mode="w", zarr_format=3)
        g.create_array("vit/embedding", data=b.numpy())
        g.attrs.update({"complete": True, "run_config": cfg})
        rows.append((f"s{i:02d}", "Tumor" if label else "Normal"))
    with open(root / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("slide", "label"), *rows])
    return root


def test_train_mil_finds_the_tile_head_beside_the_vit(tmp_path: Path) -> None:
    vit = _fake_vit(tmp_path)
    assert tile_head_of(vit) == tmp_path / "vit.tile-head.safetensors"
    root = _run_stores(tmp_path, vit)
    out = tmp_path / "topk.safetensors"
    res = train_mil([root / "run"], root / "labels.csv", out, folds=3, model="tile-topk",
                    top_k=(1, 4), progress=False)
    assert res.final_epochs == 0 and res.best_epochs == [] and len(res.fold_auc) == 3
    assert res.oof_auc > 0.9
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model"] == "tile-topk" and meta["top_k"] == res.model.top_k
    assert set(meta["top_k_search"]) == {"1", "4"}
    assert meta["tile_head"]["weights"].endswith("vit.tile-head.safetensors")
    # run loads it back through mil.weights: model and k come from the sidecar
    cfg, in_dim, _ = trained_mil_config(str(out))
    assert (cfg.model, cfg.top_k, in_dim) == ("tile-topk", res.model.top_k, D)
    loaded = build_mil(cfg, in_dim)
    bag = torch.from_numpy(zarr.open_group(str(root / "run" / "s01.zarr"))["vit/embedding"][:])
    with torch.no_grad():
        torch.testing.assert_close(loaded(bag).prob, res.model(bag).prob)
    with pytest.raises(CheckpointRefused, match="top_k"):
        build_mil(MILConfig(model="tile-topk", top_k=res.model.top_k + 1, weights=str(out)), D)
    # a head edited after train-vit wrote it is refused
    _head(tmp_path / "vit.tile-head.safetensors").write_bytes(b"x" * 64)
    with pytest.raises(CheckpointRefused, match="SHA-256"):
        tile_head_of(vit)
    with pytest.raises(ConfigError, match="tile-topk, not gated-abmil"):
        train_mil([root / "run"], root / "labels.csv", out, tile_head=vit, progress=False)


def test_train_mil_command_fits_tile_topk(tmp_path: Path) -> None:
    vit = _fake_vit(tmp_path)
    root = _run_stores(tmp_path, vit)
    out = tmp_path / "m.safetensors"
    res = CliRunner().invoke(train_mil_cmd, [
        str(root / "run"), "--labels", str(root / "labels.csv"), "--out", str(out),
        "--model", "tile-topk", "--tile-head", str(tmp_path / "vit.tile-head.safetensors"),
        "--top-k", "1", "--top-k", "2", "--folds", "3"])
    assert res.exit_code == 0, res.output
    assert "fold 3: val AUC" in res.output and "final model: top_k " in res.output
    assert json.loads(out.with_suffix(".json").read_text())["top_k"] in (1, 2)
