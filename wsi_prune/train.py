"""Training the CNN triage scorer and the gated-ABMIL slide head from slide stores.

Both trainers read the Zarr stores that tiling and ``run`` write (see ``store.py``), so training
needs no slide reads of its own:

* :func:`train_scorer` fits the scorer's patch map to lesion annotations (targets: the fraction
  of each ViT patch inside a lesion, rasterised from level-0 polygons) or, by distillation, to a
  dense ViT's token importance (``vit/token_importance``) as DynamicViT distils from its teacher.
* :func:`train_mil` fits the slide head on ``vit/embedding`` with slide labels, k-fold
  cross-validated with early stopping on validation loss, then trains the final model on every
  slide for the folds' median best epoch count.

Both are deterministic for a seed and thread count, and both write ``<name>.safetensors`` plus a
``<name>.json`` config that :func:`~wsi_prune.models.scorer.trained_scorer_config` and
:func:`~wsi_prune.models.mil.trained_mil_config` read back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsi_prune import __version__
from wsi_prune._files import file_sha256
from wsi_prune._ids import lookup_slide, slide_id
from wsi_prune.config import MILConfig, RunConfig, ScorerConfig
from wsi_prune.errors import ConfigError, StoreError, TrainingError
from wsi_prune.io.annotations import Annotation, read_asap_xml, region_masks
from wsi_prune.io.labels import parse_label, read_labels
from wsi_prune.io.store import open_store
from wsi_prune.models.checkpoints import load_into, save_safetensors
from wsi_prune.models.mil import MIL_KIND, GatedABMIL
from wsi_prune.models.scorer import SCORER_KIND, PatchScorer, pool_patch_map
from wsi_prune.models.sidecars import write_sidecar

_logger = logging.getLogger(__name__)
__all__ = [
    "MILTrainResult",
    "ScorerTrainResult",
    "TrainingError",
    "find_stores",
    "load_annotations",
    "parse_label",
    "patch_targets",
    "read_labels",
    "slide_id",
    "train_mil",
    "train_scorer",
]

PathLike = str | os.PathLike[str]
Annotations = Sequence[Annotation | np.ndarray]


# -- stores and ids -------------------------------------------------------------------------------
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


# -- annotations and patch targets (labels: parse_label, read_labels of wsi_prune.io.annotations) --
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


# -- scorer training -----------------------------------------------------------------------------
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, dict[str, Any]]:
    """Coarse tiles (n, cp, cp, 3) uint8, patch targets (n, G, G), tile targets (n,) (NaN: none),
    G, and the store grid attrs of the first store."""
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
        keep = _choose(targets.reshape(len(targets), -1).max(axis=1) > 0, max_tiles, rng)
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
    pruned = _pruning(group, len(idx))
    if pruned:
        raise StoreError("distillation needs a dense run store (every tissue tile and token "
                         "through the ViT, as RunConfig.dense() runs), but this run pruned: "
                         + "; ".join(pruned), path)
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
    loss). The loss is the patch BCE (on logits) plus ``tile_loss_weight`` times the tile BCE.

    Args:
        stores: tile or run stores (``<id>.zarr``) or folders of them; need ``tiles/coarse``,
            ``tiles/coords`` and attrs ``grid`` (plus ``vit/*`` for distillation).
        annotations: slide id → lesion polygons (level-0 px), or a folder of ASAP XML files
            ``<id>.xml``; a store without an entry is lesion-free. Unused when distilling.
        out_path: the ``.safetensors`` file to write; its ``.json`` config goes next to it.
        distill: targets from a dense ViT run instead of annotations.
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
    out_path = _check_out(out_path)
    config = config or ScorerConfig()
    if epochs < 1 or batch_size < 2 or lr <= 0:
        raise ConfigError("train-scorer needs epochs >= 1, batch_size >= 2 and lr > 0")
    if not distill and annotations is None:
        raise ConfigError("train-scorer needs annotations, or distillation from a dense run")
    polygons = None if distill else load_annotations(annotations)  # type: ignore[arg-type]
    paths = find_stores(stores)
    rng = np.random.default_rng(seed)
    tiles, patch_t, tile_t, grid, attrs = _scorer_data(paths, polygons, grid, config,
                                                       max_tiles_per_store, rng)
    n = len(tiles)
    n_pos = int((patch_t.reshape(n, -1).max(axis=1) > 0).sum())
    _logger.info("train-scorer: %d tiles (%d with target mass) from %d stores, grid %d",
                 n, n_pos, len(paths), grid)
    losses: list[float] = []
    with _seeded(seed, threads):
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
                loss = _scorer_loss(model, x, y, tile_t[idx], config, tile_loss_weight)
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
        "training": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                     "max_tiles_per_store": max_tiles_per_store, "augment": augment,
                     "tile_loss_weight": tile_loss_weight, "n_stores": len(paths),
                     "n_tiles": n, "n_positive": n_pos, "losses": losses},
    }
    config_path = _save(model, out_path, meta)
    return ScorerTrainResult(out_path, config_path, losses, n, n_pos, grid,
                             time.perf_counter() - t0, model)


def _scorer_loss(
    model: PatchScorer, x: np.ndarray, y: np.ndarray, tile_target: np.ndarray,
    config: ScorerConfig, tile_weight: float,
) -> torch.Tensor:
    """Patch BCE on logits + weighted tile BCE on the pooled score (tiles with a target)."""
    xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # channels_last view
    logits, _ = model.forward_logits(xt)
    loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y))
    t = torch.from_numpy(tile_target)
    has = ~torch.isnan(t)
    if tile_weight > 0 and bool(has.any()):
        score = pool_patch_map(torch.sigmoid(logits), config.pooling, config.topk)
        eps = 1e-6
        loss = loss + tile_weight * F.binary_cross_entropy(score[has].clamp(eps, 1 - eps), t[has])
    return loss


# -- MIL training --------------------------------------------------------------------------------
@dataclass
class MILTrainResult:
    """What :func:`train_mil` did.

    Attributes:
        weights / config: files written.
        fold_auc: validation ROC AUC of each fold at its best epoch (empty with folds=1).
        fold_loss: best validation loss of each fold.
        best_epochs: epoch (1-based) of each fold's best validation loss.
        stopped_epochs: epochs each fold ran before early stopping (or the maximum).
        oof_auc: ROC AUC of the pooled out-of-fold predictions (NaN with folds=1).
        final_epochs: epochs of the final model trained on every slide.
        slides: ids of the slides used, with labels.
        seconds: wall time.
        model: the final model (eval mode).
    """

    weights: Path
    config: Path
    fold_auc: list[float]
    fold_loss: list[float]
    best_epochs: list[int]
    stopped_epochs: list[int]
    oof_auc: float
    final_epochs: int
    slides: dict[str, int]
    seconds: float
    model: GatedABMIL

    @property
    def mean_auc(self) -> float:
        """Mean of :attr:`fold_auc` (NaN without folds)."""
        return float(np.mean(self.fold_auc)) if self.fold_auc else float("nan")

    def summary(self) -> str:
        """One line: slides, per-fold validation AUC, mean and out-of-fold AUC, final epochs."""
        folds = ", ".join(f"{a:.3f}" for a in self.fold_auc) or "none"
        return (f"{len(self.slides)} slides ({sum(self.slides.values())} positive); val AUC "
                f"per fold [{folds}], mean {self.mean_auc:.3f}, out-of-fold {self.oof_auc:.3f}; "
                f"final model {self.final_epochs} epochs")


@dataclass(frozen=True)
class _MILSettings:
    epochs: int
    lr: float
    weight_decay: float
    patience: int
    batch_bags: int
    max_instances: int | None


def _mil_data(
    stores: Sequence[Path], labels: Mapping[str, int]
) -> tuple[list[torch.Tensor], np.ndarray, list[str]]:
    bags, ys, ids, unlabelled = [], [], [], []
    for path in stores:
        sid = slide_id(path)
        label = lookup_slide(labels, sid)
        if label is None:
            unlabelled.append(sid)
            continue
        group = open_store(path)
        if "vit/embedding" not in group:
            raise StoreError("no vit/embedding: train-mil needs run stores", path)
        emb = np.asarray(group["vit/embedding"][:], np.float32)
        if emb.ndim != 2 or not len(emb):
            _logger.warning("%s: no kept-tile embedding, slide skipped", path)
            continue
        if bags and emb.shape[1] != bags[0].shape[1]:
            raise StoreError(f"embedding width {emb.shape[1]} differs from the other stores' "
                             f"{bags[0].shape[1]} (another ViT?)", path)
        bags.append(torch.from_numpy(emb))
        ys.append(int(label))
        ids.append(sid)
    if unlabelled:
        _logger.warning("%d store(s) without a label skipped: %s", len(unlabelled),
                        ", ".join(unlabelled[:5]))
    y = np.asarray(ys, np.int64)
    if len(set(ys)) < 2:
        raise ConfigError(f"train-mil needs labelled slides of both classes, got {len(ys)} "
                          f"slide(s) with labels {sorted(set(ys))}")
    return bags, y, ids


def _parse_labels(labels: Mapping[str, int | str]) -> dict[str, int]:
    try:
        return {str(k): parse_label(str(v)) for k, v in labels.items()}
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _pad(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Kmax, D) zero-padded batch and its (B, Kmax) bool mask."""
    k = max(len(b) for b in bags)
    x = torch.zeros((len(bags), k, bags[0].shape[1]))
    mask = torch.zeros((len(bags), k), dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x, mask


def _mil_epoch(model: GatedABMIL, opt: torch.optim.Optimizer, bags: list[torch.Tensor],
               y: np.ndarray, idx: np.ndarray, s: _MILSettings, rng: np.random.Generator) -> float:
    model.train()
    order = rng.permutation(idx)
    total = 0.0
    for chunk in np.array_split(order, max(1, math.ceil(len(order) / s.batch_bags))):
        batch = []
        for i in chunk:
            b = bags[i]
            if s.max_instances is not None and len(b) > s.max_instances:
                b = b[torch.from_numpy(np.sort(rng.choice(len(b), s.max_instances, False)))]
            batch.append(b)
        x, mask = _pad(batch)
        out = model(x, mask)
        loss = F.binary_cross_entropy_with_logits(out.logit, torch.from_numpy(y[chunk]).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(chunk)
    return total / len(order)


@torch.no_grad()
def _mil_predict(model: GatedABMIL, bags: list[torch.Tensor], idx: np.ndarray,
                 batch_bags: int) -> np.ndarray:
    """Slide logits (len(idx),) in eval mode, on whole bags."""
    model.eval()
    out = [model(*_pad([bags[i] for i in chunk])).logit
           for chunk in np.array_split(idx, max(1, math.ceil(len(idx) / batch_bags)))]
    return torch.cat(out).numpy()


def _bce(logits: np.ndarray, y: np.ndarray) -> float:
    return float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits),
                                                    torch.from_numpy(y).float()))


def _fit_fold(
    in_dim: int, cfg: MILConfig, bags: list[torch.Tensor], y: np.ndarray, train: np.ndarray,
    val: np.ndarray, s: _MILSettings, seed: int, bar: tqdm,
) -> tuple[GatedABMIL, float, int, int, np.ndarray]:
    """Train with early stopping on validation loss; returns the best model, its loss, its epoch
    (1-based), the epochs run and the validation logits."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = GatedABMIL(in_dim, cfg.hidden, cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    best = (math.inf, 0, None, None)
    epoch = 0
    for epoch in range(1, s.epochs + 1):
        _mil_epoch(model, opt, bags, y, train, s, rng)
        logits = _mil_predict(model, bags, val, s.batch_bags)
        loss = _bce(logits, y[val])
        bar.update(1)
        if loss < best[0] - 1e-6:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = (loss, epoch, state, logits)
        elif epoch - best[1] >= s.patience:
            bar.update(s.epochs - epoch)
            break
    if best[2] is None:
        # NaN never compares below inf: no epoch was ever "best", and there is no state to
        # restore. Keeping the last (diverged) state would save a model that predicts NaN.
        raise TrainingError(f"validation loss was never finite ({loss} after {epoch} "
                            f"epoch(s)): non-finite embeddings in a store, or lr {s.lr:g} too "
                            f"high")
    model.load_state_dict(best[2])
    return model.eval(), best[0], best[1], epoch, best[3]


def train_mil(
    stores: Sequence[PathLike],
    labels_csv: PathLike | Mapping[str, int | str],
    out_path: PathLike,
    *,
    folds: int = 5,
    epochs: int = 100,
    lr: float = 2e-4,
    patience: int = 10,
    hidden: int = 128,
    dropout: float = 0.25,
    weight_decay: float = 1e-4,
    batch_bags: int = 8,
    max_instances: int | None = 4096,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> MILTrainResult:
    """Train the gated-ABMIL slide head on the ``vit/embedding`` bags of run stores.

    With ``folds >= 2``: stratified k-fold cross-validation, each fold trained with early stopping
    on its validation BCE (best epoch restored), validation ROC AUC per fold and of the pooled
    out-of-fold predictions; then the final model is trained on every slide for the median best
    epoch count. With ``folds == 1``: one model on every slide for ``epochs``.

    Args:
        stores: run stores (``<id>.zarr`` with ``vit/embedding`` (K, D)) or run folders.
        labels_csv: ``slide,label`` CSV (see :func:`read_labels`) or a mapping id → label.
            Stores without a label are skipped with a warning.
        out_path: the ``.safetensors`` file to write; its ``.json`` config goes next to it.
        folds: k of the cross-validation (each class needs >= k slides), or 1.
        epochs: maximum epochs per fold; patience: epochs without a better validation loss
            before stopping.
        lr / weight_decay: AdamW.
        hidden / dropout: the head (see :class:`~wsi_prune.models.mil.GatedABMIL`).
        batch_bags: bags per step (padded, masked).
        max_instances: training draws at most this many tiles of a bag per step (memory);
            validation and prediction use whole bags.
        seed: seeds folds, initialisation, order, dropout and instance draws.
        threads: torch intra-op threads while training (restored afterwards); None: unchanged.
            Small heads train fastest on 1 thread, and far faster on a busy machine.
        progress: show a progress bar.

    Raises:
        ConfigError: bad arguments, labels or too few slides per class. StoreError: bad store.
        TrainingError: a fold whose validation loss is never finite.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    t0 = time.perf_counter()
    out_path = _check_out(out_path)
    if folds < 1 or epochs < 1 or patience < 1 or lr <= 0 or batch_bags < 1:
        raise ConfigError("train-mil needs folds, epochs, patience, batch_bags >= 1 and lr > 0")
    cfg = MILConfig(hidden=hidden, dropout=dropout)
    labels = (read_labels(labels_csv) if not isinstance(labels_csv, Mapping)
              else _parse_labels(labels_csv))
    bags, y, ids = _mil_data(find_stores(stores), labels)
    in_dim = int(bags[0].shape[1])
    s = _MILSettings(epochs, lr, weight_decay, patience, batch_bags, max_instances)
    counts = np.bincount(y, minlength=2)
    if folds > 1 and counts.min() < folds:
        raise ConfigError(f"{folds}-fold cross-validation needs >= {folds} slides per class, "
                          f"got {counts[0]} negative and {counts[1]} positive")
    fold_auc, fold_loss, best_epochs, stopped = [], [], [], []
    oof = np.full(len(y), np.nan)
    with _seeded(seed, threads):
        bar = tqdm(total=epochs * (folds + (folds == 1)), desc="train-mil", unit="epoch",
                   disable=not progress)
        if folds > 1:
            split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            for f, (tr, va) in enumerate(split.split(np.zeros(len(y)), y)):
                bar.set_postfix(fold=f + 1)
                _, loss, ep, ran, logits = _fit_fold(in_dim, cfg, bags, y, tr, va, s,
                                                     seed * 1000 + f + 1, bar)
                oof[va] = logits
                fold_loss.append(loss)
                best_epochs.append(ep)
                stopped.append(ran)
                fold_auc.append(float(roc_auc_score(y[va], logits)))
                _logger.info("fold %d/%d: val AUC %.3f, val loss %.4f at epoch %d", f + 1,
                             folds, fold_auc[-1], loss, ep)
            final_epochs = max(1, int(round(float(np.median(best_epochs)))))
        else:
            final_epochs = epochs
        bar.total = bar.n + final_epochs
        bar.set_postfix(fold="final")
        model = _fit_final(in_dim, cfg, bags, y, s, final_epochs, seed, bar)
        bar.close()
    oof_auc = float(roc_auc_score(y, oof)) if folds > 1 else float("nan")
    meta = {
        "kind": MIL_KIND, "format": 1, "in_dim": in_dim, "hidden": hidden, "n_classes": 1,
        "dropout": dropout, "threshold": 0.5,
        "cv": {"folds": folds, "val_auc": fold_auc, "val_loss": fold_loss,
               "best_epoch": best_epochs, "stopped_epoch": stopped,
               "mean_val_auc": float(np.mean(fold_auc)) if fold_auc else None,
               "oof_auc": None if math.isnan(oof_auc) else oof_auc},
        "training": {"epochs": epochs, "final_epochs": final_epochs, "lr": lr,
                     "weight_decay": weight_decay, "patience": patience, "seed": seed,
                     "batch_bags": batch_bags, "max_instances": max_instances,
                     "n_slides": len(y), "n_positive": int(y.sum()),
                     "slides": dict(zip(ids, y.tolist(), strict=True))},
    }
    config_path = _save(model, out_path, meta)
    return MILTrainResult(out_path, config_path, fold_auc, fold_loss, best_epochs, stopped,
                          oof_auc, final_epochs, dict(zip(ids, y.tolist(), strict=True)),
                          time.perf_counter() - t0, model)


def _fit_final(in_dim: int, cfg: MILConfig, bags: list[torch.Tensor], y: np.ndarray,
               s: _MILSettings, epochs: int, seed: int, bar: tqdm) -> GatedABMIL:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = GatedABMIL(in_dim, cfg.hidden, cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    everything = np.arange(len(y))
    for _ in range(epochs):
        _mil_epoch(model, opt, bags, y, everything, s, rng)
        bar.update(1)
    return model.eval()


# -- shared --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _seeded(seed: int, threads: int | None) -> Iterator[None]:
    """Seed a fork of torch's CPU RNG (the caller's stream is left as it was) and set the
    intra-op thread count for the block; results are reproducible for a seed and thread count."""
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    prev = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(prev)


# -- output --------------------------------------------------------------------------------------
def _check_out(out_path: PathLike) -> Path:
    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise ConfigError("the output must be a .safetensors file (its .json goes next to it)",
                          out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _save(model: torch.nn.Module, out_path: Path, meta: dict[str, Any]) -> Path:
    save_safetensors(model, out_path, metadata={"kind": meta["kind"],
                                                "wsi_prune_version": __version__})
    meta = {**meta, "weights": out_path.name, "sha256": file_sha256(out_path),
            "wsi_prune_version": __version__}
    path = write_sidecar(out_path, meta)
    _logger.info("wrote %s and %s", out_path, path)
    return path

