"""Training the CNN triage scorer from slide stores: its patch map is fitted to lesion
annotations (targets: the fraction of each ViT patch inside a lesion, rasterised from level-0
polygons) or, by distillation, to a dense ViT's token importance (``vit/token_importance``) as
DynamicViT distils from its teacher; its tile score can learn the order a dense ViT's tile
head gives the tiles (``tile_teacher``). Deterministic for a seed and thread count; writes
``<name>.safetensors`` plus the ``<name>.json`` that
:func:`~wsi_prune.models.scorer.trained_scorer_config` reads back.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsi_prune._ids import lookup_slide, slide_id
from wsi_prune.config import RunConfig, ScorerConfig
from wsi_prune.errors import ConfigError, StoreError
from wsi_prune.io.annotations import Annotation
from wsi_prune.io.store import open_store
from wsi_prune.models.checkpoints import load_into
from wsi_prune.models.scorer import SCORER_KIND, PatchScorer, pool_patch_map
from wsi_prune.training._common import check_out, save_model, seeded
from wsi_prune.training.data import find_stores, load_annotations, patch_targets

_logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Annotations = Sequence[Annotation | np.ndarray]




# -- annotations and patch targets (labels: parse_label, read_labels of wsi_prune.io.annotations) --


@dataclass
class ScorerTrainResult:
    """What :func:`train_scorer` did.

    Attributes:
        weights: the safetensors file written.
        config: the JSON config written next to it.
        losses: mean training loss of each epoch (patch BCE + tile BCE).
        n_tiles: training tiles; n_positive: those with any target mass (lesion or importance).
        grid: G of the patch maps.
        seconds: wall time.
        model: the trained scorer (eval mode).
    """

    weights: Path
    config: Path
    losses: list[float]
    n_tiles: int
    n_positive: int
    grid: int
    seconds: float
    model: PatchScorer


def _scorer_data(
    stores: Sequence[Path], polygons: dict[str, list[Annotation]] | None, grid: int | None,
    config: ScorerConfig, max_tiles: int | None, rng: np.random.Generator,
    tile_teacher: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, dict[str, Any]]:
    """Coarse tiles (n, cp, cp, 3) uint8, patch targets (n, G, G), tile targets (n,) (NaN: none),
    G, and the store grid attrs of the first store. ``tile_teacher``: tile targets are the dense
    run's ViT tile lesion probabilities (:func:`_teacher_tile_targets`)."""
    tiles, patch, tile_t, attrs0, annotated = [], [], [], None, 0
    for path in stores:
        group = open_store(path)
        attrs = dict(group.attrs.get("grid") or {})
        if "tile_level0" not in attrs or "tiles/coarse" not in group:
            raise StoreError("not a tile store: needs tiles/coarse and attrs grid", path)
        attrs0 = attrs0 or attrs
        same = ("coarse_px", "coarse_mpp")
        if any(attrs.get(k) != attrs0.get(k) for k in same):
            raise StoreError(f"coarse tiles {[attrs.get(k) for k in same]} (px, µm/px) differ "
                             f"from the first store's {[attrs0.get(k) for k in same]}", path)
        if polygons is not None:
            g = grid or 14
            idx = np.arange(group["tiles/coords"].shape[0])
            anns = lookup_slide(polygons, slide_id(path))
            annotated += anns is not None
            targets = patch_targets(group["tiles/coords"][:], float(attrs["tile_level0"]), g,
                                    anns or [])
            t_tile = pool_patch_map(torch.from_numpy(targets), config.pooling,
                                    config.topk).numpy()
        else:
            idx, targets, t_tile, g = _distill_targets(group, path, grid)
        grid = g
        positive = targets.reshape(len(targets), -1).max(axis=1) > 0
        if tile_teacher:
            t_tile = _teacher_tile_targets(group, path)[idx]
            positive |= _teacher_top(t_tile)
        keep = _choose(positive, max_tiles, rng)
        tiles.append(group["tiles/coarse"].oindex[idx[keep]] if len(keep) else
                     np.zeros((0, *group["tiles/coarse"].shape[1:]), np.uint8))
        patch.append(targets[keep])
        tile_t.append(t_tile[keep])
    if polygons is not None and not annotated:
        raise ConfigError(f"none of the {len(stores)} stores has an annotation: annotation files "
                          f"must be named <slide id>.xml like the stores (e.g. "
                          f"{slide_id(stores[0]) if stores else '?'}.xml)")
    if not tiles or grid is None or sum(len(t) for t in tiles) < 2:
        raise ConfigError("fewer than two training tiles in the given stores")
    return (np.concatenate(tiles), np.concatenate(patch).astype(np.float32),
            np.concatenate(tile_t).astype(np.float32), int(grid), attrs0 or {})


def _distill_targets(
    group: Any, path: Path, grid: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Targets from a dense run: token importance over the kept tiles, min-max normalised per
    tile (the most important patch is 1, the least 0), and MIL attention divided by the slide's
    maximum for the tile score."""
    if "vit/token_importance" not in group or "vit/tile_index" not in group:
        raise StoreError("distillation needs vit/token_importance and vit/tile_index (a run "
                         "store made with the dense ViT)", path)
    idx = np.asarray(group["vit/tile_index"][:], np.int64)
    _require_dense(group, len(idx), path, "distillation needs")
    imp = np.nan_to_num(np.asarray(group["vit/token_importance"][:], np.float32)).clip(min=0)
    g = math.isqrt(imp.shape[1]) if imp.ndim == 2 else 0
    if g * g != (imp.shape[1] if imp.ndim == 2 else -1) or len(imp) != len(idx):
        raise StoreError(f"vit/token_importance {imp.shape} is not (K, G*G) for K={len(idx)}",
                         path)
    if grid is not None and g != grid:
        raise ConfigError(f"grid {grid} asked, but the store's ViT grid is {g}", path)
    lo, hi = imp.min(axis=1, keepdims=True), imp.max(axis=1, keepdims=True)
    # Min-max per tile: the targets rank patches within a tile (which tokens to keep); a tile
    # with flat importance says nothing about its patches and gets all-zero targets.
    targets = np.divide(imp - lo, hi - lo, out=np.zeros_like(imp), where=hi - lo > 1e-12)
    targets = targets.reshape(-1, g, g)
    tile_t = np.full(len(idx), np.nan, np.float32)
    if "mil/attention" in group and group["mil/attention"].shape == (len(idx),):
        att = np.nan_to_num(np.asarray(group["mil/attention"][:], np.float32))
        if att.max() > 0:
            tile_t = att / att.max()
    return idx, targets, tile_t, g


def _teacher_tile_targets(group: Any, path: Path) -> np.ndarray:
    """(n_tiles,) the dense ViT's tile lesion probability of every tissue tile of a dense run
    store: ``sigmoid(tile_head(vit/embedding))``, with the tile head ``train-vit`` saved beside
    the run's ViT weights; NaN where a tile has no embedding (unreadable).

    The scorer then learns to rank tiles as the ViT's tile head does, so that triage keeps the
    tiles a tile-topk slide head reads (its top-k) and the CNN fill of the heat map follows the
    dense ViT's heat.

    Raises:
        StoreError: not a dense run store, or its ViT weights have no tile head.
    """
    from wsi_prune.training.tile_topk import load_tile_head, tile_head_of

    idx = dense_vit_index(group, path, "ViT tile targets need")
    weights = RunConfig.from_dict(group.attrs["run_config"]).vit.weights
    head_path = tile_head_of(weights) if weights else None
    if head_path is None:
        raise StoreError(f"ViT tile targets need the tile head train-vit saves beside the ViT "
                         f"weights; the run's ViT ({weights or 'untrained'}) has none", path)
    emb = np.asarray(group["vit/embedding"][:], np.float32)
    head = load_tile_head(head_path, emb.shape[1])
    with torch.no_grad():
        p = torch.sigmoid(head(torch.from_numpy(emb))[:, 0]).numpy()
    out = np.full(int(group["tiles/coords"].shape[0]), np.nan, np.float32)
    out[idx] = p
    return out


def _teacher_top(p: np.ndarray, share: float = 0.05, least: int = 16) -> np.ndarray:
    """Tiles the teacher rates highest on a slide (its top ``share``, at least ``least``, and
    every tile above 0.5): drawn like lesion tiles, because a normal slide's slide score is
    the mean of exactly such tiles."""
    p = np.nan_to_num(p, nan=-1.0)
    n_top = min(len(p), max(least, int(math.ceil(share * len(p)))))
    top = np.zeros(len(p), bool)
    top[np.argsort(-p, kind="stable")[:n_top]] = True
    return top | (p > 0.5)


def dense_vit_index(group: Any, path: Path, who: str) -> np.ndarray:
    """``vit/tile_index`` of a dense run store: the tiles whose ``vit/embedding`` rows it holds.

    Raises:
        StoreError: no ``vit/embedding`` or ``vit/tile_index``, or the run pruned
            (:func:`_require_dense`); ``who`` begins the message ("distill-vit needs").
    """
    if "vit/embedding" not in group or "vit/tile_index" not in group:
        raise StoreError(f"{who} vit/embedding and vit/tile_index (a run store made with "
                         "`run --dense`)", path)
    idx = np.asarray(group["vit/tile_index"][:], np.int64)
    _require_dense(group, len(idx), path, who)
    return idx


def _require_dense(group: Any, n_vit: int, path: Path, who: str) -> None:
    """Refuse a run store whose run pruned tiles or tokens (:func:`_pruning`); ``who`` begins
    the message ("distillation needs")."""
    pruned = _pruning(group, n_vit)
    if pruned:
        raise StoreError(f"{who} a dense run store (every tissue tile and token through the "
                         f"ViT, as RunConfig.dense() runs), but this run pruned: "
                         + "; ".join(pruned), path)


def _pruning(group: Any, n_vit: int) -> list[str]:
    """How a run store's run pruned tiles or tokens; empty for a dense run.

    A pruned run's token importance is 0 on every token the CNN prior dropped, so distilling
    from it would teach the scorer its own earlier choices instead of the ViT's.
    """
    if "run_config" not in group.attrs:
        return ["no run_config attribute, so not a finished `wsi-prune run` store"]
    cfg = RunConfig.from_dict(group.attrs["run_config"])
    ts, tok, vit = cfg.tile_select, cfg.token_select, cfg.vit
    out = []
    if ts.policy != "all":
        out.append(f"tile_select.policy is {ts.policy!r}")
    if ts.redundancy_eps is not None:
        out.append(f"tile_select.redundancy_eps is {ts.redundancy_eps}")
    n_tiles = int(group["tiles/coords"].shape[0]) if "tiles/coords" in group else n_vit
    if n_vit < n_tiles:  # e.g. tile_select.max_tiles capped an "all" selection
        out.append(f"{n_vit} of {n_tiles} tissue tiles reached the ViT")
    if tok.policy != "all" and not (tok.policy == "ratio" and tok.keep_ratio >= 1.0):
        out.append(f"token_select.policy is {tok.policy!r}")
    if vit.prune_blocks and not (vit.prune_policy == "ratio" and vit.keep_ratio >= 1.0):
        out.append(f"vit.prune_blocks is {list(vit.prune_blocks)}")
    return out


def _choose(positive: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``cap`` tiles, half of them positive when there are enough
    (lesions cover a few % of a CAMELYON slide; without this the scorer learns "never")."""
    n = len(positive)
    if cap is None or n <= cap:
        return np.arange(n)
    pos, neg = rng.permutation(np.flatnonzero(positive)), rng.permutation(np.flatnonzero(~positive))
    n_pos = min(len(pos), max(cap // 2, cap - len(neg)))
    return np.sort(np.concatenate([pos[:n_pos], neg[: cap - n_pos]]))


def _augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """The same random rot90/flip of each tile (B, h, w, 3) and its patch map (B, G, G)."""
    x, y = x.copy(), y.copy()
    for i in range(len(x)):
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        xi, yi = np.rot90(x[i], k), np.rot90(y[i], k)
        if flip:
            xi, yi = xi[:, ::-1], yi[:, ::-1]
        x[i], y[i] = xi, yi
    return x, y


def train_scorer(
    stores: Sequence[PathLike],
    annotations: Mapping[str, Annotations] | PathLike | None,
    out_path: PathLike,
    *,
    distill: bool = False,
    tile_teacher: bool = False,
    config: ScorerConfig | None = None,
    grid: int | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    max_tiles_per_store: int | None = 512,
    tile_loss_weight: float = 1.0,
    augment: bool = True,
    pretrained_backbone: bool = False,
    init_weights: PathLike | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> ScorerTrainResult:
    """Train the triage scorer's patch map and tile score from slide stores.

    Annotation targets: the fraction of each ViT patch inside a lesion (see
    :func:`patch_targets`), and for the tile score the same pooling of that map as the scorer
    uses (max: the largest patch fraction). Distillation targets (``distill=True``): the dense
    ViT's ``vit/token_importance`` of each kept tile, min-max normalised per tile (the store must
    come from a dense run, ``RunConfig.dense()``: pruned runs are refused), and for the tile
    score ``mil/attention`` divided by the slide's maximum when present (else no tile
    loss). ``tile_teacher=True`` replaces the tile targets of either mode with the dense ViT's
    tile lesion probabilities (:func:`_teacher_tile_targets`; dense run stores whose ViT
    ``train-vit`` trained), draws the tiles the ViT rates highest like lesion tiles, and
    learns them with a pairwise ranking loss (:func:`_rank_loss`: triage uses the tile score
    only through its order). The loss is the patch BCE (on logits) plus ``tile_loss_weight``
    times the tile loss (BCE, or the ranking loss with ``tile_teacher``).

    Args:
        stores: tile or run stores (``<id>.zarr``) or folders of them; need ``tiles/coarse``,
            ``tiles/coords`` and attrs ``grid`` (plus ``vit/*`` for distillation).
        annotations: slide id → lesion polygons (level-0 px), or a folder of ASAP XML files
            ``<id>.xml``; a store without an entry is lesion-free. Unused when distilling.
        out_path: the ``.safetensors`` file to write; its ``.json`` config goes next to it.
        distill: targets from a dense ViT run instead of annotations.
        tile_teacher: tile targets from the dense ViT run's tile head (see above).
        config: scorer architecture and pooling (default :class:`ScorerConfig`).
        grid: G of the ViT patch grid (default 14 = 224 px / patch 16; a distillation store
            fixes it).
        epochs / lr / batch_size: AdamW schedule (cosine decay of ``lr`` to 0).
        seed: seeds tile sampling, batch order, augmentation and initialisation.
        max_tiles_per_store: tiles drawn per store, half with lesion when possible (None: all).
        tile_loss_weight: weight of the tile-score BCE.
        augment: random rot90/flips (tile and target map together).
        pretrained_backbone: start from timm's ImageNet weights (downloads; needs network).
        init_weights: a scorer weights file to fine-tune from.
        threads: torch intra-op threads while training (restored afterwards); None: unchanged.
        progress: show a progress bar.

    Raises:
        ConfigError: bad arguments or fewer than two tiles. StoreError: unusable store, or a
            distillation source that is not a dense run (its config or arrays show pruning).
    """
    t0 = time.perf_counter()
    out_path = check_out(out_path)
    config = config or ScorerConfig()
    if epochs < 1 or batch_size < 2 or lr <= 0:
        raise ConfigError("train-scorer needs epochs >= 1, batch_size >= 2 and lr > 0")
    if not distill and annotations is None:
        raise ConfigError("train-scorer needs annotations, or distillation from a dense run")
    polygons = None if distill else load_annotations(annotations)  # type: ignore[arg-type]
    paths = find_stores(stores)
    rng = np.random.default_rng(seed)
    tiles, patch_t, tile_t, grid, attrs = _scorer_data(paths, polygons, grid, config,
                                                       max_tiles_per_store, rng, tile_teacher)
    n = len(tiles)
    n_pos = int((patch_t.reshape(n, -1).max(axis=1) > 0).sum())
    _logger.info("train-scorer: %d tiles (%d with target mass) from %d stores, grid %d",
                 n, n_pos, len(paths), grid)
    losses: list[float] = []
    with seeded(seed, threads):
        model = PatchScorer(config, grid, pretrained=pretrained_backbone)
        if init_weights is not None:
            load_into(model, init_weights)
        model = model.to(memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        # Balanced splits: no trailing batch of one tile, which BatchNorm cannot train on.
        n_batches = max(1, n // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * n_batches)
        bar = tqdm(total=epochs * n_batches, desc="train-scorer", unit="batch",
                   disable=not progress)
        for epoch in range(epochs):
            total = 0.0
            for idx in np.array_split(rng.permutation(n), n_batches):
                x, y = tiles[idx], patch_t[idx]
                if augment:
                    x, y = _augment(x, y, rng)
                loss = _scorer_loss(model, x, y, tile_t[idx], config, tile_loss_weight,
                                    rank=tile_teacher)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                bar.update(1)
            losses.append(total / n)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
        bar.close()
    model.eval()
    meta = {
        "kind": SCORER_KIND, "format": 1, "model": config.model,
        "feature_levels": list(config.feature_levels), "head_channels": config.head_channels,
        "grid": grid, "pooling": config.pooling, "topk": config.topk,
        "coarse_px": attrs.get("coarse_px"), "coarse_mpp": attrs.get("coarse_mpp"),
        "targets": "distill" if distill else "annotations",
        "tile_targets": "vit-tile-head" if tile_teacher else (
            "mil-attention" if distill else "annotations"),
        "training": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                     "max_tiles_per_store": max_tiles_per_store, "augment": augment,
                     "tile_loss_weight": tile_loss_weight,
                     "tile_loss": f"rank (tau {RANK_TAU})" if tile_teacher else "bce",
                     "n_stores": len(paths),
                     "n_tiles": n, "n_positive": n_pos, "losses": losses},
    }
    config_path = save_model(model, out_path, meta)
    return ScorerTrainResult(out_path, config_path, losses, n, n_pos, grid,
                             time.perf_counter() - t0, model)


#: temperature of the teacher's pairwise preferences (logit units): below 1 the order is what
#: is taught, not the teacher's confidence in it
RANK_TAU = 0.1


def _scorer_loss(
    model: PatchScorer, x: np.ndarray, y: np.ndarray, tile_target: np.ndarray,
    config: ScorerConfig, tile_weight: float, rank: bool = False,
) -> torch.Tensor:
    """Patch BCE on logits + weighted tile loss on the pooled score (tiles with a target): BCE,
    or with ``rank`` the pairwise ranking loss of :func:`_rank_loss`."""
    xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # channels_last view
    logits, _ = model.forward_logits(xt)
    loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y))
    t = torch.from_numpy(tile_target)
    has = ~torch.isnan(t)
    if tile_weight > 0 and bool(has.sum() >= (2 if rank else 1)):
        score = pool_patch_map(torch.sigmoid(logits), config.pooling, config.topk)
        eps = 1e-6
        score, t = score[has].clamp(eps, 1 - eps), t[has]
        tile = _rank_loss(torch.logit(score), torch.logit(t.clamp(eps, 1 - eps))) if rank else \
            F.binary_cross_entropy(score, t)
        loss = loss + tile_weight * tile
    return loss


def _rank_loss(z: torch.Tensor, teacher: torch.Tensor, tau: float = RANK_TAU) -> torch.Tensor:
    """RankNet loss over every pair of a batch: the logit difference ``z_i - z_j`` against the
    teacher's soft preference ``sigmoid(teacher_i - teacher_j)`` (both logits).

    Triage uses the tile score only through its order (the top share of a slide, a threshold
    set at a quantile of the training scores, the fill of the heat map below the ViT's tiles),
    so the scorer learns the ViT's order rather than its probabilities: soft-target BCE on
    probabilities that mostly lie in a narrow band (normal tissue) gives the order little
    gradient.
    """
    d = z[:, None] - z[None, :]
    q = torch.sigmoid((teacher[:, None] - teacher[None, :]) / tau)
    off = ~torch.eye(len(z), dtype=torch.bool)
    return F.binary_cross_entropy_with_logits(d[off], q[off])
