"""A small generic registry used for tasks and algorithms.

Built-ins are registered explicitly at import time of their package; third-party plugins come
through an entry-point group, discovered lazily on the first lookup that misses, and can never
shadow a built-in (the pattern of networkx's backend loader). Keys are identifiers; lookups also
accept dashes (``greater-than`` finds ``greater_than``). An unknown name raises
:class:`~circuitfind.errors.UnknownNameError` listing what exists and suggesting the closest.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from circuitfind.errors import ConfigError, UnknownNameError

T = TypeVar("T")


def normalize_name(name: str) -> str:
    """Return the registry key for ``name``: lower case, dashes and spaces as underscores."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


class Registry(Generic[T]):
    """A name -> object registry with entry-point plugins and helpful errors.

    Args:
        kind: What the registry holds, for messages ("task", "algorithm").
        entry_point_group: The ``importlib.metadata`` entry-point group scanned for plugins,
            or ``None`` for no plugins.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._builtin: set[str] = set()
        self._plugins_loaded = entry_point_group is None

    def register(self, name: str, *, builtin: bool = True) -> Callable[[T], T]:
        """Class/function decorator registering the object under ``name``.

        Raises:
            ConfigError: ``name`` is not an identifier or is already taken.
        """
        key = normalize_name(name)
        if not key.isidentifier():
            raise ConfigError(f"A {self.kind} name must be an identifier; got {name!r}.")

        def decorator(obj: T) -> T:
            if key in self._items:
                raise ConfigError(f"The {self.kind} {key!r} is already registered.")
            self._items[key] = obj
            if builtin:
                self._builtin.add(key)
            return obj

        return decorator

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        assert self.entry_point_group is not None
        for ep in entry_points(group=self.entry_point_group):
            key = normalize_name(ep.name)
            if key in self._builtin:
                warnings.warn(
                    f"Ignoring plugin {ep.value!r}: it would shadow the built-in {self.kind} {key!r}.",
                    stacklevel=3,
                )
                continue
            try:
                self._items.setdefault(key, ep.load())
            except Exception as err:  # a broken plugin must not break the built-ins
                warnings.warn(f"Could not load {self.kind} plugin {ep.value!r}: {err}", stacklevel=3)

    def get(self, name: str) -> T:
        """Return the object registered under ``name`` (dashes accepted).

        Raises:
            UnknownNameError: no such name; the message lists the names and the closest match.
        """
        key = normalize_name(name)
        if key not in self._items:
            self._load_plugins()
        if key not in self._items:
            names = self.names()
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"Unknown {self.kind} {name!r}.{hint} Available {self.kind}s: {', '.join(names)}."
            )
        return self._items[key]

    def names(self) -> list[str]:
        """All registered names, sorted (plugins included)."""
        self._load_plugins()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        """(name, object) pairs in sorted order."""
        for name in self.names():
            yield name, self._items[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalize_name(name) in self.names()
