"""Faithfulness of a circuit: normalized faithfulness, KL divergence, and faithfulness curves.

Definitions (DESIGN.md §4):

- normalized faithfulness ``f(C) = (m(C) - m(∅)) / (m(M) - m(∅))``, with ``m`` the task metric
  averaged over examples, ``M`` the full model (every edge kept) and ``∅`` the empty circuit
  (every edge corrupted, i.e. the model on corrupted sender outputs). ``f = 1`` recovers the
  model's behaviour, ``f = 0`` none of it (Wang et al. 2022 §4; Hanna et al. 2024 eq. 4);
- ``KL(p_M || p_C)``: KL divergence (nats) of the circuit's next-token distribution from the
  full model's, at the metric positions, averaged over positions and examples;
- the faithfulness curve over circuit sizes (fractions of all edges, default MIB's
  {0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100}%), circuits chosen as the top-k edges by score;
  CPR = area under f, CMD = area under |1 - f| (trapezoid rule over the fractions) as in MIB
  (Mueller et al. 2025, §3). Two conventions, recorded in every result (``convention``,
  ``label``): ``"mib"`` (default) is MIB's circuit track exactly — top ``int(p · E)`` edges,
  dangling edges pruned, CPR over the signed-score ranking, CMD over the |score| ranking;
  ``"single"`` is one ranking (by |score| or signed) for both areas, top ``max(1, round(p · E))``
  edges, unpruned.

Removed edges carry the ablation value (``ablation=``: resample, the default, zero, mean or
mean_positional; see :class:`~circuitfind.patching.spec.Ablation`); ∅ is the model with every
edge ablated that way, and the ablation used is recorded in every report and curve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.integrate import trapezoid
import torch
from torch import Tensor

from circuitfind.errors import ConfigError
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.scores import SCORE_KINDS, ScoreMeaning, score_meaning
from circuitfind.graphs.selection import prune_dangling, select_top_n
from circuitfind.patching.engine import PatchingEngine
from circuitfind.patching.spec import DEFAULT_ABLATION, Ablation
from circuitfind.tasks.base import TaskData
from circuitfind.tasks.metrics import kl_div

DEFAULT_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class FaithfulnessReport:
    """Evaluation of one circuit.

    Attributes:
        faithfulness: Normalized faithfulness (dimensionless; NaN when m(M) = m(∅)).
        metric_circuit: m(C), the mean metric of the circuit, in ``metric_unit``.
        metric_full: m(M), the full model's mean metric.
        metric_empty: m(∅), the empty circuit's (corrupted) mean metric.
        kl_div: Mean KL(p_M || p_C) in nats at the metric positions.
        n_edges: Edges in the circuit; ``n_total_edges`` in the graph.
        metric_unit: Unit of the metric values ("logits", "probability", "nats").
        ablation: What removed edges carried (``resample``, ``zero``, ``mean``,
            ``mean_positional``).
    """

    faithfulness: float
    metric_circuit: float
    metric_full: float
    metric_empty: float
    kl_div: float
    n_edges: int
    n_total_edges: int
    metric_unit: str = ""
    ablation: str = DEFAULT_ABLATION

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable; NaN stays NaN)."""
        return asdict(self)


def normalized_faithfulness(m_circuit: float, m_full: float, m_empty: float) -> float:
    """``(m(C) - m(∅)) / (m(M) - m(∅))``; NaN when ``m(M) == m(∅)`` (undefined)."""
    gap = m_full - m_empty
    return float("nan") if gap == 0 else (m_circuit - m_empty) / gap


def _engine(model_or_engine: Any, ablation: Ablation | str | None,
            memory_budget: int | str | None = None) -> tuple[PatchingEngine, Ablation]:
    """The engine to run on and the ablation to use (``None``: the engine's own); a model gets
    a new engine with ``memory_budget`` (an engine keeps its own)."""
    if isinstance(model_or_engine, PatchingEngine):
        engine = model_or_engine
    else:
        engine = PatchingEngine(model_or_engine, ablation=ablation, memory_budget=memory_budget)
    return engine, engine.ablation if ablation is None else Ablation.parse(ablation)


def evaluate(model: Any, circuit: Circuit, data: TaskData, batch_size: int | None = None,
             ablation: Ablation | str | None = None,
             memory_budget: int | str | None = None) -> FaithfulnessReport:
    """Evaluate a circuit's faithfulness and KL divergence on task data.

    The circuit, the full model and the empty circuit run in one batched masked forward pass
    (a circuit equal to the full model or to the empty circuit is not run again: it reads
    their logits, so its faithfulness is exactly 1 or 0).

    Args:
        model: A ``TransformerBridge`` (from :func:`circuitfind.load_model`) or a
            :class:`PatchingEngine`.
        circuit: The circuit (its graph must match the model's).
        data: Task data (clean prompts are run; corrupted sender outputs replace removed edges).
        batch_size: Examples per pass (default: from the engine's memory budget).
        ablation: What removed edges carry (``resample``, ``zero``, ``mean``,
            ``mean_positional`` or an :class:`Ablation`; default: the engine's, i.e. resample
            unless an engine built with another ablation is passed).
        memory_budget: Bytes (or a size such as ``"4GiB"``) for an engine built here from a
            model (default 2 GiB; an engine passed in keeps its own).

    Returns:
        A :class:`FaithfulnessReport`.

    Raises:
        ConfigError: the circuit's graph does not match the model; an unknown ablation or one
            the data cannot supply (a mean over one example).

    References:
        Wang et al. (2022) §4 (faithfulness); Hanna, Pezzelle & Belinkov (2024) eq. 4
        (normalized faithfulness); Conmy et al. (2023) (KL divergence as a metric).
    """
    engine, spec = _engine(model, ablation, memory_budget)
    _check_graph(engine, circuit)
    g = engine.graph
    # the full model, the empty circuit and, unless it is one of them, the circuit: the full
    # and empty circuits then read the very same logits (a batch's rows can round apart on
    # some CPUs' kernels, so faithfulness is exactly 1 and 0 there on every machine)
    kept = circuit.kept.to(torch.bool) & g.edge_mask
    same = (0 if torch.equal(kept, g.edge_mask) else 1 if not bool(kept.any()) else 2)
    masks = torch.stack([g.full_mask(engine.dtype),
                         torch.zeros(g.n_senders, g.n_receivers, dtype=engine.dtype)]
                        + ([kept.to(engine.dtype)] if same == 2 else []))
    logits = engine.run(data, masks, batch_size=batch_size, ablation=spec)  # [2|3, N, P, V]
    metrics = engine.on_device(data).metric(logits).double().mean(-1).cpu()
    kl = float(kl_div(logits[0], logits[same]).double().mean())
    m_c, m_full, m_empty = float(metrics[same]), float(metrics[0]), float(metrics[1])
    return FaithfulnessReport(
        faithfulness=normalized_faithfulness(m_c, m_full, m_empty), metric_circuit=m_c,
        metric_full=m_full, metric_empty=m_empty, kl_div=kl, n_edges=circuit.n_edges,
        n_total_edges=g.n_edges, metric_unit=getattr(data.task, "metric_unit", ""),
        ablation=spec.kind)


ABOVE_ONE = ("normalized faithfulness above 1 means the circuit moves the metric further than "
             "the full model does (m(C) beyond m(M)): some removed edges worked against the task "
             "(negative components, such as IOI's negative name movers), so leaving them out "
             "helps; it happens for small circuits of tasks with such components, and a CPR "
             "above 1 when they dominate the curve. Below 0: the circuit is further from the "
             "full model than the empty circuit is.")
"""What a normalized faithfulness (or CPR) above 1 means, for reports, labels and tables."""

SIGNED_RANKING = ("most important edges first: -score for metric changes of a higher-is-better "
                  "metric, score for importances and lower-is-better metrics")
"""What the signed ranking puts first, whatever the score kind (for labels and tables)."""

CONVENTIONS: tuple[str, ...] = ("mib", "single")
"""Faithfulness-curve conventions accepted by :func:`faithfulness_curve`."""

_RANKED = ScoreMeaning("importance")  # keys already ordered most important first



@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of top-k circuits over circuit sizes, with CPR and CMD.

    Two conventions (``convention``; :attr:`label` says which in words, and ``to_dict`` carries
    it, so every table or figure made from a curve can state it):

    - ``"mib"`` (Mueller et al. 2025, the MIB circuit track): at each fraction p the circuit is
      the top ``int(p · E)`` edges (floor; 0 edges is the empty circuit), dangling edges pruned.
      Two curves: ``faithfulness`` ranks edges by **signed** score in MIB's sign convention
      (CPR is its area), ``faithfulness_cmd`` by **|score|** (CMD is the area of ``|1 - f|``
      over it). MIB's scores attribute a loss (the negated logit difference), so a positive
      score means the edge supports the behaviour: the signed ranking puts first the edges
      whose corruption most lowers the metric, i.e. ranks by ``-score`` for metrics where
      higher is better (``task.higher_is_better``) and by ``score`` otherwise (KL), or by
      ``score`` for scores that are importances (``score_kind="importance"``, e.g. ACDC's KL
      effects).
    - ``"single"`` (circuitfind's earlier curve): one ranking (``absolute``), the top
      ``max(1, round(p · E))`` edges, not pruned; CPR and CMD both come from ``faithfulness``
      (``faithfulness_cmd`` is the same list).

    Attributes:
        fractions: Circuit sizes as fractions of all edges, ascending (the x axis; the areas are
            trapezoids over it, from the smallest to the largest fraction, as MIB computes them).
        n_edges: Edges requested at each size (before pruning).
        faithfulness: Normalized faithfulness at each size under the CPR ranking.
        metric: Mean metric m(C) at each size under the CPR ranking (metric units).
        cpr: Area under ``faithfulness`` over ``fractions`` (higher is better).
        cmd: Area under ``|1 - faithfulness_cmd|`` over ``fractions`` (lower is better).
        absolute: ``"single"``: ranking by |score| (True) or signed score (False);
            ``"mib"``: ``None`` (two rankings, see above).
        metric_full, metric_empty: m(M) and m(∅).
        convention: ``"mib"`` or ``"single"``.
        faithfulness_cmd: Normalized faithfulness at each size under the CMD ranking.
        metric_cmd: m(C) at each size under the CMD ranking.
        n_kept: Edges left at each size after pruning, CPR ranking (= ``n_edges`` unpruned).
        n_kept_cmd: The same for the CMD ranking.
        pruned: Whether dangling edges were pruned before evaluation.
        ablation: What removed edges carried.
        score_kind: How the signed ranking read the scores (see :func:`faithfulness_curve`).
        example_metrics: Only when asked for (``per_example=True``): every example's metric,
            ``[2n + 2][N]`` for ``n`` fractions under ``"mib"`` (CPR ranking's n circuits, CMD
            ranking's n, then the full model and the empty circuit; ``[n + 2][N]`` under
            ``"single"``), metric units; the confidence intervals of
            :mod:`circuitfind.benchmark.leaderboard` resample them. ``None`` otherwise.
    """

    fractions: list[float]
    n_edges: list[int]
    faithfulness: list[float]
    metric: list[float]
    cpr: float
    cmd: float
    absolute: bool | None
    metric_full: float
    metric_empty: float
    convention: str
    faithfulness_cmd: list[float]
    metric_cmd: list[float]
    n_kept: list[int]
    n_kept_cmd: list[int]
    pruned: bool

    @property
    def label(self) -> str:
        """One line naming the convention, for tables, reports and figure captions; when a
        point of the curve exceeds 1 it also says what that means (:data:`ABOVE_ONE`)."""
        if self.convention == "mib":
            text = ("MIB convention: top int(p·E) edges, dangling edges pruned; CPR over the "
                    f"signed ranking ({SIGNED_RANKING}), CMD over the |score| ranking")
        else:
            rank = "|score|" if self.absolute else f"signed score ({SIGNED_RANKING})"
            text = (f"single ranking by {rank}: top max(1, round(p·E)) edges, not pruned; CPR "
                    "and CMD from the same curve")
        if any(v > 1 for v in [*self.faithfulness, *self.faithfulness_cmd] if math.isfinite(v)):
            text += ("; points above 1: the circuit moves the metric past the full model (the "
                     "removed edges worked against the task)")
        return text
    ablation: str = DEFAULT_ABLATION
    score_kind: str = "metric_change"
    example_metrics: list[list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable), with ``label`` added."""
        return {**asdict(self), "label": self.label}


def faithfulness_curve(model: Any, scores: Tensor | Circuit, data: TaskData,
                       fractions: tuple[float, ...] | list[float] = DEFAULT_FRACTIONS,
                       convention: str = "mib", absolute: bool | None = None,
                       batch_size: int | None = None,
                       ablation: Ablation | str | None = None,
                       score_kind: str | None = None,
                       memory_budget: int | str | None = None,
                       per_example: bool = False) -> FaithfulnessCurve:
    """Faithfulness of the top-k circuits at each size in ``fractions``; CPR and CMD.

    Every circuit of the curve (both rankings under ``"mib"``), the full model and the empty
    circuit run as one batch of masks through :meth:`PatchingEngine.evaluate`.

    Args:
        model: A ``TransformerBridge`` or :class:`PatchingEngine`.
        scores: ``[S, R]`` edge scores (e.g. from an algorithm; metric units), or a scored
            :class:`Circuit` (e.g. from :func:`circuitfind.discover`), whose
            ``metadata["scores"]`` says how to read its scores
            (:func:`~circuitfind.graphs.scores.score_meaning`).
        data: Task data.
        fractions: Circuit sizes as fractions of all edges, each in (0, 1] (default: MIB's
            0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100%).
        convention: ``"mib"`` (default): MIB's circuit track exactly — top ``int(p · E)`` edges,
            dangling edges pruned, CPR over the signed ranking (MIB's sign: the most
            important edges first, as ``score_kind`` reads them) and CMD over the |score|
            ranking;
            ``"single"``: one ranking (``absolute``), top ``max(1, round(p · E))`` edges, no
            pruning, both areas from that curve. See :class:`FaithfulnessCurve`.
        absolute: ``"single"`` only: rank by |score| (True, default) or signed score (False,
            most important first as ``score_kind`` reads it, like MIB's CPR ranking).
        batch_size: Examples per pass.
        ablation: What removed edges carry (as in :func:`evaluate`).
        score_kind: How the signed (CPR) ranking reads a score: ``"metric_change"`` (the
            default for a tensor: circuitfind's attribution and exact scores, the task metric's
            change when the edge is removed, so the most important edges are the most
            negative for a higher-is-better metric) or ``"importance"`` (larger = more
            important: ACDC's effects under its default KL objective, MIB-sign scores); for a
            Circuit, the kind its metadata declares unless given. |score| rankings do not
            depend on it.
        memory_budget: As in :func:`evaluate`.
        per_example: Also keep every example's metric at every point
            (:attr:`FaithfulnessCurve.example_metrics`), for confidence intervals.

    Returns:
        A :class:`FaithfulnessCurve` (its ``convention`` and ``label`` say which was used).

    Raises:
        ConfigError: an unknown convention or score kind, ``absolute`` given with ``"mib"``, a
            fraction outside (0, 1], scores of the wrong shape, or NaN scores, or a bad
            ablation.

    References:
        Mueller et al. (2025), "MIB: A Mechanistic Interpretability Benchmark", §3 (CPR, CMD),
        and its circuit-track evaluation code (sizes ``int(p · E)``, ``apply_topn`` with
        pruning, areas over the fractions).
    """
    engine, spec = _engine(model, ablation, memory_budget)
    g = engine.graph
    if isinstance(scores, Circuit):  # the circuit's scores, read as its metadata says
        _check_graph(engine, scores)
        if scores.scores is None:
            raise ConfigError("The circuit has no scores to rank edges by; pass a scored circuit "
                              "(e.g. from discover) or a [S, R] scores tensor.")
        meaning = score_meaning(scores.metadata)
        score_kind = meaning.kind if score_kind is None else score_kind
        scores = scores.scores
    score_kind = "metric_change" if score_kind is None else score_kind
    if convention not in CONVENTIONS:
        raise ConfigError(f"Unknown faithfulness-curve convention {convention!r}; choose one of "
                          f"{list(CONVENTIONS)}.")
    if score_kind not in SCORE_KINDS:
        raise ConfigError(f"Unknown score_kind {score_kind!r}; choose one of {list(SCORE_KINDS)} "
                          "('importance' for scores that grow with an edge's importance, such as "
                          "ACDC's KL effects).")
    fr = sorted(float(f) for f in fractions)
    if not fr or fr[0] <= 0 or fr[-1] > 1:
        raise ConfigError(f"Fractions must lie in (0, 1]; got {fractions}.")
    g.check_edge_matrix(scores, "scores")
    # The signed ranking puts the most important edges first. MIB's scores attribute a loss
    # (-logit difference), so positive = the edge supports the behaviour; circuitfind's
    # metric-change scores, metric(without edge) - metric(full), have the opposite sign for
    # metrics where higher is better.
    meaning = ScoreMeaning(score_kind, higher_is_better=bool(
        getattr(data.task, "higher_is_better", True)))
    importance = meaning.importance(scores)
    rankings: tuple[tuple[Tensor, bool], ...]  # (ranking keys, rank by |key|) per curve
    if convention == "mib":
        if absolute is not None:
            raise ConfigError("absolute applies to convention='single' only; the MIB convention "
                              "ranks by signed score for CPR and by |score| for CMD. Drop "
                              "absolute=, or pass convention='single'.")
        sizes = [int(f * g.n_edges) for f in fr]
        rankings, prune = ((importance, False), (scores, True)), True
    else:
        absolute = True if absolute is None else bool(absolute)
        sizes = [max(1, round(f * g.n_edges)) for f in fr]
        rankings, prune = (((scores, True) if absolute else (importance, False)),), False
    kept = []
    for ranked, by_abs in rankings:
        for k in sizes:
            circuit = select_top_n(g, ranked, k, absolute=by_abs, meaning=_RANKED)
            kept.append((prune_dangling(circuit) if prune else circuit).kept)
    masks = [m.to(engine.dtype) for m in kept] + [g.full_mask(engine.dtype),
                                                  torch.zeros_like(kept[0], dtype=engine.dtype)]
    per_ex = engine.evaluate(data, torch.stack(masks), batch_size=batch_size, ablation=spec,
                             per_example=True)
    values = (per_ex.sum(-1) / data.n).tolist()
    m_full, m_empty = values[-2], values[-1]
    n = len(sizes)
    # one block of n values per ranking; with one ranking CPR and CMD share it
    metric_cpr, metric_cmd = values[:n], values[(len(rankings) - 1) * n:len(rankings) * n]
    counts = [int(m.sum()) for m in kept]
    n_kept, n_kept_cmd = counts[:n], counts[(len(rankings) - 1) * n:]
    f_cpr = [normalized_faithfulness(v, m_full, m_empty) for v in metric_cpr]
    f_cmd = [normalized_faithfulness(v, m_full, m_empty) for v in metric_cmd]
    x = np.asarray(fr)
    cpr = float(trapezoid(np.asarray(f_cpr), x)) if len(x) > 1 else math.nan
    cmd = float(trapezoid(np.abs(1 - np.asarray(f_cmd)), x)) if len(x) > 1 else math.nan
    return FaithfulnessCurve(
        fractions=fr, n_edges=sizes, faithfulness=f_cpr, metric=metric_cpr, cpr=cpr, cmd=cmd,
        absolute=None if convention == "mib" else absolute, metric_full=m_full,
        metric_empty=m_empty, convention=convention, faithfulness_cmd=f_cmd,
        metric_cmd=metric_cmd, n_kept=n_kept, n_kept_cmd=n_kept_cmd, pruned=prune,
        ablation=spec.kind, score_kind=score_kind,
        example_metrics=per_ex.tolist() if per_example else None)


def _check_graph(engine: PatchingEngine, circuit: Circuit) -> None:
    if circuit.graph != engine.graph:
        raise ConfigError(f"The circuit's graph ({circuit.graph}) does not match the model's "
                          f"({engine.graph}); was it discovered on another model?")
