"""The run's three models, built in one place: :func:`build_models` turns a
:class:`~wsi_prune.config.RunConfig` into the CNN scorer, the pruned ViT and the MIL head (with
their weights, normalisation and MAC counts), as timm's ``create_model`` turns a name into a
model. Everything that runs a slide, in this process or on a Dask worker, calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import timm.data
import torch

from wsi_prune._devices import check_device
from wsi_prune.config import RunConfig
from wsi_prune.errors import ConfigError
from wsi_prune.models.accel import fused_for_inference, normalise_tiles, to_device
from wsi_prune.models.binding import INIT_SEED, check_bindings
from wsi_prune.models.checkpoints import load_into
from wsi_prune.models.mil import build_mil, trained_mil_config
from wsi_prune.models.pruned_vit import PrunedViT, build_vit
from wsi_prune.models.scorer import build_scorer, trained_scorer_config
from wsi_prune.models.sidecars import sidecar_path, trained_vit_config
from wsi_prune.selection.macs import ViTSpec, cnn_macs
from wsi_prune.selection.registry import check_policies


def apply_trained_configs(config: RunConfig) -> RunConfig:
    """Take the architecture of trained scorer, ViT and MIL weights from the JSON that
    ``train-scorer``, ``train-vit`` and ``train-mil`` write next to them, so a run config only
    has to name the weights file. Weights without such a JSON are used with the config as it
    is."""
    if config.vit.weights:
        vit, _ = trained_vit_config(config.vit)
        config = config.replace(vit=vit)
    if config.scorer.weights and sidecar_path(config.scorer.weights).is_file():
        scorer, _ = trained_scorer_config(config.scorer.weights, config.scorer)
        config = config.replace(scorer=scorer)
    if config.mil.weights and sidecar_path(config.mil.weights).is_file():
        mil, _, _ = trained_mil_config(config.mil.weights, config.mil)
        config = config.replace(mil=mil)
    return config




def describe_models(config: RunConfig, digests: dict[str, str | None] | None = None
                    ) -> dict[str, Any]:
    """Names, weight files and their SHA-256 of the run's three models, without building them
    (a run whose slides are all skipped describes them in its manifest all the same).

    Args:
        digests: :meth:`RunConfig.weight_digests`, when already computed.
    """
    digests = config.weight_digests() if digests is None else digests
    paths = config.weight_paths()

    def weights(name: str) -> dict[str, Any]:
        # "trained": loaded from a file; without one the model is random-init (INIT_SEED)
        return {"weights": paths[name], "sha256": digests.get(name),
                "trained": bool(paths[name])}

    return {
        "scorer": {"model": config.scorer.model, **weights("scorer")},
        "vit": {"model": config.vit.model, "model_kwargs": config.vit.model_kwargs,
                **weights("vit"), "pretrained": config.vit.pretrained},
        "mil": {"model": config.mil.model, "hidden": config.mil.hidden, **weights("mil")},
    }


@dataclass
class Models:
    """The three models of a run, built once per process, on ``device``."""

    scorer: torch.nn.Module
    vit: torch.nn.Module  # PrunedViT
    mil: torch.nn.Module
    grid: tuple[int, int]
    vit_mean: torch.Tensor
    vit_std: torch.Tensor
    describe: dict[str, Any] = field(default_factory=dict)
    macs: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    def vit_input(self, tiles: np.ndarray) -> torch.Tensor:
        """ViT input from RGB tiles: uint8 to the device (pinned on CUDA), then float,
        scaled to [0, 1] and normalised there.

        Args:
            tiles: (B, H, W, 3) uint8.

        Returns:
            (B, 3, H, W) float32 on :attr:`device`.
        """
        # at 12 tokens a tile the formula's four passes were a fifth of the ViT stage
        return normalise_tiles(to_device(tiles, self.device), self.vit_mean, self.vit_std)


def build_models(config: RunConfig, device: str = "cpu",
                 digests: dict[str, str | None] | None = None) -> Models:
    """Build scorer, pruned ViT and MIL head from the config (local weights only unless the
    config asks for hub weights), on ``device``.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; weights are built and loaded on the
            CPU (the same random init everywhere), then moved.
        digests: :meth:`RunConfig.weight_digests`, when already computed (for ``describe``).

    Raises:
        ConfigError / CheckpointRefused: unknown models or selection policies, bad or unsafe
            weight files, a device that is misspelt or not here.
    """
    device = check_device(device)
    check_policies(config)
    check_bindings(config, config.weight_digests() if digests is None else digests)
    # Parts without weight files start from one fixed seed, so every process (Dask workers,
    # SLURM array tasks, a resumed run) builds the same untrained model and their slides agree.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        vit_model = build_vit(config.vit, load_weights=load_into)
        scorer = build_scorer(config.scorer, vit_model.patch_embed.grid_size[0])
        embed_dim = int(vit_model.num_features) * (2 if config.vit.pooling == "cls+mean" else 1)
        mil = build_mil(config.mil, embed_dim)
    pruned = PrunedViT(vit_model, config.vit).to(device).eval()
    gh, gw = vit_model.patch_embed.grid_size
    if gh != gw:
        raise ConfigError(f"vit.model has a non-square patch grid {gh}x{gw}")
    img = vit_model.patch_embed.img_size
    if tuple(img) != (config.tiling.tile_px, config.tiling.tile_px):
        raise ConfigError(
            f"vit.model takes {img[0]}x{img[1]} px images but tiling.tile_px is "
            f"{config.tiling.tile_px}; set vit.model_kwargs.img_size or tiling.tile_px"
        )
    scorer, mil = scorer.to(device), mil.to(device)
    data_cfg = timm.data.resolve_data_config({}, model=vit_model)
    mean = torch.tensor(data_cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg["std"], device=device).view(1, 3, 1, 1)

    cp = config.tiling.coarse_px
    describe = describe_models(config, digests)
    macs = {
        "spec": ViTSpec.from_timm(vit_model),
        "scorer_per_tile": cnn_macs(scorer, (3, cp, cp)),
    }
    # inference only from here: batch norms folded into the convolutions (checked equal)
    scorer = fused_for_inference(scorer, (4, 3, cp, cp))
    return Models(scorer, pruned, mil, (gh, gw), mean, std, describe, macs, str(device))
