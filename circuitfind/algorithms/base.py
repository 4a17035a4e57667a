"""The algorithm protocol and registry.

An algorithm is a class with explicit keyword hyperparameters (readable back with
:meth:`Algorithm.get_params`, like scikit-learn estimators) and one job: given a
:class:`~circuitfind.patching.PatchingEngine` and :class:`~circuitfind.tasks.TaskData`, return
per-edge scores ``[S, R]`` — a signed estimate, in the task's metric unit, of
``metric(circuit without the edge) - metric(full model)``. Selecting a circuit from scores
(top-n, threshold) is :func:`circuitfind.discover`'s job, so that every attribution method is
selected the same way.

Calling order: ``algo = ALGORITHMS.get(name)(**params)``; ``algo.score(engine, data)``.

Plugins register through the entry-point group ``circuitfind.algorithms`` (the entry point
points at the class); they cannot shadow a built-in name.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor

from circuitfind.patching.engine import PatchingEngine
from circuitfind.registry import Registry
from circuitfind.tasks.base import TaskData


class Algorithm(ABC):
    """Base class of edge-scoring algorithms.

    Subclasses declare their hyperparameters as keyword arguments of ``__init__`` stored under
    the same attribute names, set ``name`` and ``description``, and implement :meth:`score`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @abstractmethod
    def score(self, engine: PatchingEngine, data: TaskData) -> Tensor:
        """Score every edge of ``engine.graph``.

        Returns:
            ``[S, R]`` float32 scores (0 off real edges), in the task's metric unit.
        """

    def get_params(self) -> dict[str, Any]:
        """The hyperparameters given to ``__init__`` (JSON-serialisable), for provenance."""
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self"}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm", entry_point_group="circuitfind.algorithms")


def get_algorithm(name: str | Algorithm, **params: Any) -> Algorithm:
    """Instantiate the registered algorithm ``name`` with ``params`` (or return an instance).

    Raises:
        UnknownNameError: no such algorithm (the message lists them).
        ConfigError: a parameter the algorithm does not take, or an invalid value.
    """
    from circuitfind.errors import ConfigError

    if isinstance(name, Algorithm):
        return name
    cls = ALGORITHMS.get(name)
    accepted = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"The {cls.name!r} algorithm has no parameter(s) {', '.join(unknown)}; "
                          f"it takes: {', '.join(accepted) or 'none'}.")
    return cls(**params)
