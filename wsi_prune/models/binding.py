"""Trained heads are bound to the models they were trained with.

A MIL head learns the embedding space of one ViT (its architecture, arguments, pooling and
weights): fed another ViT's embeddings of the same width it still runs, and its probabilities
mean nothing. A scorer learns one coarse-tile geometry. ``train-mil`` and ``train-scorer``
record what they trained on in the weights' sidecar; :func:`check_bindings` compares that with
the run's config before any slide is processed.

The bag regime is recorded too: a head trained on dense bags (every tissue tile) and fed the
pruned pipeline's bags (only the kept, most suspicious tiles) shifts its probabilities upward,
so that mismatch is a warning (train on a pruned run of the training slides instead).
"""

from __future__ import annotations

import logging
from typing import Any

from wsi_prune.config import RunConfig
from wsi_prune.errors import CheckpointRefused

_logger = logging.getLogger(__name__)

#: Seed of the random initialisation of models without weight files (every process builds the
#: same untrained model from it; it also identifies a random-init ViT).
INIT_SEED = 0
_warned: set[str] = set()


def vit_identity(config: RunConfig, vit_sha256: str | None) -> dict[str, Any]:
    """What decides a run's embeddings: the ViT's name, timm arguments, pooling and weights
    (the file's SHA-256; a random-init ViT is identified by its fixed init seed), its input
    normalisation (``vit.mean``/``std``; None: the model's own) and the tiles it sees
    (``tiling.mpp`` µm/px, ``tiling.tile_px`` px).

    Args:
        config: the run config.
        vit_sha256: SHA-256 of ``config.vit.weights`` (None: no weight file).
    """
    vit = config.vit
    ident: dict[str, Any] = {"model": vit.model, "model_kwargs": dict(vit.model_kwargs),
                             "pooling": vit.pooling, "sha256": vit_sha256,
                             # input normalisation moves every embedding: part of the space
                             "mean": None if vit.mean is None else [float(v) for v in vit.mean],
                             "std": None if vit.std is None else [float(v) for v in vit.std],
                             "tile_mpp": float(config.tiling.mpp),
                             "tile_px": int(config.tiling.tile_px)}
    if vit_sha256 is None:
        ident["pretrained"] = bool(vit.pretrained)
        ident["init_seed"] = None if vit.pretrained else INIT_SEED
    return ident


def bag_regime(config: RunConfig) -> str:
    """``dense`` (every tissue tile and token) or ``pruned``: the bags a run feeds its head."""
    return "dense" if config.is_dense() else "pruned"


def _diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = ("model", "model_kwargs", "pooling", "sha256")
    # recorded since heads bind the input too; a sidecar written before lacks them
    later = tuple(k for k in ("mean", "std", "tile_mpp", "tile_px") if k in saved)
    return [f"{k} {saved.get(k)!r} (this run: {current.get(k)!r})" for k in keys + later
            if not _same(saved.get(k), current.get(k))]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)))
    return a == b


def _teacher_sha256(vit_meta: dict[str, Any] | None, vit_sha256: str | None) -> str | None:
    """SHA-256 of the ViT that the run's ViT was distilled from (``distill-vit`` records it
    in the student's sidecar ``vit_meta``, beside the student's own digest, which must be
    ``vit_sha256``), or None."""
    info = (vit_meta or {}).get("distilled_from")
    if (vit_sha256 is None or not isinstance(info, dict) or not info.get("sha256")
            or vit_meta.get("sha256") != vit_sha256):
        return None
    return str(info["sha256"])


def check_bindings(config: RunConfig, digests: dict[str, str | None]) -> list[str]:
    """Refuse trained heads that were trained on other models than this run's; warn about a
    bag-regime mismatch.

    Args:
        config: the run config (after :func:`~wsi_prune.models.factory.apply_trained_configs`).
        digests: :meth:`RunConfig.weight_digests`.

    Returns:
        The warnings (also logged, once per process).

    Raises:
        CheckpointRefused: the MIL head's sidecar names another ViT (unless
            ``mil.allow_vit_mismatch``), or the scorer's another coarse-tile geometry.
    """
    from wsi_prune.models.mil import MIL_KIND
    from wsi_prune.models.scorer import SCORER_KIND
    from wsi_prune.models.sidecars import read_sidecar, trained_vit_config

    warnings: list[str] = []
    vit_meta = trained_vit_config(config.vit)[1] if config.vit.weights else None
    if config.mil.weights:
        meta = read_sidecar(config.mil.weights, MIL_KIND) or {}
        saved = meta.get("vit")
        current = vit_identity(config, digests.get("vit"))
        teacher = _teacher_sha256(vit_meta, digests.get("vit"))
        if saved is not None and teacher is not None and saved.get("sha256") == teacher:
            # a distill-vit student of the head's ViT: trained to give that ViT's embeddings
            # and tile logits, so the head reads the same space
            _logger.info("%s: trained on the ViT this run's ViT was distilled from",
                         config.mil.weights)
            current = {**current, "sha256": teacher}
        if saved is None:
            warnings.append(f"{config.mil.weights}: the MIL head's sidecar does not say which "
                            "ViT it was trained on (trained before this was recorded); make sure "
                            f"it was {config.vit.model}")
        elif diff := _diff(saved, current):
            msg = ("this MIL head was trained on the embeddings of another ViT: "
                   + "; ".join(diff) + ". Retrain it (train-mil) on a run of this config")
            if not config.mil.allow_vit_mismatch:
                raise CheckpointRefused(msg + ", or set mil.allow_vit_mismatch: true to use it "
                                        "anyway", config.mil.weights)
            warnings.append(f"{config.mil.weights}: {msg} (mil.allow_vit_mismatch is set)")
        regime = meta.get("regime")
        # tile-topk reads only the bag's top tiles: kept tiles are those, so no shift to warn of
        if (regime == "dense" and bag_regime(config) == "pruned"
                and meta.get("model") != "tile-topk"):
            warnings.append(f"{config.mil.weights}: this MIL head was trained on dense bags and "
                            "this run feeds it pruned ones (only the kept tiles), which shifts its "
                            "probabilities; train it on a pruned run of the training slides "
                            "(README: Training and evaluation)")
    if config.scorer.weights:
        meta = read_sidecar(config.scorer.weights, SCORER_KIND) or {}
        want = {"coarse_px": config.tiling.coarse_px, "coarse_mpp": config.tiling.coarse_mpp}
        bad = [f"{k} {meta[k]!r} (this run: {v!r})" for k, v in want.items()
               if meta.get(k) is not None and abs(float(meta[k]) - float(v)) > 1e-6]
        if bad:
            raise CheckpointRefused("this scorer was trained on other coarse tiles: "
                                    + "; ".join(bad) + " (tiling.mpp, tile_px, coarse_factor)",
                                    config.scorer.weights)
    if config.vit.weights:
        want = {"tile_px": config.tiling.tile_px, "mpp": config.tiling.mpp}
        bad = [f"{k} {vit_meta[k]!r} (this run: {v!r})" for k, v in want.items()
               if vit_meta and vit_meta.get(k) is not None
               and abs(float(vit_meta[k]) - float(v)) > 1e-6]
        if bad:
            raise CheckpointRefused("this ViT was trained on other tiles: " + "; ".join(bad)
                                    + " (tiling.mpp, tiling.tile_px)", config.vit.weights)
    for w in warnings:
        if w not in _warned:
            _warned.add(w)
            _logger.warning("%s", w)
    return warnings
