"""Token-level selection policies, on batched torch tensors (one row per tile): which patch
tokens of a kept tile enter the ViT (:func:`select_patches`, the CNN prior before block 0) and
which survive a pruning block inside it (:func:`keep_by_attention`, CLS attention).

Ties are broken by index (lower first), so a selection is reproducible across machines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsi_prune.config import TokenSelectConfig
from wsi_prune.selection.registry import get_policy, register_policy
from wsi_prune.selection.tiles import MASS_RTOL


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
    counts = ((before < p * total * (1 - MASS_RTOL)) & (mass > 0)).sum(1)
    # A row with no mass at all carries no ranking: treat it as uniform.
    uniform = torch.ceil(p * n_valid.double() - MASS_RTOL * n_valid).long()
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


def _on_grid(importance: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """(B, P) float importance on the ViT patch grid (resampled, area or bilinear, when the
    CNN's (B, G, G) map has another grid), checked finite and of the grid's size."""
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
    return imp


def select_patches(
    importance: torch.Tensor,
    config: TokenSelectConfig,
    grid: tuple[int, int] | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which patch tokens of each tile enter the ViT (the CNN prior, before block 0).

    Args:
        importance: (B, G, G) or (B, P) float, non-negative CNN patch importance.
        config: policy (``nucleus``, ``ratio`` or ``all``), ``p``, ``keep_ratio``, ``min_tokens``.
        grid: (rows, cols) of the ViT patch grid; when given and different from the importance
            map's (B, G, G) grid, the map is resampled to it (area/bilinear) first.
        counts: (B,) tokens to keep per tile, the highest-rated first, instead of the policy
            (``token_select.scope: slide``: :func:`slide_token_counts`).

    Returns:
        (B, P) bool keep mask, P = rows * cols of the ViT grid (row-major, like timm's tokens).
    """
    imp = _on_grid(importance, grid)
    valid = torch.ones_like(imp, dtype=torch.bool)
    if counts is not None:
        if counts.shape != (imp.shape[0],):
            raise ValueError(f"counts must be ({imp.shape[0]},), got {tuple(counts.shape)}")
        _, order = _ranked(imp, valid)
        return _keep_first(order, counts.long().clamp(0, imp.shape[1]))
    return _apply_token_policy(
        imp, valid, config.policy, config.p, config.keep_ratio, config.min_tokens
    )


def slide_token_counts(
    importance: torch.Tensor,
    keep_ratio: float,
    min_tokens: int,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Tokens per kept tile when ``keep_ratio`` counts over the slide (``token_select.scope:
    slide``): as many tokens in all as the per-tile ratio keeps (``ceil(keep_ratio * P)`` a
    tile), every tile's ``min_tokens`` highest-rated patches first, then the rest of the
    budget to the highest-rated remaining patches of the whole slide (ties: lower tile, then
    lower patch, first). Within a tile the kept patches are then its highest-rated ones, the
    order :func:`select_patches` keeps them in.

    Args:
        importance: (K, G, G) or (K, P) CNN patch importance of the slide's kept tiles.
        grid: the ViT patch grid (see :func:`select_patches`).

    Returns:
        (K,) long counts summing to ``K * ceil(keep_ratio * P)`` (or ``K * min(min_tokens,
        P)`` when that is more).
    """
    imp = _on_grid(importance, grid)
    k, p = imp.shape
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    per_tile = int(ratio_count(torch.tensor([p]), keep_ratio)[0])
    base = min(min_tokens, p)
    valid = torch.ones_like(imp, dtype=torch.bool)
    _, order = _ranked(imp, valid)
    first = _keep_first(order, torch.full((k,), base, dtype=torch.long))
    rest = k * max(per_tile - base, 0)
    counts = torch.full((k,), base, dtype=torch.long)
    if rest:
        score = torch.where(first, torch.full_like(imp, -1.0), imp.clamp_min(0)).double()
        # stable descending sort of the flattened (tile, patch) scores: ties by flat index
        flat = torch.sort(score.flatten(), descending=True, stable=True).indices[:rest]
        counts += torch.bincount(flat // p, minlength=k)
    return counts


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
