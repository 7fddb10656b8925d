"""Gated attention-based multiple-instance learning (ABMIL) slide head.

Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018, gated
variant, as used by CLAM (Lu et al. 2021): each instance (tile embedding) h_k = ReLU(W x_k) gets
an attention score a_k = w·(tanh(V h_k) ⊙ sigmoid(U h_k)); the softmax of the scores over the bag
weighs the instances into one slide embedding, and a linear layer turns it into the slide logit.
The attention doubles as the tile heatmap.

``tile-topk`` (:class:`TileTopK`) is the other head: a lesion logit per tile (a linear layer on
the embedding, e.g. the tile head ``train-vit`` trains on lesion outlines) and a slide logit from
the mean of the bag's ``top_k`` largest tile logits, scaled and shifted. Its answer depends only
on the bag's most suspicious tiles, so a pruned bag (the triage's kept tiles) gets the answer of
the dense bag whenever the triage kept those tiles: the head does not shift its probabilities
with the bag's composition, which an attention head trained on dense bags does (issue 11).

Slide heads are registered by name (:func:`register_mil`, ``mil.model`` in the config), as
scorers and selection policies are: a head is ``builder(config, in_dim, n_classes) -> module``
whose forward takes a bag (K, D) or a padded batch (B, K, D) with a mask and returns a
:class:`MILOutput`, and which exposes ``in_dim``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from wsi_prune._registry import Registry
from wsi_prune.config import MILConfig
from wsi_prune.errors import CheckpointRefused, ConfigError
from wsi_prune.models.checkpoints import load_into
from wsi_prune.models.sidecars import read_sidecar, warn_untrained_once

_logger = logging.getLogger(__name__)

__all__ = ["GatedABMIL", "MILOutput", "TileTopK", "build_mil", "list_mil_heads", "register_mil",
           "top_k_mean", "trained_mil_config"]

#: ``kind`` of the JSON config saved next to trained MIL weights
MIL_KIND = "wsi-prune-mil"

MILBuilder = Callable[[MILConfig, int, int], nn.Module]
MIL_HEADS: Registry[MILBuilder] = Registry("MIL head")


def register_mil(name: str) -> Callable[[MILBuilder], MILBuilder]:
    """Register ``builder(config, in_dim, n_classes) -> module`` as slide head ``name``."""
    return MIL_HEADS.register(name)


def list_mil_heads() -> list[str]:
    """Names of the registered slide heads (values of ``mil.model``)."""
    return MIL_HEADS.names()


@dataclass
class MILOutput:
    """A slide head's answer for one bag (shapes without B) or a batch of B bags.

    Attributes:
        logit: () or (B,) float32 for one class; (n_classes,) or (B, n_classes) otherwise.
        prob: sigmoid (one class) or softmax (several) of ``logit``, same shape.
        attention: (K,) or (B, K) float32, softmax over the valid instances of each bag:
            sums to 1 over them and is exactly 0 on masked ones.
    """

    logit: torch.Tensor
    prob: torch.Tensor
    attention: torch.Tensor


def _as_batch(bag: torch.Tensor, mask: torch.Tensor | None, in_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """A (K, D) bag or (B, K, D) batch as ``(batch, bool mask or None, was single)``, checked;
    padded rows are zeroed so that NaN/inf padding cannot leak through ``0 * x``."""
    single = bag.ndim == 2
    if single:
        bag = bag.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    if bag.ndim != 3 or bag.shape[-1] != in_dim:
        raise ValueError(f"bag must be (K, {in_dim}) or (B, K, {in_dim}), got {tuple(bag.shape)}")
    if bag.shape[1] == 0:
        raise ValueError("empty bag: a slide needs at least one instance (tile)")
    if mask is not None:
        if mask.shape != bag.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match bag {tuple(bag.shape)}")
        mask = mask.to(device=bag.device, dtype=torch.bool)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("empty bag: every instance of a bag is masked out")
        bag = torch.where(mask.unsqueeze(-1), bag, torch.zeros((), dtype=bag.dtype))
    return bag, mask, single


class GatedABMIL(nn.Module):
    """Gated attention-MIL over a bag of instance embeddings.

    Args:
        in_dim: D, size of an instance embedding (the ViT's embedding width).
        hidden: size of the projected instances and of the attention branches.
        dropout: dropout after the first layer (active in training mode only).
        n_classes: 1 for a binary slide label (sigmoid), more for a softmax over classes.
    """

    def __init__(
        self, in_dim: int, hidden: int = 128, dropout: float = 0.0, n_classes: int = 1
    ) -> None:
        super().__init__()
        if in_dim < 1 or hidden < 1 or n_classes < 1:
            raise ValueError("in_dim, hidden and n_classes must be >= 1")
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, hidden)
        self.attention_u = nn.Linear(hidden, hidden)
        self.attention_w = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Pool a bag (or a padded batch of bags) into slide logits.

        Args:
            bag: (K, D) one bag, or (B, K, D) a batch of bags padded to K instances.
            mask: (K,) or (B, K) bool, True for real instances; None: all are real. Padded
                instances get exactly zero attention and do not change the output, whatever
                their values (even NaN).

        Returns:
            :class:`MILOutput`; for a (K, D) bag the batch axis is dropped.

        Raises:
            ValueError: wrong shapes, or a bag with no (valid) instance.
        """
        bag, mask, single = _as_batch(bag, mask, self.in_dim)
        h = self.fc(bag.float())  # (B, K, hidden)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        scores = self.attention_w(gate).squeeze(-1)  # (B, K)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)
        pooled = torch.bmm(attention.unsqueeze(1), h).squeeze(1)  # (B, hidden)
        logit = self.classifier(pooled)  # (B, n_classes)
        if self.n_classes == 1:
            logit = logit.squeeze(-1)
            prob = torch.sigmoid(logit)
        else:
            prob = torch.softmax(logit, dim=-1)
        if single:
            logit, prob, attention = logit[0], prob[0], attention[0]
        return MILOutput(logit=logit, prob=prob, attention=attention)

    @torch.no_grad()
    def calibrate_(self, a: float, c: float) -> None:
        """Make the slide logit ``a * logit + c`` (Platt scaling folded into the classifier)."""
        self.classifier.weight.mul_(a)
        self.classifier.bias.mul_(a).add_(c)


def top_k_mean(logits: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) mean of each row's ``k`` largest valid values of (B, K) ``logits``; a row with
    fewer than ``k`` valid values averages what it has."""
    valid = torch.ones_like(logits, dtype=torch.bool) if mask is None else mask
    k = min(k, logits.shape[1])
    top = torch.topk(logits.masked_fill(~valid, float("-inf")), k, dim=1).values  # (B, k)
    n = valid.sum(1).clamp(max=k)
    take = torch.arange(k, device=logits.device).unsqueeze(0) < n.unsqueeze(1)
    return torch.where(take, top, torch.zeros((), dtype=top.dtype)).sum(1) / n


class TileTopK(nn.Module):
    """Slide logit from the top-k tile lesion logits of a bag (binary labels only).

    ``s_k = tile(x_k)`` is a lesion logit per instance; the slide logit is
    ``scale * mean(top min(top_k, K) of s) + bias``. The attention (the tile heat) is each
    valid instance's lesion probability ``sigmoid(s_k)`` over their sum, so heat relative to
    the slide's hottest tile is ``sigmoid(s_k) / max sigmoid(s)``.

    Args:
        in_dim: D, size of an instance embedding.
        top_k: tiles averaged into the slide score.
    """

    def __init__(self, in_dim: int, top_k: int = 4) -> None:
        super().__init__()
        if in_dim < 1 or top_k < 1:
            raise ValueError("in_dim and top_k must be >= 1")
        self.in_dim = int(in_dim)
        self.top_k = int(top_k)
        self.n_classes = 1
        self.tile = nn.Linear(in_dim, 1)
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))

    def tile_logits(self, bag: torch.Tensor) -> torch.Tensor:
        """(..., K) lesion logits of (..., K, D) instances."""
        return self.tile(bag.float()).squeeze(-1)

    def forward(self, bag: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """As :meth:`GatedABMIL.forward`: a (K, D) bag or a (B, K, D) padded batch with mask."""
        bag, mask, single = _as_batch(bag, mask, self.in_dim)
        s = self.tile_logits(bag)  # (B, K)
        logit = self.scale * top_k_mean(s, self.top_k, mask) + self.bias
        p = torch.sigmoid(s)
        if mask is not None:
            p = p.masked_fill(~mask, 0.0)
        attention = p / p.sum(1, keepdim=True).clamp_min(1e-30)
        prob = torch.sigmoid(logit)
        if single:
            logit, prob, attention = logit[0], prob[0], attention[0]
        return MILOutput(logit=logit, prob=prob, attention=attention)

    @torch.no_grad()
    def calibrate_(self, a: float, c: float) -> None:
        """Make the slide logit ``a * logit + c`` (folded into scale and bias)."""
        self.scale.mul_(a)
        self.bias.mul_(a).add_(c)


def build_mil(config: MILConfig, in_dim: int, n_classes: int = 1) -> nn.Module:
    """Build the slide head in eval mode, loading ``config.weights`` when set.

    Args:
        config: the MIL section.
        in_dim: D, embedding width of the ViT feeding it.
        n_classes: 1 for a binary slide label.

    Raises:
        ConfigError: ``config.model`` is not a registered head.
        CheckpointRefused: the weights file is missing, unsafe, or made for another in_dim or
            hidden size (the message names the file and the mismatched tensors).
    """
    builder = MIL_HEADS.get(config.model)
    if config.weights:
        _check_sidecar(config, in_dim, n_classes)
    model = builder(config, in_dim, n_classes)
    if config.weights:
        load_into(model, config.weights)
        _logger.info("MIL head: loaded weights from %s", config.weights)
    else:
        warn_untrained_once("MIL slide head")
    return model.eval()


def trained_mil_config(weights: str, base: MILConfig | None = None) -> tuple[MILConfig, int, int]:
    """The MIL config, embedding width and class count that trained weights were made for.

    Reads the JSON config that ``wsi-prune train-mil`` writes next to the weights
    (``mil.safetensors`` → ``mil.json``); ``hidden`` comes from it, ``threshold`` from ``base``.

    Args:
        weights: the trained weights file.
        base: the run's MIL section (default: :class:`MILConfig` defaults).

    Returns:
        ``(config with weights and hidden set, in_dim, n_classes)``.

    Raises:
        CheckpointRefused: no JSON config next to ``weights``, or it is not a MIL head's.
    """
    meta = read_sidecar(weights, MIL_KIND)
    if meta is None:
        raise CheckpointRefused("no MIL config (.json) next to the weights", weights)
    base = base or MILConfig()
    try:
        config = dataclasses.replace(base, weights=str(weights), hidden=int(meta["hidden"]),
                                     model=str(meta.get("model", base.model)),
                                     top_k=int(meta.get("top_k", base.top_k)))
        return config, int(meta["in_dim"]), int(meta["n_classes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointRefused(f"MIL config lacks or mistypes {exc}", weights) from exc


def _check_sidecar(config: MILConfig, in_dim: int, n_classes: int) -> None:
    """Refuse weights whose JSON config says they were trained for another shape."""
    meta = read_sidecar(config.weights, MIL_KIND)
    if meta is None:
        return
    wanted = {"in_dim": in_dim, "hidden": config.hidden, "n_classes": n_classes,
              "model": config.model}
    if config.model == "tile-topk":
        wanted["top_k"] = config.top_k
    # sidecars written before heads were registered name no model: they are all gated ABMIL
    saved = {**meta, "model": meta.get("model", "gated-abmil")}
    diff = [f"{k}={saved.get(k)!r} (here: {v!r})" for k, v in wanted.items() if saved.get(k) != v]
    if diff:
        raise CheckpointRefused(
            "this MIL head was trained with " + ", ".join(diff)
            + " (in_dim is the ViT embedding width; trained_mil_config reads the rest)",
            config.weights,
        )


@register_mil("gated-abmil")
def _gated_abmil(config: MILConfig, in_dim: int, n_classes: int) -> GatedABMIL:
    return GatedABMIL(in_dim, hidden=config.hidden, dropout=config.dropout, n_classes=n_classes)


@register_mil("tile-topk")
def _tile_topk(config: MILConfig, in_dim: int, n_classes: int) -> TileTopK:
    if n_classes != 1:
        raise ConfigError(f"mil.model tile-topk is binary (one lesion logit per tile); "
                          f"{n_classes} classes asked")
    return TileTopK(in_dim, top_k=config.top_k)
