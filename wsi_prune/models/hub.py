"""Where a ViT's weights come from: a local file, timm's or the Hugging Face Hub's pretrained
weights, and ``hf-hub:`` names resolved to a timm architecture offline (the HF cache's
``config.json`` or :data:`KNOWN_HUB_MODELS`), so a local copy of a foundation model's weights
never needs the network. Hub failures become :class:`~wsi_prune.errors.CheckpointRefused`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from wsi_prune.errors import CheckpointRefused, ConfigError
from wsi_prune.models.checkpoints import load_into

_logger = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ModelSource:
    """How to build a timm model.

    Attributes:
        name: timm model name or ``hf-hub:org/name``.
        pretrained: ask timm for pretrained weights (timm or Hub download, or its cache).
        weights_path: local weights file to load after building, or None.
        architecture: the timm architecture to build *instead of* ``name``, with
            ``pretrained=False``: set for a hub name whose weights are local, so that building
            it never needs the Hub (see :func:`hub_architecture`). None: build ``name``.
        model_args: ``timm.create_model`` arguments that ``architecture`` needs (the caller's
            own arguments override them).
        pretrained_cfg: ``pretrained_cfg_overlay`` for ``architecture`` (normalisation).
    """

    name: str
    pretrained: bool
    weights_path: str | None
    architecture: str | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)
    pretrained_cfg: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_hub(self) -> bool:
        """The name points at the Hugging Face Hub."""
        return self.name.startswith(HUB_PREFIX)


#: Hub models whose timm architecture is known here, so that a local copy of their weights
#: builds with no network: for an ``hf-hub:`` name timm fetches the repo's ``config.json`` even
#: with ``pretrained=False``. Keys are lower-case repo ids; values ``(architecture, model args,
#: pretrained-config overlay)`` as on the model card. UNI's card passes ``init_values`` and
#: ``dynamic_img_size`` explicitly, and its ImageNet normalisation differs from the 0.5/0.5 of
#: timm's default ``vit_large_patch16_224`` weights. Adding a model is one entry.
KNOWN_HUB_MODELS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "mahmoodlab/uni": (
        "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
         "dynamic_img_size": True},
        {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    ),
}


# pretrained-config fields a hub config.json may set that decide how images are prepared
_DATA_CFG_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off now (``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE``, read at call time; huggingface_hub reads them once, at import)."""
    env = any(
        os.environ.get(k, "").strip().upper() in _TRUE
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return env
    return env or bool(constants.HF_HUB_OFFLINE)


def _split_hub_name(name: str) -> tuple[str, str | None]:
    repo, _, revision = name[len(HUB_PREFIX):].partition("@")
    return repo, revision or None


def _cached_hub_file(repo: str, filename: str, revision: str | None) -> str | None:
    """The file's path in the local Hugging Face cache, or None; never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        found = try_to_load_from_cache(repo, filename, revision=revision)
    except ValueError:  # a repo id the cache layout cannot hold
        return None
    return found if isinstance(found, str) else None


def _read_hub_config(path: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(architecture, model_args, data config)`` from a timm hub ``config.json``."""
    try:
        cfg = json.loads(Path(path).read_text("utf-8"))
        arch = cfg["architecture"]
        # timm's legacy layout is one flat dict; the current one nests pretrained_cfg
        pcfg = cfg.get("pretrained_cfg", cfg)
        args = dict(cfg.get("model_args") or {})
        if not isinstance(arch, str) or not isinstance(pcfg, dict):
            raise TypeError("architecture must be a string and pretrained_cfg an object")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointRefused(f"unreadable timm hub config ({exc})", path) from exc
    return arch, args, {k: pcfg[k] for k in _DATA_CFG_KEYS if pcfg.get(k) is not None}


def hub_architecture(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The timm architecture behind an ``hf-hub:`` name, found without the network.

    Looks in the local Hugging Face cache for the repo's ``config.json`` (what timm would
    download), then in :data:`KNOWN_HUB_MODELS`; for a known model the cached config's values
    win over the table's.

    Args:
        name: ``hf-hub:org/name`` (optionally ``@revision``).

    Returns:
        ``(architecture, model args, pretrained-config overlay)``.

    Raises:
        ConfigError: neither the cache nor the table knows the model.
        CheckpointRefused: the cached config is unreadable.
    """
    repo, revision = _split_hub_name(name)
    known = KNOWN_HUB_MODELS.get(repo.lower())
    path = _cached_hub_file(repo, "config.json", revision)
    if path is not None:
        arch, args, pcfg = _read_hub_config(path)
        if known is not None:
            args, pcfg = {**known[1], **args}, {**known[2], **pcfg}
        _logger.debug("%s: architecture %s from the cached %s", name, arch, path)
        return arch, args, pcfg
    if known is not None:
        return known[0], dict(known[1]), dict(known[2])
    raise ConfigError(
        f"{name} with a local weights file: its architecture must be known without the Hub, "
        f"but {repo}'s config.json is not in the Hugging Face cache and wsi-prune does not "
        f"know it ({', '.join(sorted(KNOWN_HUB_MODELS))}); name its timm architecture instead "
        "(e.g. vit_large_patch16_224) with the arguments of its model card as model_kwargs"
    )


def resolve_model_source(name: str, weights: PathLike | None, pretrained: bool) -> ModelSource:
    """Decide where a model's architecture and weights come from, without touching the network.

    A local ``weights`` file always wins over ``pretrained``: the model is built with
    ``pretrained=False`` and the file loaded, and a hub name's architecture comes from
    :func:`hub_architecture` (cache or known models), never from the Hub. The Hub (or timm's
    download) is used only for ``pretrained`` without a local file. Hub names need either.

    Args:
        name: timm model name or ``hf-hub:org/name``.
        weights: local weights file, or None.
        pretrained: the user asked for pretrained (downloaded) weights.

    Returns:
        The :class:`ModelSource` to pass to :func:`create_architecture` or
        :func:`create_from_source`.

    Raises:
        CheckpointRefused: the weights file is missing, or a hub model was named without
            ``pretrained`` or a local file.
        ConfigError: ``name`` is not a timm model, or a hub name with a local file whose
            architecture is unknown offline.
    """
    is_hub = name.startswith(HUB_PREFIX)
    if weights is not None:
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise CheckpointRefused("weights file not found", weights)
        if pretrained:
            _logger.info("local weights %s given: not downloading pretrained %s", weights, name)
        if is_hub:
            arch, args, pcfg = hub_architecture(name)
            return ModelSource(name, False, weights, arch, args, pcfg)
    elif is_hub and not pretrained:
        raise CheckpointRefused(
            f"{name} is a Hugging Face Hub model: give a local safetensors file of its weights "
            "(works offline), or set pretrained: true to download it (needs network access "
            "and, for gated models such as UNI, an accepted license and a token from "
            "`huggingface-cli login` or HF_TOKEN)"
        )
    if not is_hub:
        import timm

        if not timm.is_model(name):
            raise ConfigError(f"unknown timm model {name!r}")
    return ModelSource(name=name, pretrained=bool(pretrained) and weights is None,
                       weights_path=weights)


def _hub_refusal(name: str, exc: BaseException | None) -> CheckpointRefused:
    cause = "" if exc is None else f" ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
    if hub_offline():
        return CheckpointRefused(
            f"{name} needs the Hugging Face Hub, but the Hub is switched off (HF_HUB_OFFLINE) "
            f"and its files are not in the local cache{cause}. Download the weights once where "
            "there is a network and pass the local safetensors file as the weights "
            "(vit.weights for the ViT)."
        )
    return CheckpointRefused(
        f"could not get {name} from the Hugging Face Hub{cause}; this needs network access "
        "and, for gated models, an accepted license and a token (`huggingface-cli login` or "
        "HF_TOKEN). Offline, download the weights once and pass the local safetensors file as "
        "the weights (vit.weights for the ViT)."
    )


def create_architecture(source: ModelSource, **timm_kwargs: Any) -> nn.Module:
    """Build the model ``source`` describes with ``timm.create_model``, local weights not loaded.

    With ``source.architecture`` set this is ``create_model(architecture, pretrained=False)``
    and never needs the Hub. Otherwise timm builds ``source.name``, downloading only when
    ``source.pretrained`` (or for a hub name's config); when the Hub is switched off only the
    local Hugging Face cache is used.

    Args:
        source: from :func:`resolve_model_source`.
        **timm_kwargs: extra ``timm.create_model`` arguments (``num_classes=0``, tiny test
            configs, ``features_only``...); they override ``source.model_args``, and a
            ``pretrained_cfg_overlay`` is merged over ``source.pretrained_cfg``.

    Raises:
        CheckpointRefused: the Hub is needed but switched off or unreachable, or refused access;
            the message names the model and says to pass a local safetensors file.
        ConfigError: the hub config names an architecture this timm does not have.
        TypeError: a wrong keyword (a programming error, not a download problem).
    """
    import timm

    overlay = {**source.pretrained_cfg, **(timm_kwargs.pop("pretrained_cfg_overlay", None) or {})}
    if source.architecture is not None:
        kwargs = {**source.model_args, **timm_kwargs}
        if not timm.is_model(source.architecture):
            raise ConfigError(f"{source.name}: unknown timm architecture {source.architecture!r}")
        return timm.create_model(
            source.architecture, pretrained=False, pretrained_cfg_overlay=overlay or None,
            **kwargs,
        )
    needs_hub = source.pretrained or source.is_hub
    offline = needs_hub and hub_offline()
    if offline and not source.is_hub and not timm.models.get_pretrained_cfg_value(
        source.name, "hf_hub_id"
    ):
        # weights behind a plain URL: torch.hub would try the network, and nothing caches
        raise _hub_refusal(source.name, None)
    if overlay:
        timm_kwargs["pretrained_cfg_overlay"] = overlay
    try:
        with _hub_offline_mode(offline):
            return timm.create_model(source.name, pretrained=source.pretrained, **timm_kwargs)
    except TypeError:
        raise
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"{source.name}: {exc}") from exc
        if not needs_hub:
            raise
        raise _hub_refusal(source.name, exc) from exc
    except Exception as exc:
        if not needs_hub:
            raise
        raise _hub_refusal(source.name, exc) from exc


@contextlib.contextmanager
def _hub_offline_mode(on: bool) -> Iterator[None]:
    """huggingface_hub's offline mode for the duration of a block, then as it was.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, when it is imported; set later (a launcher,
    a notebook, a test), the variable would be ignored and the Hub contacted. Offline mode
    makes it refuse every request and answer from its cache only.
    """
    if not on:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def create_from_source(source: ModelSource, **timm_kwargs: Any) -> nn.Module:
    """:func:`create_architecture`, then load ``source.weights_path`` if set.

    Raises:
        CheckpointRefused: as :func:`create_architecture`, or the local weights do not fit.
    """
    model = create_architecture(source, **timm_kwargs)
    if source.weights_path is not None:
        load_into(model, source.weights_path)
    return model
