"""Safe loading and saving of model weights (where they come from: :mod:`wsi_prune.models.hub`).

Only tensors are ever loaded: ``.safetensors`` files through :mod:`safetensors`, and
``.pth``/``.pt``/``.bin`` pickles through ``torch.load(weights_only=True)``, which refuses any
pickled Python object (a pickle can run arbitrary code when loaded). Every failure becomes a
:class:`~wsi_prune.errors.CheckpointRefused` that names the file and the cause.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_prune.errors import CheckpointRefused

_logger = logging.getLogger(__name__)

__all__ = ["load_into", "load_state_dict", "mismatch_reason", "save_safetensors"]

_PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
# Keys under which training scripts commonly nest the model's state dict.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
_MAX_LISTED = 5  # keys shown per category in a mismatch message

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


#: ``hint(missing, unexpected, mismatched)`` -> a sentence on the likely cause, or None;
#: the three lists hold key names (model keys the file lacks, file keys the model lacks, keys
#: whose shapes differ)
MismatchHint = Callable[[list[str], list[str], list[str]], str | None]


def load_into(
    model: nn.Module,
    path_or_state: PathLike | Mapping[str, torch.Tensor],
    strict: bool = True,
    prefix_strip: Iterable[str] = ("module.",),
    hint: MismatchHint | None = None,
) -> None:
    """Load weights into ``model`` in place, refusing any mismatch with a readable message.

    Args:
        model: the module to fill.
        path_or_state: a weights file (see :func:`load_state_dict`) or a state dict.
        strict: refuse missing or unexpected keys (shape mismatches are always refused).
        prefix_strip: key prefixes removed first (``module.`` from ``DataParallel``).
        hint: adds the likely cause of a mismatch to the message (e.g.
            :func:`wsi_prune.models.hub.vit_mismatch_hint`: which ``model_kwargs`` differ).

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
    shapes = {k: (tuple(expected[k].shape), tuple(state[k].shape))
              for k in expected if k in state and expected[k].shape != state[k].shape}
    reason = mismatch_reason(type(model).__name__, missing if strict else [],
                             unexpected if strict else [], shapes, hint)
    if reason:
        raise CheckpointRefused(reason, path)
    if missing or unexpected:
        _logger.warning(
            "loading %s non-strictly: %d missing, %d unexpected keys",
            path or "a state dict",
            len(missing),
            len(unexpected),
        )
    model.load_state_dict(state, strict=strict)
    _logger.debug("loaded %d tensors into %s from %s", len(state), type(model).__name__, path)


def mismatch_reason(
    model_name: str,
    missing: list[str],
    unexpected: list[str],
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
    hint: MismatchHint | None = None,
) -> str | None:
    """The one-line reason of a state-dict mismatch, or None when there is none.

    Args:
        model_name: the model's class name, for the message.
        missing: model keys the weights lack; unexpected: weight keys the model lacks.
        shapes: key -> (model shape, file shape) where they differ.
        hint: see :func:`load_into`.

    Returns:
        ``weights do not match NAME: 2 shape mismatches: k: model (a, b) vs file (c, d), ...;
        1 missing key: ...; 1 unexpected key: ...`` (a few keys each) and the hint.
    """
    problems = []
    if shapes:
        problems.append(_listing("shape mismatch", [f"{k}: model {m} vs file {f}"
                                                    for k, (m, f) in shapes.items()]))
    if missing:
        problems.append(_listing("missing key", list(missing)))
    if unexpected:
        problems.append(_listing("unexpected key", list(unexpected)))
    if not problems:
        return None
    reason = f"weights do not match {model_name}: " + "; ".join(problems)
    extra = hint(list(missing), list(unexpected), list(shapes)) if hint is not None else None
    return f"{reason}. {extra}" if extra else reason


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if prefix and key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _listing(what: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    plural = "es" if what.endswith(("ch", "sh", "s", "x")) else "s"
    return f"{len(items)} {what}{'' if len(items) == 1 else plural}: {shown}{more}"


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
