"""benchmarks/bench_gpu.py runs on the CPU with --tiny (CI has no GPU), and the tiles it renders
for the full-size GPU run are the tiles the same slide gives when written as an SVS and read
through OpenSlide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from tests._paths import REPO


def test_bench_gpu_tiny_runs_every_path(tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--tiny", "--device", "cpu",
         "--work", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["source"] == "svs" and res["precision"] == "fp32" and not res["notes"]
    (slide,) = res["slides"]
    n = slide["tissue_tiles"]
    assert n >= 8
    rows = {(r["model"], r["path"]): r for r in res["rows"]}
    models = {m for m, _ in rows}
    assert len(models) == 2 and len(rows) == 6
    for model in models:
        pruned, dense, clam = (rows[model, p] for p in ("pruned", "dense", "CLAM-style"))
        assert dense["tiles"] == clam["tiles"] == n and 0 < pruned["tiles"] < n
        assert dense["tokens_in"] == clam["tokens_in"] == dense["tokens_all"]
        assert 0 < pruned["tokens_in"] < dense["tokens_in"] / 2
        assert 0 < pruned["extra"]["vit_gmacs"] < dense["extra"]["vit_gmacs"]
        # the wrapper's dense pass adds only the last block's CLS row (heatmap importance)
        assert 0 <= dense["extra"]["vit_gmacs"] / clam["extra"]["vit_gmacs"] - 1 < 1e-3
        assert all(r["seconds"] > 0 and r["gpu_util"] is None for r in (pruned, dense, clam))
    assert "of what the MACs promise" in proc.stdout and "tiles/s" in proc.stdout


def test_rendered_tiles_are_the_written_slides_tiles(tmp_path) -> None:
    """The two sources of bench_gpu agree: the same tissue tiles, and pixels within JPEG and
    resampling error (mean absolute difference of a few grey levels out of 255)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import _gpu_slides as slides
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    spec = slides.sized_spec(12, seed=0)
    rendered = slides.render_tiles(spec, tmp_path, processes=1)
    read = slides.svs_tiles(spec, tmp_path, threads=2)
    assert spec.mpp == 0.25 and 8 <= len(rendered) <= 20
    assert sorted(map(tuple, rendered.grid_rc)) == sorted(map(tuple, read.grid_rc))
    where = {tuple(rc): i for i, rc in enumerate(rendered.grid_rc)}
    for j, rc in enumerate(read.grid_rc):
        i = where[tuple(rc)]
        for a, b in ((rendered.full[i], read.full[j]), (rendered.coarse[i], read.coarse[j])):
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 6
    # a second call reuses the rendered files
    again = slides.render_tiles(spec, tmp_path, processes=1)
    assert np.array_equal(again.full, rendered.full)
