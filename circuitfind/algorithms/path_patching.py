"""Path-patching circuit discovery: the IOI paper's procedure, automated.

Background. Wang et al. (2022) found the IOI circuit by hand, backwards from the logits: path
patch every head into the logits to find the heads that write the answer (name movers); then
path patch every head into the name movers' queries to find the heads that steer them
(S-inhibition heads); then into those heads' inputs, and so on. Each step asks which senders
change the metric through their *direct* paths into the receivers found so far
(:func:`circuitfind.path_patch`).

Method. Level 0 receives at ``logits``. At level k, with receiver set ``R_k`` (the inputs of the
nodes found at level k - 1: each head's q/k/v inputs as ``qkv`` selects, each MLP's input):

1. for every sender ``u`` upstream of some receiver of ``R_k``, the path-patching effect
   ``E_k(u) = path_patch({u}, R_k)`` (all senders in batched masked passes);
2. the senders with ``|E_k(u)| > tau`` are selected, with ``tau = threshold`` (``relative=False``,
   metric units) or ``threshold * |m(M) - m(∅)|`` (``relative=True``, a fraction of the effect
   of corrupting every edge);
3. the edges ``u -> r`` from the selected senders into ``R_k`` join the circuit, each scored
   with its own single-edge path-patching effect (= ``exact``'s score of that edge);
4. the selected nodes not expanded before (``input`` has no inputs) form level k + 1.

The search stops when a level selects no new node or after ``max_depth`` levels. The result is
a :class:`~circuitfind.graphs.circuit.Circuit` (``discover`` does not re-select it) whose
metadata records each level's receivers and selected senders with their effects;
:meth:`PathPatching.score` returns its per-edge effects (0 off the circuit).

Cost. Per level, one masked pass per candidate sender (up to S) plus one per selected edge,
batched K masks per pass and resumed at the first receiver's layer. Effects are measured from
the clean model each time, so unlike ACDC the order of tests cannot change a decision.

Departures from Wang et al. 2022. (a) Senders are tested one at a time and selected by a
threshold; the paper grouped heads into classes by inspecting attention patterns, which is not
automated here. (b) MLPs are nodes (senders and receivers) like heads, and a path is a single
edge; the paper recomputes MLPs between sender and receiver, so paths through MLPs counted as
direct there (see :mod:`circuitfind.patching.paths`). (c) One ``qkv`` choice applies at every
level; the paper chose per class (queries of name movers, keys and values of S-inhibition heads).
(d) Removed edges carry the engine's ablation (resample by default: the task's corrupted
prompts, which is the paper's "ABC" distribution for IOI).
"""

from __future__ import annotations

from typing import Any

import torch

from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.algorithms.base import ALGORITHMS, PruningAlgorithm
from circuitfind.errors import ConfigError
from circuitfind.graphs.circuit import Circuit
from circuitfind.patching.engine import PatchingEngine
from circuitfind.patching.paths import check_qkv, path_patch_indices, receiver_indices
from circuitfind.tasks.base import TaskData


@ALGORITHMS.register("path_patching")
class PathPatching(PruningAlgorithm):
    """Recursive path patching from the logits (Wang et al. 2022, automated).

    Args:
        threshold: Selection threshold ``> 0`` on ``|effect|``: a fraction of
            ``|m(M) - m(∅)|`` when ``relative`` (default 0.02), else in the metric's unit.
        relative: Interpret ``threshold`` relative to the full-versus-empty metric gap.
        qkv: Which inputs of a selected head the next level patches into: letters of ``"qkv"``.
        max_depth: Levels to search (``None``: until no new node is found).
        batch_size: Examples per pass (``None``: from the engine's memory budget).

    References:
        Wang et al. (2022), "Interpretability in the Wild: a Circuit for Indirect Object
        Identification in GPT-2 small", §3 and App. B; Goldowsky-Dill et al. (2023),
        "Localizing Model Behavior with Path Patching".
    """

    name = "path_patching"
    description = "recursive path patching from the logits (Wang et al. 2022), threshold on effects"

    def __init__(self, threshold: float = 0.02, relative: bool = True, qkv: str = "qkv",
                 max_depth: int | None = None, batch_size: int | None = None) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ConfigError(f"The 'threshold' parameter of PathPatching must be a number > 0. "
                              f"Got {threshold!r}.")
        for label, value in (("max_depth", max_depth), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"The {label!r} parameter of PathPatching must be None or an "
                                  f"int >= 1. Got {value!r}.")
        self.threshold = float(threshold)
        self.relative = bool(relative)
        self.qkv = check_qkv(qkv)
        self.max_depth = max_depth
        self.batch_size = batch_size

    def discover(self, engine: PatchingEngine, data: TaskData,
                 context: RunContext | None = None) -> Circuit:
        """Run the search (module docstring) and return the circuit it finds.

        Returns:
            A :class:`Circuit` with the selected edges, their single-edge effects as scores (metric
            units) and ``metadata["path_patching"]``: the absolute threshold used and, per
            level, the receivers and the selected senders' effects.
        """
        g = engine.graph
        full = g.full_mask(engine.dtype)
        m_full, m_empty = engine.evaluate(data, torch.stack([full, torch.zeros_like(full)]),
                                          batch_size=self.batch_size).tolist()
        tau = self.threshold * abs(m_full - m_empty) if self.relative else self.threshold
        up = g.n_upstream.tolist()
        kept = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
        scores = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float32)
        frontier, expanded = ["logits"], {"logits"}
        levels: list[dict[str, Any]] = []
        while frontier and (self.max_depth is None or len(levels) < self.max_depth):
            receivers = receiver_indices(g, frontier, self.qkv)
            candidates = list(range(max(up[r] for r in receivers)))
            effects = path_patch_indices(engine, data, [([u], receivers) for u in candidates],
                                         batch_size=self.batch_size)
            selected = [u for u, e in zip(candidates, effects.tolist()) if abs(e) > tau]
            edges = [(u, r) for u in selected for r in receivers if u < up[r]]
            if edges:
                single = path_patch_indices(engine, data, [([u], [r]) for u, r in edges],
                                            batch_size=self.batch_size)
                for (u, r), value in zip(edges, single.tolist()):
                    kept[u, r] = True
                    scores[u, r] = value
            levels.append({"receivers": [g.receivers[r].name for r in receivers],
                           "senders": {g.senders[u].name: float(effects[candidates.index(u)])
                                       for u in selected}})
            frontier = [g.senders[u].name for u in selected
                        if u != 0 and g.senders[u].name not in expanded]
            expanded.update(frontier)
        return Circuit(g, kept, scores, {"scores": self.score_meaning(data.task).to_dict(),
                                         "path_patching": {
            "threshold_abs": tau, "metric_full": m_full, "metric_empty": m_empty,
            "levels": levels}})
