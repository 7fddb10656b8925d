"""Training the slide head on ``vit/embedding`` bags with slide labels: k-fold cross-validated
with early stopping on validation loss, then the final model on every slide for the folds'
median best epoch count. Deterministic for a seed and thread count.
"""

from __future__ import annotations

import logging
import math
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
from wsi_prune.config import MILConfig
from wsi_prune.errors import ConfigError, StoreError, TrainingError
from wsi_prune.io.labels import parse_label, read_labels
from wsi_prune.io.store import open_store
from wsi_prune.models.binding import bag_regime, vit_identity
from wsi_prune.models.mil import MIL_HEADS, MIL_KIND
from wsi_prune.training._common import PathLike, check_out, save_model, seeded
from wsi_prune.training.data import find_stores
from wsi_prune.training.tile_topk import (
    TOP_K_CANDIDATES,
    fit_tile_topk,
    load_tile_head,
    logistic,
    tile_head_of,
    topk_meta,
)

_logger = logging.getLogger(__name__)


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
        model: the final model (eval mode): a :class:`~wsi_prune.models.mil.GatedABMIL`, a
            :class:`~wsi_prune.models.mil.TileTopK` or another registered head.
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
    model: torch.nn.Module
    regime: str = "unknown"

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


@dataclass
class _Bags:
    """Bags of the labelled stores: embeddings, labels, slide ids, and what made them."""

    bags: list[torch.Tensor]
    y: np.ndarray
    ids: list[str]
    regimes: list[str]
    vit: dict[str, Any] | None
    vit_weights: str | None = None


def _store_vit(group: Any, path: Path) -> tuple[str, dict[str, Any] | None, str | None]:
    """The bag regime, the ViT identity and the ViT weights file of a run store (from the
    attributes ``run`` writes)."""
    from wsi_prune.config import RunConfig

    cfg_dict = group.attrs.get("run_config")
    if cfg_dict is None:
        return "unknown", None, None
    cfg = RunConfig.from_dict(cfg_dict)
    sha = ((group.attrs.get("models") or {}).get("vit") or {}).get("sha256")
    return bag_regime(cfg), vit_identity(cfg, sha), cfg.vit.weights


def _mil_data(stores: Sequence[Path], labels: Mapping[str, int]) -> _Bags:
    bags, ys, ids, regimes, unlabelled = [], [], [], [], []
    vit: dict[str, Any] | None = None
    vit_weights = None
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
        regime, ident, weights = _store_vit(group, path)
        vit_weights = vit_weights or weights
        if ident is not None:
            if vit is not None and ident != vit:
                raise StoreError("these embeddings come from another ViT than the other stores' "
                                 f"({ident} vs {vit}): one head learns one embedding space", path)
            vit = ident
        bags.append(torch.from_numpy(emb))
        ys.append(int(label))
        ids.append(sid)
        regimes.append(regime)
    if unlabelled:
        _logger.warning("%d store(s) without a label skipped: %s", len(unlabelled),
                        ", ".join(unlabelled[:5]))
    y = np.asarray(ys, np.int64)
    if len(set(ys)) < 2:
        raise ConfigError(f"train-mil needs labelled slides of both classes, got {len(ys)} "
                          f"slide(s) with labels {sorted(set(ys))}")
    return _Bags(bags, y, ids, regimes, vit, vit_weights)


def _regime(regimes: Sequence[str]) -> str:
    """``dense``, ``pruned``, ``dense+pruned`` (both kinds of bag) or ``unknown``."""
    kinds = sorted(set(regimes) - {"unknown"})
    return "+".join(kinds) if kinds else "unknown"


def _choose_folds(folds: int, y: np.ndarray, groups: np.ndarray) -> int:
    """The largest k <= ``folds`` that every class allows (each validation fold needs a slide
    of each class), with a warning when that is fewer than asked; 1 when a class has one
    slide."""
    per_class = [len(set(groups[y == c])) for c in (0, 1)]
    k = min(folds, *per_class)
    if k < folds:
        _logger.warning("%d-fold cross-validation needs >= %d slides per class, got %d negative "
                        "and %d positive: using %s", folds, folds, per_class[0], per_class[1],
                        f"{k} folds" if k >= 2 else "no validation (1 fold)")
    return max(k, 1)


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


def _mil_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, bags: list[torch.Tensor],
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
def _mil_predict(model: torch.nn.Module, bags: list[torch.Tensor], idx: np.ndarray,
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
) -> tuple[torch.nn.Module, float, int, int, np.ndarray]:
    """Train with early stopping on validation loss; returns the best model, its loss, its epoch
    (1-based), the epochs run and the validation logits."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = MIL_HEADS.get(cfg.model)(cfg, in_dim, 1)
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
    model: str = "gated-abmil",
    tile_head: PathLike | None = None,
    top_k: Sequence[int] | None = None,
    calibrate: bool = True,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> MILTrainResult:
    """Train a slide head (default gated-ABMIL) on the ``vit/embedding`` bags of run stores.

    With ``folds >= 2``: stratified k-fold cross-validation, each fold trained with early stopping
    on its validation BCE (best epoch restored), validation ROC AUC per fold and of the pooled
    out-of-fold predictions; then the final model is trained on every slide for the median best
    epoch count. With ``folds == 1``: one model on every slide for ``epochs``.

    Train as you infer: give the stores of a run made with the production (pruned) config, so
    the head learns the bags it will see (only the kept, most suspicious tiles); a head trained
    on dense bags and fed pruned ones shifts its probabilities (issue 11). Stores of a dense and
    a pruned run of the same slides may be given together (regime ``dense+pruned``): a slide's
    bags then always fall in the same fold. The sidecar records the regime and the ViT the
    embeddings came from (:mod:`wsi_prune.models.binding`); ``run`` refuses the head with
    another ViT and warns when a dense-trained head meets pruned bags.

    Args:
        stores: run stores (``<id>.zarr`` with ``vit/embedding`` (K, D)) or run folders; all
            made with one ViT (model, arguments, pooling, weights).
        labels_csv: ``slide,label`` CSV (see :func:`read_labels`) or a mapping id → label.
            Stores without a label are skipped with a warning.
        out_path: the ``.safetensors`` file to write; its ``.json`` config goes next to it.
        folds: k of the cross-validation, or 1; lowered (with a warning) to the slide count of
            the smaller class when that is below k.
        epochs: maximum epochs per fold; patience: epochs without a better validation loss
            before stopping.
        lr / weight_decay: AdamW.
        hidden / dropout: the head (see :class:`~wsi_prune.models.mil.GatedABMIL`).
        batch_bags: bags per step (padded, masked).
        max_instances: training draws at most this many tiles of a bag per step (memory);
            validation and prediction use whole bags.
        model: the registered head (``mil.model``). ``tile-topk`` with a tile head (``tile_head``,
            or the one ``train-vit`` saved beside the stores' ViT weights) is fitted in closed
            form instead (:func:`~wsi_prune.training.tile_topk.fit_tile_topk`: the tile head
            fixed, ``k`` chosen among ``top_k`` by cross-validated log loss, scale and bias by
            logistic regression); without a tile head it is trained by gradient like the others.
        tile_head: a tile head file (safetensors ``weight`` (1, D), ``bias`` (1,)).
        top_k: ``k`` candidates of ``tile-topk`` (default 1, 2, 4, 8, 16).
        calibrate: with ``folds >= 2``, Platt-scale a gradient-trained head: a logistic
            regression of the labels on the out-of-fold logits gives ``a * logit + c``, folded
            into the final model (skipped, with a warning, when ``a <= 0``: the folds did not
            rank the slides, and a negative ``a`` would reverse the final model's ranking).
        seed: seeds folds, initialisation, order, dropout and instance draws.
        threads: torch intra-op threads while training (restored afterwards); None: unchanged.
            Small heads train fastest on 1 thread, and far faster on a busy machine.
        progress: show a progress bar.

    Raises:
        ConfigError: bad arguments, labels or too few slides per class. StoreError: bad store.
        TrainingError: a fold whose validation loss is never finite.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    t0 = time.perf_counter()
    out_path = check_out(out_path)
    if folds < 1 or epochs < 1 or patience < 1 or lr <= 0 or batch_bags < 1:
        raise ConfigError("train-mil needs folds, epochs, patience, batch_bags >= 1 and lr > 0")
    cfg = MILConfig(hidden=hidden, dropout=dropout, model=model)
    MIL_HEADS.get(model)  # an unknown name fails before any store is read
    labels = (read_labels(labels_csv) if not isinstance(labels_csv, Mapping)
              else _parse_labels(labels_csv))
    data = _mil_data(find_stores(stores), labels)
    bags, y, ids = data.bags, data.y, data.ids
    # the same slide in a dense and a pruned run is two bags of one slide: they share a fold
    groups = np.asarray([i.casefold() for i in ids])
    in_dim = int(bags[0].shape[1])
    s = _MILSettings(epochs, lr, weight_decay, patience, batch_bags, max_instances)
    folds = _choose_folds(folds, y, groups) if folds > 1 else 1
    splits = (list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
                   .split(np.zeros(len(y)), y, groups)) if folds > 1 else [])
    extra: dict[str, Any] = {}
    best_epochs: list[int] = []
    stopped: list[int] = []
    head_path = _tile_head(model, tile_head, data.vit_weights)
    if head_path is not None:
        fit = fit_tile_topk(bags, y, splits, load_tile_head(head_path, in_dim),
                            top_k or TOP_K_CANDIDATES)
        net, oof, final_epochs = fit.model, fit.oof_logits, 0
        fold_auc, fold_loss = fit.fold_auc, fit.fold_loss
        extra = topk_meta(fit, head_path)
    else:
        g = _fit_gradient(in_dim, cfg, bags, y, splits, s, seed, threads, progress)
        net, oof, final_epochs = g.model, g.oof, g.final_epochs
        fold_auc, fold_loss, best_epochs, stopped = (g.fold_auc, g.fold_loss, g.best_epochs,
                                                     g.stopped)
        if calibrate and splits:
            extra["calibration"] = _platt(net, oof, y)
    oof_auc = float(roc_auc_score(y, oof)) if folds > 1 else float("nan")
    meta = {
        "kind": MIL_KIND, "format": 1, "model": cfg.model, "in_dim": in_dim, "hidden": hidden,
        "n_classes": 1, "regime": _regime(data.regimes), "vit": data.vit,
        "dropout": dropout, "threshold": 0.5, **extra,
        "cv": {"folds": folds, "val_auc": fold_auc, "val_loss": fold_loss,
               "best_epoch": best_epochs, "stopped_epoch": stopped,
               "mean_val_auc": float(np.mean(fold_auc)) if fold_auc else None,
               "oof_auc": None if math.isnan(oof_auc) else oof_auc},
        "training": {"epochs": epochs, "final_epochs": final_epochs, "lr": lr,
                     "weight_decay": weight_decay, "patience": patience, "seed": seed,
                     "batch_bags": batch_bags, "max_instances": max_instances,
                     "n_slides": len(set(groups)), "n_bags": len(y),
                     "n_positive": int(y.sum()),
                     "slides": dict(zip(ids, y.tolist(), strict=True))},
    }
    config_path = save_model(net, out_path, meta)
    return MILTrainResult(out_path, config_path, fold_auc, fold_loss, best_epochs, stopped,
                          oof_auc, final_epochs, dict(zip(ids, y.tolist(), strict=True)),
                          time.perf_counter() - t0, net, meta["regime"])


def _platt(net: torch.nn.Module, oof: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Fold Platt scaling fitted on the out-of-fold logits into ``net``; what was done."""
    a, c = logistic(oof, y)
    if a <= 0 or not hasattr(net, "calibrate_"):
        why = (f"out-of-fold logits do not rank the slides (a = {a:.3f})" if a <= 0 else
               f"{type(net).__name__} has no calibrate_")
        _logger.warning("train-mil: probabilities not calibrated: %s", why)
        return {"applied": False, "reason": why}
    net.calibrate_(a, c)
    return {"applied": True, "a": a, "c": c, "fitted_on": "out-of-fold logits"}


def _tile_head(model: str, given: PathLike | None, vit_weights: str | None) -> Path | None:
    """The tile head ``tile-topk`` starts from: ``given``, else the one saved beside the ViT
    weights of the stores (None: train by gradient). Other heads take none."""
    if model != "tile-topk":
        if given is not None:
            raise ConfigError(f"a tile head is for mil.model tile-topk, not {model}")
        return None
    if given is not None:
        return Path(given)
    found = tile_head_of(vit_weights) if vit_weights and Path(vit_weights).is_file() else None
    if found is None:
        _logger.warning("tile-topk without a tile head (none given, none beside the ViT "
                        "weights): the tile layer is learnt from slide labels alone")
    return found


@dataclass
class _GradientFit:
    """What :func:`_fit_gradient` trained: the final model, the out-of-fold logits, the
    final epoch count, and per fold the validation AUC, loss, best and last epoch."""

    model: torch.nn.Module
    oof: np.ndarray
    final_epochs: int
    fold_auc: list[float]
    fold_loss: list[float]
    best_epochs: list[int]
    stopped: list[int]


def _fit_gradient(in_dim: int, cfg: MILConfig, bags: list[torch.Tensor], y: np.ndarray,
                  splits: list[tuple[np.ndarray, np.ndarray]], s: _MILSettings, seed: int,
                  threads: int | None, progress: bool) -> _GradientFit:
    """Cross-validated gradient training (early stopping per fold), then the final model on
    every bag for the folds' median best epoch count (``s.epochs`` without folds)."""
    from sklearn.metrics import roc_auc_score

    fold_auc: list[float] = []
    fold_loss: list[float] = []
    best_epochs: list[int] = []
    stopped: list[int] = []
    oof = np.full(len(y), np.nan)
    folds = len(splits) or 1
    with seeded(seed, threads):
        bar = tqdm(total=s.epochs * (folds + (folds == 1)), desc="train-mil", unit="epoch",
                   disable=not progress)
        if splits:
            for f, (tr, va) in enumerate(splits):
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
            final_epochs = s.epochs
        bar.total = bar.n + final_epochs
        bar.set_postfix(fold="final")
        model = _fit_final(in_dim, cfg, bags, y, s, final_epochs, seed, bar)
        bar.close()
    return _GradientFit(model, oof, final_epochs, fold_auc, fold_loss, best_epochs, stopped)


def _fit_final(in_dim: int, cfg: MILConfig, bags: list[torch.Tensor], y: np.ndarray,
               s: _MILSettings, epochs: int, seed: int, bar: tqdm) -> torch.nn.Module:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = MIL_HEADS.get(cfg.model)(cfg, in_dim, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    everything = np.arange(len(y))
    for _ in range(epochs):
        _mil_epoch(model, opt, bags, y, everything, s, rng)
        bar.update(1)
    return model.eval()
