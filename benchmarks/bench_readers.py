"""Reading the kept tiles for the ViT with one and with several reader threads
(``run --read-workers``): the reads alone, and the whole ViT stage.

On a GPU a pruned ViT-L takes well under a millisecond a tile, and reading a kept 224 px tile
(JPEG decoding at the slide's best level) about half of one on these cores: the readers, not
the model, then set the ViT stage's pace. This benchmark times

* ``reads``: the pipeline's reader (:func:`wsi_prune.pipeline.stages.read_kept`: the batches
  the ViT would get, nothing else) over every ``1/--fraction``-th tissue tile of real slide
  files, with 1, 2, ... reader threads;
* ``stage`` (``--stage``): the whole ViT stage (:func:`~wsi_prune.pipeline.stages.embed_kept`)
  with the config's ViT, the CPU case, where one reader keeps ahead of the model;

in interleaved rounds, and prints seconds, tiles/s and the speed-up over one reader. The
batches (and embeddings) are checked equal to one reader's every time.

    python benchmarks/bench_readers.py SLIDE [SLIDE ...] --work bench-out/readers \
        --fraction 0.5 --workers 1 2 3 --rounds 5 [--stage --config C.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from wsi_prune.config import RunConfig, load_config
from wsi_prune.io.tiling import tile_slide
from wsi_prune.pipeline.inputs import SlideEntry
from wsi_prune.pipeline.stages import embed_kept, read_kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("slides", nargs="+", type=Path)
    ap.add_argument("--work", type=Path, default=Path("bench-out/readers"))
    ap.add_argument("--config", type=Path, default=None,
                    help="tiling, token and ViT settings (default: the package defaults)")
    ap.add_argument("--stage", action="store_true",
                    help="time the whole ViT stage with the config's ViT, not the reads alone")
    ap.add_argument("--fraction", type=float, default=0.5,
                    help="share of each slide's tissue tiles read (every k-th tile)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    cfg = load_config(args.config) if args.config else RunConfig()
    models = None
    if args.stage:
        from wsi_prune.models.factory import build_models

        models = build_models(cfg)
    args.work.mkdir(parents=True, exist_ok=True)
    cases = []
    for path in args.slides:
        res = tile_slide(path, args.work / f"{path.stem}.zarr", cfg)
        group = zarr.open_group(str(res.store_path), mode="r")
        kept = np.arange(0, res.n_tiles, max(1, round(1 / args.fraction)), dtype=np.int64)
        cases.append((SlideEntry(path.stem, path), group, kept))
    tiles = sum(len(c[2]) for c in cases)
    what = "ViT stage" if args.stage else "reads alone"
    print(f"{what}: {len(cases)} slide(s), {tiles} tiles per pass; torch threads "
          f"{torch.get_num_threads()}, cores {len(os.sched_getaffinity(0))}")

    def one_pass(workers: int) -> tuple[float, list]:
        t = time.perf_counter()
        got = []
        for entry, group, kept in cases:
            if models is not None:
                n, g = group["tiles/coords"].shape[0], models.grid
                importance = np.ones((n, g[0], g[1]), np.float32)
                got.append(embed_kept(entry, group, cfg, models, kept, importance,
                                      read_workers=workers)["embedding"])
            else:
                got += [b[2] for b in read_kept(entry, group, cfg, kept, read_workers=workers)]
        return time.perf_counter() - t, got

    _, ref = one_pass(1)  # warm: file cache, torch
    times: dict[int, list[float]] = {w: [] for w in args.workers}
    for r in range(args.rounds):
        for w in args.workers:
            dt, got = one_pass(w)
            assert all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True)), w
            times[w].append(dt)
        print(f"round {r + 1}: " + ", ".join(f"{w} reader(s) {times[w][-1]:.3f} s"
                                             for w in args.workers))
    base = statistics.median(times[args.workers[0]])
    rows = []
    print(f"\n| readers | s per pass, median (min-max) | tiles/s | vs {args.workers[0]} |")
    print("|---:|---|---:|---:|")
    for w in args.workers:
        med = statistics.median(times[w])
        rows.append({"workers": w, "median_s": med, "min_s": min(times[w]),
                     "max_s": max(times[w]), "tiles_per_s": tiles / med, "speedup": base / med})
        print(f"| {w} | {med:.3f} ({min(times[w]):.3f}-{max(times[w]):.3f}) | "
              f"{tiles / med:.0f} | {base / med:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"what": what, "tiles": tiles, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
