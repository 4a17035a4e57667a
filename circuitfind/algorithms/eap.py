"""Edge attribution patching (EAP).

Background. Activation patching measures an edge's importance by corrupting it and re-running
the model: one forward pass per edge. Attribution patching (Nanda 2023) replaces that with a
first-order Taylor expansion around the clean run; Syed, Rager & Conmy (2023) apply it to edges.

Method (Syed et al. 2023, eq. 2). For an edge from sender u to receiver r,

    score(u -> r) = sum over examples and positions of (a'_u - a_u) . d metric / d x_r

with a_u, a'_u the sender's clean and corrupted outputs and x_r the receiver's input in the clean
run. ``a'_u`` is the engine's ablation value (:attr:`PatchingEngine.ablation`): the corrupted run
(resample, default), zero, or a mean over the corrupted examples (overall or per position). The metric is the task metric averaged over examples, so the score estimates
``metric(circuit without the edge) - metric(full model)`` in the task's unit (negative scores
mean the edge helps the metric).

Cost. One corrupted forward pass (caching sender outputs), one clean forward and one backward
pass; the products are accumulated in backward hooks (on the block runner, one matmul per
layer).

Not for metrics that compare with the full model (KL divergence to its logits): they are at
their minimum in the clean run, so their gradient there, and every EAP score, is 0. EAP
refuses such tasks; EAP-IG (which integrates the gradient along the path) and exact patching
handle them.

Deviations from the reference implementation. None in the estimate; the EAP-IG library sums
over positions the same way. Scores are signed; ranking by |score| is the selection step's
choice (``absolute=True`` by default).
"""

from __future__ import annotations

from torch import Tensor

from circuitfind.algorithms.base import ALGORITHMS, Algorithm
from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.errors import ConfigError
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.patching.engine import PatchingEngine
from circuitfind.patching.plan import Workload
from circuitfind.tasks.base import TaskData


@ALGORITHMS.register("eap")
class EAP(Algorithm):
    """Edge attribution patching (Syed, Rager & Conmy 2023).

    Args:
        batch_size: Examples per forward/backward pass (``None``: as many as the engine's
            memory budget allows). Scores do not depend on it.

    References:
        Syed, Rager & Conmy (2023), "Attribution Patching Outperforms Automated Circuit
        Discovery", arXiv:2310.10348, eq. 2.
    """

    name = "eap"
    description = "edge attribution patching: one clean forward+backward, first-order estimate"

    def __init__(self, batch_size: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"The 'batch_size' parameter of EAP must be None or >= 1. "
                              f"Got {batch_size}.")
        self.batch_size = batch_size

    def workload(self, graph: ComputeGraph) -> Workload:
        """One corrupted forward, then one clean forward and backward per example."""
        return Workload(gradient_points=1, batch_size=self.batch_size)

    def score(self, engine: PatchingEngine, data: TaskData,
              context: RunContext | None = None) -> Tensor:
        """EAP scores ``[S, R]`` in the task's metric unit (see module docstring).

        ``context`` is ignored: EAP is two passes, nothing to checkpoint.

        Raises:
            ConfigError: the task's metric compares with the full model's logits (its gradient
                in the clean run is 0, so every score would be 0).
        """
        require_clean_gradient("EAP", data)
        return engine.edge_attribution(data, batch_size=self.batch_size)


def require_clean_gradient(method: str, data: TaskData) -> None:
    """Refuse a task whose metric has no gradient in the clean run.

    Raises:
        ConfigError: the task's metric compares with the full model's logits (its gradient in
            the clean run is 0, so every score of ``method``, which differentiates there,
            would be 0).
    """
    if data.task.needs_reference_logits:
        raise ConfigError(
            f"{method} differentiates the metric in the clean run, where the metric of task "
            f"{data.task.name!r} (it compares with the full model's logits, like the KL "
            f"divergence) is at its minimum: its gradient there is 0, so every {method} score "
            "would be 0. Use eap_ig or exact with this task, or give the task a metric "
            "such as logit_diff.")
