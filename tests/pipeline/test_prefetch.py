"""Reading kept tiles ahead of the ViT: the bounded reader thread, and the same embeddings with
and without it on a real pyramidal slide (OpenSlide on an SVS written with tifffile)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zarr

from wsi_prune.io.tiling import tile_slide
from wsi_prune.models.factory import build_models
from wsi_prune.pipeline.demo import demo_config
from wsi_prune.pipeline.inputs import SlideEntry
from wsi_prune.pipeline.prefetch import prefetched
from wsi_prune.pipeline.stages import embed_kept, triage
from wsi_prune.synth import SynthSpec, write_slide


def test_items_come_in_order_from_another_thread():
    threads = []

    def items():
        for i in range(7):
            threads.append(threading.current_thread())
            yield i

    assert list(prefetched(items(), 2)) == list(range(7))
    assert all(t is not threading.main_thread() for t in threads)
    threads.clear()
    assert list(prefetched(items(), 0)) == list(range(7))  # 0: no thread
    assert all(t is threading.main_thread() for t in threads)


def test_reader_stays_at_most_depth_ahead():
    produced = []

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    gen = prefetched(items(), 2)
    for i, _ in enumerate(gen):
        time.sleep(0.02)  # a slow consumer: the reader fills the queue and waits
        # queued (2) + the one being handed over (blocked in put)
        assert len(produced) <= i + 1 + 2 + 1, (i, len(produced))
    assert produced == list(range(20))


def test_reader_error_surfaces_after_the_items_before_it():
    class Boom(RuntimeError):
        pass

    def items():
        yield 1
        yield 2
        raise Boom("tile 3 broke")

    got = []
    with pytest.raises(Boom, match="tile 3 broke"):
        for x in prefetched(items(), 2):
            got.append(x)
    assert got == [1, 2]


def test_caller_stopping_early_stops_the_reader():
    started = threading.Event()

    def items():
        i = 0
        while True:  # endless: only a stop can end it
            started.set()
            yield i
            i += 1

    before = set(threading.enumerate())
    gen = prefetched(items(), 2, name="test-reader")
    assert next(gen) == 0
    gen.close()
    assert started.is_set()
    assert not [t for t in set(threading.enumerate()) - before if t.name == "test-reader"]


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """A 2048² px SVS tiled and triaged with the demo models, every tissue tile kept, ViT
    batches of 4 (many batches, so reads and the ViT interleave)."""
    d = tmp_path_factory.mktemp("prefetch")
    slide = write_slide(d / "s.svs", SynthSpec(width=2048, height=2048, mpp=0.5, seed=4,
                                               tumour=True, tissue_fraction=0.5)).path
    cfg = demo_config().replace(tile_select={"policy": "all", "min_tiles": 0, "max_tiles": None},
                                vit={"batch_size": 4})
    res = tile_slide(slide, d / "s.zarr", cfg)
    group = zarr.open_group(str(res.store_path), mode="r")
    models = build_models(cfg)
    tri = triage(group, cfg, models)
    return SlideEntry("s", slide), group, cfg, models, tri


def test_prefetch_gives_the_same_embeddings_as_reading_in_line(kept):
    entry, group, cfg, models, tri = kept
    tidx = np.flatnonzero(tri["kept"]).astype(np.int64)
    assert len(tidx) > 3 * cfg.vit.batch_size
    calls = {0: [], 2: []}
    out = {p: embed_kept(entry, group, cfg, models, tidx, tri["patch_importance"],
                         progress=lambda d, t, p=p: calls[p].append((d, t)), prefetch=p)
           for p in (0, 2)}
    for key in ("tile_index", "embedding", "token_importance", "kept_tokens"):
        assert out[0][key].dtype == out[2][key].dtype
        assert np.array_equal(out[0][key], out[2][key]), key  # bit-identical
    assert out[0]["macs"] == out[2]["macs"] and out[0]["unreadable"] == out[2]["unreadable"] == []
    assert calls[0] == calls[2] and calls[0][-1] == (len(tidx), len(tidx))
