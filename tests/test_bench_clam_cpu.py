"""benchmarks/bench_clam_cpu.py (the CLAM-style peer row on the CPU) embeds exactly the tiles
that ``wsi-prune run --dense`` embeds, with the same model, so its timing is a like-for-like
peer row."""

from __future__ import annotations

import json

import numpy as np
import yaml
import zarr

from tests._paths import benchmark_module
from wsi_prune.pipeline.batch import run_batch
from wsi_prune.pipeline.demo import demo_config


def _bench():
    return benchmark_module("bench_clam_cpu")


def test_clam_style_features_are_the_dense_runs_embeddings(svs_slide, tmp_path) -> None:
    cfg = demo_config().dense()
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    (row,) = run_batch([svs_slide], tmp_path / "dense", cfg, progress=False)
    assert row["status"] == "ok"
    g = zarr.open_group(str(tmp_path / "dense" / "synth.zarr"), mode="r")
    coords = g["tiles/coords"][...]
    tile_index = g["vit/tile_index"][...]
    emb = g["vit/embedding"][...]

    res = _bench().main([str(svs_slide), "--config", str(cfg_path), "--out",
                         str(tmp_path / "clam"), "--batch-size", "7",
                         "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["tiles"] == res["tiles"]
    (slide,) = res["rows"]
    assert slide["tiles"] == len(coords) == len(tile_index) > 7  # every tissue tile, > 1 batch
    assert slide["level"] == 0 and slide["read_px"] == cfg.tiling.tile_px  # 0.5 µm/px level 0
    feats = np.load(tmp_path / "clam" / "synth.features.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "clam" / "synth.coords.npy"), coords)
    assert feats.shape == (len(coords), emb.shape[1])
    # the dense run's embedding of tile i is the peer's feature of the same tile: same pixels,
    # same normalisation, same model (within float rounding of two computation orders)
    got = feats[tile_index]
    rel = np.linalg.norm(got - emb, axis=1) / np.linalg.norm(emb, axis=1)
    assert float(rel.max()) < 1e-3, float(rel.max())
    # and not trivially: distinct tiles give distinct features
    assert float(np.linalg.norm(feats[0] - feats[-1])) > 1e-2 * float(np.linalg.norm(feats[0]))
