"""A slide with one damaged JPEG tile at full resolution: with ``--on-corrupt-tile skip`` (the
default) the tile is recorded as unreadable (store, predictions.csv, tiles.geojson) and the
slide completes; with ``fail``, or past the allowed share of bad tiles, the slide fails."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

from tests.io.test_slide import damage_tile
from wsi_prune.cli import main
from wsi_prune.errors import CorruptSlide
from wsi_prune.io.tiling import tile_slide
from wsi_prune.models.factory import build_models
from wsi_prune.pipeline.batch import run_batch
from wsi_prune.pipeline.demo import demo_config
from wsi_prune.pipeline.inputs import SlideEntry
from wsi_prune.pipeline.stages import embed_kept, triage
from wsi_prune.synth import SynthSpec, write_slide


def _config(**tiling):
    """The demo models with every tissue tile sent to the ViT (so the damaged one is read for
    sure); up to 4 of the slide's ~40 tissue tiles touch one 256 px JPEG tile, so the skip
    test allows 15 %."""
    return demo_config().replace(tile_select={"policy": "all", "min_tiles": 0,
                                              "max_tiles": None},
                                 tiling={"max_unreadable_fraction": 0.15, **tiling})


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[Path, tuple[int, int, int, int]]:
    """A 2048² px slide with the level-0 JPEG tile at the middle of its most tissue-filled
    tile broken: the triage (coarse level) reads fine, the ViT's full-resolution read not."""
    d = tmp_path_factory.mktemp("damaged")
    clean = write_slide(d / "clean.svs", SynthSpec(width=2048, height=2048, mpp=0.5, seed=4,
                                                   tumour=True, tissue_fraction=0.5)).path
    ref = tile_slide(clean, d / "ref.zarr", demo_config())
    g = zarr.open_group(str(ref.store_path), mode="r")
    coords = np.asarray(g["tiles/coords"][:])
    side = g.attrs["grid"]["tile_level0"]
    cx, cy = coords[int(np.argmax(np.asarray(g["tiles/tissue_fraction"][:])))] + side / 2
    box = damage_tile(clean, d / "damaged.svs", 0, (cx, cy))
    return d / "damaged.svs", box


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def test_damaged_tile_is_skipped_and_the_slide_completes(damaged, tmp_path):
    slide, (x0, y0, x1, y1) = damaged
    out = tmp_path / "out"
    (row,) = run_batch([slide], out, _config(), progress=False)
    assert row["status"] == "ok", row["error"]
    g = zarr.open_group(str(out / "damaged.zarr"), mode="r")
    coords = np.asarray(g["tiles/coords"][:])
    side = g.attrs["grid"]["tile_level0"]
    bad = np.asarray(g["vit/unreadable"][:])
    records = g["vit/unreadable"].attrs["records"]
    assert 1 <= len(bad) <= 4 and g["tiles/unreadable"].shape == (0,)
    for r in records:  # position and OpenSlide's reason, each tile overlapping the damage
        x, y = r["level0_xy"]
        assert r["stage"] == "vit" and [x, y] == coords[r["tile"]].tolist()
        assert x < x1 and x + side > x0 and y < y1 and y + side > y0
        assert "read failed" in r["error"]
    # left out of the ViT and the slide head, and counted
    tidx = np.asarray(g["vit/tile_index"][:])
    assert not set(bad.tolist()) & set(tidx.tolist())
    assert len(tidx) == len(coords) - len(bad)
    kept = np.asarray(g["triage/kept"][:])
    assert not kept[bad].any() and np.array_equal(np.flatnonzero(kept), tidx)
    assert g.attrs["result"]["unreadable_tiles"] == len(bad)
    assert _rows(out / "predictions.csv")["damaged"]["unreadable_tiles"] == str(len(bad))
    fc = json.loads((out / "damaged" / "tiles.geojson").read_text())
    flagged = [i for i, f in enumerate(fc["features"])
               if f["properties"].get("classification", {}).get("name") == "Unreadable"]
    assert flagged == sorted(bad.tolist())
    assert (out / "damaged" / "heatmap.png").is_file() and (out / "froc" / "damaged.csv").is_file()
    # the same slide when no bad tile is allowed: it fails, and leaves no file in froc/
    # (Evaluation_FROC.py would score a stale one)
    (row,) = run_batch([slide], out, _config(max_unreadable_fraction=0.0), force=True,
                       progress=False)
    assert row["status"] == "failed"
    assert "tissue tiles unreadable" in row["error"] and "max_unreadable_fraction" in row["error"]
    assert not (out / "froc" / "damaged.csv").exists()


def test_fail_mode_fails_the_slide_at_the_first_bad_tile(damaged, tmp_path):
    slide, _ = damaged
    cfg = _config()
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    res = CliRunner().invoke(main, ["run", str(slide), "--out", str(tmp_path / "fail"),
                                    "--config", str(path), "--on-corrupt-tile", "fail",
                                    "--quiet"])
    assert res.exit_code == 3, res.output
    row = _rows(tmp_path / "fail" / "predictions.csv")["damaged"]
    assert row["status"] == "failed" and row["error"].startswith(f"corrupt: {slide}: ")
    assert "read failed" in row["error"]


@pytest.mark.parametrize("mode", ["skip", "fail"])
def test_read_ahead_reports_a_damaged_tile_as_reading_in_line_does(damaged, tmp_path, mode):
    """The kept tiles are read by a reader thread ahead of the ViT (``prefetch``), or by a pool
    of three (``read_workers``, a slide handle each): a damaged tile is skipped with the same
    record, or fails the stage with the same error naming the file, as when the tiles are read
    in the ViT's own thread."""
    slide, _ = damaged
    cfg = _config(on_corrupt_tile=mode)
    res = tile_slide(slide, tmp_path / "d.zarr", cfg)
    group = zarr.open_group(str(res.store_path), mode="r")
    models = build_models(cfg)
    tri = triage(group, cfg, models)
    tidx = np.flatnonzero(tri["kept"]).astype(np.int64)
    entry = SlideEntry("damaged", slide)

    def run(prefetch: int, workers: int = 1):
        return embed_kept(entry, group, cfg, models, tidx, tri["patch_importance"],
                          prefetch=prefetch, read_workers=workers)

    if mode == "skip":
        inline = run(0)
        assert 1 <= len(inline["unreadable"]) <= 4
        for ahead in (run(2), run(2, 3)):
            assert ahead["unreadable"] == inline["unreadable"]
            for key in ("tile_index", "embedding", "token_importance", "kept_tokens"):
                assert np.array_equal(ahead[key], inline[key]), key
        return
    errors = []
    for prefetch, workers in ((0, 1), (2, 1), (2, 3)):
        with pytest.raises(CorruptSlide) as info:
            run(prefetch, workers)
        errors.append(info.value)
    assert str(errors[0]) == str(errors[1]) == str(errors[2]) and str(slide) in str(errors[2])
    assert "read failed" in errors[2].reason


def test_damaged_tile_of_a_single_level_slide(real_slide: Path, tmp_path: Path, caplog) -> None:
    """The real slide has one level, which its tissue mask is read from too: a damaged tile
    there used to fail the slide at the mask. Now that area is masked as glass (a warning),
    the grid tiles overlapping it are recorded unreadable, and the slide completes, within
    the allowed share; with ``fail`` it still fails."""
    from tests.io.test_slide import damage_tile

    slide = tmp_path / "onebad.svs"
    x0, y0, x1, y1 = damage_tile(real_slide, slide, 0, (1100, 1500))
    out = tmp_path / "out"
    cfg = demo_config().replace(tiling={"max_unreadable_fraction": 0.15})
    with caplog.at_level("WARNING"):
        (row,) = run_batch([slide], out, cfg, progress=False)
    assert row["status"] == "ok", row["error"]
    assert "masked as glass" in caplog.text
    g = zarr.open_group(str(out / "onebad.zarr"), mode="r")
    side = g.attrs["grid"]["tile_level0"]
    records = g["tiles/unreadable"].attrs["records"]
    assert 1 <= len(records) <= 4
    for r in records:  # each overlaps the damaged JPEG tile
        x, y = r["level0_xy"]
        assert x < x1 and x + side > x0 and y < y1 and y + side > y0
    assert row["unreadable_tiles"] == len(records)
    # `doctor` and the free-space check mask it as the run does
    from wsi_prune.pipeline.checks import slide_bytes_bound
    from wsi_prune.pipeline.preflight import inspect_slide

    assert inspect_slide(slide, cfg)["tissue_tiles"] == g["tiles/coords"].shape[0]
    assert slide_bytes_bound(SlideEntry("onebad", slide), cfg)[1] == g["tiles/coords"].shape[0]
    fail = cfg.replace(tiling={"on_corrupt_tile": "fail"})
    with pytest.raises(CorruptSlide):
        inspect_slide(slide, fail)
    (row,) = run_batch([slide], out, fail, force=True, progress=False)
    assert row["status"] == "failed" and "read failed" in row["error"]
