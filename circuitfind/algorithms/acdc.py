"""ACDC: automatic circuit discovery by greedy edge pruning, exact and fast.

Background. Conmy et al. (2023), "Towards Automated Circuit Discovery for Mechanistic
Interpretability" (NeurIPS), Algorithm 1: start from the full graph, visit nodes from the
logits backwards, and for each incoming edge of the current node tentatively remove it (the
receiver reads the sender's ablated value); keep the removal if the objective worsens by less
than a threshold τ, else restore the edge. The reference implementation
(``ArthurConmy/Automatic-Circuit-Discovery``, ``acdc/TLACDCExperiment.py``) runs one full
forward pass with hooks per tested edge.

Method (the reference's semantics, which this module reproduces decision for decision):

- Objective. Default: ``KL(p_M || p_C)`` of the current circuit's next-token distribution from
  the full model's at the metric positions, averaged over examples (the reference's
  ``kl_divergence``); ``objective="metric"`` uses the task metric (the reference minimises, so a
  higher-is-better metric is negated inside the test). ``cur`` is the objective of the current
  circuit; a test measures ``new`` with one more edge removed, records ``effect = new - cur``
  (in the objective's unit: nats, or the task metric's unit) and removes the edge iff
  ``worsening < τ`` with ``worsening = effect`` (``-effect`` for a higher-is-better metric;
  ``|effect|`` with ``abs_value_threshold``), in which case ``cur = new`` (``step`` and
  ``update_cur_metric`` in the reference).
- Visiting order (the reference's reverse topological sort of hook points,
  ``reverse_topologically_sort_corr``): ``logits``; then for each layer from the last: the MLP
  input ``m{L}``; the q/k/v *node tests* (below) of the layer's heads, v then k then q, heads in
  descending order; the edges into each head's v, then k, then q input, heads descending.
  Within a receiver, senders are tested from the latest to the earliest: the previous layer's
  MLP, its heads (descending: the reference's ``indices_mode="normal"``, the default of its
  ``main.py``; ``head_order="ascending"`` gives ``indices_mode="reverse"``), the MLP before,
  ..., and ``input`` last (the insertion order of ``TLACDCCorrespondence.setup_from_model``).
- q/k/v node tests. The reference graph has a direct-computation edge from each head's
  ``hook_q_input`` to its ``hook_q`` (and k, v), visited before the edges into ``hook_q_input``;
  removing it corrupts the head's whole query. circuitfind's graph has no such edge: the same
  test is "remove every incoming edge of the q receiver at once" (identical values: the q input
  with every edge ablated is the ablated run's q input). When the node test removes them, the
  receiver's edges are not tested one by one (in the reference ``hook_q_input`` is then
  disconnected). Their effect is recorded in ``metadata["acdc"]["node_effects"]``.
  ``qkv_node_tests=False`` skips them (not the reference's behaviour).
- Nodes without a path to the logits. Before a receiver's tests, if no node reading it has a
  kept outgoing edge, all its incoming edges are removed untested (``current_node_connected``);
  this cannot change the objective (every consumer of such a node reads its ablated value).
  The reference also re-computes ``cur`` after such removals and at every step; here ``cur``
  carries over (equal up to floating-point rounding).
- Scores. Every tested edge's ``effect`` is its score (untested edges score 0), so an ACDC
  circuit also feeds faithfulness curves and ROC AUC. Under the KL objective an effect grows
  with the edge's importance: the circuit declares its scores as importances in nats
  (``metadata["scores"]``, :meth:`ACDC.score_meaning`), which every consumer reads (the
  faithfulness curve of the circuit, selection, the report, the MIB export); the task-metric
  objective's effects are metric changes.

Fast without changing decisions (``mode="exact"``, the default). (1) Every test is a masked
pass through the engine, which starts at the receiver's layer from the cached clean run: the
current circuit differs from the full model only at receivers already visited, i.e. at that
layer or later, so nothing before it can change. Once the visited receivers keep few edges the
engine runs such passes in kept form (each receiver reads the ablated run's residual plus its
kept edges, and only nodes a kept edge leaves are computed; see
:mod:`circuitfind.patching.runner`), so a pass costs what the circuit has left, not the
whole model. (2) Speculative batching: tests are taken in order in groups whose applicability
is fixed at the group's start (one layer's node tests, one layer's attention edges, one MLP,
the logits); K candidates are evaluated in one batched pass, candidate j's mask removing it
and every earlier candidate of the batch *predicted* removed. Decisions are then made in
order from these values, and the batch is cut at the first wrong prediction: later candidates
assumed a state that did not happen and are re-evaluated from the true state, their measured
effects becoming their predictions (each effect taken against the value of the state its mask
assumed, i.e. the batch's previous predicted removal: an effect under a state that differs by
one edge predicts the decision well). Candidates without such a value are predicted by the
removal rate so far of their category (test kind, receiver kind q/k/v/MLP/logits, sender kind
head/MLP/input), refined per receiver layer through the layer visited before (:class:`_Prior`):
on the benchmark's models MLP and logits edges are mostly kept and late q/k edges almost never,
which one majority over the run mispredicted. K maximises the expected accepted tests per
second given each candidate's own miss probability and a fit of this layer's pass time to
``c0 + c1 K``. A test whose mask was already evaluated since the circuit last changed reads
that value instead of a pass: the edge of a receiver with one kept edge (the layer-0 q/k/v
inputs read only the input) removes every edge of the receiver, which is the kept node test's
own mask. Decisions equal the sequential algorithm's (pinned edge for edge by the tests,
against one full forward per edge, and with every prediction forced wrong); speculation only
changes the cost.

Faster approximation (``mode="batched"``). All incoming edges of a receiver are tested against
the same state in one pass and every edge below τ is removed at once; ``cur`` is then
re-measured. This ignores interactions between a receiver's edges (removing two edges can
matter although each alone does not), so circuits differ from exact mode; see
``benchmarks/results/acdc_quality.md`` for how much.

Cost. Exact mode: per tested edge the blocks from the receiver's layer on (``(n_layers - L) /
n_layers`` of a forward pass), restricted to the circuit's nodes in kept form, plus the wasted
speculative candidates (measured in ``benchmarks/results/acdc_speed.md``). Batched mode: one
pass of ``n_incoming`` masks per receiver plus one re-measurement.

Checkpoints (:mod:`circuitfind.algorithms.lifecycle`). The state (group index, kept mask,
tested masks, effects, ``cur``) is saved atomically after batches (every ``save_every_s``) and on
Ctrl-C or error, with a fingerprint of model, data, τ and settings; resuming gives the identical
circuit. A NaN or infinite objective stops the run, saves the checkpoint and names the receiver
and edge.

Deviations from the reference. Grouped-query attention (Llama, stories260k): k/v receivers are
per key/value head (``a{L}.kv{G}<k>``) and read by several query heads; such a receiver's node
counts as connected when any of its query heads is (the reference has no grouped-query
support). Ablations are the engine's (``resample``: the corrupted prompt of the same example,
the reference's default with paired ``ref_ds``; ``zero``: sender outputs zeroed, which matches
the reference's ``zero_ablation`` of ``hook_result``/``hook_mlp_out``/``hook_resid_pre``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from circuitfind.algorithms.base import ALGORITHMS, PruningAlgorithm
from circuitfind.algorithms.lifecycle import RunContext, fingerprint
from circuitfind.algorithms.objective import OBJECTIVES, Objective
from circuitfind.errors import ConfigError, NonFiniteMetricError
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.graphs.scores import ScoreMeaning
from circuitfind.patching.engine import PatchingEngine
from circuitfind.patching.plan import Workload
from circuitfind.tasks.base import TaskData

MODES = ("exact", "batched")
HEAD_ORDERS = ("descending", "ascending")


@dataclass(frozen=True)
class Step:
    """One step of the visiting plan.

    Attributes:
        kind: ``"node"`` (q/k/v node test of a receiver) or ``"edges"`` (its incoming edges).
        receiver: Receiver index.
        group: Steps of one group have their applicability fixed at the group's start.
    """

    kind: str
    receiver: int
    group: int


def visiting_plan(graph: ComputeGraph, node_tests: bool = True,
                  max_receivers: int | None = None) -> list[Step]:
    """The reference ACDC's visiting order of receivers (see the module docstring).

    Args:
        graph: The graph.
        node_tests: Include the q/k/v node tests.
        max_receivers: Stop after this many ``"edges"`` steps (``None``: all receivers).

    Returns:
        The steps in order; group ids increase along the plan.
    """
    g = graph
    plan: list[Step] = [Step("edges", g.n_receivers - 1, 0)]
    group = 1
    for layer in reversed(range(g.n_layers)):
        mlp = g.mlp_receiver[layer]
        if mlp is not None:
            plan.append(Step("edges", mlp, group))
            group += 1
        attn = []
        for start, size in ((g.v_start[layer], g.n_kv_heads), (g.k_start[layer], g.n_kv_heads),
                            (g.q_start[layer], g.n_heads)):
            attn += list(reversed(range(start, start + size)))
        if node_tests:
            plan += [Step("node", r, group) for r in attn]
            group += 1
        plan += [Step("edges", r, group) for r in attn]
        group += 1
    if max_receivers is not None:
        cut, seen = len(plan), 0
        for i, step in enumerate(plan):
            seen += step.kind == "edges"
            if seen > max_receivers:
                cut = i
                break
        plan = plan[:cut]
        # a budget ends at a receiver's edges; drop node tests whose edges are not visited
        while plan and plan[-1].kind == "node":
            plan.pop()
    return plan


def sender_order(graph: ComputeGraph, receiver: int, head_order: str = "descending") -> list[int]:
    """Senders of ``receiver`` in the reference's testing order (latest first).

    Args:
        graph: The graph.
        receiver: Receiver index.
        head_order: Heads of one layer ``"descending"`` (reference ``indices_mode="normal"``)
            or ``"ascending"`` (``indices_mode="reverse"``).
    """
    up = int(graph.n_upstream[receiver])
    order = list(reversed(range(up)))
    if head_order == "ascending":
        layers = [graph.senders[s].layer for s in order]
        kinds = [graph.senders[s].kind for s in order]
        out: list[int] = []
        i = 0
        while i < len(order):
            j = i
            while (j < len(order) and kinds[j] == "attention" and kinds[i] == "attention"
                   and layers[j] == layers[i]):
                j += 1
            if j == i:
                out.append(order[i])
                i += 1
            else:
                out += list(reversed(order[i:j]))
                i = j
        order = out
    return order


@dataclass(frozen=True)
class _Item:
    """A pending test: remove ``edges`` ([(s, r)]) from the current circuit."""

    kind: str  # "edge" or "node"
    receiver: int
    sender: int | None


class _Prior:
    """Predicted decisions of candidates tested for the first time (speculation only).

    A candidate's category is its test kind (edge or node test), receiver kind (q, k, v,
    ``mlp``, ``logits``) and sender kind (``attention``, ``mlp``, ``input``; none for node
    tests); its probability of removal is the removal rate so far of its category at its
    receiver's layer, smoothed towards the category's rate at the layer visited before
    (``layer + 1``), which is smoothed towards the category's rate over all layers, the run's
    rate and 1/2 (each level ``(removed + w p) / (tests + w)`` with ``p`` the coarser level's
    rate and ``w = 2`` pseudo-tests). The previous layer's level carries the trend with depth
    into a layer's first tests: on the benchmark's models q node tests go from mostly removed
    late to all kept early, which the rate over all layers mispredicted at each new layer.
    Predictions set batch lengths and speculative masks, never a decision.
    """

    weight = 2.0

    def __init__(self) -> None:
        self.counts: dict[tuple[Any, ...], list[int]] = {}  # key -> [tests, removals]

    @staticmethod
    def keys(category: tuple[str, str, str | None], layer: int) -> tuple[tuple[Any, ...], ...]:
        """The levels of one candidate, coarsest first (the previous layer's level is the same
        category's count at ``layer + 1``: read here, learned there)."""
        return ((), category, (*category, layer + 1), (*category, layer))

    def p_removed(self, category: tuple[str, str, str | None], layer: int) -> float:
        """Probability that a first test of this category at ``layer`` removes it."""
        p = 0.5
        for key in self.keys(category, layer):
            seen = self.counts.get(key)
            if seen is not None:
                p = (seen[1] + self.weight * p) / (seen[0] + self.weight)
        return p

    def learn(self, category: tuple[str, str, str | None], layer: int, removed: bool) -> None:
        """Count one decision."""
        for key in ((), category, (*category, layer)):
            seen = self.counts.setdefault(key, [0, 0])
            seen[0] += 1
            seen[1] += removed


@ALGORITHMS.register("acdc")
class ACDC(PruningAlgorithm):
    """Automatic Circuit DisCovery (Conmy et al. 2023), with the reference's decisions.

    Args:
        threshold: τ > 0: an edge is removed when removing it worsens the objective by less
            than τ (nats for ``objective="kl"``, the task metric's unit otherwise).
        objective: ``"kl"`` (KL divergence to the full model, the reference default) or
            ``"metric"`` (the task metric).
        mode: ``"exact"`` (the reference's decisions, speculative batching) or ``"batched"``
            (every edge of a receiver tested against the same state; faster, approximate).
        abs_value_threshold: Compare ``|effect|`` with τ (the reference's option).
        qkv_node_tests: Test each head's whole q/k/v input before its edges, as the reference
            does with its direct-computation edges (default True).
        head_order: Order of one layer's heads among a receiver's senders: ``"descending"``
            (reference ``indices_mode="normal"``) or ``"ascending"``.
        max_receivers: Visit only the first N receivers in the plan (``None``: all); the rest
            keep their edges untested (for budgets and benchmarks).
        masks_per_pass: Most candidates per batched pass (``None``: from the engine's memory
            budget, at most 64).
        progress: Show a progress bar when no :class:`RunContext` is given.

    Raises:
        ConfigError: τ not finite or <= 0, or an unknown objective, mode or order.

    What a removed edge carries is the engine's ablation (:attr:`PatchingEngine.ablation`, set
    by ``discover(ablation=...)``, ``--ablation`` or a bench config), as for every algorithm.

    References:
        Conmy, Mavor-Parker, Lynch, Heimersheim & Garriga-Alonso (2023), "Towards Automated
        Circuit Discovery for Mechanistic Interpretability", Algorithm 1.
    """

    name = "acdc"
    description = "ACDC greedy edge pruning (reference decisions; speculative batching; resumable)"
    supports_checkpoint = True

    def __init__(self, threshold: float = 0.01, objective: str = "kl", mode: str = "exact",
                 abs_value_threshold: bool = False,
                 qkv_node_tests: bool = True, head_order: str = "descending",
                 max_receivers: int | None = None, masks_per_pass: int | None = None,
                 progress: bool = True) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
                math.isfinite(threshold) and threshold > 0):
            raise ConfigError(f"The 'threshold' parameter of ACDC must be a finite number > 0. "
                              f"Got {threshold!r}.")
        if objective not in OBJECTIVES:
            raise ConfigError(f"The 'objective' parameter of ACDC must be one of "
                              f"{', '.join(OBJECTIVES)}. Got {objective!r}.")
        if mode not in MODES:
            raise ConfigError(f"The 'mode' parameter of ACDC must be one of {', '.join(MODES)}. "
                              f"Got {mode!r}.")
        if head_order not in HEAD_ORDERS:
            raise ConfigError(f"The 'head_order' parameter of ACDC must be one of "
                              f"{', '.join(HEAD_ORDERS)}. Got {head_order!r}.")
        for label, value in (("max_receivers", max_receivers), ("masks_per_pass", masks_per_pass)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"The {label!r} parameter of ACDC must be None or an int >= 1. "
                                  f"Got {value!r}.")
        self.threshold = float(threshold)
        self.objective = objective
        self.mode = mode
        self.abs_value_threshold = bool(abs_value_threshold)
        self.qkv_node_tests = bool(qkv_node_tests)
        self.head_order = head_order
        self.max_receivers = max_receivers
        self.masks_per_pass = masks_per_pass
        self.progress = progress

    # ------------------------------------------------------------------ protocol
    def discover(self, engine: PatchingEngine, data: TaskData,
                 context: RunContext | None = None) -> Circuit:
        """Run ACDC and return the pruned circuit.

        Args:
            engine: The patching engine over the model.
            data: Task data (clean prompts; the ablation's values come from the corrupted ones).
            context: Checkpoint and progress (default: progress only).

        Returns:
            The circuit of kept edges; its scores are the tested edges' effects (objective
            unit); ``metadata["acdc"]`` holds the objective value of the circuit, counts of
            tested and kept edges, and the node tests' effects.

        Raises:
            NonFiniteMetricError: the objective was NaN or infinite (the checkpoint is saved).
            CheckpointMismatchError: the context's checkpoint belongs to another run.
        """
        return _Run(self, engine, data, context).run()

    def score_meaning(self, task: Any) -> ScoreMeaning:
        """ACDC's scores are the objective's change when an edge is removed: importances in nats
        under the KL objective (larger is more important), metric changes under the task
        metric."""
        if self.objective == "kl":
            return ScoreMeaning("importance", "nats", True, "the KL divergence to the full model")
        return super().score_meaning(task)

    def workload(self, graph: ComputeGraph) -> Workload:
        """At most one test per planned edge and node test, each pass starting at its
        receiver's layer (an upper bound: a removed node test skips its receiver's edges)."""
        per_layer: dict[int, int] = {}
        for step in visiting_plan(graph, self.qkv_node_tests, self.max_receivers):
            layer = graph.receivers[step.receiver].layer
            tests = 1 if step.kind == "node" else int(graph.n_upstream[step.receiver])
            per_layer[layer] = per_layer.get(layer, 0) + tests
        return Workload(masked_tests=tuple(sorted(per_layer.items())),
                        masks_cap=self.masks_per_pass or 64)

    def settings(self) -> dict[str, Any]:
        """Parameters that change the result (for the checkpoint fingerprint)."""
        params = self.get_params()
        params.pop("progress")
        return params


class _Run:
    """State of one ACDC run (see the module docstring)."""

    min_fixed = 0.1  # a pass's fixed cost, at least this many masks' cost (_pass_cost)
    near = 0.25  # a value prediction's effect this close to τ (in τ) is an uncertain one

    def __init__(self, algo: ACDC, engine: PatchingEngine, data: TaskData,
                 context: RunContext | None) -> None:
        self.algo, self.engine, self.data = algo, engine, data
        self.ctx = context if context is not None else RunContext(progress=algo.progress)
        g = self.g = engine.graph
        self.plan = visiting_plan(g, algo.qkv_node_tests, algo.max_receivers)
        self.objective = Objective(algo.objective)
        self.key = fingerprint(engine, data, algo.settings(), version="acdc v1")
        self.readers = [[g.node_index(n) for n in r.nodes if n != "logits"] for r in g.receivers]
        self.dtype = torch.float64 if engine.dtype == torch.float64 else torch.float32
        self.k_max = algo.masks_per_pass or engine.masks_per_pass(data, cap=64)
        planned = torch.zeros(g.n_receivers, dtype=torch.bool)
        for step in self.plan:
            planned[step.receiver] = True
        self.planned_mask = g.edge_mask & planned[None, :]
        self.planned_edges = int(self.planned_mask.sum())
        # speculation only (never decisions): predicted removals from values measured under a
        # nearly equal state (with whether the effect was within ``near`` of τ), the prior of
        # first tests, and (right, total) predictions by source: "prior", "far", "near"
        self.predictions: dict[_Item, tuple[bool, bool]] = {}
        # values of tests whose mask was already evaluated (:meth:`_sole_edge`), valid while
        # ``version`` (the count of changes to the kept mask) is the one stored with them
        self.measured: dict[_Item, tuple[float, int]] = {}
        self.version = 0
        self.prior = _Prior()
        self.pred_stats: dict[str, tuple[int, int]] = {"prior": (0, 0), "far": (0, 0),
                                                       "near": (0, 0)}
        self.pass_times: dict[int, list[tuple[int, float]]] = {}  # layer -> (masks, seconds)
        self.last_fit: tuple[float, float] | None = None  # the latest layer's (c0, c1)
        self.settings_text = f"ACDC({algo.settings()})"
        # this process's CPU seconds on the CPU, so that other processes on a loaded machine
        # do not skew the batch sizing; wall seconds on an accelerator (its work is not CPU)
        self.clock = time.perf_counter if engine.device.type != "cpu" else time.process_time

    # ------------------------------------------------------------------ state
    def _fresh(self) -> dict[str, Any]:
        g = self.g
        return {"group": 0, "kept": g.edge_mask.clone(),
                "tested": torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool),
                "effects": torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64),
                "node_tested": torch.zeros(g.n_receivers, dtype=torch.bool),
                "node_effects": torch.zeros(g.n_receivers, dtype=torch.float64),
                "cur": float("nan"), "start_value": float("nan")}

    def _save(self, force: bool = False, units: int = 1) -> None:
        self.ctx.save(self.key, self.state, units=units, force=force,
                      settings=self.settings_text)

    # ------------------------------------------------------------------ evaluation
    def _values(self, masks: Tensor) -> Tensor:
        return self.objective.evaluate(self.engine, self.data, masks.to(self.dtype))

    def _connected(self, r: int) -> bool:
        readers = self.readers[r]
        return not readers or bool(self.state["kept"][readers].any())

    def _items(self, steps: list[Step]) -> list[_Item]:
        """Pending tests of one group from the current state; drops disconnected receivers."""
        st, items = self.state, []
        for step in steps:
            r = step.receiver
            if not self._connected(r):
                self.version += bool(st["kept"][:, r].any())
                st["kept"][:, r] = False  # no path to the logits: removed untested
                continue
            if step.kind == "node":
                if not st["node_tested"][r] and bool(st["kept"][:, r].any()):
                    items.append(_Item("node", r, None))
                continue
            for s in sender_order(self.g, r, self.algo.head_order):
                if st["kept"][s, r] and not st["tested"][s, r]:
                    items.append(_Item("edge", r, s))
        return items

    @staticmethod
    def _remove(mask: Tensor, item: _Item) -> None:
        if item.kind == "node":
            mask[..., :, item.receiver] = False
        else:
            mask[..., item.sender, item.receiver] = False

    def _decide(self, item: _Item, value: float) -> bool:
        """Record the test of ``item`` measured at ``value``; apply it; True if removed."""
        st = self.state
        if not math.isfinite(value):
            g = self.g
            what = (f"edge {g.edge_name(item.sender, item.receiver)}" if item.sender is not None
                    else f"node test of {g.receivers[item.receiver].name}")
            self._save(force=True)
            raise NonFiniteMetricError(
                f"ACDC's {self.objective.kind} objective was {value} at receiver "
                f"{g.receivers[item.receiver].name!r} ({what}); the checkpoint is saved. Check "
                "the task metric and the model's dtype (float16 overflows), or use another "
                "ablation.")
        effect = value - st["cur"]
        removed = self._would_remove(effect)
        if item.kind == "node":
            st["node_tested"][item.receiver] = True
            st["node_effects"][item.receiver] = effect
        else:
            st["tested"][item.sender, item.receiver] = True
            st["effects"][item.sender, item.receiver] = effect
        if removed:
            self._remove(st["kept"], item)
            self.version += 1
            st["cur"] = value
        return removed

    def _category(self, item: _Item) -> tuple[str, str, str | None]:
        sender = None if item.sender is None else self.g.senders[item.sender].kind
        return item.kind, self.g.receivers[item.receiver].kind, sender

    def _guess(self, item: _Item) -> tuple[bool, float]:
        """The predicted decision of ``item`` (True: removed) and the probability that it is
        wrong: from a value measured under a nearly equal state where there is one (miss
        probability: the rate so far of such predictions whose effect was as near τ, within
        :attr:`near` τ or not, Laplace-smoothed), else from :class:`_Prior`. On the
        benchmark's models about 30% of the near ones missed and 2% of the others."""
        predicted = self.predictions.get(item)
        if predicted is not None:
            hits, total = self.pred_stats["near" if predicted[1] else "far"]
            return predicted[0], (total - hits + 1) / (total + 2)
        p = self.prior.p_removed(self._category(item), self.g.receivers[item.receiver].layer)
        return p >= 0.5, min(p, 1.0 - p)

    def _learn(self, item: _Item, guess: bool, removed: bool) -> None:
        """Count a decision for the predictions (never read by a decision)."""
        predicted = self.predictions.pop(item, None)
        source = "prior" if predicted is None else "near" if predicted[1] else "far"
        stats = self.pred_stats[source]
        self.pred_stats[source] = (stats[0] + (removed == guess), stats[1] + 1)
        self.prior.learn(self._category(item), self.g.receivers[item.receiver].layer, removed)

    def _sole_edge(self, item: _Item, value: float) -> None:
        """After a node test that kept a receiver with one kept edge: that edge's test removes
        every edge of the receiver, so its mask is the node test's own. The edge is predicted
        kept, and its test reads ``value`` (the objective of that very mask) unless the
        circuit changed in between (:attr:`version`): the value is a function of the mask
        alone, so it is a measurement under the true state. The layer-0 receivers, which read
        only the input, are all such."""
        senders = self.state["kept"][:, item.receiver].nonzero()[:, 0].tolist()
        if len(senders) == 1:
            edge = _Item("edge", item.receiver, senders[0])
            self.predictions[edge] = self._predict(value - self.state["cur"])
            self.measured[edge] = value, self.version

    def _known(self, item: _Item) -> float | None:
        """The value of ``item``'s test if its mask was evaluated since the last change to
        the circuit (:meth:`_sole_edge`), else None."""
        known = self.measured.get(item)
        return known[0] if known is not None and known[1] == self.version else None

    def _relearn(self) -> None:
        """Rebuild the prior from a resumed state's decisions (a node test kept and all its
        receiver's edges removed later reads as removed: predictions only)."""
        st, g = self.state, self.g
        for s, r in st["tested"].nonzero().tolist():
            self.prior.learn(self._category(_Item("edge", r, s)), g.receivers[r].layer,
                             not bool(st["kept"][s, r]))
        any_kept = st["kept"].any(0)
        for r in st["node_tested"].nonzero()[:, 0].tolist():
            self.prior.learn(self._category(_Item("node", r, None)), g.receivers[r].layer,
                             not bool(any_kept[r]))

    def _batch_end(self, items: list[_Item], i: int, layer: int) -> int:
        """End of the next speculative batch from ``items[i]``: the length K maximising the
        expected accepted tests per second, ``sum_{j<K} prod_{i<j} (1 - p_i) / (c0 + c1 K)``
        (``p_i`` the candidates' miss probabilities, :meth:`_guess`; ``c0`` a pass's fixed
        cost and ``c1`` its cost per mask, fitted to the passes so far at ``layer``, the
        receiver's). Candidate ``i + K - 1``'s own prediction costs nothing: the batch
        preferably ends at an uncertain one."""
        c0, c1 = self._pass_cost(layer)
        best, best_rate, accepted, reach = i + 1, 0.0, 0.0, 1.0
        for end in range(i, min(len(items), i + self.k_max)):
            accepted += reach  # candidate ``end`` is measured under the true state
            rate = accepted / (c0 + c1 * (end - i + 1))
            if rate > best_rate:
                best, best_rate = end + 1, rate
            reach *= 1.0 - self._guess(items[end])[1]
            if reach < 1e-3:  # a further candidate adds under 1e-3 expected tests
                break
        return best

    def _pass_cost(self, layer: int) -> tuple[float, float]:
        """Least-squares ``(c0, c1)`` of ``seconds = c0 + c1 K`` over this layer's passes,
        each weighted by ``1 / K^2`` (relative errors). Unweighted, the few long passes set
        the line: on Gemma-2 a post-norm pass costs more per mask past about 8 masks, which
        read as a fixed cost of a third of the short passes' and made K = 1 the choice for
        uncertain candidates, where two masks per pass cost less per test (ACDC 0.469 ->
        0.431 forwards per test there, Qwen3 0.300 -> 0.290; in-process A/B, 2026-12-05,
        ``benchmarks/results/acdc_families.md``).

        Until two batch sizes were seen at ``layer``: the cost per mask of the latest fit of
        another layer (layers are visited from the last), or ``(1, 1)``, with what this layer's
        passes cost beyond it as the fixed cost. ``c0`` is at least :attr:`min_fixed` ``* c1``:
        a pass always has a fixed cost, and a fit at zero (noise, or a range of sizes where the
        cost per mask falls with K) would choose K = 1 for good, since a layer that sees one
        batch size is never refitted.
        Seconds of this process's CPU time on the CPU (wall time on an accelerator), so load
        from other processes does not skew them; they set batch lengths, which change the
        cost, never a decision."""
        obs = self.pass_times.get(layer, [])
        n = len(obs)
        ws = [1.0 / (k * k) for k, _ in obs]
        total = sum(ws)
        mk = sum(w * k for w, (k, _) in zip(ws, obs)) / total if n else 0.0
        mt = sum(w * t for w, (_, t) in zip(ws, obs)) / total if n else 0.0
        if len({k for k, _ in obs}) < 2:
            c0, c1 = self.last_fit if self.last_fit is not None else (1.0, 1.0)
            if n:  # one batch size seen here: the other layer's cost per mask, and the rest
                c0 = mt - c1 * mk  # of what this layer's passes cost as its fixed cost
            return max(c0, self.min_fixed * c1), c1
        var = sum(w * (k - mk) ** 2 for w, (k, _) in zip(ws, obs))
        c1 = max(sum(w * (k - mk) * (t - mt) for w, (k, t) in zip(ws, obs)) / var, 1e-9)
        c0 = max(mt - c1 * mk, self.min_fixed * c1)
        self.last_fit = c0, c1
        return c0, c1

    def _exact(self, items: list[_Item], bar: Any) -> None:
        """Speculative batches: candidate j's mask removes it and every earlier candidate of
        the batch *predicted* removed; a batch is cut at the first wrong prediction (later
        candidates assumed a state that did not happen), and their measured effects, each
        against the value of the state its mask assumed, become their predictions for the
        next batch. Batch lengths follow :meth:`_batch_end` (at most ``masks_per_pass``); they
        change the cost, never a decision."""
        i = 0
        kept = self.state["kept"]
        while i < len(items):
            known = self._known(items[i])
            if known is not None:  # this test's mask was evaluated under the true state
                guess = self._guess(items[i])[0]
                del self.measured[items[i]]
                self._learn(items[i], guess, self._decide(items[i], known))
                i += 1
                self._progress(bar, items[i - 1].receiver, 1)
                continue
            layer = self.g.receivers[items[i].receiver].layer
            end = self._batch_end(items, i, layer)
            # a batch stops before a known value: read, not evaluated again, if still valid
            end = next((j for j in range(i + 1, end) if self._known(items[j]) is not None), end)
            batch = items[i: end]
            guesses = [self._guess(item)[0] for item in batch]
            masks = kept[None].repeat(len(batch), 1, 1)
            for j, (item, guess) in enumerate(zip(batch, guesses)):
                self._remove(masks[j: j + 1] if not guess else masks[j:], item)
            base = self.state["cur"]
            started = self.clock()
            values = self._values(masks).tolist()
            self.pass_times.setdefault(layer, []).append((len(batch), self.clock() - started))
            bases = []  # the value of the state candidate j's mask assumed
            for guess, value in zip(guesses, values):
                bases.append(base)
                base = value if guess else base
            done = 0
            for j, (item, guess, value) in enumerate(zip(batch, guesses, values)):
                done += 1
                removed = self._decide(item, value)
                self._learn(item, guess, removed)
                if item.kind == "node" and not removed:
                    self._sole_edge(item, value)
                if removed != guess:
                    # later candidates were measured under a state that differs from the true
                    # one by this candidate; their effects still predict their decisions well
                    for later, v, b in zip(batch[j + 1:], values[j + 1:], bases[j + 1:]):
                        self.predictions[later] = self._predict(v - b)
                    break
            i += done
            self._progress(bar, items[i - 1].receiver, done)

    def _predict(self, effect: float) -> tuple[bool, bool]:
        """A prediction from an effect measured under a nearly equal state: whether it would
        remove the candidate, and whether the effect was within :attr:`near` τ of τ."""
        worse = self._worsening(effect)
        return bool(worse < self.algo.threshold), abs(worse - self.algo.threshold) < (
            self.near * self.algo.threshold)

    def _worsening(self, effect: float) -> float:
        worse = self.objective.worsening(effect)
        return abs(worse) if self.algo.abs_value_threshold else worse

    def _would_remove(self, effect: float) -> bool:
        return bool(self._worsening(effect) < self.algo.threshold)

    def _batched(self, items: list[_Item], bar: Any) -> None:
        st, g = self.state, self.g
        by_receiver: dict[tuple[str, int], list[_Item]] = {}
        for item in items:
            by_receiver.setdefault((item.kind, item.receiver), []).append(item)
        for (_, r), group in by_receiver.items():
            masks = st["kept"][None].repeat(len(group), 1, 1)
            for j, item in enumerate(group):
                self._remove(masks[j], item)
            values = self._values(masks).tolist()
            cur = st["cur"]
            removed = []
            for item, value in zip(group, values):
                if self._decide(item, value):
                    removed.append(item)
                st["cur"] = cur  # every test is against the same state
            if removed:
                value = float(self._values(st["kept"][None])[0])
                if not math.isfinite(value):
                    self._save(force=True)
                    raise NonFiniteMetricError(
                        f"ACDC's {self.objective.kind} objective was {value} after removing "
                        f"{len(removed)} edges into {g.receivers[r].name!r}; the checkpoint "
                        "is saved.")
                st["cur"] = value
            self._progress(bar, r, len(group))

    def _decided(self) -> int:
        """Planned edges tested or removed untested (the progress bar's count)."""
        st = self.state
        return int(((st["tested"] | ~st["kept"]) & self.planned_mask).sum())

    def _progress(self, bar: Any, r: int, units: int) -> None:
        bar.n = self._decided()
        bar.set_postfix(kept=int(self.state["kept"].sum()),  # kept ⊆ edge_mask
                        receiver=self.g.receivers[r].name, refresh=False)
        bar.refresh()
        self._save(units=units)

    # ------------------------------------------------------------------ main loop
    def run(self) -> Circuit:
        g = self.g
        self.objective.prepare(self.engine, self.data)
        saved = self.ctx.resume(self.key)
        self.state = saved if saved is not None else self._fresh()
        st = self.state
        if saved is None:
            start = float(self._values(g.edge_mask[None])[0])
            st["cur"] = st["start_value"] = start
            if not math.isfinite(start):
                raise NonFiniteMetricError(f"The {self.objective.kind} objective of the full "
                                           f"model is {start}; check the task metric.")
        groups: list[list[Step]] = []
        for step in self.plan:
            if not groups or groups[-1][0].group != step.group:
                groups.append([])
            groups[-1].append(step)
        decided = self._decided()
        if saved is not None:
            self.ctx.resumed("ACDC", decided, self.planned_edges, "edge")
            self._relearn()
        bar = self.ctx.bar(total=self.planned_edges, initial=decided,
                           desc=f"ACDC τ={self.algo.threshold:g}")
        try:
            while st["group"] < len(groups):
                items = self._items(groups[st["group"]])
                if self.algo.mode == "exact":
                    self._exact(items, bar)
                else:
                    self._batched(items, bar)
                st["group"] += 1
                self._save(units=0)
        except BaseException:
            self._save(force=True)
            raise
        finally:
            bar.close()
        self._save(force=True)
        kept = st["kept"] & g.edge_mask
        node_effects = {g.receivers[r].name: float(st["node_effects"][r])
                        for r in st["node_tested"].nonzero()[:, 0].tolist()}
        return Circuit(g, kept, scores=st["effects"].float(), metadata={
            "scores": self.algo.score_meaning(self.data.task).to_dict(),
            "acdc": {"threshold": self.algo.threshold, "objective": self.objective.kind,
                     "objective_unit": self.objective.unit, "mode": self.algo.mode,
                     "value_full": st["start_value"], "value_circuit": st["cur"],
                     "tested_edges": int(st["tested"].sum()),
                     "node_tests": int(st["node_tested"].sum()),
                     "kept_edges": int(kept.sum()), "planned_edges": self.planned_edges,
                     "node_effects": node_effects}})
