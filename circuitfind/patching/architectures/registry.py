"""Which :class:`~circuitfind.patching.architectures.base.Architecture` runs which Hugging Face class.

A family module registers its adapter with ``@register("SomeForCausalLM")``; the block runner
looks a model up with :func:`architecture_for`. Adding a family is one new module (imported in
this package's ``__init__``) plus its test parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from circuitfind.errors import ConfigError

if TYPE_CHECKING:
    from circuitfind.patching.architectures.base import Architecture

_ARCHITECTURES: dict[str, type[Architecture]] = {}


def register(*hf_classes: str) -> Callable[[type[Architecture]], type[Architecture]]:
    """Class decorator: run the Hugging Face classes ``hf_classes`` with the decorated adapter.

    Args:
        hf_classes: Hugging Face model class names, e.g. ``"LlamaForCausalLM"``.

    Returns:
        The decorator (it returns the class unchanged).

    Raises:
        ConfigError: a class name is already registered to another adapter.
    """
    def decorate(cls: type[Architecture]) -> type[Architecture]:
        for name in hf_classes:
            if _ARCHITECTURES.get(name, cls) is not cls:
                raise ConfigError(f"{name} is already run by {_ARCHITECTURES[name].__name__}; "
                                  f"it cannot also be registered to {cls.__name__}.")
            _ARCHITECTURES[name] = cls
        # the class's own names only (not those a parent family registered)
        cls.hf_classes = tuple(sorted({*cls.__dict__.get("hf_classes", ()), *hf_classes}))
        return cls
    return decorate


def architecture_for(hf_class: str) -> type[Architecture] | None:
    """The adapter registered for the Hugging Face class name ``hf_class``, or ``None``."""
    return _ARCHITECTURES.get(hf_class)


def supported() -> list[str]:
    """Every Hugging Face class name the block runner implements, sorted."""
    return sorted(_ARCHITECTURES)
