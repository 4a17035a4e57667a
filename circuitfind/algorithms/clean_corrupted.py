"""Clean-corrupted attribution: EAP with the gradient averaged over the clean and corrupted runs.

Background. Hanna, Pezzelle & Belinkov (2024) introduce it as the cheapest step from EAP towards
EAP-IG: instead of integrating the gradient along the whole path from the corrupted to the
clean input, average its two end points.

Method. With clean and corrupted sender outputs ``a_u``, ``a'_u`` and receiver inputs ``x_r``,

    score(u -> r) = sum over examples and positions of
                    (a'_u - a_u) . (d metric / d x_r (clean run) + d metric / d x_r (corrupted run)) / 2

as in the EAP-IG library's ``get_scores_clean_corrupted`` (hannamw/EAP-IG): one backward pass on
the clean tokens and one on the corrupted tokens, divided by two. The engine runs the corrupted
run as the clean tokens with the corrupted input embeddings (the trapezoid end point
``alpha = 0`` of :class:`~circuitfind.patching.GradientPoint`), which is the same run: the
embeddings are all a run takes from its tokens; the tests check it against literally running
the corrupted tokens.

Cost. One corrupted and one clean forward pass (sender outputs), then two forward + backward
passes (stacked on the batch where the memory budget allows).

Deviations from the reference implementation. The metric is the batch mean of the per-example
task metric (the library divides summed scores by the example count: the same value).
"""

from __future__ import annotations

from torch import Tensor

from circuitfind.algorithms.base import ALGORITHMS, Algorithm
from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.errors import ConfigError
from circuitfind.patching.engine import GradientPoint, PatchingEngine
from circuitfind.patching.plan import Workload
from circuitfind.tasks.base import TaskData


@ALGORITHMS.register("clean_corrupted")
class CleanCorrupted(Algorithm):
    """Edge attribution with the gradient averaged over the clean and the corrupted run.

    Args:
        batch_size: Examples per forward/backward pass (``None``: from the engine's memory
            budget). Scores do not depend on it.

    Raises:
        ConfigError: ``batch_size`` < 1.

    References:
        Hanna, Pezzelle & Belinkov (2024), "Have Faith in Faithfulness: Going Beyond Circuit
        Overlap When Finding Model Mechanisms", COLM, §3 (clean-corrupted baseline).
    """

    name = "clean_corrupted"
    description = "EAP with the gradient averaged over the clean and the corrupted run"

    def __init__(self, batch_size: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"The 'batch_size' parameter of CleanCorrupted must be None or "
                              f">= 1. Got {batch_size}.")
        self.batch_size = batch_size

    def workload(self, graph: object) -> Workload:
        """The corrupted and clean forwards, then the two gradient runs."""
        return Workload(gradient_points=2, plain_forwards=2, batch_size=self.batch_size)

    def score(self, engine: PatchingEngine, data: TaskData,
              context: RunContext | None = None) -> Tensor:
        """Clean-corrupted scores ``[S, R]`` in the task's metric unit (see module docstring).

        ``context`` is ignored: nothing to checkpoint."""
        return engine.edge_attribution(data, batch_size=self.batch_size,
                                       points=[GradientPoint(1.0), GradientPoint(0.0)])
