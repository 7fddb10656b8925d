"""Fitting the ``tile-topk`` slide head from a trained tile head (issue 11).

``train-vit`` trains a per-tile lesion logit on lesion outlines (its tile head, saved beside the
backbone). With that head fixed, a slide score is the mean of a bag's ``k`` largest tile logits
(:class:`wsi_prune.models.mil.TileTopK`), and what is left to learn from slide labels is two
numbers, the scale and bias that turn it into a calibrated probability, plus the choice of
``k``. Both are fitted here in closed form (a one-feature logistic regression) instead of by
gradient steps: with tens of training slides, two parameters are what slide labels can pin down.

``k`` is chosen among candidates by the cross-validated log loss of the out-of-fold
predictions (stratified k-fold, a slide's dense and pruned bags in the same fold), on the
training slides only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_prune._files import file_sha256
from wsi_prune.errors import CheckpointRefused, ConfigError
from wsi_prune.models.checkpoints import load_into
from wsi_prune.models.mil import TileTopK, top_k_mean
from wsi_prune.models.sidecars import VIT_KIND, read_sidecar

_logger = logging.getLogger(__name__)

#: ``k`` candidates tried by :func:`fit_tile_topk` when none are given
TOP_K_CANDIDATES = (1, 2, 4, 8, 16)
#: inverse L2 strength of the one-feature logistic regression (mild: two parameters)
LOGISTIC_C = 10.0


def tile_head_of(vit_weights: str | Path) -> Path | None:
    """The tile head ``train-vit`` saved beside ``vit_weights`` (named in its sidecar), or None
    when the sidecar names none.

    Raises:
        CheckpointRefused: the sidecar names a head whose file is missing or whose SHA-256
            differs from the one recorded.
    """
    meta = read_sidecar(vit_weights, VIT_KIND)
    info = (meta or {}).get("tile_head")
    if not isinstance(info, dict) or not info.get("weights"):
        return None
    path = Path(vit_weights).with_name(str(info["weights"]))
    if not path.is_file():
        raise CheckpointRefused(f"the ViT sidecar names tile head {path.name}, which is missing",
                                str(vit_weights))
    if info.get("sha256") and file_sha256(path) != info["sha256"]:
        raise CheckpointRefused("tile head file differs from the one train-vit wrote "
                                "(SHA-256 mismatch)", str(path))
    return path


def load_tile_head(path: str | Path, in_dim: int) -> torch.nn.Linear:
    """A ``Linear(in_dim, 1)`` tile lesion head from a safetensors file (``weight`` (1, D),
    ``bias`` (1,)).

    Raises:
        CheckpointRefused: missing tensors or another embedding width (the message names the
            model's and the file's shapes, :func:`~wsi_prune.models.checkpoints.load_into`).
    """
    head = torch.nn.Linear(in_dim, 1)
    load_into(head, path)
    return head


@dataclass
class TopKFit:
    """What :func:`fit_tile_topk` chose and measured.

    Attributes:
        model: the fitted head (eval mode).
        top_k: the chosen ``k``.
        oof_logits: (n_bags,) out-of-fold slide logits with the chosen ``k`` (NaN with 1 fold).
        fold_auc / fold_loss: per fold, with the chosen ``k``.
        search: per candidate ``k``: out-of-fold log loss and AUC.
    """

    model: TileTopK
    top_k: int
    oof_logits: np.ndarray
    fold_auc: list[float] = field(default_factory=list)
    fold_loss: list[float] = field(default_factory=list)
    search: dict[int, dict[str, float | None]] = field(default_factory=dict)


def logistic(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Scale and bias of a one-feature logistic regression (both classes must be present)."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=LOGISTIC_C).fit(z.reshape(-1, 1), y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def _log_loss(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, logits) - y * logits))


def fit_tile_topk(bags: Sequence[torch.Tensor], y: np.ndarray, splits: list[tuple[np.ndarray,
                  np.ndarray]], head: torch.nn.Linear,
                  candidates: Sequence[int] = TOP_K_CANDIDATES) -> TopKFit:
    """Choose ``k`` by cross-validated log loss and fit scale and bias on every bag.

    Args:
        bags: (K_i, D) embeddings per bag.
        y: (n_bags,) 0/1 slide labels.
        splits: (train, validation) index pairs of the cross-validation; empty: no search
            (the first candidate is used).
        head: the tile head, kept fixed.
        candidates: ``k`` values to try (>= 1).

    Raises:
        ConfigError: no candidate, or one class missing from the bags or from a training fold.
    """
    from sklearn.metrics import roc_auc_score

    ks = sorted({int(k) for k in candidates})
    if not ks or ks[0] < 1:
        raise ConfigError("tile-topk needs top_k candidates >= 1")
    y = np.asarray(y, np.int64)
    if len(set(y.tolist())) < 2:
        raise ConfigError("tile-topk needs slides of both classes to fit its scale and bias")
    model = TileTopK(int(bags[0].shape[1]), top_k=ks[0])
    model.tile.load_state_dict(head.state_dict())
    with torch.no_grad():
        logits = [model.tile_logits(b).unsqueeze(0) for b in bags]  # (1, K_i) each
        z = {k: np.array([float(top_k_mean(s, k)) for s in logits]) for k in ks}
    search: dict[int, dict[str, float | None]] = {}
    oof = {k: np.full(len(y), np.nan) for k in ks}
    for k in ks:
        for tr, va in splits:
            if len(set(y[tr].tolist())) < 2:
                raise ConfigError("a training fold holds slides of one class only")
            a, c = logistic(z[k][tr], y[tr])
            oof[k][va] = a * z[k][va] + c
        if splits:
            search[k] = {"oof_log_loss": _log_loss(oof[k], y),
                         "oof_auc": float(roc_auc_score(y, oof[k]))}
    best = min(ks, key=lambda k: (search[k]["oof_log_loss"], k)) if splits else ks[0]
    fold_auc = [float(roc_auc_score(y[va], oof[best][va])) if len(set(y[va].tolist())) > 1
                else float("nan") for _, va in splits]
    fold_loss = [_log_loss(oof[best][va], y[va]) for _, va in splits]
    a, c = logistic(z[best], y)
    model.top_k = best
    with torch.no_grad():
        model.scale.fill_(a)
        model.bias.fill_(c)
    _logger.info("tile-topk: k=%d (of %s), scale %.3f, bias %.3f", best, ks, a, c)
    return TopKFit(model.eval(), best, oof[best], fold_auc, fold_loss, search)


def topk_meta(fit: TopKFit, head_path: Path) -> dict[str, Any]:
    """Sidecar entries of a fitted head: ``top_k``, the tile head it started from, the search."""
    return {"top_k": fit.top_k,
            "tile_head": {"weights": str(head_path), "sha256": file_sha256(head_path)},
            "top_k_search": {str(k): v for k, v in fit.search.items()},
            "scale": fit.model.scale.item(), "bias": fit.model.bias.item()}
