"""Selection policies: which tiles reach the ViT, and which patch tokens survive inside it.

Pure functions, no state. Tile-level policies work on numpy score vectors (one slide); token-level
policies work on batched torch tensors (one row per tile). Policies are looked up by name in a
small registry, like timm's models::

    @register_policy("nucleus", kind="tile")
    def _tile_nucleus(scores, config): ...

    get_policy("nucleus", kind="tile")  # unknown names raise ConfigError
    list_policies("token")

Ties are always broken by index (lower index first), so a selection is reproducible across runs
and machines.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsi_prune.config import TileSelectConfig, TokenSelectConfig
from wsi_prune.errors import ConfigError

_logger = logging.getLogger(__name__)

KINDS = ("tile", "token")
_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {k: {} for k in KINDS}

# Relative slack on "mass reached p": a float cumsum that lands exactly on p must count as
# reaching it, or the smallest set would gain one spurious element from rounding.
_MASS_RTOL = 1e-9


# -- registry ---------------------------------------------------------------------------------
def register_policy(name: str, kind: str = "tile") -> Callable[[Callable], Callable]:
    """Decorator registering a selection policy under ``name``.

    Args:
        name: the name used in configs (``TileSelectConfig.policy`` / ``TokenSelectConfig.policy``).
        kind: ``tile`` (``fn(scores (N,) float64, config) -> (N,) bool``) or ``token``
            (``fn(scores (B, P) float, valid (B, P) bool, *, p, keep_ratio) -> (B, P) bool``).
    """
    if kind not in KINDS:
        raise ConfigError(f"policy kind must be one of {KINDS}, got {kind!r}")

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY[kind]:
            raise ConfigError(f"{kind} policy {name!r} is already registered")
        _REGISTRY[kind][name] = fn
        return fn

    return deco


def get_policy(name: str, kind: str = "tile") -> Callable[..., Any]:
    """The registered policy ``name`` of ``kind``; raises :class:`ConfigError` if unknown."""
    if kind not in KINDS:
        raise ConfigError(f"policy kind must be one of {KINDS}, got {kind!r}")
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY[kind]))
        raise ConfigError(f"unknown {kind} policy {name!r} (registered: {known})") from None


def list_policies(kind: str | None = None) -> list[str]:
    """Sorted names of registered policies, of one kind or (``None``) as ``kind:name``."""
    if kind is None:
        return sorted(f"{k}:{n}" for k in KINDS for n in _REGISTRY[k])
    if kind not in KINDS:
        raise ConfigError(f"policy kind must be one of {KINDS}, got {kind!r}")
    return sorted(_REGISTRY[kind])


# -- tile level (numpy) -----------------------------------------------------------------------
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
        return max(1, math.ceil(p * n - _MASS_RTOL * n))
    before = cum - sorted_mass  # mass of the elements strictly before each one
    return int(np.count_nonzero(before < p * total * (1 - _MASS_RTOL)))


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

    Order of operations: the policy (``config.policy``), then the budget (top up to
    ``min_tiles`` by score, cap at ``max_tiles`` by score), then the optional redundancy filter.

    Args:
        scores: (N,) float tile scores in [0, 1] (CNN triage).
        config: the selection settings.
        grid: (N, 2) int tile positions (row, col) in the tile grid; needed by the redundancy
            filter only.
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
def _ranked(scores: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: mass of valid tokens (0 elsewhere) sorted descending, ties by index, and order."""
    mass = torch.where(valid, scores.double().clamp_min(0), torch.zeros((), dtype=torch.float64))
    # Stable sort keeps equal scores in index order; invalid entries go last via -1.
    key = torch.where(valid, mass, torch.full_like(mass, -1.0))
    _, order = torch.sort(key, dim=1, descending=True, stable=True)
    return mass.gather(1, order), order


def _keep_first(order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, P) bool mask with, per row, the first ``counts[b]`` entries of ``order[b]`` set."""
    rank_ok = torch.arange(order.shape[1], device=order.device)[None, :] < counts[:, None]
    keep = torch.zeros_like(rank_ok)
    keep.scatter_(1, order, rank_ok)
    return keep


@register_policy("nucleus", kind="token")
def _token_nucleus(
    scores: torch.Tensor, valid: torch.Tensor, *, p: float, keep_ratio: float
) -> torch.Tensor:
    mass, order = _ranked(scores, valid)
    n_valid = valid.sum(1)
    cum = mass.cumsum(1)
    total = cum[:, -1:]
    before = cum - mass
    counts = ((before < p * total * (1 - _MASS_RTOL)) & (mass > 0)).sum(1)
    # A row with no mass at all carries no ranking: treat it as uniform.
    uniform = torch.ceil(p * n_valid.double() - _MASS_RTOL * n_valid).long()
    counts = torch.where(total[:, 0] > 0, counts, uniform)
    return _keep_first(order, counts)


@register_policy("ratio", kind="token")
def _token_ratio(
    scores: torch.Tensor, valid: torch.Tensor, *, p: float, keep_ratio: float
) -> torch.Tensor:
    _, order = _ranked(scores, valid)
    counts = ratio_count(valid.sum(1), keep_ratio)
    return _keep_first(order, counts)


@register_policy("all", kind="token")
def _token_all(
    scores: torch.Tensor, valid: torch.Tensor, *, p: float, keep_ratio: float
) -> torch.Tensor:
    return valid.clone()


def ratio_count(n_valid: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Tokens kept by a fixed ratio: ``ceil(keep_ratio * n_valid)`` (EViT's rounding), long."""
    return torch.ceil(n_valid.double() * keep_ratio - 1e-9).long()


def _apply_token_policy(
    scores: torch.Tensor,
    valid: torch.Tensor,
    policy: str,
    p: float,
    keep_ratio: float,
    min_tokens: int,
) -> torch.Tensor:
    keep = get_policy(policy, "token")(scores, valid, p=p, keep_ratio=keep_ratio) & valid
    # Top up to min_tokens by score; never more than the valid tokens there are.
    need = torch.minimum(valid.sum(1), torch.full_like(valid.sum(1), min_tokens))
    short = keep.sum(1) < need
    if bool(short.any()):
        _, order = _ranked(scores, valid)
        keep = torch.where(short[:, None], keep | _keep_first(order, need), keep)
    return keep


def select_patches(
    importance: torch.Tensor,
    config: TokenSelectConfig,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Which patch tokens of each tile enter the ViT (the CNN prior, before block 0).

    Args:
        importance: (B, G, G) or (B, P) float, non-negative CNN patch importance.
        config: policy (``nucleus``, ``ratio`` or ``all``), ``p``, ``keep_ratio``, ``min_tokens``.
        grid: (rows, cols) of the ViT patch grid; when given and different from the importance
            map's (B, G, G) grid, the map is resampled to it (area/bilinear) first.

    Returns:
        (B, P) bool keep mask, P = rows * cols of the ViT grid (row-major, like timm's tokens).
    """
    imp = importance.detach().float()
    if imp.ndim == 3 and grid is not None and tuple(imp.shape[1:]) != tuple(grid):
        imp = F.interpolate(
            imp[:, None], size=tuple(grid), mode="area" if imp.shape[1] >= grid[0] else "bilinear"
        )[:, 0]
    if imp.ndim == 3:
        imp = imp.flatten(1)
    if imp.ndim != 2:
        raise ValueError(f"importance must be (B, G, G) or (B, P), got {tuple(importance.shape)}")
    if not bool(torch.isfinite(imp).all()):
        raise ValueError("importance must be finite")
    if grid is not None and imp.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            f"importance has {imp.shape[1]} patches, ViT grid {grid} needs {grid[0] * grid[1]}"
        )
    valid = torch.ones_like(imp, dtype=torch.bool)
    return _apply_token_policy(
        imp, valid, config.policy, config.p, config.keep_ratio, config.min_tokens
    )


def keep_by_attention(
    cls_attn: torch.Tensor,
    valid: torch.Tensor,
    policy: str,
    p: float,
    keep_ratio: float,
    min_tokens: int = 1,
) -> torch.Tensor:
    """Which of the currently valid patch tokens survive a pruning block.

    Args:
        cls_attn: (B, P) float CLS-attention to each patch token (any scale; normalised here
            over valid tokens).
        valid: (B, P) bool tokens present now (False: padding or pruned earlier).
        policy: ``nucleus`` (smallest set reaching attention mass ``p``: an adaptive count per
            image) or ``ratio`` (``ceil(keep_ratio * n_valid)``, DynamicViT/EViT schedules).
        p: nucleus mass in (0, 1].
        keep_ratio: fraction kept by ``ratio``, in (0, 1].
        min_tokens: at least this many (or all valid if fewer) are kept per image.

    Returns:
        (B, P) bool, a subset of ``valid``.
    """
    if cls_attn.shape != valid.shape or cls_attn.ndim != 2:
        raise ValueError(
            f"cls_attn {tuple(cls_attn.shape)} and valid {tuple(valid.shape)} must both be (B, P)"
        )
    return _apply_token_policy(cls_attn, valid.bool(), policy, p, keep_ratio, min_tokens)
