"""Shared by the evaluation tests: the FROC example slide, and run folders written as the
pipeline writes them (predictions.csv, candidates.csv, slide stores)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import zarr

from tests.io.test_annotations import square
from wsi_prune.io.annotations import Annotation
from wsi_prune.outputs.candidates import write_candidates

COLUMNS = ["id", "path", "status", "error", "probability", "label", "mpp", "mpp_source",
           "tissue_tiles", "kept_tiles", "token_fraction", "gmacs", "gmacs_dense", "sec_tiling",
           "sec_triage", "sec_vit", "sec_mil", "sec_outputs", "sec_total"]  # fmt: skip

# Slide "a" at 0.5 µm/px: two lesions, one ITC and an exclusion region; slide "b" is normal.
L1, L2 = square(2000, 2000, 2000), square(8000, 2000, 800)  # 1000 µm and 400 µm wide
ITC, EXCL = square(2000, 8000, 200), square(8000, 8000, 1000)  # 100 µm ITC; 500 µm exclusion
ANNOTATIONS = {"a": [Annotation(L1, "Tumor"), Annotation(L2, "_1"), Annotation(ITC, "_0"),
                     Annotation(EXCL, "_2")]}  # fmt: skip
CANDIDATES = {
    "a": np.array([[0.9, 3000, 3000],  # in L1: true positive
                   [0.6, 2500, 2500],  # in L1 again: L1 keeps 0.9
                   [0.3, 8840, 2400],  # 20 µm right of L2: inside the 37.5 µm margin, hit
                   [0.7, 8920, 2400],  # 60 µm right of L2: false positive
                   [0.95, 8500, 8500],  # in the exclusion region: ignored
                   [0.85, 2100, 8100]]),  # on the ITC: ignored
    "b": np.array([[0.5, 100, 100], [0.2, 5000, 5000]]),  # normal slide: false positives
}  # fmt: skip


def write_store(path: Path, heat: np.ndarray, source: np.ndarray, coords: np.ndarray) -> None:
    """A minimal complete slide store with the layout's heatmap and tile arrays."""
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("tiles/coords", data=np.asarray(coords, np.int64))
    g.create_array("heatmap/tile", data=np.asarray(heat, np.float32))
    g.create_array("heatmap/source", data=np.asarray(source, np.uint8))
    g.attrs["complete"] = True


def write_run(run: Path, rows: list[dict], candidates: dict[str, np.ndarray] | None = None,
              stores: dict[str, tuple] | None = None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    with (run / "predictions.csv").open("w", newline="") as fh:
        wr = csv.DictWriter(fh, COLUMNS)
        wr.writeheader()
        for r in rows:
            wr.writerow({k: r.get(k, "") for k in COLUMNS})
    for sid, c in (candidates or {}).items():
        (run / sid).mkdir(exist_ok=True)
        write_candidates(run / sid / "candidates.csv", c.reshape(-1, 3))
    for sid, arrays in (stores or {}).items():
        write_store(run / f"{sid}.zarr", *arrays)
    return run


def row(sid: str, prob: float | None, status: str = "ok", **kw) -> dict:
    base = {"id": sid, "path": f"/slides/{sid}.svs", "status": status,
            "probability": "" if prob is None else prob, "label": int((prob or 0) >= 0.5),
            "mpp": 0.5, "tissue_tiles": 100, "kept_tiles": 10, "token_fraction": 0.05,
            "gmacs": 10.0, "gmacs_dense": 200.0, "sec_total": 2.0}  # fmt: skip
    return base | kw


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def write_pipeline_store(path: Path, kept: np.ndarray, reached: np.ndarray | None = None,
                         heat: np.ndarray | None = None, mpp: float = 0.5,
                         tile_level0: float = 224.0, n_patches: int = 196, stages: int = 2
                         ) -> Path:
    """A complete slide store as ``process_slide`` lays it out, every grid cell a tissue tile.

    Args:
        kept: (rows, cols) bool, tiles the triage kept.
        reached: (rows, cols, P) bool, patches whose token reached the last block (only kept
            tiles count); default all patches of kept tiles.
        heat: (rows, cols) float tile heat; default the tile index over N.
    """
    n_rows, n_cols = kept.shape
    rc = np.stack(np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij"), -1)
    rc = rc.reshape(-1, 2)
    tile_index = np.flatnonzero(kept.ravel())
    kt = np.ones((len(tile_index), stages, n_patches), bool)
    if reached is not None:
        kt[:, -1] = reached.reshape(-1, n_patches)[tile_index]
    if heat is None:
        heat = np.arange(len(rc), dtype=np.float32) / len(rc)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("tiles/coords", data=np.round(rc[:, ::-1] * tile_level0).astype(np.int64))
    g.create_array("tiles/grid", data=rc.astype(np.int64))
    g.create_array("triage/kept", data=kept.ravel())
    g.create_array("vit/tile_index", data=tile_index.astype(np.int64))
    g.create_array("vit/kept_tokens", data=kt)
    g.create_array("heatmap/tile", data=np.asarray(heat, np.float32).ravel())
    g.create_array("heatmap/source", data=kept.ravel().astype(np.uint8))
    g.attrs.update({"complete": True, "mpp": mpp,
                    "grid": {"tile_level0": tile_level0, "n_rows": n_rows, "n_cols": n_cols}})
    return path
