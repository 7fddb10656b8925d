"""wsi-prune: whole-slide images to slide predictions and heatmaps, fast.

Slide → tissue mask → Dask-written Zarr tile store → cheap CNN triage → token-pruned ViT →
attention-MIL slide prediction and heatmaps. The README's map says which folder holds which
stage. What a notebook user imports is here::

    import wsi_prune as wp

    cfg = wp.load_config("pipelines/camelyon16.yaml")
    rows = wp.run_batch(["slides/"], "results/", cfg)

Names are imported on first use (PEP 562), so ``import wsi_prune`` and ``import
wsi_prune.config`` stay free of torch, zarr and OpenSlide.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_ERRORS = ("WsiPruneError", "ConfigError", "SlideError", "UnsupportedSlide", "CorruptSlide",
           "MissingMPP", "NoTissue", "CheckpointRefused", "OutputConflict", "StoreError",
           "AnnotationError", "EvaluationError", "ShardsMissing", "TrainingError", "DiskFull",
           "OutputNotWritable", "SlideChanged")
#: public name -> the module that defines it
_API: dict[str, str] = {
    "RunConfig": "wsi_prune.config",
    "load_config": "wsi_prune.config",
    "Slide": "wsi_prune.io.slide",
    "open_slide": "wsi_prune.io.slide",
    "tile_slide": "wsi_prune.io.tiling",
    "build_models": "wsi_prune.models.factory",
    "SlideEntry": "wsi_prune.pipeline.inputs",
    "discover": "wsi_prune.pipeline.inputs",
    "process_slide": "wsi_prune.pipeline.process",
    "run_batch": "wsi_prune.pipeline.batch",
    "evaluate_run": "wsi_prune.evaluation.runs",
    "compare_runs": "wsi_prune.evaluation.compare",
    **{name: "wsi_prune.errors" for name in _ERRORS},
}

__all__ = [
    "__version__", "AnnotationError", "CheckpointRefused", "ConfigError", "CorruptSlide",
    "DiskFull", "EvaluationError", "MissingMPP", "NoTissue", "OutputConflict",
    "OutputNotWritable", "RunConfig", "ShardsMissing", "Slide", "SlideChanged", "SlideEntry",
    "SlideError", "StoreError", "TrainingError", "UnsupportedSlide",
    "WsiPruneError", "build_models", "compare_runs", "discover", "evaluate_run", "load_config",
    "open_slide", "process_slide", "run_batch", "tile_slide",
]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'wsi_prune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:  # static checkers and IDEs see the real objects
    from wsi_prune.config import RunConfig, load_config
    from wsi_prune.errors import (
        AnnotationError,
        CheckpointRefused,
        ConfigError,
        CorruptSlide,
        DiskFull,
        EvaluationError,
        MissingMPP,
        NoTissue,
        OutputConflict,
        OutputNotWritable,
        ShardsMissing,
        SlideChanged,
        SlideError,
        StoreError,
        TrainingError,
        UnsupportedSlide,
        WsiPruneError,
    )
    from wsi_prune.evaluation.compare import compare_runs
    from wsi_prune.evaluation.runs import evaluate_run
    from wsi_prune.io.slide import Slide, open_slide
    from wsi_prune.io.tiling import tile_slide
    from wsi_prune.models.factory import build_models
    from wsi_prune.pipeline.batch import run_batch
    from wsi_prune.pipeline.inputs import SlideEntry, discover
    from wsi_prune.pipeline.process import process_slide
