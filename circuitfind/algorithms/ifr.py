"""Information flow routes (IFR): the prediction's routes through the graph, from one forward pass.

Background. Patching methods ask what changes when a component is corrupted; they need a
corrupted input and one pass (or one gradient) per question. Ferrando & Voita (2024) instead
decompose one clean forward pass: every update of the residual stream is a sum of parts (each
head reading each earlier position, each MLP, the residual stream itself), and each part's
share of the updated stream is its proximity to it (eq. 2, after ALTI-Logit). The graph of
these shares, pruned to edges above a threshold ``tau`` and traced top-down from the
prediction, is the prediction's information flow route.

Method. :mod:`circuitfind.patching.flow_routes` computes the contributions (eqs. 1-2) on the
block runner, for every family it supports, and maps the routes onto circuitfind's edges: an
edge ``u -> r`` is the route from ``u``'s part through the residual stream into the state
receiver ``r`` reads; its score is the mean over examples of the prediction's flow through it
(eq. 3 there), a share of the prediction in [0, 1] (an importance: larger is more important).
The circuit is the paper's top-down graph: every edge with positive flow once contributions
``<= tau`` are cut (an edge reached from the prediction of at least one example through
contributions all above ``tau``). Scores are the flows without the cut, so every edge is
ranked (faithfulness curves, ROC).

Cost. One forward pass over the clean prompts (no corrupted run, no backward pass) plus the
decomposition of every attention output into ``T`` key positions per head (``N T^2 H d``
values a layer, chunked by the engine's memory budget).

Deviations from the paper. Attention weights are taken as given (as in the paper): q and k
edges carry no flow and score 0. Contributions are clipped at 0 rather than at 1e-5 (the
paper's code) so that masked future positions carry nothing. The paper's graph is per prompt;
ours sums the flows of every example's predictions (the union of their top-down graphs). The
threshold cuts each contribution without renormalising the rest (the paper's top-down
search; the LLM transparency tool's renormalising variant is not used).
"""

from __future__ import annotations

from typing import Any

from circuitfind.algorithms.base import ALGORITHMS, PruningAlgorithm
from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.errors import ConfigError
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.scores import ScoreMeaning
from circuitfind.patching.engine import PatchingEngine
from circuitfind.patching.flow_routes import information_flow
from circuitfind.tasks.base import TaskData


@ALGORITHMS.register("ifr")
class InformationFlowRoutes(PruningAlgorithm):
    """Information flow routes (Ferrando & Voita 2024): the top-down graph of contributions.

    Args:
        threshold: ``tau`` in [0, 1): contributions (shares of a residual-stream state) at or
            below it are cut before tracing the graph from the prediction (default 0.04;
            higher cuts more; 0 keeps every route).
        batch_size: Examples per pass (``None``: from the engine's memory budget).

    Raises:
        ConfigError: ``threshold`` outside [0, 1) or ``batch_size`` < 1.

    References:
        Ferrando & Voita (2024), "Information Flow Routes: Automatically Interpreting Language
        Models at Scale", arXiv:2403.00824, §2-3; Ferrando et al. (2022), "Measuring the
        Mixing of Contextual Information in the Transformer" (ALTI, proximity).
    """

    name = "ifr"
    description = "information flow routes: one forward pass, top-down graph of contributions"

    def __init__(self, threshold: float = 0.04, batch_size: int | None = None) -> None:
        if (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                or not 0 <= threshold < 1):
            raise ConfigError(f"The 'threshold' parameter of InformationFlowRoutes must be a "
                              f"number in [0, 1) (a share of a residual-stream state). Got "
                              f"{threshold!r}.")
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise ConfigError(f"The 'batch_size' parameter of InformationFlowRoutes must be None "
                              f"or >= 1. Got {batch_size}.")
        self.threshold = float(threshold)
        self.batch_size = batch_size

    def score_meaning(self, task: Any) -> ScoreMeaning:
        """Flows are importances: a share of the prediction, larger is more important."""
        return ScoreMeaning("importance", "share of the prediction",
                            what="information flow from the prediction")

    def discover(self, engine: PatchingEngine, data: TaskData,
                 context: RunContext | None = None) -> Circuit:
        """The top-down graph at ``threshold`` (module docstring), scored by unthresholded flow.

        Raises:
            ConfigError: an engine whose ablation is not the default (IFR ablates nothing).

        Returns:
            A :class:`Circuit` whose edges have positive flow after the cut, with every edge's
            flow as its score and ``metadata["ifr"]`` (threshold, the kept edges' total flow).
        """
        if engine.ablation.kind != "resample":
            raise ConfigError(f"Information flow routes decompose the clean run and ablate "
                              f"nothing, so the {engine.ablation.kind!r} ablation does not apply; "
                              "run it with the default (resample) ablation.")
        flows = information_flow(engine, engine.on_device(data), (0.0, self.threshold),
                                 batch_size=self.batch_size)
        kept = flows[1] > 0
        return Circuit(engine.graph, kept, flows[0], {
            "scores": self.score_meaning(data.task).to_dict(),
            "ifr": {"threshold": self.threshold,
                    "kept_flow": float(flows[0][kept].sum()),
                    "total_flow": float(flows[0].sum())}})
