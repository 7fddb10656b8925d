"""Dask -> Zarr tiling on real slides (synthetic SVS/TIFF and the real Aperio slide): grids,
tile pixels, schedulers (threads, sync, a 2-process LocalCluster), atomic publication, resume
after SIGKILL, skip/rebuild by config, locks, empty and corrupt slides."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from wsi_prune.config import RunConfig
from wsi_prune.errors import CorruptSlide, OutputConflict, StoreError
from wsi_prune.io import locks, store, tiling
from wsi_prune.io.slide import Slide
from wsi_prune.io.tiling import tile_slide, tile_store_hash
from wsi_prune.synth import SynthSpec, tissue_truth, write_slide

# what conftest.py writes to svs_slide
SVS_SPEC = SynthSpec(width=4096, height=4096, mpp=0.5, flavour="svs", seed=1, tumour=True)
# small shards: many Dask tasks, each writing its own shards
SMALL_SHARDS = RunConfig().replace(tiling={"tiles_per_shard": 4})
ARRAYS = ("tiles/coarse", "tiles/coords", "tiles/grid", "tiles/tissue_fraction", "mask/tissue")


def _arrays(path: Path) -> dict[str, np.ndarray]:
    g = store.open_store(path)
    return {name: g[name][...] for name in ARRAYS}


def _assert_same_arrays(a: Path, b: Path) -> None:
    xa, xb = _arrays(a), _arrays(b)
    for name in ARRAYS:
        assert xa[name].dtype == xb[name].dtype, name
        np.testing.assert_array_equal(xa[name], xb[name], err_msg=name)


def _hash(slide: Path, config: RunConfig, mpp: float | None = None) -> str:
    """The tile hash a store of ``slide`` built with ``config`` must carry."""
    with Slide(slide, mpp) as s:
        return tile_store_hash(config, s.info, slide.stat())


def _assert_whole(path: Path, n: int) -> None:
    """Complete, every shard and every chunk on disk: nothing read back as fill value."""
    g = store.open_store(path)
    coarse = g["tiles/coarse"]
    assert coarse.shape[0] == n
    assert store.missing_shards(coarse) == []
    assert store.missing_chunks(coarse) == []
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))
    assert not Path(f"{path}.lock").exists()


@pytest.fixture(scope="module")
def client():
    """One 2-process LocalCluster for the module (starting one costs seconds)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=":0") as cluster:
        with distributed.Client(cluster) as c:
            yield c


@pytest.fixture(scope="module")
def svs_threads(svs_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """svs_slide tiled once with the threaded scheduler and small shards: the reference."""
    out = tmp_path_factory.mktemp("ref") / "svs.zarr"
    tile_slide(svs_slide, out, SMALL_SHARDS, scheduler="threads")
    return out


# -- grids -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["svs_slide", "tiff_slide", "real_slide"])
def test_grid_inside_slide(name: str, request, tmp_path: Path) -> None:
    slide = request.getfixturevalue(name)
    res = tile_slide(slide, tmp_path / "s.zarr", RunConfig())
    g = store.open_store(tmp_path / "s.zarr")
    a = g.attrs
    with Slide(slide) as s:
        w, h = s.dimensions
        mpp, source = s.mpp, s.info.mpp_source
    side = a["grid"]["tile_level0"]
    assert side == pytest.approx(224 * 0.5 / mpp)
    n_rows, n_cols = int(h // side), int(w // side)
    assert (a["grid"]["n_rows"], a["grid"]["n_cols"]) == (n_rows, n_cols)
    assert res.n_grid == a["grid"]["n_grid"] == n_rows * n_cols
    assert res.n_tiles == a["grid"]["n_tiles"] == g["tiles/coords"].shape[0] > 0
    assert (a["mpp"], a["mpp_source"], a["complete"]) == (pytest.approx(mpp), source, True)
    assert a["config_hash"] == RunConfig().hash()
    xy, rc = g["tiles/coords"][...], g["tiles/grid"][...]
    frac = g["tiles/tissue_fraction"][...]
    assert xy.dtype == rc.dtype == np.int64 and frac.dtype == np.float32
    np.testing.assert_array_equal(xy, np.round(rc[:, ::-1] * side))
    assert (xy >= 0).all() and (xy[:, 0] + side <= w).all() and (xy[:, 1] + side <= h).all()
    assert len({tuple(r) for r in rc}) == len(rc)  # no tile twice
    order = rc[:, 0] * n_cols + rc[:, 1]
    assert (np.diff(order) > 0).all()  # row-major
    assert (frac >= 0.25).all() and (frac <= 1).all()
    assert g["tiles/coarse"].shape == (res.n_tiles, 56, 56, 3)
    assert g["mask/tissue"].attrs["mpp"] == pytest.approx(8.0, rel=0.02)
    _assert_whole(tmp_path / "s.zarr", res.n_tiles)


def test_real_slide_counts(real_slide: Path, tmp_path: Path) -> None:
    res = tile_slide(real_slide, tmp_path / "r.zarr", RunConfig())
    assert (res.n_tiles, res.n_grid) == (54, 117)  # 9 x 13 whole 224.4 px tiles
    tiles = store.open_store(tmp_path / "r.zarr")["tiles/coarse"][...]
    # tissue tiles of an H&E slide: stained, not glass
    assert 100 < tiles.mean() < 225 and tiles.std() > 20


def test_tissue_filter_matches_synthetic_truth(svs_slide: Path, svs_threads: Path) -> None:
    """Kept tiles are those whose true (drawn) tissue fraction is >= 0.25."""
    g = store.open_store(svs_threads)
    truth = tissue_truth(SVS_SPEC, 4.0)  # 8 level-0 px per px: a tile is 28 x 28 px
    true_frac = truth[:18 * 28, :18 * 28].reshape(18, 28, 18, 28).mean(axis=(1, 3))
    rc = g["tiles/grid"][...]
    kept = np.zeros((18, 18), bool)
    kept[rc[:, 0], rc[:, 1]] = True
    clear = np.abs(true_frac - 0.25) > 0.05  # tiles right at the threshold may go either way
    np.testing.assert_array_equal(kept[clear], true_frac[clear] >= 0.25)
    measured = g["tiles/tissue_fraction"][...]
    assert np.abs(measured - true_frac[rc[:, 0], rc[:, 1]]).max() < 0.08


@pytest.mark.parametrize("name", ["svs_slide", "tiff_slide", "real_slide"])
def test_coarse_tiles_equal_direct_reads(name: str, request, tmp_path: Path) -> None:
    slide = request.getfixturevalue(name)
    tile_slide(slide, tmp_path / "s.zarr", RunConfig())
    g = store.open_store(tmp_path / "s.zarr")
    coarse, xy = g["tiles/coarse"], g["tiles/coords"][...]
    side = round(g.attrs["grid"]["tile_level0"])
    picks = sorted({0, len(xy) // 3, len(xy) // 2, len(xy) - 1})
    with Slide(slide) as s:
        for i in picks:
            direct = s.read(tuple(xy[i]), (side, side), 2.0, out_size=(56, 56))
            np.testing.assert_array_equal(coarse[i], direct)
        # and not any tile: the neighbour's pixels differ
        shifted = s.read((int(xy[0][0]) + side // 2, int(xy[0][1])), (side, side), 2.0, (56, 56))
        assert np.abs(shifted.astype(int) - coarse[0]).mean() > 1


def test_store_tiles_full_resolution(svs_slide: Path, tmp_path: Path) -> None:
    cfg = RunConfig().replace(tiling={"store_tiles": True, "tiles_per_shard": 16})
    res = tile_slide(svs_slide, tmp_path / "f.zarr", cfg)
    g = store.open_store(tmp_path / "f.zarr")
    full, coarse = g["tiles/full"], g["tiles/coarse"][...]
    assert full.shape == (res.n_tiles, 224, 224, 3)
    assert store.missing_chunks(full) == []
    pooled = full[...].reshape(-1, 56, 4, 56, 4, 3).mean(axis=(2, 4))
    # the coarse level is the 4x area average of level 0, up to JPEG on fine texture...
    err = np.abs(pooled - coarse).mean(axis=(1, 2, 3))
    assert err.mean() < 5 and err.max() < 12
    # ...and each full tile matches its own coarse tile, not its neighbour's
    other = np.abs(pooled - np.roll(coarse, 1, axis=0)).mean(axis=(1, 2, 3))
    assert (other > err).mean() > 0.9
    default = tile_slide(svs_slide, tmp_path / "d.zarr", RunConfig()).store_path
    assert "full" not in store.open_store(default)["tiles"]  # only when asked


# -- schedulers --------------------------------------------------------------------------------
def test_threads_and_sync_give_identical_stores(svs_slide, svs_threads, tmp_path: Path) -> None:
    seen = []
    res = tile_slide(svs_slide, tmp_path / "sync.zarr", SMALL_SHARDS, scheduler="sync",
                     progress=lambda done, total: seen.append((done, total)))
    assert res.n_tiles > 100  # > 25 shards of 4 tiles, one Dask task each
    _assert_same_arrays(svs_threads, tmp_path / "sync.zarr")
    _assert_whole(tmp_path / "sync.zarr", res.n_tiles)
    _assert_whole(svs_threads, res.n_tiles)
    assert seen[-1] == (res.n_tiles, res.n_tiles)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == -(-res.n_tiles // 4)


def test_local_cluster_gives_identical_store(client, svs_slide, svs_threads, tmp_path) -> None:
    from distributed import get_task_stream

    out = tmp_path / "dist.zarr"
    with get_task_stream(client) as ts:
        res = tile_slide(svs_slide, out, SMALL_SHARDS, scheduler=client)
    assert not res.skipped
    _assert_same_arrays(svs_threads, out)
    _assert_whole(out, res.n_tiles)
    blocks = [t for t in ts.data if str(t["key"]).startswith("tile-block-")]
    assert len(blocks) == -(-res.n_tiles // 4)
    # both worker processes wrote shards
    assert len({t["worker"] for t in blocks}) == 2


def test_local_cluster_corrupt_slide(client, svs_slide: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.svs"
    _corrupt_page(svs_slide, bad, page=1)
    cfg = SMALL_SHARDS.replace(tiling={"coarse_factor": 2})  # coarse tiles read page 1
    with pytest.raises(CorruptSlide) as err:
        tile_slide(bad, tmp_path / "bad.zarr", cfg, scheduler=client)
    assert str(bad) in str(err.value)
    assert not (tmp_path / "bad.zarr").exists()
    assert not Path(f"{tmp_path / 'bad.zarr'}.lock").exists()


# -- publication, resume, config -----------------------------------------------------------------
_KILLABLE = textwrap.dedent("""
    import json, sys, time
    from wsi_prune.config import RunConfig
    from wsi_prune.io.tiling import tile_slide

    def slow(done, total):
        print("progress", done, total, flush=True)
        time.sleep(0.5)

    cfg = RunConfig.from_dict(json.loads(sys.argv[3]))
    tile_slide(sys.argv[1], sys.argv[2], cfg, scheduler="threads", progress=slow)
    print("finished", flush=True)
""")


def test_resume_after_sigkill(svs_slide: Path, svs_threads: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(svs_slide), str(out),
         json.dumps(SMALL_SHARDS.to_dict())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()  # the first block is written; the others wait on us
        assert line.startswith("progress"), (line, proc.stderr.read())
        (tmp,) = tmp_path.glob(".k.zarr.tmp-*")
        assert store.open_store(tmp, require_complete=False).attrs["complete"] is False
        # a second run on the same store while this one holds it
        with pytest.raises(OutputConflict, match=f"pid {proc.pid}"):
            tile_slide(svs_slide, out, SMALL_SHARDS)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and not store.is_complete(out)
    assert Path(f"{out}.lock").exists()  # left by the dead process
    written = [p for p in (tmp / "tiles" / "coarse" / "c").iterdir()]
    n_shards = -(-store.open_store(svs_threads)["tiles/coarse"].shape[0] // 4)
    assert 0 < len(written) < n_shards

    res = tile_slide(svs_slide, out, SMALL_SHARDS)  # takes the dead lock, drops the debris
    assert not res.skipped and not tmp.exists()
    _assert_whole(out, res.n_tiles)
    _assert_same_arrays(svs_threads, out)


def test_same_config_skips_other_config_rebuilds(svs_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    first = tile_slide(svs_slide, out, SMALL_SHARDS)
    stamp = (out / "zarr.json").stat().st_mtime_ns
    again = tile_slide(svs_slide, out, SMALL_SHARDS)
    assert again.skipped and not first.skipped and again.n_tiles == first.n_tiles
    assert (out / "zarr.json").stat().st_mtime_ns == stamp
    # model settings do not touch the tile store
    vit = tile_slide(svs_slide, out, SMALL_SHARDS.replace(vit={"keep_ratio": 0.3}))
    assert vit.skipped
    stricter = SMALL_SHARDS.replace(tiling={"tissue_threshold": 0.9})
    rebuilt = tile_slide(svs_slide, out, stricter)
    assert not rebuilt.skipped and 0 < rebuilt.n_tiles < first.n_tiles
    g = store.open_store(out)
    assert g.attrs["tile_hash"] == _hash(svs_slide, stricter)
    assert (g["tiles/tissue_fraction"][...] >= 0.9).all()
    _assert_whole(out, rebuilt.n_tiles)
    forced = tile_slide(svs_slide, out, stricter, force=True)
    assert not forced.skipped and forced.n_tiles == rebuilt.n_tiles


def test_slide_smaller_than_a_tile(tmp_path: Path) -> None:
    # 256 px at 0.25 µm/px = 64 µm, less than one 112 µm tile
    slide = write_slide(tmp_path / "tiny.tif",
                        SynthSpec(width=256, height=256, mpp=0.25, flavour="tiff")).path
    out = tmp_path / "tiny.zarr"
    res = tile_slide(slide, out, RunConfig())
    assert (res.n_tiles, res.n_grid, res.skipped) == (0, 0, False)
    assert store.is_complete(out, _hash(slide, RunConfig()))
    g = store.open_store(out)
    assert g["tiles/coarse"].shape == (0, 56, 56, 3) and g["tiles/coords"].shape == (0, 2)
    assert g["mask/tissue"].shape == (8, 8)  # 64 µm at 8 µm/px
    _assert_whole(out, 0)
    assert tile_slide(slide, out, RunConfig()).skipped


def _corrupt_page(src: Path, dst: Path, page: int) -> None:
    """Copy ``src``, breaking the JPEG data of the middle half of one pyramid page's tiles."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        p = tif.pages[page]
        offs, counts = p.dataoffsets, p.databytecounts
    n = len(offs)
    with open(dst, "r+b") as fh:
        for i in range(n // 4, 3 * n // 4):
            fh.seek(offs[i] + 2)  # keep the SOI marker, break everything after it
            fh.write(bytes([0xFF, 0xD9]) + b"\x13" * max(0, counts[i] - 4))


def test_corrupt_slide_publishes_nothing(svs_slide: Path, tmp_path: Path) -> None:
    from tests.io.test_slide import corrupt_tiles

    # every level broken: the thumbnail read for the tissue mask fails
    bad = tmp_path / "all.svs"
    corrupt_tiles(svs_slide, bad)
    with pytest.raises(CorruptSlide) as err:
        tile_slide(bad, tmp_path / "all.zarr", SMALL_SHARDS)
    assert str(bad) in str(err.value)
    # the thumbnail level (page 2) intact, the coarse-tile level (page 1) broken: the mask
    # is fine and Dask tasks fail mid-slide, after other tasks wrote their shards
    mid = tmp_path / "mid.svs"
    _corrupt_page(svs_slide, mid, page=1)
    cfg = SMALL_SHARDS.replace(tiling={"coarse_factor": 2})
    with Slide(mid) as s:
        assert s.best_level(cfg.tissue.mask_mpp) == 2 and s.best_level(1.0) == 1
    with pytest.raises(CorruptSlide, match="read failed") as err:
        tile_slide(mid, tmp_path / "mid.zarr", cfg, scheduler="threads")
    assert str(mid) in str(err.value)
    for name in ("all.zarr", "mid.zarr"):
        assert not (tmp_path / name).exists()
        assert not Path(f"{tmp_path / name}.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.svs", "mid.svs"]


def test_concurrent_run_in_process_gets_output_conflict(svs_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.zarr"
    with locks.locked(out):  # what a running tile_slide holds
        with pytest.raises(OutputConflict, match=f"pid {os.getpid()}") as err:
            tile_slide(svs_slide, out, RunConfig())
        assert str(out) in str(err.value)
    assert not out.exists()
    assert tile_slide(svs_slide, out, RunConfig()).n_tiles > 0


def test_store_group_layout(svs_slide: Path, svs_threads: Path) -> None:
    g = zarr.open_group(str(svs_threads), mode="r")
    a = g.attrs
    cfg = RunConfig.from_dict(a["config"])
    assert cfg == SMALL_SHARDS and a["tile_hash"] == _hash(svs_slide, cfg)
    st = svs_slide.stat()
    assert a["slide_file"] == {"path": str(svs_slide), "size_bytes": st.st_size,
                               "mtime_ns": st.st_mtime_ns}
    assert set(a["grid"]) >= {"tile_px", "mpp", "coarse_px", "coarse_mpp", "tile_level0",
                              "n_rows", "n_cols", "n_grid", "n_tiles"}
    assert a["slide"]["vendor"] == "aperio" and a["slide"]["width"] == 4096
    assert 0.1 < a["tissue"]["fraction"] < 0.6
    coarse = g["tiles/coarse"]
    assert coarse.chunks == (1, 56, 56, 3) and coarse.shards == (4, 56, 56, 3)


def test_user_mpp_and_slide_file_are_part_of_the_store_identity(nompp_slide: Path,
                                                                 tmp_path: Path) -> None:
    """A slide without metadata re-tiled with another --mpp must not reuse the old store."""
    slide = tmp_path / "nompp.tif"
    shutil.copy2(nompp_slide, slide)  # a copy: its mtime is changed below
    out = tmp_path / "n.zarr"
    half = tile_slide(slide, out, RunConfig(), mpp=0.5)
    xy_half = store.open_store(out)["tiles/coords"][...]
    quarter = tile_slide(slide, out, RunConfig(), mpp=0.25)
    assert not half.skipped and not quarter.skipped
    g = store.open_store(out)
    # at 0.25 µm/px the slide is half as wide: 224 px at 0.5 µm/px is 448 level-0 px
    assert (g.attrs["mpp"], g.attrs["mpp_source"]) == (0.25, "user")
    assert g.attrs["grid"]["tile_level0"] == pytest.approx(448.0)
    assert (half.n_grid, quarter.n_grid) == (81, 16)  # 9 x 9 and 4 x 4 whole tiles
    assert 0 < quarter.n_tiles < half.n_tiles
    assert not np.array_equal(g["tiles/coords"][...], xy_half[:quarter.n_tiles])
    assert g.attrs["tile_hash"] == _hash(slide, RunConfig(), 0.25) != _hash(slide, RunConfig(),
                                                                           0.5)
    _assert_whole(out, quarter.n_tiles)
    again = tile_slide(slide, out, RunConfig(), mpp=0.25)
    assert again.skipped and again.n_tiles == quarter.n_tiles
    # a replaced slide file (another mtime) is rebuilt, into the same tiles
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    replaced = tile_slide(slide, out, RunConfig(), mpp=0.25)
    assert not replaced.skipped and replaced.n_tiles == quarter.n_tiles
    assert store.open_store(out).attrs["slide_file"]["mtime_ns"] == st.st_mtime_ns + 10**9


def test_lost_chunks_raise_and_publish_nothing(svs_slide: Path, tmp_path: Path,
                                               monkeypatch) -> None:
    """A block that writes fewer tiles than its shard holds (what a shard shared by two tasks
    loses) fails the build with StoreError naming the array; nothing is published."""
    real = tiling._write_block
    calls = []

    def short_block(slide_path, mpp, store_path, start, level0_xy, tile_level0, config):
        calls.append(start)
        if start == 4:  # the second shard: its last tile is never written
            level0_xy = level0_xy[:-1]
        return real(slide_path, mpp, store_path, start, level0_xy, tile_level0, config)

    monkeypatch.setattr(tiling, "_write_block", short_block)
    out = tmp_path / "lost.zarr"
    with pytest.raises(StoreError, match=r"tiles/coarse: 1 tiles missing .*first: \[7\]"):
        tile_slide(svs_slide, out, SMALL_SHARDS, scheduler="threads")
    assert 4 in calls and len(calls) > 10
    assert not out.exists() and not store.is_complete(out)
    assert not Path(f"{out}.lock").exists()
    assert not list(tmp_path.glob(".lost.zarr.tmp-*"))


def test_non_ascii_file_name_tiles_like_ascii(svs_slide: Path, tmp_path: Path) -> None:
    uni = tmp_path / "Präparat_µ_淋巴结.svs"
    ascii_ = tmp_path / "plain.svs"
    shutil.copy(svs_slide, uni)
    shutil.copy(svs_slide, ascii_)
    a = tile_slide(uni, tmp_path / "Präparat_µ.zarr", SMALL_SHARDS)
    b = tile_slide(ascii_, tmp_path / "plain.zarr", SMALL_SHARDS)
    assert a.n_tiles == b.n_tiles > 100 and a.n_grid == b.n_grid
    _assert_same_arrays(tmp_path / "Präparat_µ.zarr", tmp_path / "plain.zarr")
    _assert_whole(tmp_path / "Präparat_µ.zarr", a.n_tiles)
    assert store.open_store(tmp_path / "Präparat_µ.zarr").attrs["slide"]["path"] == str(uni)


def test_relative_slide_path_reaches_tasks_absolute(svs_slide: Path, tmp_path: Path,
                                                    monkeypatch) -> None:
    real = tiling._write_block
    seen = []

    def recording(slide_path, *args):
        seen.append(slide_path)
        return real(slide_path, *args)

    monkeypatch.setattr(tiling, "_write_block", recording)
    monkeypatch.chdir(svs_slide.parent)
    out = tmp_path / "rel.zarr"
    res = tile_slide(Path(svs_slide.name), out, RunConfig())
    assert res.n_tiles > 0 and seen
    for p in seen:
        assert os.path.isabs(p) and os.path.samefile(p, svs_slide)
    a = store.open_store(out).attrs
    assert os.path.isabs(a["slide"]["path"]) and a["slide"]["path"] == a["slide_file"]["path"]
    assert os.path.samefile(a["slide"]["path"], svs_slide)


# -- corrupt tiles inside a readable slide -----------------------------------------------------


def test_damaged_coarse_tile_is_recorded_and_skipped(svs_slide: Path, svs_threads: Path,
                                                     tmp_path: Path, caplog) -> None:
    """One bad JPEG tile in the level the tissue mask and the coarse tiles come from: the mask
    is read from the next finer level, the tiles it spoils are recorded (index, level-0
    position, reason) and left white, every other tile is exactly the clean slide's."""
    from tests.io.test_slide import damage_tile

    ref = store.open_store(svs_threads)
    coords = np.asarray(ref["tiles/coords"][:])
    frac = np.asarray(ref["tiles/tissue_fraction"][:])
    side = ref.attrs["grid"]["tile_level0"]
    cx, cy = coords[int(np.argmax(frac))] + side / 2
    bad = tmp_path / "one.svs"
    with Slide(svs_slide) as s:
        page = s.best_level(SMALL_SHARDS.tiling.coarse_mpp)
        assert page == s.best_level(SMALL_SHARDS.tissue.mask_mpp) == 2  # both read page 2
    x0, y0, x1, y1 = damage_tile(svs_slide, bad, page, (cx, cy))
    cfg = SMALL_SHARDS.replace(tiling={"max_unreadable_fraction": 0.5})
    with caplog.at_level("WARNING"):
        res = tile_slide(bad, tmp_path / "one.zarr", cfg, scheduler="threads")
    assert any("thumbnail level damaged" in r.getMessage() for r in caplog.records)
    g = store.open_store(tmp_path / "one.zarr")
    assert res.n_tiles == pytest.approx(len(coords), rel=0.03)
    new_coords = np.asarray(g["tiles/coords"][:])
    idx = np.asarray(g["tiles/unreadable"][:])
    records = g["tiles/unreadable"].attrs["records"]
    assert len(idx) >= 1 and [r["tile"] for r in records] == idx.tolist()

    def overlaps(xy, margin):
        return (xy[:, 0] < x1 + margin) & (xy[:, 0] + side > x0 - margin) & \
            (xy[:, 1] < y1 + margin) & (xy[:, 1] + side > y0 - margin)

    hit = set(np.flatnonzero(overlaps(new_coords, -8)).tolist())
    near = set(np.flatnonzero(overlaps(new_coords, 8)).tolist())
    assert hit <= set(idx.tolist()) <= near
    for r in records:
        assert r["stage"] == "tiling" and r["level0_xy"] == new_coords[r["tile"]].tolist()
        assert "read failed" in r["error"]
    coarse = np.asarray(g["tiles/coarse"][:])
    assert (coarse[idx] == 255).all()
    # every other tile is the clean slide's, pixel for pixel
    same = {tuple(c): i for i, c in enumerate(coords)}
    ok = [i for i in range(len(new_coords)) if i not in set(idx.tolist())
          and tuple(new_coords[i]) in same]
    assert len(ok) > 50
    ref_coarse = np.asarray(ref["tiles/coarse"][:])
    np.testing.assert_array_equal(coarse[ok], ref_coarse[[same[tuple(new_coords[i])]
                                                          for i in ok]])


def test_too_many_or_fail_mode_fails_the_slide(svs_slide: Path, tmp_path: Path) -> None:
    from tests.io.test_slide import damage_tile

    bad = tmp_path / "one.svs"
    damage_tile(svs_slide, bad, 2, (2048, 2048))
    # the default share (5 %): up to 25 of ~130 tiles touch a 1024 px coarse JPEG tile
    with pytest.raises(CorruptSlide, match=r"tissue tiles unreadable .* more than "
                                           r"tiling.max_unreadable_fraction = 5 %") as err:
        tile_slide(bad, tmp_path / "a.zarr", SMALL_SHARDS)
    assert str(bad) in str(err.value) and "read failed" in str(err.value)
    fail = SMALL_SHARDS.replace(tiling={"on_corrupt_tile": "fail"})
    with pytest.raises(CorruptSlide, match="read failed"):
        tile_slide(bad, tmp_path / "b.zarr", fail)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_blocks_reuse_slide_handles_one_per_running_block(svs_slide: Path) -> None:
    """Blocks of a build in this process borrow handles from its pool: a handle returned is
    lent again (its tile cache stays warm), two blocks at once get two handles, and a handle
    whose read failed is closed instead of lent."""
    pool = tiling._HandlePool(str(svs_slide), None)
    try:
        with pool.borrow() as a:
            a.read((0, 0), (224, 224), 2.0)
        with pool.borrow() as b:
            assert b is a  # reused, not reopened
            with pool.borrow() as c:
                assert c is not a  # in use: a second handle
            b._broken = "simulated failed read"  # what Slide.read sets when OpenSlide fails
        with pool.borrow() as d:
            assert d is c  # the broken one was dropped
    finally:
        pool.close()
    assert a._osr is None and c._osr is None  # all closed


def test_sync_and_threaded_builds_write_identical_stores(svs_slide: Path, tmp_path: Path) -> None:
    """Pooled handles and whole-shard writes change nothing in the store: the threaded build
    (two handles) equals the synchronous one (one handle reused by every block), and both
    equal tiles read one by one through a fresh handle."""
    a = tile_slide(svs_slide, tmp_path / "t.zarr", SMALL_SHARDS, scheduler="threads")
    b = tile_slide(svs_slide, tmp_path / "s.zarr", SMALL_SHARDS, scheduler="sync")
    _assert_same_arrays(tmp_path / "t.zarr", tmp_path / "s.zarr")
    g = store.open_store(a.store_path)
    coords = np.asarray(g["tiles/coords"][:])
    side = g.attrs["grid"]["tile_level0"]
    pick = np.linspace(0, len(coords) - 1, 9).astype(int)
    with Slide(svs_slide) as s:
        ref, _ = tiling.read_tiles(s, coords[pick], side, 2.0, 56)
    assert np.array_equal(np.asarray(g["tiles/coarse"][:])[pick], ref)
    assert b.n_tiles == a.n_tiles and not tiling._POOLS
