"""The JSON config saved next to trained weights (``scorer.safetensors`` → ``scorer.json``):
the architecture and the training data a weights file was made with, so a run config only has
to name the weights file and a mismatch is refused instead of silently loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsi_prune._files import write_text_atomic
from wsi_prune.config import ViTConfig
from wsi_prune.errors import CheckpointRefused

_logger = logging.getLogger(__name__)

#: ``kind`` of the JSON config ``train-vit`` saves next to its weights
VIT_KIND = "wsi-prune-vit"

PathLike = str | os.PathLike[str]


_warned_untrained: set[str] = set()


def warn_untrained_once(what: str) -> None:
    """Log, once per process and per ``what``, that a model runs with random weights."""
    if what not in _warned_untrained:
        _warned_untrained.add(what)
        _logger.warning(
            "%s has no trained weights (random init): its outputs are meaningless until "
            "trained weights are given",
            what,
        )


def sidecar_path(weights: PathLike) -> Path:
    """The JSON config that goes with a weights file: same name, ``.json`` suffix
    (``scorer.safetensors`` → ``scorer.json``)."""
    return Path(weights).with_suffix(".json")


def write_sidecar(weights: PathLike, config: Mapping[str, Any]) -> Path:
    """Write the JSON config of a weights file atomically next to it.

    Args:
        weights: the weights file the config describes.
        config: JSON-serialisable mapping (architecture, training settings, metrics).

    Returns:
        The path written (see :func:`sidecar_path`).
    """
    return write_text_atomic(sidecar_path(weights),
                             json.dumps(dict(config), indent=2, sort_keys=True) + "\n")


def read_sidecar(weights: PathLike, kind: str | None = None) -> dict[str, Any] | None:
    """Read the JSON config next to a weights file, if there is one.

    Args:
        weights: the weights file.
        kind: when given, the config's ``kind`` must equal it (``wsi-prune-scorer``,
            ``wsi-prune-mil``), so that a MIL head is never loaded as a scorer.

    Returns:
        The config, or None when no sidecar file exists.

    Raises:
        CheckpointRefused: the sidecar is not valid JSON, not an object, or of another kind.
    """
    path = sidecar_path(weights)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointRefused(f"unreadable model config ({exc})", path) from exc
    if not isinstance(data, dict):
        raise CheckpointRefused("a model config must be a JSON object", path)
    if kind is not None and data.get("kind") != kind:
        raise CheckpointRefused(
            f"model config is of kind {data.get('kind')!r}, expected {kind!r}; "
            f"{os.fspath(weights)} holds another model's weights", path
        )
    return data


def trained_vit_config(config: ViTConfig) -> tuple[ViTConfig, dict | None]:
    """The ViT config that ``config.weights`` was trained with, when ``train-vit`` wrote them.

    A ``train-vit`` sidecar (``vit.json`` next to ``vit.safetensors``, kind
    :data:`VIT_KIND`) names the architecture (``model``, ``model_kwargs``); the run's other
    ViT settings (pruning, pooling, batch size) stay. Weights without such a sidecar (a
    foundation model's file) are used with the config as it is.

    Returns:
        ``(config, sidecar or None)``.
    """
    path = sidecar_path(config.weights) if config.weights else None
    if path is None or not path.is_file():
        return config, None
    try:
        meta = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return config, None  # not ours: a foundation model's own JSON, say
    if not isinstance(meta, dict) or meta.get("kind") != VIT_KIND:
        return config, None
    cfg = dataclasses.replace(config, model=str(meta["model"]),
                              model_kwargs=dict(meta.get("model_kwargs") or {}),
                              pretrained=False)
    return cfg, meta
