"""Tokens entering each block under the peer pruning methods (DynamicViT, EViT, ToMe) and the
dense model, as their reference code does it (the conventions: :mod:`wsi_prune.selection.macs`).
Fed to :func:`wsi_prune.selection.macs.vit_macs` by the tests against published tables and by
the pruning benchmark's peer rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from wsi_prune.errors import ConfigError
from wsi_prune.selection.macs import ViTSpec


def _check_blocks(spec: ViTSpec, blocks: Sequence[int]) -> None:
    if list(blocks) != sorted(set(blocks)) or any(not 0 <= b < spec.depth for b in blocks):
        raise ConfigError(f"prune blocks {list(blocks)} must be increasing in 0..{spec.depth - 1}")


def _check_rate(rate: float, what: str) -> None:
    if not 0 < rate <= 1:
        raise ConfigError(f"{what}={rate} must be in (0, 1]")


def dense_schedule(spec: ViTSpec) -> list[int]:
    """Tokens entering each block of the unpruned model (prefix included)."""
    return [spec.n_tokens] * spec.depth


def dynamicvit_schedule(
    spec: ViTSpec, keep_ratio: float, prune_blocks: Sequence[int] = (3, 6, 9)
) -> list[int]:
    """DynamicViT: tokens entering each block, pruning before each block in ``prune_blocks``.

    After the s-th pruning (s = 1, 2, ...) ``round(keep_ratio**s · n_patches)`` patch tokens
    remain, plus the prefix tokens, which are never pruned.
    """
    _check_rate(keep_ratio, "keep_ratio")
    _check_blocks(spec, prune_blocks)
    n_patch, out = spec.n_patches, []
    for i in range(spec.depth):
        if i in prune_blocks:
            stage = list(prune_blocks).index(i) + 1
            n_patch = max(1, round(keep_ratio**stage * spec.n_patches))
        out.append(n_patch + spec.num_prefix_tokens)
    return out


def dynamicvit_predictor_macs(
    spec: ViTSpec, keep_ratio: float, prune_blocks: Sequence[int] = (3, 6, 9)
) -> int:
    """MACs of DynamicViT's PredictorLG heads (Linear D→D, D→D/2, D/2→D/4, D/4→2).

    Each head runs on the patch tokens entering its pruning block, before pruning.
    """
    sched = dynamicvit_schedule(spec, keep_ratio, prune_blocks)
    d = spec.embed_dim
    per_token = d * d + d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2
    entering = [spec.n_tokens if b == 0 else sched[b - 1] for b in prune_blocks]
    return sum((n - spec.num_prefix_tokens) * per_token for n in entering)


def evit_schedule(
    spec: ViTSpec,
    keep_rate: float,
    prune_blocks: Sequence[int] = (3, 6, 9),
    fuse_token: bool = True,
) -> list[tuple[int, int]]:
    """EViT: ``(n_attn, n_mlp)`` per block, pruning after attention in ``prune_blocks``.

    At a pruning block ``ceil(keep_rate · n_patch)`` attentive patch tokens are kept, plus one
    token fusing the rest when ``fuse_token``; ``n_patch`` includes an earlier fused token.
    """
    _check_rate(keep_rate, "keep_rate")
    _check_blocks(spec, prune_blocks)
    n_patch, out = spec.n_patches, []
    for i in range(spec.depth):
        n_attn = n_patch + spec.num_prefix_tokens
        if i in prune_blocks and keep_rate < 1:
            n_patch = math.ceil(keep_rate * n_patch) + (1 if fuse_token else 0)
        out.append((n_attn, n_patch + spec.num_prefix_tokens))
    return out


def tome_schedule(spec: ViTSpec, r: int) -> list[tuple[int, int]]:
    """ToMe: ``(n_attn, n_mlp)`` per block, ``r`` tokens merged between attention and MLP.

    As ToMe's code, ``r`` is capped at ``(n − prefix) // 2`` so the bipartite split can pair.
    """
    if r < 0:
        raise ConfigError(f"ToMe r={r} must be >= 0")
    n, out = spec.n_tokens, []
    for _ in range(spec.depth):
        merged = min(r, (n - spec.num_prefix_tokens) // 2)
        out.append((n, n - merged))
        n -= merged
    return out
