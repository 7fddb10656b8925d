"""The selection policy registry: which tiles reach the ViT (``tile`` policies, numpy) and which
patch tokens enter or survive inside it (``token`` policies, torch). Policies are registered by
name, like timm's models, and resolved where they are built::

    @register_policy("nucleus", kind="tile")
    def _tile_nucleus(scores, config): ...

    get_policy("nucleus", kind="tile")  # unknown names raise ConfigError listing the known
    list_policies("token")

This module imports neither numpy nor torch; the built-in policies live in
:mod:`wsi_prune.selection.tiles` and :mod:`wsi_prune.selection.tokens` and register themselves
when imported (:func:`get_policy` and :func:`list_policies` import them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wsi_prune._registry import Registry
from wsi_prune.errors import ConfigError

if TYPE_CHECKING:
    from wsi_prune.config import RunConfig

KINDS = ("tile", "token")
_REGISTRIES: dict[str, Registry[Callable[..., Any]]] = {
    "tile": Registry("tile policy"), "token": Registry("token policy"),
}
_BUILTIN = {"tile": "wsi_prune.selection.tiles", "token": "wsi_prune.selection.tokens"}


def _registry(kind: str, load: bool = True) -> Registry[Callable[..., Any]]:
    if kind not in KINDS:
        raise ConfigError(f"policy kind must be one of {KINDS}, got {kind!r}")
    if load:
        importlib.import_module(_BUILTIN[kind])  # registers the built-in policies once
    return _REGISTRIES[kind]


def register_policy(name: str, kind: str = "tile") -> Callable[[Callable], Callable]:
    """Decorator registering a selection policy under ``name``.

    Args:
        name: the name used in configs (``TileSelectConfig.policy`` / ``TokenSelectConfig.policy``).
        kind: ``tile`` (``fn(scores (N,) float64, config) -> (N,) bool``) or ``token``
            (``fn(scores (B, P) float, valid (B, P) bool, *, p, keep_ratio) -> (B, P) bool``).

    Raises:
        ConfigError: unknown kind, or ``name`` already registered for it.
    """
    return _registry(kind, load=False).register(name)


def get_policy(name: str, kind: str = "tile") -> Callable[..., Any]:
    """The registered policy ``name`` of ``kind``; raises :class:`ConfigError` if unknown."""
    return _registry(kind).get(name)


def list_policies(kind: str | None = None) -> list[str]:
    """Sorted names of registered policies, of one kind or (``None``) as ``kind:name``."""
    if kind is None:
        return sorted(f"{k}:{n}" for k in KINDS for n in _registry(k).names())
    return _registry(kind).names()


def check_policies(config: RunConfig) -> None:
    """Resolve every policy name a run config uses, before any slide is read.

    Raises:
        ConfigError: an unknown tile or token policy, naming the config key.
    """
    for key, kind, name in (("tile_select.policy", "tile", config.tile_select.policy),
                            ("token_select.policy", "token", config.token_select.policy),
                            ("vit.prune_policy", "token", config.vit.prune_policy)):
        try:
            get_policy(name, kind)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
