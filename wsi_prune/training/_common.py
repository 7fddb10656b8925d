"""Pieces both trainers share: seeded, thread-bounded blocks and the safetensors + JSON sidecar
output that :func:`~wsi_prune.models.scorer.trained_scorer_config` and
:func:`~wsi_prune.models.mil.trained_mil_config` read back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_prune import __version__
from wsi_prune._files import file_sha256
from wsi_prune.errors import ConfigError
from wsi_prune.models.accel import normalise_tiles
from wsi_prune.models.checkpoints import save_safetensors
from wsi_prune.models.sidecars import write_sidecar

_logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def seeded(seed: int, threads: int | None) -> Iterator[None]:
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


def check_out(out_path: PathLike) -> Path:
    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise ConfigError("the output must be a .safetensors file (its .json goes next to it)",
                          out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def save_model(model: torch.nn.Module, out_path: Path, meta: dict[str, Any]) -> Path:
    save_safetensors(model, out_path, metadata={"kind": meta["kind"],
                                                "wsi_prune_version": __version__})
    meta = {**meta, "weights": out_path.name, "sha256": file_sha256(out_path),
            "wsi_prune_version": __version__}
    path = write_sidecar(out_path, meta)
    _logger.info("wrote %s and %s", out_path, path)
    return path


def optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler,
                   params: list[torch.nn.Parameter], max_norm: float = 1.0) -> float:
    """One update: gradients of ``loss``, clipped to ``max_norm``, an optimiser and a schedule
    step. Returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    sched.step()
    return float(loss.detach())


def end_epoch(losses: list[float], total: float, steps: int, bar: Any, t0: float,
              max_minutes: float | None, epochs: int, lr: float, what: str = "training"
              ) -> tuple[bool, bool]:
    """Record an epoch's mean loss (``total / steps``) in ``losses`` and on the progress bar.

    Returns:
        ``(stop, stopped_early)``: the time budget (``max_minutes`` since ``t0``) is spent,
        and that ended training before ``epochs``.

    Raises:
        ConfigError: the loss is not finite (``what`` names it: "training", "distillation").
    """
    losses.append(total / steps)
    if not math.isfinite(losses[-1]):
        raise ConfigError(f"{what} loss became {losses[-1]} (lr {lr:g} too high?)")
    bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes:
        return True, len(losses) < epochs
    return False, False


def input_norm(vit: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) mean and std the ViT's inputs are normalised with, as ``build_models``
    resolves them (timm's data config of the model)."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=vit)
    return (torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1))


def normalised(pixels: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float ViT input from (B, H, W, 3) uint8 tiles, computed as ``run``
    computes it (:func:`~wsi_prune.models.accel.normalise_tiles`)."""
    return normalise_tiles(torch.from_numpy(np.ascontiguousarray(pixels)), mean, std)
