"""The per-slide Zarr v3 store: layout, atomic publication and completeness checks (locks on
its paths: :mod:`wsi_prune.io.locks`).

Layout of ``<id>.zarr`` (N tissue tiles, G×G ViT patch grid)::

    attrs   format, wsi_prune_version, slide{...SlideInfo}, mpp, mpp_source,
            config{...}, tile_hash, grid{tile_px, mpp, coarse_px, coarse_mpp, tile_level0,
            n_rows, n_cols}, complete (bool)
    tiles/coarse          (N, cp, cp, 3) uint8   triage tiles at coarse_mpp, one tile a chunk
    tiles/full            (N, tp, tp, 3) uint8   only with store_tiles
    tiles/coords          (N, 2) int64           top-left (x, y), level-0 px
    tiles/grid            (N, 2) int64           (row, col) in the tile grid
    tiles/tissue_fraction (N,) float32
    mask/tissue           (H, W) bool            tissue mask at attrs["mpp"] µm/px
    tiles/unreadable      (U,) int64             tiles that failed to decode (attrs: records
                                                 with level-0 (x, y) and reason)

Later stages add their own groups (``triage/``, ``vit/``, ``mil/``, ``heatmap/``...).
``heatmap/image`` is an OME-NGFF 0.5 multiscale image (:func:`write_multiscale`: arrays ``0``,
``1``... halving in size, µm scale, level-0 px translation), which napari-ome-zarr opens.

A store is built under a hidden temporary name beside its final path and renamed when complete:
a store at the final path with ``complete: true`` is whole, and an interrupted run leaves only
a temporary directory that the next run removes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from wsi_prune import __version__
from wsi_prune.errors import StoreError

_logger = logging.getLogger(__name__)

STORE_FORMAT = 1
_TMP_MARK = ".tmp-"


def tmp_path_for(final: str | os.PathLike[str]) -> Path:
    """A unique hidden sibling of ``final`` to build into before :func:`publish`."""
    final = Path(final)
    return final.parent / f".{final.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_tmp(final: str | os.PathLike[str]) -> int:
    """Delete temporary siblings left by interrupted builds of ``final``. Call under its lock."""
    final = Path(final)
    n = 0
    for p in final.parent.glob(f".{final.name}{_TMP_MARK}*"):
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    return n


def publish(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path:
    """Move a finished ``tmp`` directory to ``final``, replacing an older ``final``.

    The old store is first renamed aside, so at every instant ``final`` is either the old whole
    store, absent, or the new whole store.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        aside = final.parent / f".{final.name}{_TMP_MARK}old-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def tile_compressors(name: str) -> Any:
    """Codecs for tile arrays. zstd level 1: see docs/benchmarks.md for the measurement."""
    return None if name == "none" else ZstdCodec(level=1)


def create_store(path: str | os.PathLike[str]) -> zarr.Group:
    """A new, empty store group at ``path`` (which must not exist), marked incomplete."""
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    group.attrs.update({"format": STORE_FORMAT, "wsi_prune_version": __version__,
                        "complete": False})
    return group


def create_tiles_array(
    group: zarr.Group, name: str, n: int, tile_shape: tuple[int, ...], tiles_per_shard: int,
    compressor: str, dtype: str = "uint8",
) -> zarr.Array:
    """An (n, *tile_shape) array chunked one tile per chunk inside shards of
    ``tiles_per_shard`` tiles: a reader fetches single tiles, a writer writes whole shards."""
    shard = max(1, min(tiles_per_shard, max(n, 1)))
    return group.create_array(
        name, shape=(n, *tile_shape), chunks=(1, *tile_shape), shards=(shard, *tile_shape),
        dtype=dtype, compressors=tile_compressors(compressor), fill_value=0,
        # every chunk is written even when it equals the fill value, so "all shards present"
        # is a real completeness test
        config={"write_empty_chunks": True},
    )


def write_array(group: zarr.Group, name: str, data: np.ndarray, **attrs: Any) -> zarr.Array:
    """Write a small whole array (coords, scores, masks) in one chunk, replacing any old one."""
    data = np.asarray(data)
    chunks = tuple(max(1, s) for s in data.shape) or None
    arr = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype,
                             fill_value=0, overwrite=True, config={"write_empty_chunks": True})
    if data.size:
        arr[...] = data
    if attrs:
        arr.attrs.update(attrs)
    return arr


def _array_dir(arr: zarr.Array) -> Path:
    """The directory of an array in a local store."""
    return Path(str(arr.store_path.store.root)) / arr.path


def _shard_file(arr: zarr.Array, i: int) -> Path:
    """The file of shard (or unsharded chunk) ``i`` along axis 0 of an array in a local store,
    whose other axes are one shard wide (the tile arrays)."""
    return (_array_dir(arr) / "c" / str(i)).joinpath(*("0" for _ in arr.shape[1:]))


def missing_shards(arr: zarr.Array) -> list[int]:
    """Indices of shards (along axis 0) absent from disk.

    Zarr returns the fill value for a missing chunk; this is how a reader tells a lost write
    from real zeros (zarr-python #3682: concurrent partial writes to one shard lose data).
    """
    n = arr.shape[0]
    if n == 0:
        return []
    shard0 = (arr.shards or arr.chunks)[0]
    return [i for i in range(math.ceil(n / shard0)) if not _shard_file(arr, i).is_file()]


# An empty slot in a shard index: offset and length both 2**64 - 1 (Zarr v3 sharding spec).
_EMPTY_SLOT = np.uint64(2**64 - 1)
_DEFAULT_INDEX_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}},
                         {"name": "crc32c"}]


def _index_nbytes(per_shard: int) -> int:
    """Bytes of a shard index of ``per_shard`` chunks: an (offset, nbytes) uint64 pair per chunk,
    then its crc32c."""
    return per_shard * 16 + 4


def _index_crc(raw: bytes) -> bytes:
    """The 4-byte crc32c (little-endian) that closes a shard index."""
    import google_crc32c

    return google_crc32c.value(raw).to_bytes(4, "little")


def missing_chunks(arr: zarr.Array) -> list[int]:
    """Indices (along axis 0) of chunks with no data on disk: their shard is absent or
    truncated, or the shard's index marks them empty.

    Stricter than :func:`missing_shards`: a shard written by two tasks at once can exist and
    still have lost one task's chunks. Tile arrays are written with ``write_empty_chunks``, so
    every chunk of a complete array is present even where it equals the fill value. Reads only
    the shard indexes (16 bytes per chunk), not the data.

    Args:
        arr: an array in a local store, chunked along axis 0 only (one chunk spans the other
            axes), sharded or not.

    Raises:
        StoreError: the array is chunked along another axis, or its shard index uses codecs
            other than zarr's default (little-endian bytes + crc32c).
    """
    n = arr.shape[0]
    if n == 0:
        return []
    chunk0 = arr.chunks[0]
    if tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
        raise StoreError(f"chunked along an axis other than 0: chunks {arr.chunks}",
                         _array_dir(arr))
    n_chunks = math.ceil(n / chunk0)
    if arr.shards is None:
        return [i for i in range(n_chunks) if not _shard_file(arr, i).is_file()]
    # through JSON: the in-memory metadata holds tuples where the file holds lists
    codec = json.loads(json.dumps(arr.metadata.to_dict()["codecs"][0]["configuration"]))
    if codec.get("index_codecs") != _DEFAULT_INDEX_CODECS:
        raise StoreError(f"unsupported shard index codecs {codec.get('index_codecs')}",
                         _array_dir(arr))
    per_shard = arr.shards[0] // chunk0
    index_bytes = _index_nbytes(per_shard)
    at_end = codec.get("index_location", "end") == "end"
    missing = []
    for s in range(math.ceil(n_chunks / per_shard)):
        first = s * per_shard
        want = range(first, min(first + per_shard, n_chunks))
        path = _shard_file(arr, s)
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                if size < index_bytes:
                    raise OSError("shorter than its index")
                fh.seek(size - index_bytes if at_end else 0)
                raw = fh.read(index_bytes - 4)
        except OSError:
            missing.extend(want)
            continue
        slots = np.frombuffer(raw, "<u8").reshape(per_shard, 2)
        for i in want:
            off, nbytes = slots[i - first]
            if (off == _EMPTY_SLOT and nbytes == _EMPTY_SLOT) or int(off) + int(nbytes) > size:
                missing.append(i)
    return missing


def _shard_layout(arr: zarr.Array) -> tuple[int, Any] | None:
    """``(tiles per shard, zstd codec or None)`` when ``arr`` is a tile array whose shards
    :func:`write_tile_shards` can encode byte for byte as zarr would (one tile a chunk, inner
    codecs ``bytes`` and optionally ``zstd``, the default index at the end), else None."""
    if arr.shards is None or arr.chunks[0] != 1 or tuple(arr.chunks[1:]) != tuple(
            arr.shape[1:]) or arr.dtype != np.uint8:
        return None
    codecs = json.loads(json.dumps(arr.metadata.to_dict()["codecs"]))
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return None
    conf = codecs[0]["configuration"]
    if conf.get("index_codecs") != _DEFAULT_INDEX_CODECS or \
            conf.get("index_location", "end") != "end":
        return None
    inner = conf.get("codecs", [])
    if not inner or inner[0]["name"] != "bytes":
        return None
    if len(inner) == 1:
        return arr.shards[0], None
    if len(inner) == 2 and inner[1]["name"] == "zstd":
        from numcodecs import Zstd

        z = inner[1].get("configuration", {})
        return arr.shards[0], Zstd(level=int(z.get("level", 0)),
                                   checksum=bool(z.get("checksum", False)))
    return None


def write_tile_shards(arr: zarr.Array, start: int, tiles: np.ndarray) -> None:
    """Write ``tiles`` as ``arr[start:start + len(tiles)]``.

    When the range is made of whole shards (the array's last shard may be short) and the
    array's layout allows (:func:`_shard_layout`), the shard files are encoded here, byte for
    byte what zarr writes: the chunks in order, each compressed by the same numcodecs codec,
    then the (offset, nbytes) uint64 index and its crc32c. Otherwise zarr writes them. Why:
    zarr-python 3.1 runs its async codec pipeline chunk by chunk, ~28 ms per 64-tile shard of
    56 px tiles against ~3 ms here, a third of the tiling stage (docs/benchmarks.md,
    "Throughput").
    """
    n = arr.shape[0]
    stop = start + len(tiles)
    layout = _shard_layout(arr)
    if layout is None or start % layout[0] or (stop % layout[0] and stop != n) or stop > n:
        arr[start:stop] = tiles
        return
    per_shard, zstd = layout
    tiles = np.ascontiguousarray(tiles, np.uint8)
    for first in range(start, stop, per_shard):
        block = tiles[first - start:min(first + per_shard, stop) - start]
        parts = [t.tobytes() if zstd is None else zstd.encode(t) for t in block]
        index = np.full((per_shard, 2), _EMPTY_SLOT, "<u8")
        sizes = np.array([len(b) for b in parts], np.uint64)
        index[:len(parts), 1] = sizes
        index[:len(parts), 0] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint64)
        raw = index.tobytes()
        crc = _index_crc(raw)
        path = _shard_file(arr, first // per_shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"".join([*(bytes(b) for b in parts), raw, crc]))


def read_tile_shards(arr: zarr.Array, start: int, stop: int) -> np.ndarray:
    """``arr[start:stop]`` of a tile array, decoded here when the layout allows
    (:func:`_shard_layout`, what :func:`write_tile_shards` writes): each shard file read once,
    its index checked against its crc32c, the wanted chunks decompressed by the same numcodecs
    codec. Otherwise, and outside ``[0, len(arr)]``, through zarr. Why: zarr-python 3.1 decodes
    chunk by chunk through its async pipeline, ~0.5 ms a 56 px tile, about as long as the
    triage CNN takes to score it (docs/benchmarks.md, "The fixed per-slide costs, second
    pass").

    A chunk the index marks empty, or a shard file that does not exist, reads as the array's
    fill value, as zarr reads it.

    Raises:
        StoreError: a shard shorter than its index, an index whose checksum does not match, or
            a chunk that fails to decompress or has the wrong size (naming the shard file).
    """
    n = arr.shape[0]
    layout = _shard_layout(arr)
    if layout is None or not 0 <= start <= stop <= n:
        return np.asarray(arr[start:stop])
    per_shard, zstd = layout
    shape = tuple(arr.shape[1:])
    size = int(np.prod(shape))
    out = np.empty((stop - start, *shape), np.uint8)
    fill = np.uint8(arr.fill_value or 0)
    index_bytes = _index_nbytes(per_shard)
    for s in range(start // per_shard, -(-stop // per_shard)):
        first = s * per_shard
        lo, hi = max(start, first), min(stop, first + per_shard)
        path = _shard_file(arr, s)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            out[lo - start:hi - start] = fill
            continue
        if len(data) < index_bytes:
            raise StoreError(f"tile shard shorter than its index ({len(data)} bytes)", path)
        raw = data[-index_bytes:-4]
        if _index_crc(raw) != data[-4:]:
            raise StoreError("tile shard index fails its crc32c checksum", path)
        slots = np.frombuffer(raw, "<u8").reshape(per_shard, 2)
        for i in range(lo, hi):
            off, nbytes = (int(v) for v in slots[i - first])
            if off == int(_EMPTY_SLOT) and nbytes == int(_EMPTY_SLOT):
                out[i - start] = fill
                continue
            if off + nbytes > len(data) - index_bytes:
                raise StoreError(f"tile {i} lies past the shard's data (offset {off}, "
                                 f"{nbytes} bytes)", path)
            chunk = data[off:off + nbytes]
            try:
                buf = chunk if zstd is None else zstd.decode(chunk)
            except Exception as exc:  # numcodecs raises RuntimeError, a bare Exception on some
                raise StoreError(f"tile {i} fails to decompress ({exc})", path) from exc
            if len(buf) != size:
                raise StoreError(f"tile {i} holds {len(buf)} bytes, expected {size}", path)
            out[i - start] = np.frombuffer(buf, np.uint8).reshape(shape)
    return out


class TileShards:
    """A tile array sliced along axis 0 through :func:`read_tile_shards`: what
    :func:`wsi_prune.models.scorer.score_tiles` streams (``shape``, ``dtype``, ``len``,
    ``[a:b]``)."""

    def __init__(self, arr: zarr.Array) -> None:
        self.arr = arr
        self.shape = tuple(arr.shape)
        self.dtype = np.dtype(arr.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            return np.asarray(self.arr[key])
        start, stop, _ = key.indices(self.shape[0])
        return read_tile_shards(self.arr, start, max(start, stop))


def open_store(path: str | os.PathLike[str], mode: str = "r", require_complete: bool = True
               ) -> zarr.Group:
    """Open a slide store; raise :class:`StoreError` if absent or (by default) incomplete."""
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError("no Zarr store here", path) from exc
    if require_complete and not group.attrs.get("complete", False):
        raise StoreError("store is incomplete (an interrupted run?)", path)
    return group


def is_complete(path: str | os.PathLike[str], tile_hash: str | None = None) -> bool:
    """True when ``path`` holds a complete store (built with ``tile_hash`` when given)."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    same = tile_hash is None or attrs.get("tile_hash") == tile_hash
    return bool(attrs.get("complete")) and same


#: OME-NGFF version of :func:`write_multiscale` (0.5: the first on Zarr v3)
NGFF_VERSION = "0.5"


def write_multiscale(group: zarr.Group, name: str, image: np.ndarray, mpp_yx: tuple[float, float],
                     origin_um: tuple[float, float] = (0.0, 0.0), min_px: int = 32,
                     **attrs: Any) -> zarr.Group:
    """Write a 2-D image as an OME-NGFF multiscale group that napari-ome-zarr opens.

    Arrays ``0``, ``1``... halve the image each level (2x2 mean, NaN-aware) until its longer
    side is below ``min_px``; each carries a ``scale`` (µm/px) and a ``translation`` (µm,
    the centre of its first pixel, as NGFF places a pixel) so the levels overlay the slide in
    physical units.

    Args:
        group: the store (or a group in it).
        name: the multiscale group's path, replaced if present.
        image: (H, W) float map at ``mpp_yx``.
        mpp_yx: (y, x) µm per pixel of ``image``.
        origin_um: (y, x) µm of the image's top-left corner on the slide.
        min_px: stop halving below this side.
        **attrs: extra attributes of the group (units of the values, source).
    """
    if name in group:
        del group[name]
    g = group.create_group(name)
    levels, datasets = [np.asarray(image, np.float32)], []
    while max(levels[-1].shape) >= 2 * min_px:
        levels.append(halve_nanmean(levels[-1]))
    for i, level in enumerate(levels):
        f = 2.0 ** i
        # NGFF 0.5 asks each array to name its dimensions as the axes do
        arr = g.create_array(str(i), shape=level.shape, chunks=level.shape, dtype=level.dtype,
                             fill_value=float("nan"), dimension_names=("y", "x"))
        arr[...] = level
        scale = [mpp_yx[0] * f, mpp_yx[1] * f]
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": scale},
            {"type": "translation",
             "translation": [origin_um[0] + scale[0] / 2, origin_um[1] + scale[1] / 2]}]})
    g.attrs.update({"ome": {"version": NGFF_VERSION, "multiscales": [{
        "name": name,
        "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": datasets,
        "type": "mean",
    }]}, **attrs})
    return g


def halve_nanmean(a: np.ndarray) -> np.ndarray:
    """(H, W) -> (ceil(H/2), ceil(W/2)) float32: 2x2 mean ignoring NaN (a block all NaN stays
    NaN); odd edges padded with NaN."""
    h, w = a.shape
    p = np.pad(a, ((0, h % 2), (0, w % 2)), constant_values=np.nan)
    # the four pixels of each block as four strided views, added (top pair) + (bottom pair):
    # the order np.nansum over the blocks' axes used (the same floats), at half its time
    quads = [p[i::2, j::2] for i in (0, 1) for j in (0, 1)]
    finite = [np.isfinite(q) for q in quads]
    vals = [np.where(f, q, 0) for q, f in zip(quads, finite, strict=True)]
    n = finite[0].astype(np.int8) + finite[1] + finite[2] + finite[3]
    total = (vals[0] + vals[1]) + (vals[2] + vals[3])
    return np.divide(total, n, out=np.full(total.shape, np.nan, np.float32),
                     where=n > 0).astype(np.float32)
