"""The one registry pattern (as timm's ``register_model`` / ``create_model``): scorers, MIL
heads and selection policies are registered by a decorated function under a name, looked up
by that name where they are built, and listed for the CLI and the tests.

An unknown name raises :class:`~wsi_prune.errors.ConfigError` listing the known ones. A leaf
module: it imports neither torch nor any stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from wsi_prune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to builders of one kind.

    Args:
        what: what is registered, for messages (``"tile policy"``, ``"scorer"``).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``.

        Raises:
            ConfigError: ``name`` is already registered.
        """

        def deco(obj: T) -> T:
            if name in self._items:
                raise ConfigError(f"{self.what} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The object registered as ``name``.

        Raises:
            ConfigError: unknown name; the message lists the registered ones.
        """
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.what} {name!r} (registered: "
                              f"{', '.join(self.names()) or 'none'})") from None

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests that register a temporary entry); unknown names are ignored."""
        self._items.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
