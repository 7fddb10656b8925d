"""Safe loading and saving of model weights, and where a model's weights come from.

Only tensors are ever loaded: ``.safetensors`` files through :mod:`safetensors`, and
``.pth``/``.pt``/``.bin`` pickles through ``torch.load(weights_only=True)``, which refuses any
pickled Python object (a pickle can run arbitrary code when loaded). Every failure becomes a
:class:`~wsi_prune.errors.CheckpointRefused` that names the file and the cause.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_prune.errors import CheckpointRefused, ConfigError

_logger = logging.getLogger(__name__)

__all__ = [
    "ModelSource",
    "read_sidecar",
    "sidecar_path",
    "write_sidecar",
    "KNOWN_HUB_MODELS",
    "create_architecture",
    "create_from_source",
    "hub_architecture",
    "hub_offline",
    "load_into",
    "load_state_dict",
    "resolve_model_source",
    "save_safetensors",
    "warn_untrained_once",
]

_PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
# Keys under which training scripts commonly nest the model's state dict.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
_MAX_LISTED = 5  # keys shown per category in a mismatch message
HUB_PREFIX = "hf-hub:"

PathLike = str | os.PathLike[str]


def load_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from a weights file, without unpickling objects.

    Args:
        path: ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` file. Common nestings such as
            ``{"state_dict": {...}}`` or ``{"model": {...}}`` are unwrapped.

    Returns:
        Parameter name → CPU tensor.

    Raises:
        CheckpointRefused: the file is missing, of an unknown format, truncated or corrupt,
            pickles a Python object, or holds something other than named tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointRefused("weights file not found", path)
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointRefused(f"unreadable safetensors file ({exc})", path) from exc
    elif suffix in _PICKLE_SUFFIXES:
        obj = _torch_load(path)
    else:
        raise CheckpointRefused(
            f"unsupported weights format {suffix or '(no suffix)'!r}; "
            "use .safetensors (preferred), .pth, .pt or .bin",
            path,
        )
    return _as_state_dict(obj, path)


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch reports both "this pickle names a Python class" and "these bytes are not a
        # pickle" as UnpicklingError; only the first is a refusal on safety grounds.
        # Two wordings: "Unsupported global: GLOBAL mod.Class" for a class not allow-listed,
        # and "unsupported GLOBAL posix.system whose module posix is blocked" for a callable.
        match = re.search(r"unsupported\s+global:?\s*(?:GLOBAL\s+)?([\w.]+)", str(exc), re.I)
        if match:
            raise CheckpointRefused(
                f"refused to load: the checkpoint pickles the Python object {match.group(1)}, "
                "and unpickling objects can run arbitrary code; save only the state dict "
                "(tensors), preferably as .safetensors",
                path,
            ) from exc
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(exc), re.S)
        cause = detail.group(1).strip() if detail else type(exc).__name__
        raise CheckpointRefused(f"corrupt or not a torch checkpoint ({cause})", path) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        # A KeyError's message is just the key ("101" for a non-pickle): name the type too.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointRefused(
            f"corrupt or truncated torch checkpoint ({type(exc).__name__}: {first[:200]})", path
        ) from exc


def _as_state_dict(obj: Any, path: str | None) -> dict[str, torch.Tensor]:
    # Unwrap {"state_dict": {...}, "epoch": 3, ...}-style checkpoints, possibly nested twice.
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointRefused(
            f"expected a mapping of parameter names to tensors, found {type(obj).__name__}", path
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointRefused(
            f"{len(bad)} entr{'y' if len(bad) == 1 else 'ies'} are not named tensors "
            f"(e.g. {', '.join(repr(k) for k in bad[:_MAX_LISTED])})",
            path,
        )
    if not obj:
        raise CheckpointRefused("the checkpoint holds no tensors", path)
    return dict(obj)


def load_into(
    model: nn.Module,
    path_or_state: PathLike | Mapping[str, torch.Tensor],
    strict: bool = True,
    prefix_strip: Iterable[str] = ("module.",),
) -> None:
    """Load weights into ``model`` in place, refusing any mismatch with a readable message.

    Args:
        model: the module to fill.
        path_or_state: a weights file (see :func:`load_state_dict`) or a state dict.
        strict: refuse missing or unexpected keys (shape mismatches are always refused).
        prefix_strip: key prefixes removed first (``module.`` from ``DataParallel``).

    Raises:
        CheckpointRefused: the file cannot be read, or keys/shapes do not match the model; the
            message lists a few missing and unexpected keys and each shape mismatch as
            ``name: model (a, b) vs file (c, d)``.
    """
    if isinstance(path_or_state, Mapping):
        path = None
        state = _as_state_dict(path_or_state, None)
    else:
        path = os.fspath(path_or_state)
        state = load_state_dict(path)
    prefixes = tuple(prefix_strip)
    state = {_strip(k, prefixes): v for k, v in state.items()}

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: model {tuple(expected[k].shape)} vs file {tuple(state[k].shape)}"
        for k in expected
        if k in state and expected[k].shape != state[k].shape
    ]
    problems = []
    if mismatched:
        problems.append(_listing("shape mismatch", mismatched))
    if strict and missing:
        problems.append(_listing("missing key", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected key", unexpected))
    if problems:
        raise CheckpointRefused(
            f"weights do not match {type(model).__name__}: " + "; ".join(problems), path
        )
    if missing or unexpected:
        _logger.warning(
            "loading %s non-strictly: %d missing, %d unexpected keys",
            path or "a state dict",
            len(missing),
            len(unexpected),
        )
    model.load_state_dict(state, strict=strict)
    _logger.debug("loaded %d tensors into %s from %s", len(state), type(model).__name__, path)


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if prefix and key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _listing(what: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {what}{'' if len(items) == 1 else 's'}: {shown}{more}"


def save_safetensors(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write weights as ``.safetensors`` atomically (temporary file, then ``os.replace``).

    Args:
        model_or_state: a module (its ``state_dict()``) or a state dict of tensors.
        path: destination; a reader never sees a half-written file.
        metadata: string → string pairs stored in the file header (config hash, model name).
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    # safetensors refuses tensors sharing storage (tied weights) and non-contiguous views, so
    # every tensor gets its own contiguous CPU copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; bad keys: {bad}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _logger.info("wrote %d tensors to %s", len(tensors), path)


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


# -- the JSON config saved next to trained weights -------------------------------------------------
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
    path = sidecar_path(weights)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n", "utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
