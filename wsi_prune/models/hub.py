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
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from wsi_prune.errors import CheckpointRefused, ConfigError
from wsi_prune.models.checkpoints import load_into, mismatch_reason
from wsi_prune.models.timm_args import resolve_timm_kwargs

_logger = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
#: timm also accepts ``hf_hub:`` (Prov-GigaPath's card spells it so); it is read as ``hf-hub:``
_HUB_ALIASES = ("hf_hub:",)
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


class KnownModel(NamedTuple):
    """A hub model whose architecture is known offline (an entry of :data:`KNOWN_HUB_MODELS`).

    Attributes:
        architecture: the timm architecture its ``config.json`` names.
        model_args: ``timm.create_model`` arguments, as its model card passes them; classes
            by name (:mod:`wsi_prune.models.timm_args`), so the entry is also a valid
            ``vit.model_kwargs``.
        pretrained_cfg: normalisation (``mean``/``std`` of RGB in [0, 1]).
        pooling: the ``vit.pooling`` its card's embedding uses (``cls+mean``: Virchow).
        repo: the repo id as the Hub spells it.
    """

    architecture: str
    model_args: dict[str, Any]
    pretrained_cfg: dict[str, Any]
    pooling: str = "model"
    repo: str = ""


_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
# H-optimus-0 and -1 normalise with their own training-set statistics (model card).
_BIOPTIMUS = {"mean": (0.707223, 0.578729, 0.703617), "std": (0.211883, 0.230117, 0.177517)}
# The DINOv2-style ViT-g/ViT-H cards: SwiGLU with one packed fc1 (D -> 2H), SiLU, LayerScale.
_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu", "init_values": 1e-5}
_H_OPTIMUS = KnownModel(
    "vit_giant_patch14_reg4_dinov2",
    # the architecture's defaults already give SwiGLU, SiLU, 4 registers, no_embed_class
    {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0,
     "global_pool": "token"},
    _BIOPTIMUS,
)

#: Hub models whose timm architecture is known here, so that a local copy of their weights
#: builds with no network: for an ``hf-hub:`` name timm fetches the repo's ``config.json`` even
#: with ``pretrained=False``. Keys are lower-case repo ids; values as on each model card (its
#: ``timm.create_model`` call plus the ``config.json`` it points at). A cached ``config.json``
#: wins over an entry; the entry fills what the json lacks (Virchow's json names no MLP class:
#: its card passes ``mlp_layer``/``act_layer`` in code). Adding a model is one entry.
#:
#: * UNI: ViT-L/16, LayerScale, CLS token; ImageNet normalisation, not the 0.5/0.5 of timm's
#:   default ``vit_large_patch16_224`` weights.
#: * UNI2-h: ViT-H/14 built on ``vit_giant_patch14_224`` (1536 wide, 24 blocks, 24 heads),
#:   SwiGLU packed (fc1 1536 -> 8192), SiLU, 8 registers, no_embed_class; CLS token.
#: * Virchow / Virchow2: ViT-H/14 (1280 wide, 32 blocks), SwiGLU packed (mlp_ratio 5.3375),
#:   SiLU, ``global_pool=""``; Virchow2 has 4 registers. Their embedding is the CLS token
#:   concatenated with the mean of the patch tokens, registers excluded (``vit.pooling:
#:   cls+mean``, 2560 wide).
#: * H-optimus-0 / H-optimus-1: ViT-g/14 (1536 wide, 40 blocks), SwiGLU, 4 registers,
#:   no_embed_class; Bioptimus' own normalisation.
#: * Prov-GigaPath's tile encoder: ViT-g built on ``vit_giant_patch14_dinov2`` but with
#:   **16 px patches** (its config.json sets ``patch_size: 16``: 14x14 patches at 224 px),
#:   SwiGLU packed (mlp_ratio 5.33334), no registers; CLS token.
KNOWN_HUB_MODELS: dict[str, KnownModel] = {
    "mahmoodlab/uni": KnownModel(
        "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
         "dynamic_img_size": True},
        _IMAGENET, repo="MahmoodLab/UNI",
    ),
    "mahmoodlab/uni2-h": KnownModel(
        "vit_giant_patch14_224",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "embed_dim": 1536,
         "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True, "reg_tokens": 8,
         "dynamic_img_size": True, **_SWIGLU},
        _IMAGENET, repo="MahmoodLab/UNI2-h",
    ),
    "paige-ai/virchow": KnownModel(
        "vit_huge_patch14_224",
        {"img_size": 224, "num_classes": 0, "mlp_ratio": 5.3375, "global_pool": "",
         "dynamic_img_size": True, **_SWIGLU},
        _IMAGENET, pooling="cls+mean", repo="paige-ai/Virchow",
    ),
    "paige-ai/virchow2": KnownModel(
        "vit_huge_patch14_224",
        {"img_size": 224, "num_classes": 0, "reg_tokens": 4, "mlp_ratio": 5.3375,
         "global_pool": "", "dynamic_img_size": True, **_SWIGLU},
        _IMAGENET, pooling="cls+mean", repo="paige-ai/Virchow2",
    ),
    "bioptimus/h-optimus-0": _H_OPTIMUS._replace(repo="bioptimus/H-optimus-0"),
    "bioptimus/h-optimus-1": _H_OPTIMUS._replace(repo="bioptimus/H-optimus-1"),
    "prov-gigapath/prov-gigapath": KnownModel(
        "vit_giant_patch14_dinov2",
        {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
         "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0,
         "mlp_layer": "swiglu_packed", "act_layer": "silu"},
        _IMAGENET, repo="prov-gigapath/prov-gigapath",
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


def canonical_hub_name(name: str) -> str:
    """``name`` with timm's ``hf_hub:`` spelling read as ``hf-hub:``; other names unchanged."""
    for alias in _HUB_ALIASES:
        if name.startswith(alias):
            return HUB_PREFIX + name[len(alias):]
    return name


def _split_hub_name(name: str) -> tuple[str, str | None]:
    repo, _, revision = canonical_hub_name(name)[len(HUB_PREFIX):].partition("@")
    return repo, revision or None


def known_model(name: str) -> KnownModel | None:
    """The :data:`KNOWN_HUB_MODELS` entry of an ``hf-hub:org/name[@revision]`` name, or None."""
    name = canonical_hub_name(name)
    if not name.startswith(HUB_PREFIX):
        return None
    return KNOWN_HUB_MODELS.get(_split_hub_name(name)[0].lower())


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
        if known is not None and known.architecture == arch:
            # the json wins; the entry adds what only the card's code passes (MLP classes)
            args, pcfg = {**known.model_args, **args}, {**known.pretrained_cfg, **pcfg}
        _logger.debug("%s: architecture %s from the cached %s", name, arch, path)
        return arch, args, pcfg
    if known is not None:
        return known.architecture, dict(known.model_args), dict(known.pretrained_cfg)
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
    name = canonical_hub_name(name)
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
        kwargs = resolve_timm_kwargs({**source.model_args, **timm_kwargs})
        if not timm.is_model(source.architecture):
            raise ConfigError(f"{source.name}: unknown timm architecture {source.architecture!r}")
        return timm.create_model(
            source.architecture, pretrained=False, pretrained_cfg_overlay=overlay or None,
            **kwargs,
        )
    extra_args, extra_cfg = _card_extras(source.name)
    timm_kwargs = resolve_timm_kwargs({**extra_args, **timm_kwargs})
    overlay = {**extra_cfg, **overlay}
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
        mismatch = _state_dict_mismatch(source.name, exc)
        if mismatch is not None:
            # the weights arrived (cache or download) but do not fit: not a Hub problem
            raise mismatch from exc
        if not needs_hub:
            raise
        raise _hub_refusal(source.name, exc) from exc
    except Exception as exc:
        if not needs_hub:
            raise
        raise _hub_refusal(source.name, exc) from exc


def _card_extras(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """For a known hub model built by timm from the Hub (``pretrained`` without a local file):
    the table's arguments and normalisation that its ``config.json`` does not give (the MLP
    classes Virchow's card passes in code). The json wins where it has a value, as in
    :func:`hub_architecture`; without a cached json (a download), the whole entry applies."""
    known = known_model(name)
    if known is None:
        return {}, {}
    repo, revision = _split_hub_name(name)
    path = _cached_hub_file(repo, "config.json", revision)
    if path is None:
        return dict(known.model_args), dict(known.pretrained_cfg)
    arch, args, pcfg = _read_hub_config(path)
    if arch != known.architecture:
        return {}, {}
    return ({k: v for k, v in known.model_args.items() if k not in args},
            {k: v for k, v in known.pretrained_cfg.items() if k not in pcfg})


_SIZE_MISMATCH = re.compile(
    r"size mismatch for ([^:\s]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
    r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")
_KEY_LIST = r'{} key\(s\) in state_dict: ((?:"[^"]+"(?:, )?)+)'


def _state_dict_mismatch(name: str, exc: BaseException) -> CheckpointRefused | None:
    """torch's ``Error(s) in loading state_dict`` (raised inside timm's pretrained loading)
    as the same mismatch message a local file gets, or None for any other error."""
    text = str(exc)
    if "Error(s) in loading state_dict" not in text:
        return None

    def keys(kind: str) -> list[str]:
        found = re.search(_KEY_LIST.format(kind), text)
        return re.findall(r'"([^"]+)"', found.group(1)) if found else []

    def shape(dims: str) -> tuple[int, ...]:
        return tuple(int(d) for d in dims.split(",") if d.strip())

    shapes = {k: (shape(model), shape(file)) for k, file, model in _SIZE_MISMATCH.findall(text)}
    reason = mismatch_reason("the architecture", keys("Missing"), keys("Unexpected"), shapes,
                             vit_mismatch_hint)
    return CheckpointRefused(f"{name}: pretrained {reason or text.splitlines()[0]}")


def vit_mismatch_hint(missing: list[str], unexpected: list[str], shapes: list[str]) -> str | None:
    """The ``model_kwargs`` a ViT checkpoint most likely needs, from the keys that differ
    (a hint for :func:`~wsi_prune.models.checkpoints.load_into`), or None.

    Args:
        missing: model keys the file lacks; unexpected: file keys the model lacks; shapes: keys
            whose shapes differ.
    """
    def has(keys: list[str], part: str) -> bool:
        return any(part in k for k in keys)

    hints = []
    if has(unexpected, ".ls1.gamma"):
        hints.append("the file has LayerScale (ls1.gamma): set init_values (1e-5 on the "
                     "UNI and DINOv2-style cards)")
    elif has(missing, ".ls1.gamma"):
        hints.append("the model has LayerScale the file lacks: drop init_values")
    if "reg_token" in unexpected:
        hints.append("the file has register tokens (reg_token): set reg_tokens")
    elif "reg_token" in missing:
        hints.append("the model has register tokens the file lacks: drop reg_tokens")
    if has(unexpected, ".mlp.fc1_g") or has(missing, ".mlp.fc1_g"):
        hints.append("the MLP layouts differ: fc1_g/fc1_x is mlp_layer: swiglu, one fc1 is "
                     "mlp or swiglu_packed")
    elif has(shapes, ".mlp.fc"):
        hints.append("the MLP widths differ: a SwiGLU checkpoint (fc1 twice fc2's input) needs "
                     "mlp_layer: swiglu_packed, act_layer: silu and its card's mlp_ratio")
    if "patch_embed.proj.weight" in shapes:
        hints.append("patch_embed differs: check patch_size (Prov-GigaPath: 16) and embed_dim")
    if "pos_embed" in shapes:
        hints.append("pos_embed differs: check img_size, patch_size, and no_embed_class with "
                     "reg_tokens")
    if not hints:
        return None
    return ("Likely model_kwargs to fix: " + "; ".join(hints)
            + " (the known models' arguments: wsi_prune.models.hub.KNOWN_HUB_MODELS)")


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
        load_into(model, source.weights_path, hint=vit_mismatch_hint)
    return model
