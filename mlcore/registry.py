"""One small registry per kind of component: model heads, losses, partition kinds.

A :class:`Registry` is a ``dict`` from name to spec (a frozen dataclass with a ``name``); a
component's module registers its spec, and configs select it by that name (the way timm and
torchtitan look models up by name).
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from mlcore.configlib import ConfigError


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(dict[str, T], Generic[T]):
    """Name -> spec of one kind of component.

    Args:
        what: The kind, singular, for messages (``head``, ``loss``).
        key: The setting that selects one, for messages (``model.head``, ``loss.name``).
        plural: ``what`` in the plural (default: ``what`` + s).
    """

    def __init__(self, what: str, key: str, plural: str | None = None) -> None:
        super().__init__()
        self.what = what
        self.key = key
        self.plural = plural or f"{what}s"

    def register(self, spec: T) -> T:
        """Make ``spec`` selectable by its name.

        Raises:
            ValueError: Another spec holds the name.
        """
        if spec.name in self and self[spec.name] is not spec:
            raise ValueError(f"{self.what} {spec.name!r} is registered already")
        self[spec.name] = spec
        return spec

    def lookup(self, name: str) -> T:
        """The spec registered as ``name``.

        Raises:
            ConfigError: No such name (the message names the registered ones).
        """
        if name not in self:
            names = ", ".join(self)
            raise ConfigError(
                f"{self.key}: {name!r} is not one of the registered {self.plural}: {names}"
            )
        return self[name]
