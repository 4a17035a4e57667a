"""EAP with integrated gradients (EAP-IG).

Background. EAP (Syed et al. 2023) scores an edge with the gradient of the clean run only: a
first-order Taylor estimate that fails where the metric saturates or bends between the clean
and the corrupted run. Integrated gradients (Sundararajan et al. 2017) average the gradient
along a path from a baseline to the input instead; Hanna, Pezzelle & Belinkov (2024) apply this
to edges (EAP-IG), and the MIB circuit track (Mueller et al. 2025) recommends EAP-IG with
interpolated inputs and 5 steps as its baseline.

Method. With clean and corrupted sender outputs ``a_u``, ``a'_u`` (from the plain clean and
corrupted runs) and receiver inputs ``x_r``,

    score(u -> r) = sum over examples and positions of
                    (a'_u - a_u) . (1 / |P|) sum_{p in P} d metric / d x_r (run p)

where each run ``p`` reads the clean tokens with the outputs of one node group set to
``alpha_p * clean + (1 - alpha_p) * corrupted`` (held constant). The interpolation points are
those of the EAP-IG library (hannamw/EAP-IG, ``src/eap/attribute.py``), which we match:

``interpolation="inputs"`` (the library's ``EAP-IG-inputs``, the default):
    the input embeddings (the residual stream entering block 0, token plus position
    embeddings) are interpolated at ``alpha_k = k / steps`` for ``k = 0, 1, ..., steps - 1``:
    a left Riemann sum of the path integral from the corrupted input (``alpha = 0``, included)
    towards the clean input (``alpha = 1``, not evaluated). ``steps`` gradient runs. (Older
    releases of the library used ``k = 1, ..., steps``; its current code uses ``0 .. steps-1``.)
    As ``steps`` grows the scores converge to the integral; their sum over the edges out of
    ``input`` then equals ``metric(corrupted) - metric(clean)`` (completeness), which the tests
    check.
``interpolation="activations"`` (the library's ``EAP-IG-activations``):
    for each node group in forward order -- ``input``, then per layer all of its attention heads
    together (``a{L}``) and its MLP (``m{L}``) -- and each ``k = 1, ..., steps``, one run in
    which only that group's output is ``alpha_k = k / steps`` of the way from corrupted to
    clean; gradients are averaged over all ``(2 L + 1) * steps`` runs (``L + 1`` groups for
    attention-only models).

Cost. One corrupted and one clean forward pass (sender outputs), then ``steps`` (inputs) or
``groups * steps`` (activations) forward + backward passes, stacked on the batch dimension as
far as the engine's ``memory_budget`` allows; the products are accumulated in backward hooks with
one matmul per receiver group and pass (gradients of stacked runs are summed first).

Deviations from the reference implementation. The metric is the batch mean of the task's
per-example metric, as for every circuitfind algorithm (the library sums the metric over the
batch and divides the scores by the number of examples: the same value). Grouped-query models
are scored per key/value head (the library un-groups them). Only the task's corrupted run is
supported as the ablation, as in the library's ``EAP-IG-inputs``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from circuitfind.algorithms.base import ALGORITHMS, Algorithm
from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.errors import ConfigError, UnknownNameError
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.patching.engine import GradientPoint, PatchingEngine
from circuitfind.patching.plan import Workload
from circuitfind.registry import Registry
from circuitfind.tasks.base import TaskData

Schedule = Callable[[ComputeGraph, int], list[GradientPoint]]
INTERPOLATIONS: Registry[Schedule] = Registry("interpolation")


@INTERPOLATIONS.register("inputs")
def input_points(graph: ComputeGraph, steps: int) -> list[GradientPoint]:
    """``steps`` runs with the input embeddings at ``alpha = k / steps``, ``k = 0 .. steps-1``."""
    return [GradientPoint(k / steps, "input") for k in range(steps)]


@INTERPOLATIONS.register("activations")
def activation_points(graph: ComputeGraph, steps: int) -> list[GradientPoint]:
    """For each node group (``input``, ``a{L}``, ``m{L}``): ``alpha = k / steps``, ``k = 1 .. steps``."""
    groups = ["input"]
    for layer in range(graph.n_layers):
        groups.append(f"a{layer}")
        if graph.mlp_index[layer] is not None:
            groups.append(f"m{layer}")
    return [GradientPoint(k / steps, node) for node in groups for k in range(1, steps + 1)]


@ALGORITHMS.register("eap_ig")
class EAPIG(Algorithm):
    """Edge attribution patching with integrated gradients (Hanna et al. 2024).

    Args:
        interpolation: ``"inputs"`` (interpolate the input embeddings; default) or
            ``"activations"`` (interpolate each layer's attention and MLP outputs in turn).
        steps: Interpolation steps (>= 1; default 5, as recommended by MIB).
        batch_size: Examples per forward/backward pass (``None``: from the engine's memory
            budget). Scores do not depend on it.

    Raises:
        ConfigError: ``steps`` < 1, an unknown ``interpolation``, or ``batch_size`` < 1.

    References:
        Hanna, Pezzelle & Belinkov (2024), "Have Faith in Faithfulness: Going Beyond Circuit
        Overlap When Finding Model Mechanisms", COLM, §3; Sundararajan, Taly & Yan (2017),
        "Axiomatic Attribution for Deep Networks", eq. 1; Mueller et al. (2025), "MIB: A
        Mechanistic Interpretability Benchmark" (EAP-IG-inputs, 5 steps).
    """

    name = "eap_ig"
    description = "EAP with integrated gradients: gradients averaged over interpolated runs"

    def __init__(self, interpolation: str = "inputs", steps: int = 5,
                 batch_size: int | None = None) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"The 'steps' parameter of EAPIG must be an int >= 1. Got {steps!r}.")
        try:
            INTERPOLATIONS.get(interpolation)
        except UnknownNameError as err:
            raise ConfigError(f"The 'interpolation' parameter of EAPIG is invalid: {err}") from err
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"The 'batch_size' parameter of EAPIG must be None or >= 1. "
                              f"Got {batch_size}.")
        self.interpolation = interpolation
        self.steps = steps
        self.batch_size = batch_size

    def points(self, graph: ComputeGraph) -> list[GradientPoint]:
        """The gradient runs this configuration averages over, for ``graph``."""
        return INTERPOLATIONS.get(self.interpolation)(graph, self.steps)

    def workload(self, graph: ComputeGraph) -> Workload:
        """The corrupted and clean forwards, then one forward and backward per point."""
        return Workload(gradient_points=len(self.points(graph)), plain_forwards=2,
                        batch_size=self.batch_size)

    def score(self, engine: PatchingEngine, data: TaskData,
              context: RunContext | None = None) -> Tensor:
        """EAP-IG scores ``[S, R]`` in the task's metric unit (see module docstring).

        ``context`` is ignored: nothing to checkpoint."""
        return engine.edge_attribution(data, batch_size=self.batch_size,
                                       points=self.points(engine.graph))
