"""Imported by every Dask worker that wsi-prune starts (distributed's worker ``preload``), so
that the heavy imports (torch, timm, OpenSlide, Zarr: about 4 s on 2 cores) happen while the
cluster starts rather than inside each worker's first slide task, where they would delay that
slide and, on a small batch, look like poor scaling (docs/benchmarks.md). matplotlib is no
longer among them: the slide pictures are drawn with Pillow (:mod:`wsi_prune.outputs._draw`)."""

import timm  # noqa: F401

import wsi_prune.outputs.writer  # noqa: F401
import wsi_prune.pipeline.batch  # noqa: F401
