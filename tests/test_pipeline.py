"""End to end: real slides (synthetic pyramidal SVS/TIFF and the real Aperio slide) through the
whole pipeline with the tiny demo models, plus bad inputs that must fail alone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

from wsi_prune.cli import main
from wsi_prune.config import RunConfig
from wsi_prune.demo import DEMO_CONFIG, demo_config
from wsi_prune.errors import EXIT_SOME_FAILED
from wsi_prune.pipeline import (
    PREDICTION_COLUMNS,
    SlideEntry,
    discover,
    run_batch,
    run_complete,
    safe_id,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.svs").write_bytes(b"")
    (d / "notes.svs").write_text("this is not a slide\n")
    return d


@pytest.fixture(scope="module")
def batch(tmp_path_factory, svs_slide, nompp_slide, bad_dir, request):
    """One run over good and bad slides; the real slide joins when present."""
    out = tmp_path_factory.mktemp("run")
    inputs = [svs_slide, nompp_slide, bad_dir / "empty.svs", bad_dir / "notes.svs"]
    from conftest import SHARED_SLIDE

    if SHARED_SLIDE.is_file():
        inputs.append(SHARED_SLIDE)
    rows = run_batch(inputs, out, demo_config(), progress=False)
    return out, {r["id"]: r for r in rows}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_statuses_and_one_line_reasons(batch, svs_slide):
    out, rows = batch
    assert rows["synth"]["status"] == "ok"
    assert rows["nompp"]["status"] == "failed" and "--mpp" in rows["nompp"]["error"]
    assert rows["empty"]["status"] == "failed" and "empty.svs" in rows["empty"]["error"]
    assert rows["notes"]["status"] == "failed" and "notes.svs" in rows["notes"]["error"]
    for r in rows.values():
        assert "\n" not in (r["error"] or "")
    # a failed slide leaves no store that could look complete
    assert not (out / "nompp.zarr").exists() or not run_complete(
        out, SlideEntry("nompp", Path("x")), demo_config())


def test_predictions_csv_typed(batch):
    out, rows = batch
    table = _read_csv(out / "predictions.csv")
    assert tuple(table[0].keys()) == PREDICTION_COLUMNS
    assert [r["id"] for r in table] == list(rows)
    for r in table:
        if r["status"] != "ok":
            assert r["probability"] == ""
            continue
        p = float(r["probability"])
        assert 0.0 <= p <= 1.0
        assert int(r["label"]) == int(p >= 0.5)
        assert 0 < int(r["kept_tiles"]) <= int(r["tissue_tiles"])
        assert 0.0 < float(r["token_fraction"]) <= 1.0
        assert 0.0 < float(r["gmacs"]) < float(r["gmacs_dense"])
        assert float(r["sec_total"]) > 0
        assert r["mpp_source"] in ("openslide", "tiff-resolution")


def test_store_is_consistent(batch):
    out, rows = batch
    g = zarr.open_group(str(out / "synth.zarr"), mode="r")
    n = g["tiles/coords"].shape[0]
    kept = np.asarray(g["triage/kept"][:])
    tidx = np.asarray(g["vit/tile_index"][:])
    assert kept.shape == (n,) and kept.sum() == len(tidx) == rows["synth"]["kept_tiles"]
    assert np.array_equal(np.flatnonzero(kept), tidx)  # kept tiles ⊆ tissue tiles, in order
    assert g["triage/patch_importance"].shape == (n, 14, 14)
    assert g["vit/kept_tokens"].shape == (len(tidx), 4, 196)  # CNN prior + 3 pruning blocks
    kt = np.asarray(g["vit/kept_tokens"][:])
    # nested: a token kept at a stage was kept at every earlier stage
    assert not (kt[:, 1:] & ~kt[:, :-1]).any()
    assert np.allclose(kt[:, 0].sum(1), 98)  # token_select ratio 0.5 of 196
    att = np.asarray(g["mil/attention"][:])
    assert att.shape == (len(tidx),) and att.sum() == pytest.approx(1.0, abs=1e-5)
    heat, src = np.asarray(g["heatmap/tile"][:]), np.asarray(g["heatmap/source"][:])
    assert np.array_equal(src.astype(bool), kept)
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    # dropped tiles never outrank kept ones
    if (~kept).any():
        assert heat[~kept].max() <= heat[kept].min() + 1e-6
    assert g["heatmap/patch"].shape == (len(tidx), 14, 14)
    res = g.attrs["result"]
    assert res["probability"] == pytest.approx(rows["synth"]["probability"])
    assert set(res["seconds"]) == {"tiling", "triage", "vit", "mil", "outputs"}
    assert g.attrs["run_hash"] == demo_config().hash()


def test_pictures_geojson_candidates(batch):
    out, _ = batch
    d = out / "synth"
    from PIL import Image

    for name in ("heatmap.png", "tokens.png"):
        with Image.open(d / name) as im:
            assert im.size[0] > 400 and im.size[1] > 400
    g = zarr.open_group(str(out / "synth.zarr"), mode="r")
    w, h = g.attrs["slide"]["width"], g.attrs["slide"]["height"]
    gj = json.loads((d / "regions.geojson").read_text())
    assert gj["type"] == "FeatureCollection"
    for f in gj["features"]:
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert f["geometry"]["type"] == "Polygon" and len(ring) >= 4
        assert (ring[0] == ring[-1]).all()
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= w
        assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= h
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == "Tumor"
    cands = _read_csv(d / "candidates.csv")
    assert len(cands) == g["vit/tile_index"].shape[0]
    conf = [float(c["confidence"]) for c in cands]
    assert conf == sorted(conf, reverse=True)
    coords = np.asarray(g["tiles/coords"][:])
    side = g.attrs["grid"]["tile_level0"]
    for c in cands:  # each candidate inside a kept tile
        x, y = float(c["X"]), float(c["Y"])
        inside = ((coords[:, 0] <= x) & (x < coords[:, 0] + side) & (coords[:, 1] <= y)
                  & (y < coords[:, 1] + side))
        assert inside.any()


def test_manifest(batch):
    out, rows = batch
    m = json.loads((out / "manifest.json").read_text())
    assert m["config_hash"] == demo_config().hash()
    assert m["versions"]["torch"].startswith("2.14.1")
    assert set(m["slides"]) == set(rows)
    assert m["slides"]["nompp"]["status"] == "failed"
    assert m["models"]["vit"]["model"] == "vit_small_patch16_224"
    assert m["models"]["mil"]["trained"] is False


def test_rerun_skips_then_force_recomputes(batch, svs_slide):
    out, rows = batch
    again = run_batch([svs_slide], out, demo_config(), progress=False)
    assert again[0]["status"] == "skipped"
    assert again[0]["probability"] == pytest.approx(rows["synth"]["probability"])
    forced = run_batch([svs_slide], out, demo_config(), force=True, progress=False)
    assert forced[0]["status"] == "ok"
    # same weights seed? models are rebuilt with fresh random weights, so only the structure
    # is compared
    assert forced[0]["kept_tiles"] >= 4


def test_interrupted_result_is_not_complete(tmp_path, svs_slide):
    # What a run killed after tiling leaves: a complete tile store without a result.
    cfg = demo_config()
    from wsi_prune.tiling import tile_slide

    tile_slide(svs_slide, tmp_path / "synth.zarr", cfg)
    entry = SlideEntry("synth", svs_slide)
    assert not run_complete(tmp_path, entry, cfg)
    rows = run_batch([entry], tmp_path, cfg, progress=False)
    assert rows[0]["status"] == "ok" and run_complete(tmp_path, entry, cfg)
    # another config is not complete
    other = cfg.replace(token_select={"keep_ratio": 0.25})
    assert not run_complete(tmp_path, entry, other)


def test_real_slide_end_to_end(batch, real_slide):
    out, rows = batch
    r = rows["cmu-1-small-region"]
    assert r["status"] == "ok" and r["tissue_tiles"] == 54
    assert r["mpp"] == pytest.approx(0.499)


def test_safe_ids_and_csv_list(tmp_path, svs_slide):
    assert safe_id("../../etc/passwd") == "etc_passwd"
    assert safe_id("..") == "slide"
    assert safe_id("tumor 001 (ä).svs") == "tumor_001_.svs"
    lst = tmp_path / "slides.csv"
    lst.write_text(f"path,id,mpp,label\n{svs_slide},../evil,0.5,Tumor\n{svs_slide},../evil,,\n")
    entries = discover([lst])
    assert [e.id for e in entries] == ["evil", "evil-2"]
    assert entries[0].mpp == 0.5 and entries[0].label == 1 and entries[1].mpp is None


def test_demo_yaml_matches_builtin():
    from_yaml = RunConfig.from_yaml(ROOT / "pipelines" / "demo.yaml")
    assert from_yaml == RunConfig.from_dict(DEMO_CONFIG)
    for name in ("camelyon16", "uni"):
        RunConfig.from_yaml(ROOT / "pipelines" / f"{name}.yaml")
    assert yaml.safe_load((ROOT / "pipelines" / "uni.yaml").read_text())["vit"]["model"] \
        == "hf-hub:MahmoodLab/uni"


def test_cli_exit_codes_and_heatmap(tmp_path, svs_slide, bad_dir, batch):
    runner = CliRunner()
    cfg = str(ROOT / "pipelines" / "demo.yaml")
    res = runner.invoke(main, ["run", str(svs_slide), str(bad_dir / "empty.svs"),
                               "--out", str(tmp_path / "o"), "--config", cfg, "--quiet"])
    assert res.exit_code == EXIT_SOME_FAILED, res.output
    res = runner.invoke(main, ["run", str(svs_slide), "--out", str(tmp_path / "o"),
                               "--config", cfg, "--quiet"])
    assert res.exit_code == 0, res.output  # skipped counts as fine
    res = runner.invoke(main, ["run", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2  # usage: no input
    res = runner.invoke(main, ["run", str(svs_slide), "--out", str(tmp_path / "o"),
                               "--shard", "3/2"])
    assert res.exit_code == 2
    png = tmp_path / "o" / "synth" / "heatmap.png"
    before = png.stat().st_mtime_ns
    res = runner.invoke(main, ["heatmap", str(tmp_path / "o" / "synth.zarr")])
    assert res.exit_code == 0, res.output
    assert png.stat().st_mtime_ns != before
    res = runner.invoke(main, ["doctor", str(svs_slide), str(bad_dir), "--json"])
    lines = [json.loads(x) for x in res.output.splitlines()]
    assert {x["id"]: x["status"] for x in lines} == {"synth": "ok", "empty": "error",
                                                   "notes": "error"}
    assert res.exit_code == EXIT_SOME_FAILED


def test_two_runs_on_one_out_do_not_collide(tmp_path, svs_slide):
    # A second run on the same slide while the first holds its lock fails that slide only.
    from wsi_prune import store

    cfg = demo_config()
    with store.locked(tmp_path / "synth"):
        rows = run_batch([svs_slide], tmp_path, cfg, progress=False)
    assert rows[0]["status"] == "failed" and "locked" in rows[0]["error"]


def test_help_everywhere():
    for cmd in ("run", "doctor", "heatmap", "demo", "info", "tile", "synth"):
        res = CliRunner().invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "Example" in res.output, cmd

