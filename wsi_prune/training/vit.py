"""Training a small ViT here, so that its CLS attention means something.

Real pathology foundation models (UNI and others, from local files) are the production path;
this is the stand-in the project can train on 2 CPU cores: by default a 6-block ViT-Ti
(``vit_tiny_patch16_224`` with ``depth: 6``, 192 wide, 3 heads, 5.5 M parameters), trained from
scratch on full-resolution tiles (224 px at 0.5 µm/px) read from the slides of tile or run
stores, with two targets from ASAP lesion outlines:

* the tile label (a patch of the tile is at least half lesion) on the pooled embedding (the one
  ``run`` feeds the MIL head), through a linear head;
* the lesion fraction of every patch, on the patch tokens, through a second linear head (dense
  supervision: the tokens of lesion patches become distinguishable, and the CLS token, trained
  to find lesion, learns to attend to them).

The weights file holds the backbone only, loaded by ``run`` through ``vit.weights``. The tile
head is saved beside it (``<name>.tile-head.safetensors``, named in the sidecar): the per-tile
lesion logit that the ``tile-topk`` slide head (:class:`wsi_prune.models.mil.TileTopK`) starts
from, so ``train-mil --model tile-topk`` only calibrates how the top tiles make a slide score.
The sidecar records the architecture, the data it saw, and validation metrics on held-out
slides: tile AUC, patch AUC and the AUC of the CLS attention of the last block for lesion
versus non-lesion patches inside lesion tiles (does attention-based pruning keep lesion tokens?).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsi_prune._files import file_sha256
from wsi_prune._ids import lookup_slide, slide_id
from wsi_prune.config import TilingConfig, ViTConfig
from wsi_prune.errors import ConfigError, StoreError
from wsi_prune.io.slide import Slide
from wsi_prune.io.store import open_store
from wsi_prune.io.tiling import read_tiles
from wsi_prune.models.checkpoints import load_into, save_safetensors
from wsi_prune.models.pruned_vit import PrunedViT, build_vit
from wsi_prune.models.sidecars import VIT_KIND
from wsi_prune.training._common import (
    PathLike,
    check_out,
    end_epoch,
    input_norm,
    normalised,
    optimiser_step,
    save_model,
    seeded,
)
from wsi_prune.training.data import Annotations, find_stores, load_annotations, patch_targets

_logger = logging.getLogger(__name__)

#: the default stand-in: ViT-Ti/16 cut to 6 blocks
DEFAULT_VIT = ViTConfig(model="vit_tiny_patch16_224", model_kwargs={"depth": 6},
                        prune_blocks=(2, 4))
#: the tile head is saved as ``<weights stem>`` + this, beside the backbone
TILE_HEAD_SUFFIX = ".tile-head.safetensors"
#: ``kind`` in the tile head's safetensors header
TILE_HEAD_KIND = "wsi-prune-tile-head"
#: a patch at least this much inside a lesion is a lesion patch (tile label, attention AUC)
LESION_PATCH = 0.5


@dataclass
class ViTTrainResult:
    """What :func:`train_vit` did.

    Attributes:
        weights / config: files written.
        losses: mean training loss per epoch.
        n_train / n_val: training and validation tiles; n_positive: training lesion tiles.
        val: validation metrics on held-out slides (``tile_auc``, ``patch_auc``,
            ``attention_auc``; None where a class is missing).
        seconds: wall time; stopped_early: the time budget ended training.
        model: the trained backbone (eval mode, no head).
    """

    weights: Path
    config: Path
    losses: list[float]
    n_train: int
    n_val: int
    n_positive: int
    val: dict[str, float | None]
    seconds: float
    stopped_early: bool
    model: torch.nn.Module


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).ravel() > 0.5
    return float(roc_auc_score(y, np.asarray(s).ravel())) if 0 < y.sum() < y.size else None


def _tiles_of(path: Path, polygons: Mapping[str, list], grid: int, cap: int | None,
              tiling: TilingConfig, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution tiles (n, tp, tp, 3) uint8 and patch targets (n, G, G) of one store,
    at most ``cap`` (half of them lesion tiles when there are enough)."""
    group = open_store(path)
    anns = lookup_slide(polygons, slide_id(path))
    grid_attrs = dict(group.attrs.get("grid") or {})
    if "tile_level0" not in grid_attrs or "tiles/coords" not in group:
        raise StoreError("not a tile store: needs tiles/coords and attrs grid", path)
    if abs(float(grid_attrs["mpp"]) - tiling.mpp) > 1e-6 or \
            int(grid_attrs["tile_px"]) != tiling.tile_px:
        raise StoreError(f"tiles of {grid_attrs['tile_px']} px at {grid_attrs['mpp']} µm/px, "
                         f"the ViT is trained on {tiling.tile_px} px at {tiling.mpp}", path)
    coords = np.asarray(group["tiles/coords"][:])
    tl0 = float(grid_attrs["tile_level0"])
    targets = patch_targets(coords, tl0, grid, anns or [])
    lesion = targets.reshape(len(targets), -1).max(axis=1) >= LESION_PATCH
    pos, neg = np.flatnonzero(lesion), np.flatnonzero(~lesion)
    if cap is not None and len(pos) + len(neg) > cap:
        n_pos = min(len(pos), cap // 2) if len(neg) >= cap - cap // 2 else min(len(pos),
                                                                             cap - len(neg))
        pos = rng.choice(pos, n_pos, replace=False)
        neg = rng.choice(neg, min(len(neg), cap - n_pos), replace=False)
    idx = np.sort(np.concatenate([pos, neg]).astype(np.int64))
    info = group.attrs["slide"]
    with Slide(info["path"], float(group.attrs["mpp"])) as slide:
        pix, _ = read_tiles(slide, coords[idx], tl0, tiling.mpp, tiling.tile_px)
    return pix, targets[idx].astype(np.float32)


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 90° rotation and flip per batch (tiles and patch targets alike) and a per-image
    brightness/contrast/channel jitter (stain and scanner variation), on (B, 3, H, W) [0, 1]."""
    k = int(torch.randint(4, (1,), generator=gen))
    x, y = torch.rot90(x, k, (2, 3)), torch.rot90(y, k, (1, 2))
    if bool(torch.randint(2, (1,), generator=gen)):
        x, y = x.flip(3), y.flip(2)
    b = x.shape[0]
    gain = 1 + 0.08 * (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1)
    contrast = 1 + 0.15 * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * gain
    return x.clamp_(0, 1), y


class _Heads(torch.nn.Module):
    """Tile logit on the pooled embedding and a logit per patch token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.tile = torch.nn.Linear(dim, 1)
        self.patch = torch.nn.Linear(dim, 1)


def _forward(vit: torch.nn.Module, heads: _Heads, x: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    feats = vit.forward_features(x)  # (B, prefix + P, D), final norm applied
    pooled = vit.forward_head(feats, pre_logits=True)  # what run feeds the MIL head
    tile = heads.tile(pooled).squeeze(-1)
    patch = heads.patch(feats[:, vit.num_prefix_tokens:]).squeeze(-1)  # (B, P)
    return tile, patch


class _ClsRows:
    """Captures the qkv projections of chosen blocks during a forward pass (forward hooks, no
    second projection) and turns them into each block's CLS attention row over the patch
    tokens, head-averaged and renormalised: the quantity PrunedViT ranks tokens by."""

    def __init__(self, vit: torch.nn.Module, blocks: Sequence[int]) -> None:
        self.vit, self.out = vit, {}
        self.handles = [vit.blocks[b].attn.qkv.register_forward_hook(self._hook(b))
                        for b in blocks]

    def _hook(self, b: int):
        def hook(_mod: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
            self.out[b] = out
        return hook

    def rows(self) -> dict[int, torch.Tensor]:
        """Block -> (B, P) patch share of the CLS attention (sums to 1 per image)."""
        rows = {}
        npre = self.vit.num_prefix_tokens
        for b, qkv in self.out.items():
            attn = self.vit.blocks[b].attn
            bsz, n, _ = qkv.shape
            q, k, _v = qkv.reshape(bsz, n, 3, attn.num_heads, attn.head_dim).unbind(2)
            q, k = attn.q_norm(q), attn.k_norm(k)
            logits = torch.einsum("bhd,bnhd->bhn", q[:, 0], k) * attn.scale
            a = logits.softmax(-1).mean(1)[:, npre:]  # (B, P)
            rows[b] = a / a.sum(1, keepdim=True).clamp_min(1e-12)
        self.out = {}
        return rows

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _attention_loss(rows: dict[int, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Mean over blocks and over tiles with lesion patches of ``-log(CLS attention mass on
    lesion patches)``: the CLS token is taught to look at lesion tokens, which is what
    attention-based pruning keeps. Tiles without lesion add nothing."""
    lesion = (y.reshape(len(y), -1) >= LESION_PATCH).float()
    has = lesion.sum(1) > 0
    if not rows or not bool(has.any()):
        return y.new_zeros(())
    terms = [-(r[has] * lesion[has]).sum(1).clamp_min(1e-6).log().mean() for r in rows.values()]
    return torch.stack(terms).mean()


def _split_slides(ids: Sequence[str], has_lesion: Sequence[bool], val_fraction: float,
                  rng: np.random.Generator) -> set[str]:
    """Validation slide ids: a share of the lesion and of the lesion-free slides each."""
    val: set[str] = set()
    for flag in (True, False):
        group = [i for i, h in zip(ids, has_lesion, strict=True) if h == flag]
        n = int(round(val_fraction * len(group)))
        if val_fraction > 0 and len(group) >= 2:
            n = max(1, min(n, len(group) - 1))
        val.update(rng.choice(group, n, replace=False).tolist() if n else [])
    return val


@torch.no_grad()
def _evaluate(vit: torch.nn.Module, heads: _Heads, config: ViTConfig, x_u8: np.ndarray,
              y: np.ndarray, mean: torch.Tensor, std: torch.Tensor, bs: int
              ) -> dict[str, float | None]:
    """Validation AUCs: tile head, patch head, and the last block's CLS attention inside lesion
    tiles (lesion patches vs patches with no lesion)."""
    vit.eval()
    wrapper = PrunedViT(vit, dataclasses.replace(config, prune_blocks=()))
    pruner = PrunedViT(vit, config) if config.prune_blocks else None
    tile_s, patch_s, attn, kept = [], [], [], []
    for i in range(0, len(x_u8), bs):
        x = normalised(x_u8[i:i + bs], mean, std)
        t, p = _forward(vit, heads, x)
        tile_s.append(t.numpy())
        patch_s.append(p.numpy())
        attn.append(wrapper(x).token_importance.float().numpy())
        if pruner is not None:
            kept.append(pruner(x).kept[-1].numpy())
    flat = y.reshape(len(y), -1)
    tile_y = flat.max(axis=1) >= LESION_PATCH
    att, ps = np.concatenate(attn), np.concatenate(patch_s)
    mixed = tile_y & (flat == 0).any(axis=1)
    inside = (flat >= LESION_PATCH) | (flat == 0)
    return {
        "tile_auc": _auc(tile_y, np.concatenate(tile_s)),
        "patch_auc": _auc(flat[inside] >= LESION_PATCH, ps[inside]),
        "attention_auc": _auc(flat[mixed][inside[mixed]] >= LESION_PATCH,
                              att[mixed][inside[mixed]]),
        # the ViT's own in-network pruning (config.prune_blocks) alone, all tokens entering
        "lesion_token_recall": (float(np.concatenate(kept)[flat >= LESION_PATCH].mean())
                                if kept and (flat >= LESION_PATCH).any() else None),
        "kept_token_share": float(np.concatenate(kept).mean()) if kept else None,
        "n_tiles": int(len(y)), "n_lesion_tiles": int(tile_y.sum()),
        "n_mixed_tiles": int(mixed.sum()),
    }


def train_vit(
    stores: Sequence[PathLike],
    annotations: Mapping[str, Annotations] | PathLike,
    out_path: PathLike,
    *,
    config: ViTConfig = DEFAULT_VIT,
    tiling: TilingConfig | None = None,
    epochs: int = 8,
    lr: float = 5e-4,
    weight_decay: float = 0.05,
    batch_size: int = 32,
    max_tiles_per_store: int | None = 256,
    val_fraction: float = 0.2,
    patch_loss_weight: float = 1.0,
    attention_loss_weight: float = 1.0,
    augment: bool = True,
    max_minutes: float | None = None,
    init_weights: PathLike | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> ViTTrainResult:
    """Train a ViT on lesion-labelled full-resolution tiles of slide stores.

    Args:
        stores: tile or run stores (or run folders); their slides must still be where the store
            says (``attrs["slide"]["path"]``): pixels are read at ``tiling.mpp``.
        annotations: folder of ASAP XML ``<slide id>.xml`` (slides without one are lesion-free),
            or a mapping slide id -> outlines.
        out_path: ``.safetensors`` to write (backbone only); its ``.json`` goes next to it.
        config: the architecture (``model``, ``model_kwargs``); the run loads the result with
            ``vit.weights`` and takes the architecture from the sidecar.
        tiling: tile size and resolution (default :class:`TilingConfig`: 224 px at 0.5 µm/px).
        epochs / lr / weight_decay / batch_size: AdamW with cosine decay.
        max_tiles_per_store: tiles drawn per slide, half of them lesion tiles when there are
            enough (None: all).
        val_fraction: share of slides (of each of lesion and lesion-free) held out.
        patch_loss_weight: weight of the per-patch loss against the tile loss.
        attention_loss_weight: weight of the attention-guidance loss (:func:`_attention_loss`)
            on the CLS attention rows of ``config.prune_blocks`` and the last block; 0: off.
        max_minutes: stop after this much training time (the last finished epoch is kept).
        init_weights: backbone weights to fine-tune from (e.g. an earlier train-vit).
        seed / threads: determinism for a seed and thread count.

    Raises:
        ConfigError: no annotation matches a store, too few tiles, bad arguments.
        StoreError: a store is not a tile store or was tiled at another resolution.
    """
    t0 = time.perf_counter()
    tiling = tiling or TilingConfig()
    out = check_out(out_path)
    if epochs < 1 or batch_size < 2 or lr <= 0 or not 0 <= val_fraction < 1:
        raise ConfigError("train-vit needs epochs >= 1, batch_size >= 2, lr > 0 and "
                          "0 <= val_fraction < 1")
    polygons = load_annotations(annotations)
    paths = find_stores(stores)
    rng = np.random.default_rng(seed)
    with seeded(seed, threads):
        vit = build_vit(dataclasses.replace(config, weights=None, pretrained=False))
        if init_weights is not None:
            load_into(vit, init_weights)
        grid = int(vit.patch_embed.grid_size[0])
        if tuple(vit.patch_embed.img_size) != (tiling.tile_px, tiling.tile_px):
            raise ConfigError(f"{config.model} takes {vit.patch_embed.img_size} px, the tiles are "
                              f"{tiling.tile_px} px (set model_kwargs.img_size)")
        data = {}
        for p in tqdm(paths, desc="reading tiles", unit="slide", disable=not progress):
            data[slide_id(p)] = _tiles_of(p, polygons, grid, max_tiles_per_store, tiling, rng)
        if not any(lookup_slide(polygons, s) is not None for s in data):
            raise ConfigError(f"none of the {len(paths)} stores has an annotation file (named "
                              "<slide id>.xml like the stores)")
        ids = sorted(data)
        has_lesion = [bool((data[i][1] >= LESION_PATCH).any()) for i in ids]
        val_ids = _split_slides(ids, has_lesion, val_fraction, rng)
        x_tr = np.concatenate([data[i][0] for i in ids if i not in val_ids])
        y_tr = np.concatenate([data[i][1] for i in ids if i not in val_ids])
        x_va = np.concatenate([data[i][0] for i in ids if i in val_ids] or [x_tr[:0]])
        y_va = np.concatenate([data[i][1] for i in ids if i in val_ids] or [y_tr[:0]])
        if len(x_tr) < batch_size:
            raise ConfigError(f"{len(x_tr)} training tiles, fewer than one batch of {batch_size}")
        heads = _Heads(int(vit.num_features))
        params = list(vit.parameters()) + list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        steps_per_epoch = len(x_tr) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.1)
        mean, std = input_norm(vit)
        tile_y = torch.from_numpy((y_tr.reshape(len(y_tr), -1).max(1) >= LESION_PATCH)
                                  .astype(np.float32))
        gen = torch.Generator().manual_seed(seed)
        depth = len(vit.blocks)
        guided = sorted({*config.prune_blocks, depth - 1} & set(range(depth)))
        cls_rows = _ClsRows(vit, guided if attention_loss_weight > 0 else [])
        losses, stopped = [], False
        bar = tqdm(total=epochs * steps_per_epoch, desc="train-vit", unit="step",
                   disable=not progress)
        for _epoch in range(epochs):
            vit.train()
            heads.train()
            order = rng.permutation(len(x_tr))[: steps_per_epoch * batch_size]
            total = 0.0
            for step in range(steps_per_epoch):
                b = np.sort(order[step * batch_size:(step + 1) * batch_size])
                x = torch.from_numpy(x_tr[b]).permute(0, 3, 1, 2).float().div_(255)
                y = torch.from_numpy(y_tr[b])
                if augment:
                    x, y = _augment(x, y, gen)
                t_logit, p_logit = _forward(vit, heads, (x - mean) / std)
                loss = F.binary_cross_entropy_with_logits(t_logit, tile_y[b]) + \
                    patch_loss_weight * F.binary_cross_entropy_with_logits(
                        p_logit, y.reshape(len(b), -1))
                if attention_loss_weight > 0:
                    loss = loss + attention_loss_weight * _attention_loss(cls_rows.rows(), y)
                total += optimiser_step(loss, opt, sched, params)
                bar.update(1)
            stop, stopped = end_epoch(losses, total, steps_per_epoch, bar, t0, max_minutes,
                                      epochs, lr)
            if stop:
                break
        bar.close()
        cls_rows.close()
        val = (_evaluate(vit, heads, config, x_va, y_va, mean, std, batch_size) if len(x_va)
               else {})
    vit.eval()
    meta: dict[str, Any] = {
        "kind": VIT_KIND, "format": 1, "model": config.model,
        "model_kwargs": dict(config.model_kwargs), "grid": grid,
        "tile_px": tiling.tile_px, "mpp": tiling.mpp,
        "targets": "annotations", "val": val,
        "training": {"epochs": epochs, "epochs_run": len(losses), "lr": lr,
                     "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed,
                     "max_tiles_per_store": max_tiles_per_store, "augment": augment,
                     "patch_loss_weight": patch_loss_weight,
                     "attention_loss_weight": attention_loss_weight,
                     "guided_blocks": guided, "losses": losses,
                     "n_slides": len(ids), "val_slides": sorted(val_ids),
                     "n_train_tiles": int(len(x_tr)), "n_val_tiles": int(len(x_va)),
                     "n_positive": int(tile_y.sum()), "stopped_early": stopped,
                     "seconds": round(time.perf_counter() - t0, 1)},
    }
    head_path = out.with_name(out.stem + TILE_HEAD_SUFFIX)
    save_safetensors(heads.tile, head_path, metadata={"kind": TILE_HEAD_KIND})
    meta["tile_head"] = {"weights": head_path.name, "sha256": file_sha256(head_path),
                         "in_dim": int(vit.num_features), "target": "tile has a patch at "
                         f"least {LESION_PATCH} inside a lesion", "val_auc": val.get("tile_auc")}
    config_path = save_model(vit, out, meta)
    _logger.info("train-vit: %d tiles (%d lesion), val %s", len(x_tr), int(tile_y.sum()), val)
    return ViTTrainResult(out, config_path, losses, int(len(x_tr)), int(len(x_va)),
                          int(tile_y.sum()), val, time.perf_counter() - t0, stopped, vit)
