"""The conformance checks every algorithm must pass (built-ins and plugins alike).

Like scikit-learn's estimator checks and optuna's sampler test cases: call
:func:`check_algorithm` from your plugin's tests with a small model and task data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from circuitfind.algorithms.base import Algorithm
from circuitfind.errors import CircuitFindError, ConfigError
from circuitfind.graphs.scores import ScoreMeaning
from circuitfind.patching.engine import PatchingEngine
from circuitfind.tasks.base import TaskData


class ConformanceError(CircuitFindError, AssertionError):
    """An algorithm failed a conformance check (the message names the check)."""


def _hook_count(model: Any) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())


def check_algorithm(make: Callable[[], Algorithm], model: Any, data: TaskData) -> None:
    """Run every conformance check on an algorithm.

    Checks: ``get_params`` round-trips through the constructor; scores are ``[S, R]`` float on
    the CPU, finite on real edges and zero elsewhere; two runs give identical scores
    (deterministic); no hooks are left on the model; parameters, their ``requires_grad`` flags
    and gradients are untouched; the model's dtype is honoured (scores are computed without
    casting the model). Pruning algorithms (``returns_circuit``): ``discover`` returns a
    :class:`Circuit` over the engine's graph whose scores are ``score``'s; attribution
    algorithms' ``discover`` raises a ConfigError. Algorithms with ``supports_checkpoint``: a
    run writing a checkpoint through a :class:`RunContext` and a run resuming from the finished
    checkpoint give the same scores as a run without one. :meth:`Algorithm.score_meaning`
    returns a :class:`~circuitfind.graphs.scores.ScoreMeaning`, and a pruning algorithm's
    circuit declares it in ``metadata["scores"]``. Every algorithm follows the
    engine's ablation: on an engine with zero ablation its scores differ from those on a
    resample engine, unless it refuses that ablation with a ConfigError (EAP-IG interpolates
    towards the corrupted run, so it takes resample only).

    Args:
        make: Builds a fresh algorithm instance.
        model: A small ``TransformerBridge``.
        data: Task data for that model.

    Raises:
        ConformanceError: the first failed check.
    """
    algo = make()
    try:
        clone = type(algo)(**algo.get_params())
    except TypeError as err:
        raise ConformanceError(f"{type(algo).__name__}(**get_params()) failed: {err}") from err
    if clone.get_params() != algo.get_params():
        raise ConformanceError("get_params() does not round-trip through the constructor.")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    flags = [p.requires_grad for p in model.parameters()]
    dtype = next(model.parameters()).dtype
    hooks = _hook_count(model)
    engine = PatchingEngine(model)
    g = engine.graph
    first = algo.score(engine, data)
    second = make().score(PatchingEngine(model), data)
    try:
        g.check_edge_matrix(first, "score()'s result")
    except ConfigError as err:
        raise ConformanceError(str(err)) from None
    if not first.is_floating_point() or first.device.type != "cpu":
        raise ConformanceError("scores must be a floating-point tensor on the CPU.")
    if not torch.isfinite(first[g.edge_mask]).all():
        raise ConformanceError("scores are not finite on every real edge.")
    if (first[~g.edge_mask] != 0).any():
        raise ConformanceError("scores must be 0 off the real edges.")
    if not torch.equal(first, second):
        raise ConformanceError("two runs on the same data gave different scores.")
    if _hook_count(model) != hooks:
        raise ConformanceError("hooks were left on the model.")
    if [p.requires_grad for p in model.parameters()] != flags:
        raise ConformanceError("parameters' requires_grad flags changed.")
    if any(p.grad is not None for p in model.parameters()):
        raise ConformanceError("parameter gradients were left behind.")
    if next(model.parameters()).dtype != dtype:
        raise ConformanceError("the model's dtype changed.")
    for name, value in model.named_parameters():
        if not torch.equal(value, before[name]):
            raise ConformanceError(f"parameter {name} changed.")
    if not isinstance(algo.score_meaning(data.task), ScoreMeaning):
        raise ConformanceError("score_meaning(task) must return a circuitfind.graphs.scores."
                               f"ScoreMeaning; got {type(algo.score_meaning(data.task)).__name__}.")
    _check_lifecycle(make, engine, data, first)
    _check_ablation(make, model, data, first)


def _check_ablation(make: Callable[[], Algorithm], model: Any, data: TaskData,
                    resample: torch.Tensor) -> None:
    """The algorithm's scores follow the engine's ablation (or it refuses one explicitly)."""
    try:
        zero = make().score(PatchingEngine(model, ablation="zero"), data)
    except ConfigError:
        return  # refused with a message (e.g. gradient points interpolate to the corrupted run)
    if torch.equal(zero, resample):
        raise ConformanceError("scores on an engine with zero ablation equal those with resample "
                               "ablation: the algorithm ignores the engine's ablation.")


def _check_lifecycle(make: Callable[[], Algorithm], engine: PatchingEngine, data: TaskData,
                     scores: torch.Tensor) -> None:
    """The circuit-returning and checkpoint parts of the protocol."""
    import tempfile
    from pathlib import Path

    from circuitfind.algorithms.lifecycle import RunContext
    from circuitfind.errors import ConfigError
    from circuitfind.graphs.circuit import Circuit

    algo = make()
    if algo.returns_circuit:
        circuit = algo.discover(engine, data)
        if not isinstance(circuit, Circuit) or circuit.graph != engine.graph:
            raise ConformanceError("discover() of a pruning algorithm must return a Circuit over "
                                   "the engine's graph.")
        if circuit.scores is None or not torch.equal(circuit.scores, scores):
            raise ConformanceError("a pruning algorithm's score() must equal its circuit's scores.")
        declared = algo.score_meaning(data.task).to_dict()
        if circuit.metadata.get("scores") != declared:
            raise ConformanceError(
                "a pruning algorithm's circuit must declare what its scores mean: "
                f"metadata['scores'] is {circuit.metadata.get('scores')!r}, its "
                f"score_meaning(task) is {declared!r}. Build the circuit with "
                "metadata={'scores': self.score_meaning(data.task).to_dict()}.")
    else:
        try:
            algo.discover(engine, data)
        except ConfigError:
            pass
        else:
            raise ConformanceError("discover() of an attribution algorithm must raise ConfigError "
                                   "(discover selects from its scores).")
    if not algo.supports_checkpoint:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.pt"
        with_ckpt = make().score(engine, data, RunContext(checkpoint=path, progress=False))
        if not path.exists():
            raise ConformanceError("supports_checkpoint is set but no checkpoint was written.")
        resumed = make().score(engine, data, RunContext(checkpoint=path, progress=False))
    if not (torch.equal(with_ckpt, scores) and torch.equal(resumed, scores)):
        raise ConformanceError("a run with a checkpoint, or resumed from a finished one, gave "
                               "different scores.")
