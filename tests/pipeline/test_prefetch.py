"""Reading kept tiles ahead of the ViT: the bounded reader thread, the pool of readers, and the
same embeddings with and without them on a real pyramidal slide (OpenSlide on an SVS written
with tifffile)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zarr

from wsi_prune.io.tiling import tile_slide
from wsi_prune.models.factory import build_models
from wsi_prune.pipeline.demo import demo_config
from wsi_prune.pipeline.inputs import SlideEntry
from wsi_prune.pipeline.prefetch import mapped_ahead, prefetched
from wsi_prune.pipeline.stages import auto_read_workers, embed_kept, triage
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


def test_pool_results_come_in_order_from_several_threads():
    names = set()
    lock = threading.Lock()

    def work(i):
        time.sleep(0.01 * (i % 3))  # later tasks often finish first
        with lock:
            names.add(threading.current_thread().name)
        return i * i

    assert list(mapped_ahead(work, range(12), 2, workers=3, name="pool-t")) == \
        [i * i for i in range(12)]
    assert len(names) >= 2 and all(n.startswith("pool-t") for n in names)
    # one worker is the single reader thread of prefetched
    assert list(mapped_ahead(work, range(5), 2, workers=1)) == [i * i for i in range(5)]


def test_pool_stays_at_most_max_depth_workers_ahead():
    started = []

    def work(i):
        started.append(i)
        return i

    gen = mapped_ahead(work, range(30), 2, workers=3)
    for i, _ in enumerate(gen):
        time.sleep(0.01)  # a slow consumer: the pool waits for it
        # the one handed over + max(depth, workers) submitted ahead of the caller
        assert len(started) <= i + 1 + 3, (i, len(started))
    assert sorted(started) == list(range(30))


def test_pool_error_surfaces_at_its_task_after_the_results_before_it():
    class Boom(RuntimeError):
        pass

    err = Boom("batch 4 broke")

    def work(i):
        if i == 4:
            raise err
        if i < 4:
            time.sleep(0.02)  # the failing task finishes before the ones the caller wants
        return i

    got = []
    with pytest.raises(Boom) as info:
        for x in mapped_ahead(work, range(10), 2, workers=3):
            got.append(x)
    assert got == [0, 1, 2, 3] and info.value is err


def test_pool_caller_stopping_early_cancels_and_joins_the_readers():
    running = threading.Event()
    done = []

    def work(i):
        running.set()
        time.sleep(0.05)
        done.append(i)
        return i

    before = set(threading.enumerate())
    gen = mapped_ahead(work, range(1000), 2, workers=2, name="pool-stop")
    assert next(gen) == 0
    gen.close()
    assert running.is_set() and len(done) < 10  # the rest were cancelled, not read
    assert not [t for t in set(threading.enumerate()) - before
                if t.name.startswith("pool-stop")]


def test_auto_read_workers(monkeypatch):
    """One reader on the CPU; with a GPU a quarter of the cores, 1 to 4."""
    for cores, want in ((2, 1), (4, 1), (8, 2), (16, 4), (64, 4)):
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert auto_read_workers("cpu") == 1
        assert auto_read_workers("cuda") == want, cores
        assert auto_read_workers("cuda:1") == want, cores


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


def test_reader_pool_gives_the_same_embeddings_as_one_reader(kept):
    """Three reader threads, each with its own slide handle, batches handed to the ViT in order:
    the same arrays, bit for bit, as one reader and as reading in line."""
    entry, group, cfg, models, tri = kept
    tidx = np.flatnonzero(tri["kept"]).astype(np.int64)
    out = {w: embed_kept(entry, group, cfg, models, tidx, tri["patch_importance"],
                         read_workers=w) for w in (1, 3)}
    inline = embed_kept(entry, group, cfg, models, tidx, tri["patch_importance"], prefetch=0,
                        read_workers=1)
    for key in ("tile_index", "embedding", "token_importance", "kept_tokens"):
        assert np.array_equal(out[1][key], out[3][key]), key
        assert np.array_equal(out[1][key], inline[key]), key
    assert out[1]["macs"] == out[3]["macs"] and out[3]["unreadable"] == []
    with pytest.raises(ValueError, match="read_workers"):
        embed_kept(entry, group, cfg, models, tidx, tri["patch_importance"], read_workers=0)


def test_cli_read_workers_same_outputs_and_recorded(kept, tmp_path):
    """``run --read-workers 3`` gives the run of one reader (every stored array of the slide
    equal) and the manifest says how the run read; 0 is refused."""
    from click.testing import CliRunner

    from tests._faults import differences
    from wsi_prune.cli import main

    entry = kept[0]
    outs = {}
    for flags in ([], ["--read-workers", "3"]):
        out = tmp_path / f"out{len(flags)}"
        res = CliRunner().invoke(main, ["run", str(entry.path), "--out", str(out), "--quiet",
                                        "--no-tile-ahead", *flags])
        assert res.exit_code == 0, res.output
        outs[len(flags)] = out
    assert not differences(outs[0], outs[2], [entry.id])
    manifests = {k: json.loads((o / "manifest.json").read_text()) for k, o in outs.items()}
    assert manifests[0]["execution"] == {"device": "cpu", "dask": False, "tile_ahead": False,
                                         "read_workers": 1}
    assert manifests[2]["execution"]["read_workers"] == 3
    res = CliRunner().invoke(main, ["run", str(entry.path), "--out", str(tmp_path / "o0"),
                                    "--read-workers", "0"])
    assert res.exit_code == 2 and "--read-workers" in res.output
