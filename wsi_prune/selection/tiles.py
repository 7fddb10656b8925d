"""Tile-level selection policies, on numpy score vectors (one slide): which tiles reach the
ViT. :func:`select_tiles` applies a registered policy (:mod:`wsi_prune.selection.registry`),
the per-slide budget and MedPruner's redundancy filter.

Ties are always broken by index (lower index first), so a selection is reproducible across runs
and machines.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from wsi_prune.config import TileSelectConfig
from wsi_prune.selection.registry import get_policy, register_policy

_logger = logging.getLogger(__name__)

# Relative slack on "mass reached p": a float cumsum that lands exactly on p must count as
# reaching it, or the smallest set would gain one spurious element from rounding.
MASS_RTOL = 1e-9


def _rank(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties by ascending index: (N,) int64."""
    # lexsort sorts by the last key first; -scores descending, then index ascending.
    return np.lexsort((np.arange(scores.size), -scores)).astype(np.int64)


def nucleus_count(sorted_mass: np.ndarray, p: float) -> int:
    """Size of the smallest prefix of ``sorted_mass`` (descending, >= 0) whose mass reaches ``p``.

    Args:
        sorted_mass: (N,) float, non-negative, in descending order.
        p: target fraction of the total mass, in (0, 1].

    Returns:
        k in [0, N]; 0 only when N is 0. A zero total mass is treated as uniform.
    """
    n = sorted_mass.size
    if n == 0:
        return 0
    cum = np.cumsum(sorted_mass, dtype=np.float64)
    total = cum[-1]
    if total <= 0:
        return max(1, math.ceil(p * n - MASS_RTOL * n))
    before = cum - sorted_mass  # mass of the elements strictly before each one
    return int(np.count_nonzero(before < p * total * (1 - MASS_RTOL)))


@register_policy("nucleus", kind="tile")
def _tile_nucleus(scores: np.ndarray, config: TileSelectConfig) -> np.ndarray:
    order = _rank(scores)
    keep = np.zeros(scores.size, dtype=bool)
    keep[order[: nucleus_count(scores[order], config.p)]] = True
    return keep


@register_policy("topk", kind="tile")
def _tile_topk(scores: np.ndarray, config: TileSelectConfig) -> np.ndarray:
    keep = np.zeros(scores.size, dtype=bool)
    keep[_rank(scores)[: config.k]] = True
    return keep


@register_policy("fraction", kind="tile")
def _tile_fraction(scores: np.ndarray, config: TileSelectConfig) -> np.ndarray:
    keep = np.zeros(scores.size, dtype=bool)
    keep[_rank(scores)[: math.ceil(config.fraction * scores.size - 1e-9)]] = True
    return keep


@register_policy("threshold", kind="tile")
def _tile_threshold(scores: np.ndarray, config: TileSelectConfig) -> np.ndarray:
    return scores >= config.threshold


@register_policy("all", kind="tile")
def _tile_all(scores: np.ndarray, config: TileSelectConfig) -> np.ndarray:
    return np.ones(scores.size, dtype=bool)


def select_tiles(
    scores: np.ndarray,
    config: TileSelectConfig,
    grid: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
) -> np.ndarray:
    """Choose the tiles of one slide that reach the ViT.

    Order of operations: the neighbourhood mix of the scores (``config.neighbour_mix``,
    :func:`neighbour_mixed`), the policy (``config.policy``), then the budget (top up to
    ``min_tiles`` by score, cap at ``max_tiles`` by score), then the optional redundancy
    filter.

    Args:
        scores: (N,) float tile scores in [0, 1] (CNN triage).
        config: the selection settings.
        grid: (N, 2) int tile positions (row, col) in the tile grid; needed by the neighbourhood
            mix and the redundancy filter only.
        embeddings: (N, D) float tile embeddings (any model); needed by the redundancy filter only.

    Returns:
        (N,) bool keep mask.

    Raises:
        ValueError: scores not a finite 1-D array in [0, 1], or the redundancy filter is on
            without ``grid``/``embeddings`` of matching length.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"tile scores must be (N,), got shape {scores.shape}")
    if scores.size and (not np.all(np.isfinite(scores)) or scores.min() < 0 or scores.max() > 1):
        raise ValueError("tile scores must be finite and in [0, 1]")
    n = scores.size
    if config.neighbour_mix > 0:
        if grid is None:
            raise ValueError("tile_select.neighbour_mix needs the tile grid (N, 2)")
        scores = neighbour_mixed(scores, grid, config.neighbour_mix)
    keep = np.asarray(get_policy(config.policy, "tile")(scores, config), dtype=bool)

    order = _rank(scores)
    n_min = min(config.min_tiles, n)
    if keep.sum() < n_min:
        missing = [i for i in order if not keep[i]][: n_min - int(keep.sum())]
        keep[missing] = True
    if config.max_tiles is not None and keep.sum() > config.max_tiles:
        kept_order = order[keep[order]]
        keep[kept_order[config.max_tiles :]] = False

    if config.redundancy_eps is not None:
        keep = _drop_redundant(scores, keep, grid, embeddings, config.redundancy_eps, n_min)
    _logger.debug("select_tiles %s: kept %d of %d", config.policy, int(keep.sum()), n)
    return keep


def neighbour_mixed(scores: np.ndarray, grid: np.ndarray, mix: float) -> np.ndarray:
    """``(1 - mix) * score + mix * (mean score of the tile's tissue 8-neighbours)``.

    A tile without a tissue neighbour keeps its own score. The result stays in [0, 1].

    Args:
        scores: (N,) float tile scores.
        grid: (N, 2) int (row, col) of each tile in the tile grid (distinct cells).
        mix: in [0, 1).

    Returns:
        (N,) float64.
    """
    scores = np.asarray(scores, np.float64)
    grid = np.asarray(grid, np.int64)
    if grid.shape != (scores.size, 2):
        raise ValueError(f"grid must be ({scores.size}, 2), got {grid.shape}")
    if not scores.size:
        return scores
    rc = grid - grid.min(axis=0) + 1  # a ring of empty cells around the tiles
    shape = tuple(rc.max(axis=0) + 2)
    total = np.zeros(shape)
    count = np.zeros(shape)
    total[rc[:, 0], rc[:, 1]] = scores
    count[rc[:, 0], rc[:, 1]] = 1.0
    nb_total = np.zeros(scores.size)
    nb_count = np.zeros(scores.size)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                nb_total += total[rc[:, 0] + dr, rc[:, 1] + dc]
                nb_count += count[rc[:, 0] + dr, rc[:, 1] + dc]
    mean = np.divide(nb_total, nb_count, out=scores.copy(), where=nb_count > 0)
    return (1.0 - mix) * scores + mix * mean


def _drop_redundant(
    scores: np.ndarray,
    keep: np.ndarray,
    grid: np.ndarray | None,
    embeddings: np.ndarray | None,
    eps: float,
    n_min: int,
) -> np.ndarray:
    """MedPruner's anchor filter on the 2-D tile grid.

    Kept tiles are visited by descending score; a tile is dropped when its embedding lies
    within cosine distance ``eps`` of an already-retained 8-neighbour, unless that would leave
    fewer than ``n_min`` tiles.
    """
    n = scores.size
    if grid is None or embeddings is None:
        raise ValueError("redundancy_eps needs both grid (N, 2) and embeddings (N, D)")
    grid = np.asarray(grid)
    emb = np.asarray(embeddings, dtype=np.float64)
    if grid.shape != (n, 2) or emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(
            f"grid must be ({n}, 2) and embeddings ({n}, D); got {grid.shape} and {emb.shape}"
        )
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = emb / np.where(norms > 0, norms, 1.0)
    keep = keep.copy()
    n_kept = int(keep.sum())
    retained: dict[tuple[int, int], int] = {}
    for i in _rank(scores):
        if not keep[i]:
            continue
        r, c = int(grid[i, 0]), int(grid[i, 1])
        redundant = False
        if n_kept > n_min:
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    j = retained.get((r + dr, c + dc))
                    if j is not None and (dr or dc) and 1.0 - unit[i] @ unit[j] <= eps:
                        redundant = True
                        break
                if redundant:
                    break
        if redundant:
            keep[i] = False
            n_kept -= 1
        else:
            retained[(r, c)] = int(i)
    return keep


# -- token level (torch) ----------------------------------------------------------------------

