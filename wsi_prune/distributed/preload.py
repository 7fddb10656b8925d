"""Imported by every Dask worker that wsi-prune starts (distributed's worker ``preload``), so
that the heavy imports (torch, timm, OpenSlide, Zarr, matplotlib: about 4 s on 2 cores) happen
while the cluster starts rather than inside each worker's first slide task, where they would
delay that slide and, on a small batch, look like poor scaling (docs/benchmarks.md)."""

import matplotlib

matplotlib.use("Agg")  # workers have no display

import matplotlib.pyplot  # noqa: E402,F401
import timm  # noqa: E402,F401

import wsi_prune.outputs.writer  # noqa: E402,F401
import wsi_prune.pipeline.batch  # noqa: E402,F401
