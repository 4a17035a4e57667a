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
pass; the products are accumulated in backward hooks with one matmul per receiver group.

Deviations from the reference implementation. None in the estimate; the EAP-IG library sums
over positions the same way. Scores are signed; ranking by |score| is the selection step's
choice (``absolute=True`` by default).
"""

from __future__ import annotations

from torch import Tensor

from circuitfind.algorithms.base import ALGORITHMS, Algorithm
from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.errors import ConfigError
from circuitfind.patching.engine import PatchingEngine
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

    def score(self, engine: PatchingEngine, data: TaskData,
              context: RunContext | None = None) -> Tensor:
        """EAP scores ``[S, R]`` in the task's metric unit (see module docstring).

        ``context`` is ignored: EAP is two passes, nothing to checkpoint.
        """
        return engine.edge_attribution(data, batch_size=self.batch_size)
