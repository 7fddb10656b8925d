"""Store helpers on real Zarr v3 directories: sharded tile arrays and their completeness checks,
atomic publication, stale temporary directories, completeness markers and locks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wsi_prune.errors import OutputConflict, StoreError
from wsi_prune.io import locks, store


def _tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_tile_array_round_trip_and_layout(tmp_path: Path, compressor: str) -> None:
    g = store.create_store(tmp_path / "s.zarr")
    arr = store.create_tiles_array(g, "tiles/coarse", 10, (8, 8, 3), 4, compressor)
    assert (arr.chunks, arr.shards, arr.dtype) == ((1, 8, 8, 3), (4, 8, 8, 3), np.uint8)
    data = _tiles(10)
    data[5] = 0  # a tile equal to the fill value is still written (write_empty_chunks)
    for start in range(0, 10, 4):  # whole shards, as tiling tasks write them
        arr[start:start + 4] = data[start:start + 4]
    assert store.missing_shards(arr) == [] and store.missing_chunks(arr) == []
    back = store.open_store(tmp_path / "s.zarr", require_complete=False)["tiles/coarse"][...]
    np.testing.assert_array_equal(back, data)
    files = sorted(p.name for p in (tmp_path / "s.zarr" / "tiles" / "coarse" / "c").iterdir())
    assert files == ["0", "1", "2"]  # one file per shard, not per tile


def test_zstd_is_smaller_on_smooth_tiles(tmp_path: Path) -> None:
    """Stained tissue is smooth at 2 µm/px; zstd must earn its place on such data."""
    yy, xx = np.mgrid[0:56, 0:56]
    smooth = np.stack([200 + 20 * np.sin(xx / 7), 150 + 10 * np.cos(yy / 5), 190 + 0 * xx], -1)
    tiles = np.broadcast_to(smooth.astype(np.uint8), (64, 56, 56, 3))
    sizes = {}
    for comp in ("zstd", "none"):
        g = store.create_store(tmp_path / f"{comp}.zarr")
        arr = store.create_tiles_array(g, "t", 64, (56, 56, 3), 64, comp)
        arr[...] = tiles
        sizes[comp] = store._shard_file(arr, 0).stat().st_size
        np.testing.assert_array_equal(arr[...], tiles)
    assert sizes["none"] >= 64 * 56 * 56 * 3
    assert sizes["zstd"] < sizes["none"] / 3


def test_missing_chunks_finds_partial_and_lost_shards(tmp_path: Path) -> None:
    g = store.create_store(tmp_path / "s.zarr")
    arr = store.create_tiles_array(g, "t", 10, (8, 8, 3), 4, "zstd")
    data = _tiles(10)
    # shard 0 half written: what a lost concurrent write to one shard looks like on disk
    arr[0:2] = data[0:2]
    arr[4:8] = data[4:8]  # shard 1 whole; shard 2 (tiles 8-9) never written
    assert store.missing_shards(arr) == [2]
    assert store.missing_chunks(arr) == [2, 3, 8, 9]
    # a missing chunk reads back as the fill value: indistinguishable from black pixels
    assert not arr[3].any()
    arr[8:10] = data[8:10]
    arr[0:4] = data[0:4]
    assert store.missing_chunks(arr) == []
    # a truncated shard (disk full, killed copy) loses all of its chunks
    shard1 = store._shard_file(arr, 1)
    shard1.write_bytes(shard1.read_bytes()[:-100])
    assert store.missing_chunks(arr) == [4, 5, 6, 7]
    shard1.write_bytes(b"")
    assert store.missing_chunks(arr) == [4, 5, 6, 7]
    shard1.unlink()
    assert store.missing_shards(arr) == [1] and store.missing_chunks(arr) == [4, 5, 6, 7]


def test_missing_chunks_on_unsharded_and_empty_arrays(tmp_path: Path) -> None:
    g = store.create_store(tmp_path / "s.zarr")
    plain = g.create_array("p", shape=(5, 4), chunks=(2, 4), dtype="f4", fill_value=0)
    plain[0:2] = 1.0
    assert store.missing_chunks(plain) == [1, 2] and store.missing_shards(plain) == [1, 2]
    empty = store.create_tiles_array(g, "e", 0, (8, 8, 3), 64, "zstd")
    assert empty.shape == (0, 8, 8, 3)
    assert store.missing_chunks(empty) == [] and store.missing_shards(empty) == []
    crosswise = g.create_array("x", shape=(4, 8), chunks=(4, 4), dtype="u1", fill_value=0)
    with pytest.raises(StoreError, match="axis other than 0") as err:
        store.missing_chunks(crosswise)
    assert str(tmp_path / "s.zarr") in str(err.value)


def test_write_array_replaces_and_keeps_attrs(tmp_path: Path) -> None:
    g = store.create_store(tmp_path / "s.zarr")
    store.write_array(g, "tiles/coords", np.arange(6, dtype=np.int64).reshape(3, 2), units="px")
    a = store.write_array(g, "tiles/coords", np.zeros((0, 2), np.int64))
    assert a.shape == (0, 2) and a.dtype == np.int64
    m = store.write_array(g, "mask/tissue", np.eye(3, dtype=bool), mpp=8.0)
    assert m.attrs["mpp"] == 8.0 and m[...].sum() == 3


def test_publish_replaces_atomically(tmp_path: Path) -> None:
    final = tmp_path / "a.zarr"
    for version in (1, 2):
        tmp = store.tmp_path_for(final)
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.zarr.tmp-")
        g = store.create_store(tmp)
        g.attrs.update({"complete": True, "tile_hash": f"h{version}"})
        assert store.publish(tmp, final) == final
        assert not tmp.exists()
    assert store.is_complete(final, "h2") and not store.is_complete(final, "h1")
    assert [p.name for p in tmp_path.iterdir()] == ["a.zarr"]  # the old one is gone too


def test_remove_stale_tmp_only_touches_its_own(tmp_path: Path) -> None:
    for name in (".a.zarr.tmp-1-x", ".a.zarr.tmp-old-y", ".b.zarr.tmp-1-z"):
        (tmp_path / name / "tiles").mkdir(parents=True)
    (tmp_path / "a.zarr").mkdir()
    assert store.remove_stale_tmp(tmp_path / "a.zarr") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.zarr.tmp-1-z", "a.zarr"]


def test_completeness_markers(tmp_path: Path) -> None:
    assert not store.is_complete(tmp_path / "none.zarr")
    with pytest.raises(StoreError, match="no Zarr store"):
        store.open_store(tmp_path / "none.zarr")
    g = store.create_store(tmp_path / "s.zarr")
    assert g.attrs["complete"] is False and g.attrs["format"] == store.STORE_FORMAT
    assert not store.is_complete(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="incomplete") as err:
        store.open_store(tmp_path / "s.zarr")
    assert str(tmp_path / "s.zarr") in str(err.value)
    g.attrs.update({"complete": True, "tile_hash": "abc"})
    assert store.is_complete(tmp_path / "s.zarr") and store.is_complete(tmp_path / "s.zarr", "abc")
    assert not store.is_complete(tmp_path / "s.zarr", "other")
    with pytest.raises(FileExistsError):
        store.create_store(tmp_path / "s.zarr")  # never silently over an existing store
    (tmp_path / "s.zarr" / "zarr.json").write_text("{not json")
    assert not store.is_complete(tmp_path / "s.zarr")


def test_lock_excludes_a_live_holder(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    lock = Path(f"{path}.lock")
    with locks.locked(path) as held:
        assert held == lock
        holder = json.loads(lock.read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(OutputConflict, match="delete") as err:
            with locks.locked(path):
                pass
        assert str(path) in str(err.value)
    assert not lock.exists()
    # released on error too
    with pytest.raises(RuntimeError):
        with locks.locked(path):
            raise RuntimeError("boom")
    assert not lock.exists()


def test_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    lock = Path(f"{path}.lock")
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with locks.locked(path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    # another host's lock is never taken over: its process cannot be checked from here
    lock.write_text(json.dumps({"pid": pid, "host": "elsewhere"}))
    with pytest.raises(OutputConflict, match="elsewhere"):
        with locks.locked(path):
            pass
    # an unreadable or empty lock is treated as held while it is fresh (its maker may be
    # between creating and writing it) ...
    for text in ("garbage", ""):
        lock.write_text(text)
        with pytest.raises(OutputConflict):
            with locks.locked(path):
                pass
    # ... and taken over once it is old: a maker killed between the two never writes it
    old = time.time() - 60
    os.utime(lock, (old, old))
    with locks.locked(path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


@pytest.mark.parametrize("compressor", ["zstd", "none"])
@pytest.mark.parametrize("n", [130, 64, 5])
def test_whole_shard_writes_are_the_bytes_zarr_writes(tmp_path, compressor, n):
    """write_tile_shards encodes shard files itself (zarr's codec pipeline is per chunk and
    slow); every file must be what zarr writes for the same tiles, the short last shard too."""
    import zarr

    rng = np.random.default_rng(n)
    tiles = rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)
    tiles[::3] = 255  # some compress well, some not
    arrays = {}
    for how in ("zarr", "ours"):
        group = store.create_store(tmp_path / f"{how}.zarr")
        arr = store.create_tiles_array(group, "tiles/coarse", n, (12, 12, 3), 64, compressor)
        shard = arr.shards[0]
        for start in range(0, n, shard):
            if how == "zarr":
                arr[start:start + shard] = tiles[start:start + shard]
            else:
                store.write_tile_shards(arr, start, tiles[start:start + shard])
        arrays[how] = arr
    files = sorted(p.relative_to(tmp_path / "zarr.zarr")
                   for p in (tmp_path / "zarr.zarr" / "tiles").rglob("c/*/0/0/0"))
    assert len(files) == -(-n // min(64, n))
    for f in files:
        ours, theirs = tmp_path / "ours.zarr" / f, tmp_path / "zarr.zarr" / f
        assert ours.read_bytes() == theirs.read_bytes()
    back = zarr.open_group(str(tmp_path / "ours.zarr"), mode="r")["tiles/coarse"][:]
    assert np.array_equal(back, tiles) and store.missing_chunks(arrays["ours"]) == []


def test_part_of_a_shard_is_written_through_zarr(tmp_path):
    """A range that is not whole shards (what a damaged block would write) goes through zarr,
    so the completeness check still sees the chunks it lacks."""
    group = store.create_store(tmp_path / "s.zarr")
    arr = store.create_tiles_array(group, "tiles/coarse", 8, (4, 4, 3), 4, "zstd")
    tiles = np.full((8, 4, 4, 3), 7, np.uint8)
    store.write_tile_shards(arr, 0, tiles[:4])
    store.write_tile_shards(arr, 4, tiles[4:7])  # one short
    assert store.missing_chunks(arr) == [7]
    assert np.array_equal(arr[:7], tiles[:7])


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_shard_reads_are_what_zarr_reads(tmp_path, compressor):
    """read_tile_shards decodes shard files itself (zarr's pipeline is per chunk and slow): any
    range, across shards, inside one, the short last one, empty, must equal zarr's read."""
    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (130, 12, 12, 3), dtype=np.uint8)
    tiles[::3] = 255
    arr = store.create_tiles_array(store.create_store(tmp_path / "s.zarr"), "tiles/coarse",
                                   130, (12, 12, 3), 64, compressor)
    for start in range(0, 130, 64):
        store.write_tile_shards(arr, start, tiles[start:start + 64])
    assert arr.shards[0] == 64 and store._shard_layout(arr) is not None
    for a, b in [(0, 130), (0, 64), (10, 20), (60, 70), (63, 129), (128, 130), (5, 5), (0, 1)]:
        assert np.array_equal(store.read_tile_shards(arr, a, b), arr[a:b]), (a, b)
    view = store.TileShards(arr)
    assert view.shape == (130, 12, 12, 3) and view.dtype == np.uint8 and len(view) == 130
    assert np.array_equal(view[100:1000], tiles[100:])  # clipped as numpy clips
    assert np.array_equal(view[[3, 1]], tiles[[3, 1]])  # not a plain slice: through zarr


def test_shard_reads_of_an_unsharded_array_go_through_zarr(tmp_path):
    import zarr

    g = zarr.open_group(str(tmp_path / "u.zarr"), mode="w")
    arr = g.create_array("t", shape=(10, 4, 4, 3), chunks=(4, 4, 4, 3), dtype="uint8")
    arr[:] = np.arange(480, dtype=np.uint8).reshape(10, 4, 4, 3)
    assert store._shard_layout(arr) is None
    assert np.array_equal(store.read_tile_shards(arr, 2, 9), arr[2:9])


def test_shard_reads_of_damaged_files_name_the_shard(tmp_path):
    tiles = np.random.default_rng(0).integers(0, 256, (8, 6, 6, 3), dtype=np.uint8)
    arr = store.create_tiles_array(store.create_store(tmp_path / "s.zarr"), "tiles/coarse", 8,
                                   (6, 6, 3), 4, "zstd")
    store.write_tile_shards(arr, 0, tiles[:4])
    store.write_tile_shards(arr, 4, tiles[4:])
    shard0, shard1 = store._shard_file(arr, 0), store._shard_file(arr, 1)
    good = shard0.read_bytes()
    # a missing shard reads as the fill value, as zarr reads it (completeness is checked apart)
    shard1.unlink()
    assert np.array_equal(store.read_tile_shards(arr, 2, 8), arr[2:8])
    assert not store.read_tile_shards(arr, 4, 8).any()
    # a flipped byte in a tile's compressed data
    bad = bytearray(good)
    bad[5] ^= 0xFF
    shard0.write_bytes(bytes(bad))
    with pytest.raises(StoreError, match=r"tile 0 .*decompress|tile 0 holds") as err:
        store.read_tile_shards(arr, 0, 2)
    assert str(shard0) in str(err.value)
    # a flipped byte in the index
    bad = bytearray(good)
    bad[-10] ^= 0xFF
    shard0.write_bytes(bytes(bad))
    with pytest.raises(StoreError, match="crc32c") as err:
        store.read_tile_shards(arr, 0, 2)
    assert str(shard0) in str(err.value)
    # cut short
    shard0.write_bytes(good[:20])
    with pytest.raises(StoreError, match="shorter than its index"):
        store.read_tile_shards(arr, 0, 2)
