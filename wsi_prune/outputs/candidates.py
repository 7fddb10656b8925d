"""CAMELYON16 lesion candidates: one ``confidence,X,Y`` per kept tile, at its hottest patch,
in the header-less integer format CAMELYON16's ``Evaluation_FROC.py`` reads; in
``OUT/<id>/candidates.csv`` and, for the challenge script, in ``OUT/froc/<id>.csv``.

Coordinates are OpenSlide level-0 px (no viewer offset, :mod:`wsi_prune.outputs.frame`): the
script reads its masks through OpenSlide, and ASAP lesion XML is in that frame too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import zarr

from wsi_prune._files import write_text_atomic

#: folder of OUT holding one ``<id>.csv`` per slide, as ``Evaluation_FROC.py`` reads them
FROC_DIR = "froc"


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
    path.write_text(format_candidates(rows), encoding="utf-8", newline="")
    return path


def format_candidates(rows: Iterable[tuple[float, float, float]]) -> str:
    """The text of a candidates file (see :func:`write_candidates`)."""
    return "".join(f"{float(c):.6f},{int(round(float(x)))},{int(round(float(y)))}\n"
                   for c, x, y in rows)


def write_froc_export(out: str | os.PathLike[str], slide_id: str,
                      rows: Iterable[tuple[float, float, float]]) -> Path:
    """Write ``OUT/froc/<slide_id>.csv``: the folder ``Evaluation_FROC.py`` takes as its
    result folder (it lists the ``.csv`` files there and takes each name, less ``.csv``, as
    the slide: ``<name>_Mask.tif`` in its mask folder, and a tumour slide only when the name
    starts with ``Tumor``), written atomically."""
    folder = Path(out) / FROC_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(folder / f"{slide_id}.csv", format_candidates(rows))
