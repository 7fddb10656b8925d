"""End to end: real slides (synthetic pyramidal SVS/TIFF and the real Aperio slide) through the
whole pipeline with the tiny demo models, plus bad inputs that must fail alone."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

from tests._paths import REPO as ROOT
from wsi_prune._ids import safe_id
from wsi_prune.cli import main
from wsi_prune.config import RunConfig
from wsi_prune.errors import EXIT_SOME_FAILED
from wsi_prune.pipeline.batch import run_batch
from wsi_prune.pipeline.demo import DEMO_CONFIG, demo_config
from wsi_prune.pipeline.inputs import SlideEntry, discover
from wsi_prune.pipeline.process import run_complete
from wsi_prune.pipeline.records import PREDICTION_COLUMNS


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
    from tests._paths import SHARED_SLIDE

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
    assert rows["nompp"]["error"].startswith("missing-mpp: ")
    assert rows["empty"]["status"] == "failed" and "empty.svs" in rows["empty"]["error"]
    assert rows["notes"]["status"] == "failed" and "notes.svs" in rows["notes"]["error"]
    assert rows["notes"]["error"].startswith("unsupported: ")
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
    # the heatmap grid and the level-0 coordinates describe the same tiles
    grid, coords = np.asarray(g["tiles/grid"][:]), np.asarray(g["tiles/coords"][:])
    tile_level0 = g.attrs["grid"]["tile_level0"]
    assert np.array_equal(np.round(grid[:, ::-1] * tile_level0).astype(np.int64), coords)
    assert grid[:, 0].max() < g.attrs["grid"]["n_rows"]
    assert grid[:, 1].max() < g.attrs["grid"]["n_cols"]
    res = g.attrs["result"]
    assert res["probability"] == pytest.approx(rows["synth"]["probability"])
    assert set(res["seconds"]) == {"tiling", "triage", "vit", "mil", "outputs"}
    # no weight files: the run hash is the config's plus "no weights"
    assert g.attrs["run_hash"] == demo_config().run_hash() != demo_config().hash()


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
    # CAMELYON16's Evaluation_FROC.py format: no header, "confidence,X,Y", integer level-0 px
    with open(d / "candidates.csv", newline="") as fh:
        cands = [dict(zip(("confidence", "X", "Y"), row, strict=True)) for row in csv.reader(fh)]
    assert len(cands) == g["vit/tile_index"].shape[0]
    assert all(c["X"].isdigit() and c["Y"].isdigit() for c in cands)
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
    assert m["run_hash"] == demo_config().run_hash()
    assert m["versions"]["torch"].startswith("2.14.1")
    assert set(m["slides"]) == set(rows)
    assert m["slides"]["nompp"]["status"] == "failed"
    assert m["models"]["vit"]["model"] == "vit_small_patch16_224"
    assert m["models"]["scorer"]["model"] == "mobilenetv3_small_100"
    for name in ("scorer", "vit", "mil"):
        assert m["models"][name]["trained"] is False and m["models"][name]["sha256"] is None
    # the store records the same description as the manifest
    g = zarr.open_group(str(out / "synth.zarr"), mode="r")
    assert g.attrs["models"] == m["models"]


def test_rerun_skips_then_force_recomputes(batch, svs_slide):
    out, rows = batch
    again = run_batch([svs_slide], out, demo_config(), progress=False)
    assert again[0]["status"] == "skipped"
    assert again[0]["probability"] == pytest.approx(rows["synth"]["probability"])
    forced = run_batch([svs_slide], out, demo_config(), force=True, progress=False)
    assert forced[0]["status"] == "ok"
    # models without weights start from pipeline.INIT_SEED: a recomputation agrees
    assert forced[0]["kept_tiles"] == rows["synth"]["kept_tiles"]
    assert forced[0]["probability"] == pytest.approx(rows["synth"]["probability"], abs=1e-6)


def test_skip_clears_the_lock_of_a_run_killed_after_publishing(batch, svs_slide):
    """A process killed between publishing a slide's outputs and releasing its lock leaves
    complete outputs and a dead holder's lock (a Dask worker SIGKILLed there; CI saw it): the
    next run skips the slide and removes that lock, and leaves a live holder's lock alone."""
    out, _ = batch
    lock = out / "synth.lock"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lock.write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(), "token": "x"}))
    again = run_batch([svs_slide], out, demo_config(), progress=False)
    assert again[0]["status"] == "skipped" and not lock.exists()
    live = {"pid": os.getpid(), "host": socket.gethostname(), "token": "live"}
    lock.write_text(json.dumps(live))
    try:
        again = run_batch([svs_slide], out, demo_config(), progress=False)
        assert again[0]["status"] == "skipped"
        assert json.loads(lock.read_text()) == live
    finally:
        lock.unlink()


def test_interrupted_result_is_not_complete(tmp_path, svs_slide):
    # What a run killed after tiling leaves: a complete tile store without a result.
    cfg = demo_config()
    from wsi_prune.io.tiling import tile_slide

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
    assert safe_id("tumor 001 (ä).svs") == "tumor_001_ä_.svs"
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
    # --quiet: no progress bar, no table; the log file has the run all the same
    assert "slides:" not in res.output and "tile/s" not in res.output and "it/s" not in res.output
    assert "probability" not in res.stdout
    log = (tmp_path / "o" / "run.log").read_text()
    assert "2 slide(s) ->" in log and "synth: p=" in log and "empty failed" in log
    res = runner.invoke(main, ["run", str(svs_slide), "--out", str(tmp_path / "o"),
                               "--config", cfg])
    assert res.exit_code == 0, res.output  # skipped counts as fine
    assert "slides: 100%" in res.stderr  # the bar that --quiet hides
    assert "skipped" in res.stdout
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


def test_locked_slide_fails_alone_locked_out_refuses(tmp_path, svs_slide):
    from wsi_prune.errors import OutputConflict
    from wsi_prune.io import locks

    cfg = demo_config()
    # a slide held by someone else (a concurrent shard) fails that slide only
    with locks.locked(tmp_path / "synth"):
        rows = run_batch([svs_slide], tmp_path, cfg, progress=False)
    assert rows[0]["status"] == "failed" and "locked" in rows[0]["error"]
    assert rows[0]["error"].startswith("output-conflict: ")
    # the OUT held by a live run: refused before anything is written
    (tmp_path / "predictions.csv").unlink()
    with locks.locked(tmp_path / ".run"):
        with pytest.raises(OutputConflict, match=f"pid {os.getpid()}") as err:
            run_batch([svs_slide], tmp_path, cfg, progress=False)
    assert str(tmp_path) in str(err.value) and "--out" in str(err.value)
    assert not (tmp_path / "predictions.csv").exists()
    # a shard holds its own lock, so shards of one OUT run side by side
    with locks.locked(tmp_path / ".run"):
        rows = run_batch([svs_slide], tmp_path, cfg, shard=(0, 1), progress=False)
    assert rows[0]["status"] == "ok" and (tmp_path / "predictions.shard-0-of-1.csv").is_file()
    # a lock left by a dead process is taken over
    (tmp_path / ".run.lock").write_text(json.dumps({"pid": _dead_pid(),
                                                    "host": socket.gethostname()}))
    assert run_batch([svs_slide], tmp_path, cfg, progress=False)[0]["status"] == "skipped"
    assert not (tmp_path / ".run.lock").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_help_everywhere():
    for cmd in ("run", "doctor", "heatmap", "demo", "info", "tile", "synth"):
        res = CliRunner().invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "Example" in res.output, cmd



def test_info_cli(svs_slide, batch):
    out, rows = batch
    cfg = str(ROOT / "pipelines" / "demo.yaml")
    res = CliRunner().invoke(main, ["info", str(svs_slide), "--config", cfg, "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["mpp"] == pytest.approx(0.5) and info["mpp_source"] == "openslide"
    assert info["vendor"] == "aperio" and info["size_px"] == "4096x4096"
    assert info["levels"] >= 3 and info["level_downsamples"][:2] == [1.0, 2.0]
    # the estimate is the tiling the run does
    assert info["tissue_tiles"] == rows["synth"]["tissue_tiles"] > 0
    assert 0 < info["tissue_fraction"] < 1 and info["grid_tiles"] > info["tissue_tiles"]
    assert "rough" in info["estimate_note"] and info["estimated_seconds"] > 0
    text = CliRunner().invoke(main, ["info", str(svs_slide), "--config", cfg])
    assert text.exit_code == 0 and "mpp_source: openslide" in text.output
    bad = CliRunner().invoke(main, ["info", str(ROOT / "pyproject.toml")])
    assert bad.exit_code == 1 and "pyproject.toml" in bad.stderr


# -- several processes: a killed run resumes, two runs on one OUT, retrained weights ---------
CLI = Path(sys.executable).with_name("wsi-prune")
DEMO_YAML = str(ROOT / "pipelines" / "demo.yaml")


def _run_cli(slides: Path, out: Path, *extra: str) -> subprocess.Popen:
    if not CLI.is_file():
        pytest.skip(f"console script not installed at {CLI}")
    return subprocess.Popen([str(CLI), "run", str(slides), "--out", str(out), "--config",
                             DEMO_YAML, "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def three_slides(tmp_path_factory) -> Path:
    from wsi_prune.synth import write_dataset

    d = tmp_path_factory.mktemp("three")
    write_dataset(d, n=3, seed=0, size=2048)
    return d


@pytest.fixture(scope="module")
def two_runs(three_slides, tmp_path_factory):
    """Two ``wsi-prune run`` processes on one OUT. The first takes OUT/.run.lock and runs
    undisturbed (the reference of the resume tests); the second must refuse. The first is
    held still (SIGSTOP) from the moment its lock exists until the second has answered, so
    the second always meets a live holder, however slowly either starts."""
    out = tmp_path_factory.mktemp("two")
    first = _run_cli(three_slides, out)
    lock = out / ".run.lock"
    deadline = time.monotonic() + 240
    while not lock.is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock.is_file(), first.communicate()
    first.send_signal(signal.SIGSTOP)
    try:
        second = _run_cli(three_slides, out)
        second_result = (second.pid, second.wait(timeout=300), *second.communicate())
    finally:
        first.send_signal(signal.SIGCONT)
    results = [(first.pid, first.wait(timeout=300), *first.communicate()), second_result]
    return out, results


def test_second_run_on_same_out_refuses(two_runs):
    out, results = two_runs
    codes = sorted(rc for _, rc, _, _ in results)
    assert codes == [0, 1], results
    (winner, *_), (_, _, _, loser_err) = sorted(results, key=lambda r: r[1])
    line = loser_err.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(out) in line and f"pid {winner}" in line
    assert "another wsi-prune run" in line
    # the refused run wrote nothing: the winner's table and manifest are whole
    table = _read_csv(out / "predictions.csv")
    assert [r["status"] for r in table] == ["ok"] * 3
    m = json.loads((out / "manifest.json").read_text())
    assert {s["status"] for s in m["slides"].values()} == {"ok"}
    assert not (out / ".run.lock").exists()


def _outputs(out: Path, sid: str) -> dict[str, object]:
    """Everything a slide's run computed: every array of its store, its probability and the
    text outputs (timings and file times aside)."""
    g = zarr.open_group(str(out / f"{sid}.zarr"), mode="r")
    got: dict[str, object] = {name: np.asarray(a[...]) for name, a in
                              g.members(max_depth=None) if isinstance(a, zarr.Array)}
    got["probability"] = g.attrs["result"]["probability"]
    got["kept_tiles"] = g.attrs["result"]["kept_tiles"]
    for name in ("candidates.csv", "regions.geojson"):
        got[name] = (out / sid / name).read_text()
    return got


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_resume_after_killed_run(three_slides, two_runs, tmp_path, sig):
    reference, _ = two_runs
    out = tmp_path / "out"
    cfg = demo_config()
    entries = discover([three_slides])
    proc = _run_cli(three_slides, out)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        pred = out / "predictions.csv"
        if pred.is_file() and any(r["status"] == "ok" for r in _read_csv(pred)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    proc.communicate()
    # SIGTERM stops the run like Ctrl-C (SystemExit, locks released); SIGKILL leaves locks
    assert rc == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)
    assert (out / ".run.lock").exists() == (sig == signal.SIGKILL)
    done = {r["id"] for r in _read_csv(out / "predictions.csv")}
    assert all(r["status"] == "ok" for r in _read_csv(out / "predictions.csv"))
    assert 1 <= len(done) < 3
    assert not (out / "manifest.json").exists()  # the batch never looks finished
    for e in entries:  # only what predictions.csv reports is complete
        assert run_complete(out, e, cfg) == (e.id in done), e.id
    stamps = {sid: ((out / f"{sid}.zarr" / "zarr.json").stat().st_mtime_ns,
                    (out / sid / "heatmap.png").stat().st_mtime_ns) for sid in done}

    again = _run_cli(three_slides, out)
    assert again.wait(timeout=300) == 0, again.communicate()
    table = {r["id"]: r for r in _read_csv(out / "predictions.csv")}
    ref = {r["id"]: r for r in _read_csv(reference / "predictions.csv")}
    assert {sid: r["status"] for sid, r in table.items()} == {
        e.id: "skipped" if e.id in done else "ok" for e in entries}
    for sid in done:  # not recomputed
        assert stamps[sid] == ((out / f"{sid}.zarr" / "zarr.json").stat().st_mtime_ns,
                               (out / sid / "heatmap.png").stat().st_mtime_ns)
    for e in entries:  # every output as an undisturbed run made it
        assert table[e.id]["probability"] == ref[e.id]["probability"]
        got, want = _outputs(out, e.id), _outputs(reference, e.id)
        assert got.keys() == want.keys()
        for key in want:
            nan = np.asarray(got[key]).dtype.kind == "f"  # the heat image is NaN off tissue
            assert np.array_equal(got[key], want[key], equal_nan=nan), (e.id, key)
        assert run_complete(out, e, cfg)
    assert not (out / ".run.lock").exists()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or p.suffix == ".lock"]


def test_trained_weights_resume_identity_and_manifest(three_slides, two_runs, tmp_path):
    """Trained scorer and MIL head (their JSON carries the architecture, here a MIL hidden
    size the run config does not have) are used by run, described in the manifest with their
    SHA-256 even when every slide is skipped, and retraining at the same path recomputes."""
    from wsi_prune._files import file_sha256
    from wsi_prune.training.mil import train_mil
    from wsi_prune.training.scorer import train_scorer

    reference, _ = two_runs
    stores = sorted(reference.glob("*.zarr"))
    labels = three_slides / "labels.csv"
    scorer_w, mil_w = tmp_path / "w" / "scorer.safetensors", tmp_path / "w" / "mil.safetensors"
    train_scorer(stores, three_slides, scorer_w, config=demo_config().scorer, epochs=1,
                 max_tiles_per_store=32, progress=False)
    train_mil(stores, labels, mil_w, folds=1, epochs=3, hidden=16, progress=False)
    cfg = demo_config().replace(scorer={"weights": str(scorer_w)},
                                mil={"weights": str(mil_w)})
    assert cfg.mil.hidden == 64  # what the sidecar JSON must override
    out = tmp_path / "out"

    def manifest() -> dict:
        return json.loads((out / "manifest.json").read_text())

    first = run_batch([three_slides], out, cfg, progress=False)
    assert [r["status"] for r in first] == ["ok"] * 3, first
    m = manifest()
    assert m["config"]["mil"]["hidden"] == 16 and m["config"]["mil"]["weights"] == str(mil_w)
    assert m["models"]["scorer"]["sha256"] == file_sha256(scorer_w)
    assert m["models"]["mil"]["sha256"] == file_sha256(mil_w)
    assert m["models"]["mil"]["trained"] and m["models"]["mil"]["hidden"] == 16
    assert m["models"]["vit"]["trained"] is False and m["models"]["vit"]["sha256"] is None
    ref = {r["id"]: r["probability"] for r in _read_csv(reference / "predictions.csv")}
    assert any(abs(r["probability"] - float(ref[r["id"]])) > 1e-4 for r in first)
    described = m["models"]

    second = run_batch([three_slides], out, cfg, progress=False)
    assert [r["status"] for r in second] == ["skipped"] * 3
    m = manifest()
    assert m["models"] == described  # nothing was built, the models are described all the same
    assert m["models"]["scorer"]["model"] == "mobilenetv3_small_100"

    old_hash, config_hash = m["run_hash"], m["config_hash"]
    train_mil(stores, labels, mil_w, folds=1, epochs=6, hidden=16, seed=1, progress=False)
    assert file_sha256(mil_w) != described["mil"]["sha256"]
    third = run_batch([three_slides], out, cfg, progress=False)
    assert [r["status"] for r in third] == ["ok"] * 3  # same path, new weights: recomputed
    m = manifest()
    assert m["run_hash"] != old_hash and m["config_hash"] == config_hash  # paths unchanged
    assert m["models"]["mil"]["sha256"] == file_sha256(mil_w)
    assert [r["probability"] for r in third] != [r["probability"] for r in first]
    g = zarr.open_group(str(out / f"{third[0]['id']}.zarr"), mode="r")
    assert g.attrs["run_hash"] == m["run_hash"] and g.attrs["models"] == m["models"]


def _write_blank_tiff(path: Path, size: int = 2048, mpp: float = 0.5) -> Path:
    """A pyramidal TIFF of bare glass: near-white everywhere, with resolution tags."""
    import tifffile

    glass = np.full((size, size, 3), 242, np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for level in range(4):
            ds = 2**level
            px_per_cm = 10_000.0 / (mpp * ds)
            tif.write(glass[::ds, ::ds], tile=(256, 256), photometric="rgb", compression="jpeg",
                      subfiletype=1 if level else 0, resolution=(px_per_cm, px_per_cm),
                      resolutionunit="CENTIMETER", metadata=None)
    return path


def test_mixed_folder_through_cli(tmp_path, three_slides, nompp_slide):
    import shutil

    from tests.io.test_slide import corrupt_tiles

    d = tmp_path / "slides"
    d.mkdir()
    for name in ("synth_000.svs", "synth_001.svs"):
        shutil.copy(three_slides / name, d / name)
    corrupt_tiles(three_slides / "synth_002.svs", d / "corrupt.svs")
    (d / "notes.svs").write_text("this is not a slide\n")
    (d / "empty.svs").write_bytes(b"")
    shutil.copy(nompp_slide, d / "nompp.tif")
    _write_blank_tiff(d / "blank.tif")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(d), "--out", str(out), "--config", DEMO_YAML,
                                    "--quiet"])
    assert res.exit_code == EXIT_SOME_FAILED, res.output
    table = {r["id"]: r for r in _read_csv(out / "predictions.csv")}
    assert list(table) == sorted(table)  # slide order
    expect = {  # id: (kind, what the reason says)
        "corrupt": ("corrupt", "read failed"),
        "notes": ("unsupported", "not a slide format"),
        "empty": ("unsupported", "empty file (0 bytes)"),
        "nompp": ("missing-mpp", "pass --mpp"),
        "blank": ("no-tissue", "no tissue tile"),
    }
    assert set(table) == set(expect) | {"synth_000", "synth_001"}
    for sid, (kind, words) in expect.items():
        r = table[sid]
        assert r["status"] == "failed", sid
        assert r["error"].startswith(f"{kind}: {d / Path(r['path']).name}: "), r["error"]
        assert words in r["error"] and "\n" not in r["error"], r["error"]
        assert all(r[c] == "" for c in PREDICTION_COLUMNS[4:]), sid
        assert f"{sid} failed: {kind}: " in res.stderr  # --quiet still logs warnings
        if (out / f"{sid}.zarr").exists():  # e.g. the blank slide's (empty) tile store
            assert not run_complete(out, SlideEntry(sid, Path(r["path"])), demo_config())
        assert not (out / sid).exists()
    for sid in ("synth_000", "synth_001"):
        r = table[sid]
        assert r["status"] == "ok" and r["error"] == ""
        assert 0.0 <= float(r["probability"]) <= 1.0 and r["label"] in ("0", "1")
        assert 0 < int(r["kept_tiles"]) <= int(r["tissue_tiles"])
        assert float(r["mpp"]) == pytest.approx(0.5) and r["mpp_source"] == "openslide"
        assert all(float(r[f"sec_{s}"]) >= 0 for s in ("tiling", "triage", "vit", "mil"))
        assert (out / sid / "heatmap.png").is_file()
    m = json.loads((out / "manifest.json").read_text())
    assert {k: v["status"] for k, v in m["slides"].items()} == {
        k: v["status"] for k, v in table.items()}


def test_run_dense_flag_sends_every_tile_and_token(tmp_path, tiff_slide):
    res = CliRunner().invoke(main, ["run", str(tiff_slide), "--out", str(tmp_path / "d"),
                                    "--config", DEMO_YAML, "--dense", "--quiet"])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "d" / "predictions.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "ok" and int(row["tissue_tiles"]) > 0
    assert row["kept_tiles"] == row["tissue_tiles"]
    assert float(row["token_fraction"]) == 1.0
    g = zarr.open_group(str(tmp_path / "d" / f"{tiff_slide.stem}.zarr"), mode="r")
    assert np.asarray(g["vit/kept_tokens"][...]).all()  # no token pruned at any stage
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert man["config"]["tile_select"]["policy"] == "all"
    assert man["config"]["vit"]["prune_blocks"] == []


def test_rerun_recomputes_when_the_slide_or_its_mpp_changed(tmp_path, nompp_slide):
    """The resume key covers the slide as it is now: another --mpp on a slide without
    metadata, or a replaced file, recomputes instead of keeping stale results."""
    import shutil

    slide = tmp_path / "s.tif"
    shutil.copy(nompp_slide, slide)
    out, cfg = tmp_path / "o", demo_config()
    first = run_batch([slide], out, cfg, mpp=0.5, progress=False)
    assert first[0]["status"] == "ok"
    assert run_batch([slide], out, cfg, mpp=0.5, progress=False)[0]["status"] == "skipped"
    other = run_batch([slide], out, cfg, mpp=0.25, progress=False)[0]
    assert other["status"] == "ok" and float(other["mpp"]) == 0.25
    assert int(other["tissue_tiles"]) < int(first[0]["tissue_tiles"])  # 4x the area per tile
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was replaced
    assert run_batch([slide], out, cfg, mpp=0.25, progress=False)[0]["status"] == "ok"


def test_free_space_bound_counts_the_tiles_the_run_tiles(batch, svs_slide):
    """The disk check before the first slide masks it as tiling does (the same bounded
    thumbnail and mask), so it counts the tissue tiles the run then finds."""
    from wsi_prune.pipeline.checks import OUTPUTS_MARGIN_BYTES, slide_bytes_bound

    _, rows = batch
    cfg = demo_config()
    row = next(r for r in rows.values() if r["status"] == "ok" and Path(r["path"]) == svs_slide)
    need, n = slide_bytes_bound(SlideEntry("x", svs_slide), cfg)
    assert n == int(row["tissue_tiles"]) > 0
    t = cfg.tiling
    assert need == n * t.coarse_px**2 * 3 + OUTPUTS_MARGIN_BYTES



def test_kept_mask_is_taken_once_by_the_same_slide_and_config(svs_slide, tmp_path):
    """``run_tissue_mask(keep=True)`` (the free-space check) leaves its mask for the next call
    on the same file with the same tissue and tiling config (tiling), once; another config or
    a replaced file masks anew."""
    import shutil

    from wsi_prune.io.slide import Slide
    from wsi_prune.io.tiling import forget_kept_mask, run_tissue_mask

    slide_path = tmp_path / "s.svs"
    shutil.copy(svs_slide, slide_path)
    cfg = demo_config()
    other = cfg.replace(tissue={"closing_um": cfg.tissue.closing_um + 4})
    try:
        with Slide(slide_path) as slide:
            kept = run_tissue_mask(slide, cfg, keep=True)
            assert run_tissue_mask(slide, other) is not kept  # another config
            assert run_tissue_mask(slide, cfg) is kept  # taken ...
            again = run_tissue_mask(slide, cfg)  # ... once
            assert again is not kept and np.array_equal(again.mask, kept.mask)
            run_tissue_mask(slide, cfg, keep=True)
        st = slide_path.stat()
        os.utime(slide_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # replaced
        with Slide(slide_path) as slide:
            assert run_tissue_mask(slide, cfg) is not kept
            kept = run_tissue_mask(slide, cfg, keep=True)
        forget_kept_mask()
        with Slide(slide_path) as slide:
            assert run_tissue_mask(slide, cfg) is not kept
    finally:
        forget_kept_mask()


def test_a_run_masks_its_first_slide_once(svs_slide, tmp_path, monkeypatch):
    """The free-space check masks the first slide before the run tiles it; tiling takes that
    mask instead of masking again (the real masking function, counted)."""
    from wsi_prune.io import tiling

    calls = []
    real = tiling.slide_tissue_mask

    def counted(slide, *args, **kwargs):
        calls.append(Path(slide.path).name)
        return real(slide, *args, **kwargs)

    monkeypatch.setattr(tiling, "slide_tissue_mask", counted)
    (row,) = run_batch([svs_slide], tmp_path / "o", demo_config(), progress=False)
    assert row["status"] == "ok", row["error"]
    assert calls == [svs_slide.name]
    assert not tiling._KEPT  # nothing held after the run
    # the store holds what a build that masks on its own makes
    res = tiling.tile_slide(svs_slide, tmp_path / "alone.zarr", demo_config())
    assert len(calls) == 2 and res.n_tiles == int(row["tissue_tiles"])
    a = zarr.open_group(str(tmp_path / "o" / f"{row['id']}.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "alone.zarr"), mode="r")
    assert np.array_equal(a["mask/tissue"][...], b["mask/tissue"][...])
    assert np.array_equal(a["tiles/coords"][...], b["tiles/coords"][...])


def test_slide_token_scope_spends_the_same_tokens_where_the_cnn_looks(batch, svs_slide,
                                                                       tmp_path):
    """``token_select.scope: slide``: the same tokens in all as the per-tile ratio, moved to
    the tiles whose CNN patch maps rate highest."""
    out, rows = batch
    sid = next(k for k, r in rows.items() if Path(r["path"]) == svs_slide)
    cfg = demo_config().replace(token_select={"scope": "slide", "min_tokens": 2})
    (row,) = run_batch([svs_slide], tmp_path / "slide", cfg, progress=False)
    assert row["status"] == "ok", row["error"]
    a = zarr.open_group(str(out / f"{sid}.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "slide" / f"{row['id']}.zarr"), mode="r")
    assert np.array_equal(a["vit/tile_index"][:], b["vit/tile_index"][:])  # same triage
    per_tile = np.asarray(a["vit/kept_tokens"][:, 0]).sum(1)
    per_slide = np.asarray(b["vit/kept_tokens"][:, 0]).sum(1)
    assert per_tile.sum() == per_slide.sum() and len(set(per_tile)) == 1
    assert per_slide.min() >= 2 and len(set(per_slide)) > 1
    # the tiles given more tokens are those whose patch maps rate higher
    tidx = np.asarray(b["vit/tile_index"][:])
    imp = np.asarray(b["triage/patch_importance"][:])[tidx].reshape(len(tidx), -1)
    top = np.sort(imp, axis=1)[:, ::-1][:, : per_tile[0]].mean(1)
    more = per_slide > per_tile[0]
    assert top[more].mean() > top[~more].mean()
