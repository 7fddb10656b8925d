"""Distilling a ViT into one that keeps its answer when pruned (train as you infer, for the ViT).

A ViT trained on whole 196-token tiles gives a different tile probability when the pipeline's
CNN prior lets only a quarter or an eighth of a tile's patches in and the ViT prunes more inside
(blocks 2 and 4): the pruned run then changes lesion candidates and calibration even where
triage kept the right tiles. DynamicViT fine-tunes the pruned model against its dense teacher;
this does the same for the pipeline's pruning:

* **teacher**: the ViT the pipeline is configured with (``config.vit.weights``), as a dense run
  of training slides saw it: the run's stored embedding of every tissue tile
  (``vit/embedding``) and the tile lesion logit of the tile head ``train-vit`` saved beside it;
* **student**: a copy of the teacher, run through :class:`~wsi_prune.models.pruned_vit.PrunedViT`
  exactly as ``run`` runs it: the CNN prior keeps each tile's patches the scorer rates highest
  (``token_select`` ratio ``r``), the ViT prunes at ``vit.prune_blocks``. ``r`` cycles over
  ``keep_ratios`` batch by batch; ``r = 1`` runs the student dense (every token, no pruning)
  so that its dense answer stays the teacher's;
* **loss**: squared error of the student's tile logit against the teacher's, plus the squared
  error of its embedding (what ABMIL heads read), scaled by the teacher embeddings' variance.
  No labels: the target is the dense answer, right or wrong.

Tiles are drawn per slide like the pipeline keeps them: half of ``max_tiles_per_store`` from the
tiles the scorer rates highest, the rest at random. Held-out slides measure, per ratio, how far
the student's pruned tile logits are from the teacher's dense ones, next to the teacher's own
pruned logits (the sidecar's ``val``).

The student is a ViT like any ``train-vit`` output (same sidecar kind, the teacher's tile head
copied beside it, ``distilled_from`` naming the teacher), loaded by ``run`` through
``vit.weights``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsi_prune._files import file_sha256
from wsi_prune._ids import slide_id
from wsi_prune.config import RunConfig
from wsi_prune.errors import ConfigError, StoreError
from wsi_prune.io.slide import Slide
from wsi_prune.io.store import TileShards, open_store
from wsi_prune.io.tiling import read_tiles
from wsi_prune.models.checkpoints import load_into
from wsi_prune.models.pruned_vit import PrunedViT, build_vit
from wsi_prune.models.scorer import build_scorer, score_tiles
from wsi_prune.models.sidecars import VIT_KIND, read_sidecar
from wsi_prune.selection.tokens import select_patches
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
from wsi_prune.training.data import find_stores
from wsi_prune.training.tile_topk import load_tile_head, tile_head_of
from wsi_prune.training.vit import TILE_HEAD_KIND, TILE_HEAD_SUFFIX

_logger = logging.getLogger(__name__)

#: token ratios a student learns by default: dense (its dense answer must stay the teacher's),
#: the default prior (half of each tile's patches) and the wider triages (a quarter, an eighth)
DEFAULT_KEEP_RATIOS = (1.0, 0.5, 0.25, 0.125)


@dataclass
class DistillResult:
    """What :func:`distill_vit` did.

    Attributes:
        weights / config: files written (student backbone and its sidecar).
        losses: mean training loss per epoch.
        n_train / n_val: training and held-out tiles.
        val: per keep ratio (``"r0.5"``…) on the held-out tiles, the teacher's pruned and the
            student's tile logits against the teacher's dense ones: ``teacher_rmse``,
            ``student_rmse`` (logit units), ``teacher_pearson``, ``student_pearson``,
            ``teacher_tokens`` / ``student_tokens`` (mean patch tokens after the last pruning).
        seconds: wall time; stopped_early: the time budget ended training.
        model: the student backbone (eval mode).
    """

    weights: Path
    config: Path
    losses: list[float]
    n_train: int
    n_val: int
    val: dict[str, dict[str, float]]
    seconds: float
    stopped_early: bool
    model: torch.nn.Module


@dataclass
class _Slide:
    pixels: np.ndarray  # (n, px, px, 3) uint8
    patch: np.ndarray  # (n, G, G) CNN patch importance
    embedding: np.ndarray  # (n, D) teacher embedding
    logit: np.ndarray  # (n,) teacher tile logit


def _teacher_of(config: RunConfig) -> tuple[Path, dict[str, Any], Path]:
    """Teacher weights, sidecar and tile head of ``config.vit.weights``.

    Raises:
        ConfigError: no weights, not a ``train-vit`` ViT, or no tile head beside it.
    """
    if not config.vit.weights:
        raise ConfigError("distill-vit needs vit.weights: the trained ViT to distil (the teacher)")
    w = Path(config.vit.weights)
    meta = read_sidecar(w, VIT_KIND)
    if meta is None:
        raise ConfigError("distill-vit needs a ViT written by train-vit (a wsi-prune-vit sidecar "
                          "naming its architecture)", w)
    head = tile_head_of(w)
    if head is None:
        raise ConfigError("distill-vit needs the tile head train-vit saves beside the ViT; this "
                          "one has none", w)
    return w, meta, head


def _check_run(group: Any, path: Path, teacher_sha: str) -> np.ndarray:
    """The dense run store's ``vit/tile_index``; refuses pruned runs and other ViTs."""
    from wsi_prune.training.scorer import dense_vit_index

    idx = dense_vit_index(group, path, "distill-vit needs")
    vit = ((group.attrs.get("models") or {}).get("vit") or {})
    if vit.get("sha256") != teacher_sha:
        raise StoreError(f"this run's ViT ({vit.get('weights') or 'untrained'}) is not the "
                         "teacher named by vit.weights (SHA-256 differs): run the training "
                         "slides densely with the teacher first", path)
    return idx


def _draw(score: np.ndarray, cap: int | None, top_share: float,
          rng: np.random.Generator) -> np.ndarray:
    """Sorted tile positions: ``top_share`` of ``cap`` with the highest scores, the rest at
    random among the others (all when there are at most ``cap``)."""
    n = len(score)
    if cap is None or n <= cap:
        return np.arange(n)
    n_top = int(round(top_share * cap))
    order = np.argsort(-score, kind="stable")
    top, rest = order[:n_top], order[n_top:]
    return np.sort(np.concatenate([top, rng.choice(rest, cap - n_top, replace=False)]))


def _load_slide(path: Path, config: RunConfig, scorer: torch.nn.Module, head: torch.nn.Linear,
                teacher_sha: str, cap: int | None, top_share: float,
                rng: np.random.Generator) -> _Slide:
    group = open_store(path)
    idx = _check_run(group, path, teacher_sha)
    grid = dict(group.attrs["grid"])
    tiling = config.tiling
    if abs(float(grid["mpp"]) - tiling.mpp) > 1e-6 or int(grid["tile_px"]) != tiling.tile_px:
        raise StoreError(f"tiles of {grid['tile_px']} px at {grid['mpp']} µm/px, the config's "
                         f"ViT reads {tiling.tile_px} px at {tiling.mpp}", path)
    out = score_tiles(scorer, TileShards(group["tiles/coarse"]), config.scorer.batch_size)
    patch, tile, _ = out.numpy()
    pick = _draw(tile[idx], cap, top_share, rng)
    rows = idx[pick]
    emb = np.asarray(group["vit/embedding"][:], np.float32)[pick]
    with torch.no_grad():
        logit = head(torch.from_numpy(emb))[:, 0].numpy()
    info = group.attrs["slide"]
    coords = np.asarray(group["tiles/coords"][:])
    with Slide(info["path"], float(group.attrs["mpp"])) as slide:
        pix, _ = read_tiles(slide, coords[rows], float(grid["tile_level0"]), tiling.mpp,
                            tiling.tile_px)
    return _Slide(pix, patch[rows].astype(np.float32), emb, logit.astype(np.float32))


def _scorer(config: RunConfig, grid: int) -> torch.nn.Module:
    """The triage scorer as ``run`` builds it (an untrained one from the pipeline's fixed init
    seed, so its patch maps are the ones the pipeline will use)."""
    from wsi_prune.models.binding import INIT_SEED

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return build_scorer(config.scorer, grid)


def _keep0(patch: np.ndarray, ratio: float, config: RunConfig,
           grid: tuple[int, int]) -> torch.Tensor | None:
    """The CNN prior's keep mask at ``ratio`` (None: every token)."""
    if ratio >= 1.0:
        return None
    tok = dataclasses.replace(config.token_select, policy="ratio", keep_ratio=ratio, scope="tile")
    return select_patches(torch.from_numpy(patch), tok, grid=grid)


def _wrappers(vit: torch.nn.Module, config: RunConfig) -> tuple[PrunedViT, PrunedViT]:
    """(pruned, dense) PrunedViT views of one backbone, eval mode (no dropout; gradients still
    flow through the kept tokens)."""
    vit.eval()
    return (PrunedViT(vit, config.vit).eval(),
            PrunedViT(vit, dataclasses.replace(config.vit, prune_blocks=())).eval())


def _forward(wrappers: tuple[PrunedViT, PrunedViT], x: torch.Tensor, patch: np.ndarray,
             ratio: float, config: RunConfig, grid: tuple[int, int]):
    pruned, dense = wrappers
    return (dense(x) if ratio >= 1.0 else pruned(x, _keep0(patch, ratio, config, grid)))


@torch.no_grad()
def _validate(student: torch.nn.Module, teacher: torch.nn.Module, head: torch.nn.Linear,
              config: RunConfig, data: Sequence[_Slide], ratios: Sequence[float],
              mean: torch.Tensor, std: torch.Tensor, grid: tuple[int, int], bs: int
              ) -> dict[str, dict[str, float]]:
    """Per ratio: teacher-pruned and student-pruned tile logits against the teacher's dense
    logits (stored), on the held-out tiles."""
    if not data:
        return {}
    pix = np.concatenate([d.pixels for d in data])
    patch = np.concatenate([d.patch for d in data])
    want = np.concatenate([d.logit for d in data])
    models = {"teacher": _wrappers(teacher, config), "student": _wrappers(student, config)}
    out: dict[str, dict[str, float]] = {}
    for r in ratios:
        row: dict[str, float] = {}
        for name, w in models.items():
            got, toks = [], []
            for i in range(0, len(pix), bs):
                res = _forward(w, normalised(pix[i:i + bs], mean, std), patch[i:i + bs], r,
                               config, grid)
                got.append(head(res.embedding)[:, 0].numpy())
                toks.append(res.tokens_per_image[:, -1, 1].numpy() - w[0].num_prefix)
            g = np.concatenate(got)
            row[f"{name}_rmse"] = float(np.sqrt(np.mean((g - want) ** 2)))
            row[f"{name}_pearson"] = float(np.corrcoef(g, want)[0, 1]) if len(g) > 1 else math.nan
            row[f"{name}_tokens"] = float(np.concatenate(toks).mean())
        out[f"r{r:g}"] = row
    return out


def distill_vit(
    dense_runs: Sequence[PathLike],
    out_path: PathLike,
    config: RunConfig,
    *,
    keep_ratios: Sequence[float] = DEFAULT_KEEP_RATIOS,
    epochs: int = 6,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    batch_size: int = 32,
    max_tiles_per_store: int | None = 256,
    top_share: float = 0.5,
    val_fraction: float = 0.2,
    embedding_weight: float = 1.0,
    max_minutes: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> DistillResult:
    """Fine-tune a copy of the configured ViT so that, pruned as ``config`` prunes, it gives the
    dense ViT's tile logits and embeddings.

    Args:
        dense_runs: run folders or stores of training slides made with ``run --dense`` and the
            teacher (``config.vit.weights``); their slides must still be where the stores say.
        out_path: the student's ``.safetensors`` (its ``.json`` and tile head go beside it).
        config: the pipeline config the student will run in (after
            :func:`~wsi_prune.models.factory.apply_trained_configs`): ``vit.weights`` is the
            teacher, ``scorer`` gives the CNN prior's patch maps, ``token_select.min_tokens``,
            ``vit.prune_blocks`` / ``prune_policy`` / ``keep_ratio`` the pruning learnt.
        keep_ratios: CNN-prior token ratios cycled over the batches (1: dense, no pruning).
        epochs / lr / weight_decay / batch_size: AdamW with one-cycle cosine decay.
        max_tiles_per_store: tiles drawn per slide (None: all), ``top_share`` of them the ones
            the scorer rates highest.
        val_fraction: share of slides held out for :attr:`DistillResult.val`.
        embedding_weight: weight of the embedding error against the tile-logit error.
        max_minutes: stop after this much time (the last finished epoch is kept).
        seed / threads: determinism for a seed and thread count.

    Raises:
        ConfigError: no teacher or no tile head, bad arguments, too few tiles.
        StoreError: a store is not a dense run of the teacher, or was tiled differently.
    """
    t0 = time.perf_counter()
    out = check_out(out_path)
    ratios = tuple(float(r) for r in keep_ratios)
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise ConfigError(f"keep ratios must be in (0, 1], got {list(keep_ratios)}")
    if epochs < 1 or batch_size < 2 or lr <= 0 or not 0 <= val_fraction < 1 or \
            not 0 <= top_share <= 1:
        raise ConfigError("distill-vit needs epochs >= 1, batch_size >= 2, lr > 0, "
                          "0 <= val_fraction < 1 and 0 <= top_share <= 1")
    teacher_w, teacher_meta, head_path = _teacher_of(config)
    teacher_sha = file_sha256(teacher_w)
    paths = find_stores(dense_runs)
    rng = np.random.default_rng(seed)
    with seeded(seed, threads):
        teacher = build_vit(dataclasses.replace(config.vit, pretrained=False),
                            load_weights=load_into).eval()
        grid = tuple(int(g) for g in teacher.patch_embed.grid_size)
        head = load_tile_head(head_path, int(teacher.num_features)).eval()
        for p in head.parameters():
            p.requires_grad_(False)
        scorer = _scorer(config, grid[0])
        data = {}
        for p in tqdm(paths, desc="reading tiles", unit="slide", disable=not progress):
            data[slide_id(p)] = _load_slide(p, config, scorer, head, teacher_sha,
                                            max_tiles_per_store, top_share, rng)
        ids = sorted(data)
        n_val = int(round(val_fraction * len(ids)))
        if val_fraction > 0 and len(ids) >= 2:
            n_val = max(1, min(n_val, len(ids) - 1))
        val_ids = set(rng.choice(ids, n_val, replace=False).tolist()) if n_val else set()
        train = [data[i] for i in ids if i not in val_ids]
        held = [data[i] for i in ids if i in val_ids]
        x_tr = np.concatenate([d.pixels for d in train])
        p_tr = np.concatenate([d.patch for d in train])
        e_tr = torch.from_numpy(np.concatenate([d.embedding for d in train]))
        l_tr = torch.from_numpy(np.concatenate([d.logit for d in train]))
        if len(x_tr) < batch_size:
            raise ConfigError(f"{len(x_tr)} training tiles, fewer than one batch of {batch_size}")
        emb_var = float(e_tr.var()) or 1.0

        student = build_vit(dataclasses.replace(config.vit, pretrained=False),
                            load_weights=load_into)
        wrappers = _wrappers(student, config)
        mean, std = input_norm(teacher)
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        steps_per_epoch = len(x_tr) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.1)
        losses, stopped = [], False
        bar = tqdm(total=epochs * steps_per_epoch, desc="distill-vit", unit="step",
                   disable=not progress)
        step_no = 0
        for _epoch in range(epochs):
            order = rng.permutation(len(x_tr))[: steps_per_epoch * batch_size]
            total = 0.0
            for step in range(steps_per_epoch):
                b = np.sort(order[step * batch_size:(step + 1) * batch_size])
                x = normalised(x_tr[b], mean, std)
                r = ratios[step_no % len(ratios)]
                step_no += 1
                res = _forward(wrappers, x, p_tr[b], r, config, grid)
                logit = head(res.embedding)[:, 0]
                loss = F.mse_loss(logit, l_tr[b]) + \
                    embedding_weight * F.mse_loss(res.embedding, e_tr[b]) / emb_var
                total += optimiser_step(loss, opt, sched, params)
                bar.update(1)
            stop, stopped = end_epoch(losses, total, steps_per_epoch, bar, t0, max_minutes,
                                      epochs, lr, "distillation")
            if stop:
                break
        bar.close()
        student.eval()
        val = _validate(student, teacher, head, config, held, ratios, mean, std, grid,
                        batch_size)
    head_out = out.with_name(out.stem + TILE_HEAD_SUFFIX)
    shutil.copyfile(head_path, head_out)  # frozen: the teacher's head, the student's too
    meta: dict[str, Any] = {
        "kind": VIT_KIND, "format": 1, "model": teacher_meta["model"],
        "model_kwargs": dict(teacher_meta.get("model_kwargs") or {}),
        "grid": teacher_meta.get("grid", grid[0]),
        "tile_px": config.tiling.tile_px, "mpp": config.tiling.mpp,
        "targets": "distilled", "val": val,
        "distilled_from": {"weights": str(teacher_w), "sha256": teacher_sha,
                           "val": teacher_meta.get("val")},
        "tile_head": {**(teacher_meta.get("tile_head") or {}), "weights": head_out.name,
                      "sha256": file_sha256(head_out), "kind": TILE_HEAD_KIND},
        "training": {"epochs": epochs, "epochs_run": len(losses), "lr": lr,
                     "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed,
                     "keep_ratios": list(ratios), "max_tiles_per_store": max_tiles_per_store,
                     "top_share": top_share, "embedding_weight": embedding_weight,
                     "pruning": {"prune_blocks": list(config.vit.prune_blocks),
                                 "prune_policy": config.vit.prune_policy,
                                 "keep_ratio": config.vit.keep_ratio,
                                 "min_tokens": config.token_select.min_tokens},
                     "scorer": config.scorer.weights,
                     "losses": losses, "n_slides": len(ids), "val_slides": sorted(val_ids),
                     "n_train_tiles": int(len(x_tr)),
                     "n_val_tiles": int(sum(len(d.logit) for d in held)),
                     "stopped_early": stopped,
                     "seconds": round(time.perf_counter() - t0, 1)},
    }
    config_path = save_model(student, out, meta)
    _logger.info("distill-vit: %d tiles, val %s", len(x_tr), val)
    return DistillResult(out, config_path, losses, int(len(x_tr)),
                         int(sum(len(d.logit) for d in held)), val,
                         time.perf_counter() - t0, stopped, student)
