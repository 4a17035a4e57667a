"""The algorithm protocol and registry.

An algorithm is a class with explicit keyword hyperparameters (readable back with
:meth:`Algorithm.get_params`, like scikit-learn estimators) and one of two jobs:

- **attribution** (``returns_circuit = False``; ``eap``, ``exact``): given a
  :class:`~circuitfind.patching.PatchingEngine` and :class:`~circuitfind.tasks.TaskData`, return
  per-edge scores ``[S, R]`` — a signed estimate, in the objective's unit, of
  ``value(circuit without the edge) - value(full model)``. Selecting a circuit from scores
  (top-n, threshold) is :func:`circuitfind.discover`'s job, so that every attribution method is
  selected the same way;
- **pruning** (:class:`PruningAlgorithm`, ``returns_circuit = True``; ``acdc``,
  ``path_patching``): :meth:`Algorithm.discover` returns a
  :class:`~circuitfind.graphs.circuit.Circuit` whose edges the algorithm selected itself (its
  scores are the measured per-edge effects, so it still feeds faithfulness curves and ROC
  curves); ``discover`` never re-selects them. :meth:`Algorithm.score` of a pruning algorithm
  returns that circuit's scores.

Objective. Algorithms that can optimise either the task metric or KL divergence to the full
model take an ``objective`` hyperparameter (``"metric"`` or ``"kl"``; see
:mod:`circuitfind.algorithms.objective`).

Lifecycle. Long algorithms set ``supports_checkpoint = True`` and take an optional
:class:`~circuitfind.algorithms.lifecycle.RunContext` (checkpoint file, progress bar,
interruption) in ``score``/``discover``; the CLI passes one pointing inside ``--out``. See
:mod:`circuitfind.algorithms.lifecycle` for the calling order inside a run.

Calling order: ``algo = ALGORITHMS.get(name)(**params)``; then ``algo.score(engine, data,
context)`` (attribution) or ``algo.discover(engine, data, context)`` (pruning).

Plugins register through the entry-point group ``circuitfind.algorithms`` (the entry point
points at the class); they cannot shadow a built-in name.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor

from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.errors import ConfigError
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.scores import ScoreMeaning
from circuitfind.patching.engine import PatchingEngine
from circuitfind.patching.plan import Workload
from circuitfind.registry import Registry
from circuitfind.tasks.base import TaskData


class Algorithm(ABC):
    """Base class of edge-scoring algorithms.

    Subclasses declare their hyperparameters as keyword arguments of ``__init__`` stored under
    the same attribute names, set ``name`` and ``description``, and implement :meth:`score`
    (attribution) or :meth:`discover` with ``returns_circuit = True`` (pruning).

    Attributes:
        returns_circuit: :meth:`discover` selects the circuit itself.
        supports_checkpoint: ``score``/``discover`` use a :class:`RunContext` (checkpoint,
            resume, progress); the CLI then passes one inside ``--out``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    returns_circuit: ClassVar[bool] = False
    supports_checkpoint: ClassVar[bool] = False

    @abstractmethod
    def score(self, engine: PatchingEngine, data: TaskData,
              context: RunContext | None = None) -> Tensor:
        """Score every edge of ``engine.graph``.

        Args:
            engine: The patching engine over the model.
            data: Task data.
            context: Checkpoint/progress lifecycle (used by long algorithms; ignored by others).

        Returns:
            ``[S, R]`` float32 scores (0 off real edges), in the objective's unit.
        """

    def discover(self, engine: PatchingEngine, data: TaskData,
                 context: RunContext | None = None) -> Circuit:
        """The circuit a pruning algorithm selects (with per-edge scores).

        Raises:
            ConfigError: an attribution algorithm (``returns_circuit`` is False): select from
                its scores with :func:`circuitfind.discover` instead.
        """
        raise ConfigError(f"The {self.name!r} algorithm scores edges and does not select a "
                          "circuit itself; use circuitfind.discover(..., n_edges=N) or "
                          "threshold= to select from its scores.")

    def score_meaning(self, task: Any) -> ScoreMeaning:
        """What this algorithm's scores mean on ``task`` (stored in ``metadata["scores"]`` of
        the circuits found with it): by default a metric change in the task metric's unit and
        direction, :data:`circuitfind.graphs.scores.SCORE_KINDS`."""
        return ScoreMeaning("metric_change", str(getattr(task, "metric_unit", "") or ""),
                            bool(getattr(task, "higher_is_better", True)))

    def workload(self, graph: Any) -> Workload:
        """What this configuration asks of the engine, for :func:`circuitfind.plan`: gradient
        runs per example, or the masked passes (start layer, masks) it makes where they are
        known beforehand. Default: masked passes of unknown number (memory is planned, time
        is not)."""
        return Workload()

    def get_params(self) -> dict[str, Any]:
        """The hyperparameters given to ``__init__`` (JSON-serialisable), for provenance."""
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self"}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


class PruningAlgorithm(Algorithm):
    """Base class of algorithms that select their circuit themselves (``acdc``, ``path_patching``).

    Subclasses implement :meth:`discover`; :meth:`score` returns the per-edge scores of the
    circuit it finds (the effects the algorithm measured; 0 for edges it never tested).
    """

    returns_circuit: ClassVar[bool] = True

    def score(self, engine: PatchingEngine, data: TaskData,
              context: RunContext | None = None) -> Tensor:
        """``[S, R]`` float32 scores of :meth:`discover`'s circuit, in the objective's unit.

        Raises:
            ConfigError: the circuit the algorithm returned carries no scores.
        """
        scores = self.discover(engine, data, context).scores
        if scores is None:
            raise ConfigError(f"The {self.name!r} algorithm returned a circuit without scores.")
        return scores

    @abstractmethod
    def discover(self, engine: PatchingEngine, data: TaskData,
                 context: RunContext | None = None) -> Circuit:
        """The circuit the algorithm selects, with its per-edge scores."""


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm", entry_point_group="circuitfind.algorithms")


def get_algorithm(name: str | Algorithm, **params: Any) -> Algorithm:
    """Instantiate the registered algorithm ``name`` with ``params`` (or return an instance).

    Raises:
        UnknownNameError: no such algorithm (the message lists them).
        ConfigError: a parameter the algorithm does not take, or an invalid value.
    """
    if isinstance(name, Algorithm):
        return name
    cls = ALGORITHMS.get(name)
    accepted = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    unknown = sorted(set(params) - set(accepted))
    if "ablation" in unknown:
        raise ConfigError(f"Algorithms follow the engine's ablation; {cls.name!r} takes no "
                          "'ablation' parameter. Pass it to discover/score_edges "
                          "(ablation='zero'), to PatchingEngine, as --ablation on the CLI or as "
                          "a bench config's ablation key.")
    if unknown:
        raise ConfigError(f"The {cls.name!r} algorithm has no parameter(s) {', '.join(unknown)}; "
                          f"it takes: {', '.join(accepted) or 'none'}.")
    return cls(**params)
