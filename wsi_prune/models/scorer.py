"""The cheap CNN triage model: patch-importance maps and tile scores from coarse tiles.

A :class:`PatchScorer` looks at a coarse tile (default 56×56 px at 2.0 µm/px, the same footprint
as a 224×224 px full-resolution tile at 0.5 µm/px) and predicts, for each patch of the ViT that
will later see the full-resolution tile, how important that patch is. Its map is therefore on the
ViT patch grid: G×G with G = vit tile_px / vit patch_size (14 for 224/16, 16 for 224/14). From the
map it derives a tile score (for tile selection) and from the backbone a tile embedding (for the
redundancy filter).

:func:`score_tiles` runs a scorer over an (N, h, w, 3) uint8 array such as a Zarr array,
streaming it in batches so that memory is bounded by the batch size, not by the slide.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsi_prune._registry import Registry
from wsi_prune.config import ScorerConfig
from wsi_prune.errors import CheckpointRefused, ConfigError
from wsi_prune.models.accel import autocast, to_device
from wsi_prune.models.checkpoints import load_into
from wsi_prune.models.sidecars import read_sidecar, warn_untrained_once

_logger = logging.getLogger(__name__)

__all__ = [
    "PatchScorer",
    "ScorerOutput",
    "build_scorer",
    "list_scorers",
    "pool_patch_map",
    "register_scorer",
    "score_tiles",
    "to_input",
    "trained_scorer_config",
]

#: ``kind`` of the JSON config saved next to trained scorer weights
SCORER_KIND = "wsi-prune-scorer"
# The scorer fields that define its architecture; the rest (batch size, threads) are run settings.
_ARCH_FIELDS = ("model", "feature_levels", "head_channels")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

ScorerBuilder = Callable[[ScorerConfig, int], nn.Module]
SCORERS: Registry[ScorerBuilder] = Registry("scorer")


@dataclass
class ScorerOutput:
    """What a scorer says about a batch of B coarse tiles (CPU or model device).

    Attributes:
        patch: (B, G, G) float32 in [0, 1], patch importance on the ViT patch grid (row-major,
            row 0 at the top of the tile).
        tile: (B,) float32 in [0, 1], tile score pooled from ``patch``.
        embedding: (B, C) float32, global average of the last backbone feature map.
    """

    patch: torch.Tensor
    tile: torch.Tensor
    embedding: torch.Tensor

    def __len__(self) -> int:
        return int(self.tile.shape[0])

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(patch, tile, embedding)`` as float32 NumPy arrays."""
        return (
            self.patch.detach().cpu().numpy(),
            self.tile.detach().cpu().numpy(),
            self.embedding.detach().cpu().numpy(),
        )


def register_scorer(name: str) -> Callable[[ScorerBuilder], ScorerBuilder]:
    """Register ``builder(config, grid) -> module`` under ``name`` (used as ``scorer.model``).

    The module's forward must take (B, 3, h, w) uint8 or [0, 1] float input and return a
    :class:`ScorerOutput`, and it must expose ``grid`` and ``embed_dim`` attributes. Names not
    registered are taken as timm CNN names and built as a :class:`PatchScorer`.
    """

    return SCORERS.register(name)


def list_scorers() -> list[str]:
    """Names registered with :func:`register_scorer` (any timm CNN name works as well)."""
    return SCORERS.names()


def pool_patch_map(patch: torch.Tensor, pooling: str, topk: int = 8) -> torch.Tensor:
    """Tile scores from patch maps.

    Args:
        patch: (B, G, G) patch importance.
        pooling: ``max``, ``mean`` or ``topk`` (mean of the ``topk`` highest patches).
        topk: patches averaged by ``topk``; clamped to G*G.

    Returns:
        (B,) tile scores; always ``max >= topk >= mean`` for the same map.
    """
    flat = patch.flatten(1)
    if pooling == "max":
        return flat.amax(dim=1)
    if pooling == "mean":
        return flat.mean(dim=1)
    if pooling == "topk":
        k = max(1, min(int(topk), flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ConfigError(f"unknown tile pooling {pooling!r} (max|mean|topk)")


class PatchScorer(nn.Module):
    """timm CNN backbone + light 1×1-conv head giving a patch map on the ViT patch grid.

    The head projects one or two backbone levels (``config.feature_levels``) to
    ``config.head_channels`` with 1×1 convs, upsamples the deeper one onto the shallower one, adds
    them, and a last 1×1 conv gives one logit per position. That logit map is resampled to G×G
    (average pooling when it is finer than G, bilinear when coarser, as for a 56 px tile whose
    stride-8 map is 7×7) before the sigmoid.

    Args:
        config: the scorer section; ``config.model`` must be a timm CNN with ``features_only``.
        grid: G, side of the ViT patch grid of the matching full-resolution tile.
        pretrained: start the backbone from timm's pretrained (ImageNet) weights, which timm
            downloads (network); used to initialise training, never at inference.
    """

    def __init__(self, config: ScorerConfig, grid: int, pretrained: bool = False) -> None:
        super().__init__()
        import timm

        if grid < 1:
            raise ConfigError(f"scorer grid must be >= 1, got {grid}")
        if not timm.is_model(config.model):
            raise ConfigError(f"unknown timm model {config.model!r} for the scorer")
        try:
            self.backbone = timm.create_model(
                config.model,
                pretrained=pretrained,
                features_only=True,
                out_indices=config.feature_levels,
            )
        except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
            raise ConfigError(
                f"timm model {config.model!r} cannot give feature levels "
                f"{config.feature_levels} ({exc}); use a CNN that supports features_only"
            ) from exc
        except Exception as exc:
            if not pretrained:
                raise
            raise CheckpointRefused(
                f"could not download pretrained {config.model} weights "
                f"({type(exc).__name__}: {exc}); this needs network access"
            ) from exc
        channels = list(self.backbone.feature_info.channels())
        self.lateral = nn.ModuleList(nn.Conv2d(c, config.head_channels, 1) for c in channels)
        self.classifier = nn.Conv2d(config.head_channels, 1, 1)
        self.grid = int(grid)
        self.pooling = config.pooling
        self.topk = config.topk
        self.embed_dim = channels[-1]
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", _IMAGENET_MEAN)
        std = cfg.get("std", _IMAGENET_STD)
        # Not persistent: normalisation is a property of the backbone, not a trained weight, and
        # keeping it out of the state dict keeps checkpoints interchangeable.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> ScorerOutput:
        """Score a batch of tiles.

        Args:
            x: (B, 3, h, w) uint8 (0-255) or float in [0, 1]; channels_last is fastest.
                ImageNet normalisation is applied here.

        Returns:
            :class:`ScorerOutput` with patch (B, G, G), tile (B,), embedding (B, C), float32.
        """
        logits, embedding = self.forward_logits(x)
        patch = torch.sigmoid(logits)
        tile = pool_patch_map(patch, self.pooling, self.topk)
        return ScorerOutput(patch=patch, tile=tile, embedding=embedding)

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch logits before the sigmoid (what training needs for a stable BCE).

        Args:
            x: as for :meth:`forward`.

        Returns:
            ``(logits, embedding)``: (B, G, G) float32 patch logits on the ViT patch grid and
            (B, C) float32 tile embedding.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"scorer input must be (B, 3, h, w), got {tuple(x.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (x - self.mean) / self.std
        feats = self.backbone(x)
        size = feats[0].shape[-2:]
        fused = self.lateral[0](feats[0])
        for conv, f in zip(self.lateral[1:], feats[1:], strict=True):
            fused = fused + F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
        logits = self.classifier(F.relu(fused))
        embedding = feats[-1].float().mean(dim=(2, 3))
        return _to_grid(logits, self.grid)[:, 0].float(), embedding


def _to_grid(logits: torch.Tensor, grid: int) -> torch.Tensor:
    h, w = logits.shape[-2:]
    if h >= grid and w >= grid:
        return F.adaptive_avg_pool2d(logits, (grid, grid))
    # A coarser map (a 56 px tile gives 7×7 at stride 8) is interpolated rather than
    # block-replicated so that the map has no 2×2 staircase aligned to nothing in the tissue.
    return F.interpolate(logits, size=(grid, grid), mode="bilinear", align_corners=False)


def to_input(tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn (B, h, w, 3) uint8 RGB tiles into scorer input.

    Args:
        tiles: (B, h, w, 3) uint8 array or tensor (NHWC).

    Returns:
        (B, 3, h, w) float32 in [0, 1], channels_last memory format (a view-permute of the NHWC
        data, so no transpose copy is made).
    """
    t = torch.as_tensor(np.ascontiguousarray(tiles)) if not torch.is_tensor(tiles) else tiles
    if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"tiles must be (B, h, w, 3) uint8, got {tuple(t.shape)} {t.dtype}")
    x = t.permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


def build_scorer(config: ScorerConfig, grid: int) -> nn.Module:
    """Build the triage scorer for a ViT patch grid of G×G, in eval mode, channels_last.

    Args:
        config: the scorer section. A name registered with :func:`register_scorer` is built by
            its builder; any other name as a timm :class:`PatchScorer`. ``config.weights``
            (the whole scorer's state dict) is loaded when set.
        grid: G, e.g. 14 for a 224 px tile and patch 16.

    Raises:
        ConfigError: unknown model or unusable feature levels.
        CheckpointRefused: the weights file is missing, unsafe or does not fit.
    """
    if config.weights:
        _check_sidecar(config, grid)
    if config.model in SCORERS:
        model = SCORERS.get(config.model)(config, grid)
    else:
        model = PatchScorer(config, grid)
    if config.weights:
        load_into(model, config.weights)
        _logger.info("scorer %s: loaded weights from %s", config.model, config.weights)
    else:
        warn_untrained_once(f"scorer {config.model!r}")
    return model.to(memory_format=torch.channels_last).eval()


def trained_scorer_config(
    weights: str, base: ScorerConfig | None = None
) -> tuple[ScorerConfig, int]:
    """The scorer config and patch grid that trained weights were made for.

    Reads the JSON config that ``wsi-prune train-scorer`` writes next to the weights
    (``scorer.safetensors`` → ``scorer.json``) and applies its architecture (model,
    feature_levels, head_channels) to ``base``; run settings (batch size, threads, pooling)
    stay those of ``base``.

    Args:
        weights: the trained weights file.
        base: the run's scorer section (default: :class:`ScorerConfig` defaults).

    Returns:
        ``(config with weights set, G)``.

    Raises:
        CheckpointRefused: no JSON config next to ``weights``, or it is not a scorer's.
    """
    meta = read_sidecar(weights, SCORER_KIND)
    if meta is None:
        raise CheckpointRefused("no scorer config (.json) next to the weights", weights)
    base = base or ScorerConfig()
    try:
        arch = {k: meta[k] for k in _ARCH_FIELDS}
        grid = int(meta["grid"])
        config = dataclasses.replace(base, weights=str(weights), **arch)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointRefused(f"scorer config lacks or mistypes {exc}", weights) from exc
    return config, grid


def _check_sidecar(config: ScorerConfig, grid: int) -> None:
    """Refuse weights whose JSON config says they were trained for another scorer or grid."""
    meta = read_sidecar(config.weights, SCORER_KIND)
    if meta is None:
        return
    wanted = {"model": config.model, "feature_levels": list(config.feature_levels),
              "head_channels": config.head_channels, "grid": grid}
    saved = {k: meta.get(k) for k in wanted}
    saved["feature_levels"] = list(saved["feature_levels"] or [])
    diff = [f"{k}={saved[k]!r} (config: {wanted[k]!r})" for k in wanted if saved[k] != wanted[k]]
    if diff:
        raise CheckpointRefused(
            "these scorer weights were trained with " + ", ".join(diff)
            + "; set the scorer section to match (trained_scorer_config does it)",
            config.weights,
        )


def score_tiles(
    scorer: nn.Module,
    tiles,
    batch_size: int,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
) -> ScorerOutput:
    """Score every tile of an (N, h, w, 3) uint8 array, streaming it in batches.

    Args:
        scorer: a module from :func:`build_scorer`; run in eval mode (its mode is restored).
        tiles: (N, h, w, 3) uint8 array-like sliceable on the first axis (NumPy, Zarr, Dask);
            only ``batch_size`` tiles are read at a time.
        batch_size: tiles per forward pass.
        threads: torch intra-op threads for this call (restored afterwards); None: unchanged.
        progress: called as ``progress(n_done, n_total)`` after each batch.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast of the forward
            (:func:`wsi_prune.models.accel.autocast`; ``scorer.precision``).

    Returns:
        :class:`ScorerOutput` for all N tiles, CPU float32: patch (N, G, G), tile (N,),
        embedding (N, C).
    """
    shape = tuple(tiles.shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"tiles must be (N, h, w, 3), got shape {shape}")
    if np.dtype(tiles.dtype) != np.uint8:
        raise ValueError(f"tiles must be uint8, got {tiles.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = shape[0]
    grid, embed_dim = int(scorer.grid), int(scorer.embed_dim)
    patch = torch.empty((n, grid, grid), dtype=torch.float32)
    tile = torch.empty((n,), dtype=torch.float32)
    embedding = torch.empty((n, embed_dim), dtype=torch.float32)
    device = next(scorer.parameters()).device
    prev_threads = torch.get_num_threads()
    was_training = scorer.training
    scorer.eval()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                batch = np.asarray(tiles[start:stop])
                # uint8 travels to the device (4× less than float, pinned on CUDA) and is
                # normalised there.
                x = to_device(batch, device).permute(0, 3, 1, 2)
                with autocast(device, precision):
                    out = scorer(x)
                patch[start:stop] = out.patch.float().cpu()
                tile[start:stop] = out.tile.float().cpu()
                embedding[start:stop] = out.embedding.float().cpu()
                if progress is not None:
                    progress(stop, n)
    finally:
        scorer.train(was_training)
        if threads is not None:
            torch.set_num_threads(prev_threads)
    return ScorerOutput(patch=patch, tile=tile, embedding=embedding)
