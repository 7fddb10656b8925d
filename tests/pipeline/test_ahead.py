"""The next slide tiled ahead (``wsi_prune.pipeline.ahead``): the same stores, rows and errors
as a run that tiles each slide in its turn; a failed build is not repeated; a slide replaced
after its build is tiled again; an interrupted build leaves nothing behind; complete and
locked slides are not built."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from tests._faults import differences, leftovers
from wsi_prune.cli import main
from wsi_prune.io import locks, tiling
from wsi_prune.models.factory import build_models
from wsi_prune.pipeline import ahead as ahead_mod
from wsi_prune.pipeline import process as process_mod
from wsi_prune.pipeline.ahead import TilingAhead, auto_tile_ahead
from wsi_prune.pipeline.batch import run_batch
from wsi_prune.pipeline.demo import demo_config
from wsi_prune.pipeline.inputs import SlideEntry, discover
from wsi_prune.pipeline.process import process_slide, run_complete


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Three small synthetic slides and a damaged copy of one between them (its pyramid
    truncated: it opens, its tiles do not all decode)."""
    from wsi_prune.synth import write_dataset

    d = tmp_path_factory.mktemp("ahead")
    write_dataset(d, n=3, seed=5, size=1024)
    data = (d / "synth_001.svs").read_bytes()
    (d / "synth_001b.svs").write_bytes(data[: len(data) * 2 // 3])
    (d / "labels.csv").unlink()
    return d


def _counting(monkeypatch, module, name: str = "tile_slide") -> list[str]:
    """Record the slides ``module.<name>`` is called for (the real function runs):
    ``tile_slide`` by its store's name, ``tiling._build`` (a store built, not reused) by the
    slide id."""
    calls: list[str] = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        if name == "tile_slide":
            calls.append(Path(args[1]).name)
        else:  # _build(slide, tmp, ...): the temporary store is named after the slide's
            calls.append(Path(args[1]).name.split(".zarr")[0].lstrip("."))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_batch_tiled_ahead_equals_one_tiled_in_turn(slides, tmp_path, monkeypatch):
    cfg = demo_config()
    in_turn = run_batch([slides], tmp_path / "turn", cfg, progress=False, tile_ahead=False)
    built_ahead = _counting(monkeypatch, ahead_mod)
    rows = run_batch([slides], tmp_path / "ahead", cfg, progress=False, tile_ahead=True)
    ids = [r["id"] for r in rows]
    assert ids == [r["id"] for r in in_turn] == ["synth_000", "synth_001", "synth_001b",
                                                 "synth_002"]
    # each slide's build starts when the slide before it has finished triage: the damaged
    # slide never gets there, so the slide after it tiles in its own turn
    assert built_ahead == ["synth_001.zarr", "synth_001b.zarr"]
    for a, b in zip(rows, in_turn, strict=True):
        assert (a["status"], a["error"], a["probability"], a["kept_tiles"]) == \
            (b["status"], b["error"], b["probability"], b["kept_tiles"]), a["id"]
    ok = [r["id"] for r in rows if r["status"] == "ok"]
    assert ok == ["synth_000", "synth_001", "synth_002"]
    assert rows[2]["status"] == "failed" and "synth_001b.svs" in rows[2]["error"]
    # every array of every store, the result and the text outputs are the same
    assert not differences(tmp_path / "ahead", tmp_path / "turn", ok)
    assert not leftovers(tmp_path / "ahead")
    # a slide built ahead records what it waited for its build; the others tile in turn
    manifest = json.loads((tmp_path / "ahead" / "manifest.json").read_text())["slides"]
    assert manifest["synth_000"]["sec_tiling_waited"] is None
    assert manifest["synth_002"]["sec_tiling_waited"] is None
    m = manifest["synth_001"]
    assert 0 <= m["sec_tiling_waited"] <= m["sec_tiling"]
    assert m["sec_total"] == pytest.approx(sum(m[f"sec_{s}"] for s in process_mod.STAGES))
    turn = json.loads((tmp_path / "turn" / "manifest.json").read_text())["slides"]
    assert all(m["sec_tiling_waited"] is None for m in turn.values())


def test_a_failed_build_is_raised_at_the_slides_turn_not_repeated(slides, tmp_path,
                                                                  monkeypatch):
    cfg = demo_config()
    out = tmp_path / "out"
    out.mkdir()
    (entry,) = discover([slides / "synth_001b.svs"], out=out)
    ahead = TilingAhead(out, cfg, False, cfg.run_hash())
    ahead.start(entry)
    tiled = ahead.take(entry)
    assert tiled is not None and tiled.error is not None and tiled.seconds > 0
    in_turn = _counting(monkeypatch, process_mod)
    with pytest.raises(type(tiled.error)) as raised:
        process_slide(entry, out, cfg, build_models(cfg), tiled=tiled)
    assert raised.value is tiled.error  # the same exception object: the same failed row
    assert in_turn == []  # the damaged slide was read once, ahead
    assert not (out / "synth_001b.zarr").exists() and not leftovers(out)


def test_a_slide_replaced_after_its_build_is_tiled_again(slides, tmp_path):
    cfg = demo_config()
    out, src = tmp_path / "out", tmp_path / "src"
    out.mkdir()
    src.mkdir()
    shutil.copy(slides / "synth_000.svs", src / "s.svs")
    (entry,) = discover([src / "s.svs"], out=out)
    ahead = TilingAhead(out, cfg, False, cfg.run_hash())
    ahead.start(entry)
    tiled = ahead.take(entry)
    assert tiled is not None and tiled.error is None
    shutil.copy(slides / "synth_002.svs", src / "new.svs")
    os.replace(src / "new.svs", src / "s.svs")  # another slide under the same name
    row = process_slide(entry, out, cfg, build_models(cfg), tiled=tiled)
    assert row["status"] == "ok" and run_complete(out, entry, cfg)
    ref = tiling.tile_slide(slides / "synth_002.svs", tmp_path / "ref.zarr", cfg)
    got = zarr.open_group(str(out / "s.zarr"), mode="r")
    want = zarr.open_group(str(ref.store_path), mode="r")
    assert got.attrs["tile_hash"] == tiling.slide_tile_hash(src / "s.svs", cfg)
    assert (got["tiles/coords"][:] == want["tiles/coords"][:]).all()
    assert (got["tiles/coarse"][:] == want["tiles/coarse"][:]).all()


def test_an_interrupted_run_stops_the_build(slides, tmp_path):
    cfg = demo_config()
    out = tmp_path / "out"
    out.mkdir()
    (entry,) = discover([slides / "synth_000.svs"], out=out)
    ahead = TilingAhead(out, cfg, False, cfg.run_hash())
    ahead._stop.set()  # as close(stop=True) does while the build runs
    assert ahead._build(entry) is None  # stopped at its first block of tiles
    assert not (out / "synth_000.zarr").exists()
    assert not leftovers(out)  # no temporary store, no lock


def test_complete_and_locked_slides_are_not_built(slides, tmp_path, monkeypatch):
    cfg = demo_config()
    out = tmp_path / "out"
    out.mkdir()
    entries = discover([slides / "synth_000.svs", slides / "synth_002.svs"], out=out)
    run_batch(entries[:1], out, cfg, progress=False)
    built = _counting(monkeypatch, ahead_mod)
    ahead = TilingAhead(out, cfg, False, cfg.run_hash())
    assert ahead._build(entries[0]) is None  # complete: the run skips it
    with locks.locked(out / entries[1].id):  # held: as by another run
        assert ahead._build(entries[1]) is None
    assert built == [] and not (out / "synth_002.zarr").exists()
    assert ahead.take(entries[1]) is None  # never started for it


def test_start_refuses_a_second_build(slides, tmp_path):
    cfg = demo_config()
    out = tmp_path / "out"
    out.mkdir()
    entries = [SlideEntry(path=slides / f"synth_00{i}.svs", id=f"s{i}") for i in (0, 2)]
    ahead = TilingAhead(out, cfg, False, cfg.run_hash())
    ahead.start(entries[0])
    try:
        with pytest.raises(RuntimeError, match="s0 is still being built"):
            ahead.start(entries[1])
    finally:
        ahead.close()
    assert (out / "s0.zarr" / "zarr.json").is_file()


@pytest.mark.parametrize("flag", ["--tile-ahead", "--no-tile-ahead"])
def test_cli_flag(slides, tmp_path, flag):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(slides / "synth_000.svs"),
                                    str(slides / "synth_002.svs"), "--out", str(out),
                                    "--quiet", flag])
    assert res.exit_code == 0, res.output
    waited = json.loads((out / "manifest.json").read_text())["slides"]["synth_002"][
        "sec_tiling_waited"]
    assert (waited is not None) == (flag == "--tile-ahead")


def test_auto_tiles_ahead_when_a_core_is_free():
    import torch

    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        assert auto_tile_ahead("cuda") and auto_tile_ahead("mps")  # the cores wait on the GPU
        torch.set_num_threads(cores)
        assert not auto_tile_ahead("cpu")  # torch uses every core: the build only competes
        if cores > 1:
            torch.set_num_threads(cores - 1)
            assert auto_tile_ahead("cpu")
    finally:
        torch.set_num_threads(threads)


def test_force_builds_each_store_once(slides, tmp_path, monkeypatch):
    """--force with tiling ahead: the store built ahead is the slide's forced rebuild; its turn
    does not build it a second time."""
    cfg = demo_config()
    out = tmp_path / "out"
    inputs = [slides / "synth_000.svs", slides / "synth_002.svs"]
    first = run_batch(inputs, out, cfg, progress=False, tile_ahead=True)
    stamps = {r["id"]: (out / f"{r['id']}.zarr" / "tiles" / "zarr.json").stat().st_mtime_ns
              for r in first}
    builds = _counting(monkeypatch, tiling, "_build")
    again = run_batch(inputs, out, cfg, progress=False, tile_ahead=True, force=True)
    assert [r["status"] for r in again] == ["ok", "ok"]
    assert sorted(builds) == sorted(stamps)  # each store rebuilt, once
    for r in again:
        assert (out / f"{r['id']}.zarr" / "tiles" / "zarr.json").stat().st_mtime_ns > \
            stamps[r["id"]]
    assert [r["probability"] for r in again] == [r["probability"] for r in first]
