"""CAMELYON16 lesion candidates: one ``confidence,X,Y`` per kept tile, at its hottest patch,
in the header-less integer format CAMELYON16's ``Evaluation_FROC.py`` reads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import zarr


def candidates(group: zarr.Group, probability: float) -> list[tuple[float, int, int]]:
    """CAMELYON16 lesion candidates: one per kept tile at its hottest patch.

    Confidence is the patch heat times the slide probability (the lesion confidence of the
    module docstring), so candidates compare across slides (the FROC pools them). Returns
    (confidence, X, Y) with X, Y the patch centre in integer level-0 px, sorted by
    decreasing confidence.
    """
    if "vit" not in group or "patch" not in group["heatmap"]:
        return []
    tidx = np.asarray(group["vit/tile_index"][:])
    if not len(tidx):
        return []
    patch = np.asarray(group["heatmap/patch"][:])
    coords = np.asarray(group["tiles/coords"][:])
    g = patch.shape[1]
    side = float(group.attrs["grid"]["tile_level0"]) / g
    out = []
    for k, i in enumerate(tidx):
        flat = int(np.argmax(patch[k]))
        pr, pc = divmod(flat, g)
        # floor, not round: the pixel that holds the centre, so it stays inside the tile
        x = int(coords[i][0] + (pc + 0.5) * side)
        y = int(coords[i][1] + (pr + 0.5) * side)
        out.append((float(probability) * float(patch[k].max()), x, y))
    out.sort(key=lambda t: -t[0])
    return out


def write_candidates(path: str | os.PathLike[str],
                     rows: Iterable[tuple[float, float, float]]) -> Path:
    """Write candidates as CAMELYON16's ``Evaluation_FROC.py`` reads them: no header, one
    ``confidence,X,Y`` line each, X and Y integer level-0 px (the script calls ``int()`` on
    them, which refuses ``12.0``)."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        for conf, x, y in rows:
            fh.write(f"{float(conf):.6f},{int(round(float(x)))},{int(round(float(y)))}\n")
    return path
