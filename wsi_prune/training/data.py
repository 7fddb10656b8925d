"""What training reads: slide stores written by ``run``, lesion annotations matched to them by
slide id, and per-patch targets rasterised from the annotations (training needs no slide reads
of its own).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from wsi_prune._ids import slide_id
from wsi_prune.errors import ConfigError, StoreError
from wsi_prune.io.annotations import Annotation, read_asap_xml, region_masks

PathLike = str | os.PathLike[str]
Annotations = Sequence[Annotation | np.ndarray]


def find_stores(paths: Iterable[PathLike]) -> list[Path]:
    """Expand run folders into their ``*.zarr`` slide stores.

    Args:
        paths: slide stores (``<id>.zarr``) or folders holding them (a run's ``OUT``).

    Raises:
        StoreError: a path is neither a Zarr store nor a folder with ``*.zarr`` stores.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "zarr.json").is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(q for q in p.glob("*.zarr") if not q.name.startswith("."))
            if not found:
                raise StoreError("no *.zarr slide stores in this folder", p)
            out.extend(found)
        else:
            raise StoreError("not a Zarr store or a folder of stores", p)
    return out


def load_annotations(
    annotations: Mapping[str, Annotations] | PathLike,
) -> dict[str, list[Annotation]]:
    """Lesion annotations per slide id.

    Args:
        annotations: a mapping slide id → annotations, each an :class:`Annotation` (groups
            decide lesion or exclusion) or a bare ``(K, 2)`` (x, y) level-0 px polygon (taken as
            lesion); or a folder of ASAP XML files named ``<slide id>.xml``; or one such file.

    Raises:
        ConfigError: the path holds no XML file. AnnotationError: an unreadable XML file.
    """
    if isinstance(annotations, Mapping):
        return {str(k): [_as_annotation(a) for a in v] for k, v in annotations.items()}
    path = Path(annotations)
    files = sorted(path.glob("*.xml")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise ConfigError("no ASAP XML annotation files here", path)
    return {slide_id(f): read_asap_xml(f) for f in files}


def _as_annotation(a: Annotation | np.ndarray) -> Annotation:
    if isinstance(a, Annotation):
        return a
    return Annotation(np.asarray(a, np.float64).reshape(-1, 2), "Tumor")


def patch_targets(
    level0_xy: np.ndarray, tile_level0: float, grid: int,
    annotations: Sequence[Annotation | np.ndarray], supersample: int = 8,
) -> np.ndarray:
    """Fraction of each ViT patch of each tile that lies inside a lesion.

    Each tile is rasterised at ``grid * supersample`` px a side (a sub-pixel is lesion when its
    centre is inside a lesion polygon and outside every exclusion polygon, as in the CAMELYON16
    masks), then averaged over ``supersample²`` blocks.

    Args:
        level0_xy: (N, 2) top-left (x, y) of the tiles, level-0 px.
        tile_level0: tile side, level-0 px.
        grid: G, patches per tile side.
        annotations: :class:`Annotation` objects or bare (K, 2) lesion polygons, level-0 px.
        supersample: sub-pixels per patch side.

    Returns:
        (N, G, G) float32 in [0, 1], row-major (row 0 at the top of the tile).
    """
    xy = np.asarray(level0_xy, np.float64).reshape(-1, 2)
    anns = [a for a in map(_as_annotation, annotations) if a.is_area and a.role != "other"]
    side = grid * supersample
    out = np.zeros((len(xy), grid, grid), np.float32)
    if not len(xy) or not any(a.role == "positive" for a in anns):
        return out
    lo = np.array([a.coords.min(axis=0) for a in anns])  # (A, 2) bounding boxes, level-0 px
    hi = np.array([a.coords.max(axis=0) for a in anns])
    positive = np.array([a.role == "positive" for a in anns])
    for i, corner in enumerate(xy):
        # only annotations whose box meets the tile are drawn: a slide has thousands of tiles
        near = np.all((lo < corner + tile_level0) & (hi > corner), axis=1)
        if not (near & positive).any():
            continue
        pos, exc = region_masks([a for a, n in zip(anns, near, strict=True) if n],
                                (float(corner[0]), float(corner[1])), (side, side),
                                mpp=tile_level0 / side, level0_mpp=1.0)
        out[i] = (pos & ~exc).reshape(grid, supersample, grid, supersample).mean(axis=(1, 3))
    return out
