"""Names for the ``timm.create_model`` arguments that YAML cannot hold.

Foundation models' model cards pass classes: UNI2-h and Virchow2 are built with
``mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU``. A run config is YAML/JSON (its
hash is the run's identity), so ``vit.model_kwargs`` names them by string and
:func:`resolve_timm_kwargs` turns the strings into the classes where the model is built, as
timm's ``create_model`` resolves a model name. Only the names below are accepted: an unknown
one raises instead of building a different network, whose weights would then not load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from timm.layers import GELUTanh, Mlp, QuickGELU, SwiGLU, SwiGLUPacked
from torch import nn

from wsi_prune.errors import ConfigError

#: ``mlp_layer`` names. ``swiglu_packed`` is timm's ``SwiGLUPacked`` (one fc1 D→2H split into
#: gate and value, the layout of the DINOv2-style checkpoints: UNI2-h, Virchow/Virchow2,
#: H-optimus, Prov-GigaPath); ``swiglu`` has two separate D→H layers (``fc1_g``, ``fc1_x``).
MLP_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": Mlp,
    "swiglu": SwiGLU,
    "swiglu_packed": SwiGLUPacked,
}

#: ``act_layer`` names. ``gelu`` is ``nn.GELU``, what timm's ViT uses when none is given.
ACT_LAYERS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": GELUTanh,
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}

_TABLES: dict[str, Mapping[str, Any]] = {"mlp_layer": MLP_LAYERS, "act_layer": ACT_LAYERS}


def resolve_timm_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the string values of ``mlp_layer`` and ``act_layer`` turned into classes.

    Classes (a caller in Python) pass through unchanged; every other argument too.

    Args:
        kwargs: ``timm.create_model`` keyword arguments, e.g. ``vit.model_kwargs``.

    Raises:
        ConfigError: a name not in :data:`MLP_LAYERS` / :data:`ACT_LAYERS` (the known ones are
            listed).
    """
    out = dict(kwargs)
    for key, table in _TABLES.items():
        value = out.get(key)
        if not isinstance(value, str):
            continue
        name = value.strip().lower().replace("-", "_")
        if name not in table:
            raise ConfigError(f"model_kwargs.{key}: unknown name {value!r} (known: "
                              f"{', '.join(sorted(table))})")
        out[key] = table[name]
    return out
