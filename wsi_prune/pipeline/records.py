"""A run's own files: ``predictions.csv`` (one row per slide, failed ones with a one-line
reason) and ``manifest.json`` (config, hashes, versions, models, times, per-slide status), both
written atomically.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsi_prune import __version__
from wsi_prune._files import write_text_atomic
from wsi_prune.config import RunConfig
from wsi_prune.errors import WsiPruneError
from wsi_prune.outputs.frame import CONVENTION
from wsi_prune.pipeline.inputs import SlideEntry

PREDICTION_COLUMNS = (
    "id", "path", "status", "error", "probability", "label", "mpp", "mpp_source",
    "tissue_tiles", "kept_tiles", "unreadable_tiles", "token_fraction", "gmacs", "gmacs_dense",
    "sec_tiling", "sec_triage", "sec_vit", "sec_mil", "sec_outputs", "sec_total",
)


def failed_row(entry: SlideEntry, exc: BaseException) -> dict[str, Any]:
    """A ``predictions.csv`` row for a slide that failed, with a one-line reason."""
    if isinstance(exc, WsiPruneError):
        reason = f"{exc.kind}: {exc.one_line()}"  # e.g. "missing-mpp: /data/x.tif: ..."
    else:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    row = {c: None for c in PREDICTION_COLUMNS}
    row.update(id=entry.id, path=str(entry.path), status="failed", error=reason)
    return row


def write_predictions(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``predictions.csv`` atomically (:func:`wsi_prune._files.write_text_atomic`)."""
    write_text_atomic(path, csv_header() + "".join(csv_line(r) for r in rows))


def csv_header() -> str:
    """The header line of ``predictions.csv``."""
    buf = io.StringIO()
    csv.writer(buf).writerow(PREDICTION_COLUMNS)
    return buf.getvalue()


def csv_line(row: dict[str, Any]) -> str:
    """One row of ``predictions.csv`` as a CSV line (a batch formats each row once)."""
    buf = io.StringIO()
    csv.writer(buf).writerow([_fmt(row.get(c)) for c in PREDICTION_COLUMNS])
    return buf.getvalue()


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def versions() -> dict[str, str]:
    """Versions of the package and the libraries that decide its numbers."""
    import dask
    import numpy as np
    import openslide
    import timm
    import torch
    import zarr

    out = {"wsi_prune": __version__, "python": platform.python_version(),
           "torch": torch.__version__, "timm": timm.__version__, "zarr": zarr.__version__,
           "dask": dask.__version__, "numpy": np.__version__,
           "openslide_python": openslide.__version__,
           "openslide": getattr(openslide, "__library_version__", "unknown")}
    return out


#: what ``manifest.json`` records of each slide; ``sec_tiling_waited`` only for a slide tiled
#: ahead (:mod:`wsi_prune.pipeline.ahead`): then ``sec_tiling`` ran under the slide before
_MANIFEST_KEYS = ("status", "error", "path", "probability", "sec_tiling", "sec_triage",
                  "sec_vit", "sec_mil", "sec_outputs", "sec_total", "sec_tiling_waited",
                  "viewer_offset")


def write_manifest(path: Path, config: RunConfig, rows: Sequence[dict[str, Any]],
                   started: str, models: dict[str, Any] | None, extra: dict | None = None) -> None:
    """Write ``manifest.json`` atomically: config, hash, versions, models, times, slides."""
    manifest = {
        "config": config.to_dict(), "config_hash": config.hash(), "versions": versions(),
        "models": models, "started": started,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "slides": {r["id"]: {k: r.get(k) for k in _MANIFEST_KEYS} for r in rows},
        "coordinates": CONVENTION,
        **(extra or {}),
    }
    write_text_atomic(path, json.dumps(manifest, indent=2, default=str))
