"""The conformance checks every algorithm must pass (built-ins and plugins alike).

Like scikit-learn's estimator checks and optuna's sampler test cases: call
:func:`check_algorithm` from your plugin's tests with a small model and task data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from circuitfind.algorithms.base import Algorithm
from circuitfind.errors import CircuitFindError
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
    casting the model).

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
    if not isinstance(first, torch.Tensor) or tuple(first.shape) != (g.n_senders, g.n_receivers):
        raise ConformanceError(f"score() must return a [S, R] = {(g.n_senders, g.n_receivers)} "
                               f"tensor; got {type(first).__name__} "
                               f"{tuple(getattr(first, 'shape', ()))}.")
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
