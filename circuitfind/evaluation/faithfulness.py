"""Faithfulness of a circuit: normalized faithfulness, KL divergence, and faithfulness curves.

Definitions (DESIGN.md §4):

- normalized faithfulness ``f(C) = (m(C) - m(∅)) / (m(M) - m(∅))``, with ``m`` the task metric
  averaged over examples, ``M`` the full model (every edge kept) and ``∅`` the empty circuit
  (every edge corrupted, i.e. the model on corrupted sender outputs). ``f = 1`` recovers the
  model's behaviour, ``f = 0`` none of it (Wang et al. 2022 §4; Hanna et al. 2024 eq. 4);
- ``KL(p_M || p_C)``: KL divergence (nats) of the circuit's next-token distribution from the
  full model's, at the metric positions, averaged over positions and examples;
- the faithfulness curve over circuit sizes (fractions of all edges, default
  {0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100}%), circuits chosen as the top-k edges by score;
  CPR = area under f, CMD = area under |1 - f| (trapezoid rule over the fraction of edges in
  [0, 1]) as in MIB (Mueller et al. 2025, §3). Which top-k convention (``absolute=True``: by
  |score|; ``False``: by signed score, largest first) each figure uses is recorded in the result.

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
from circuitfind.graphs.circuit import Circuit, select_top_n
from circuitfind.patching.engine import PatchingEngine
from circuitfind.patching.spec import Ablation
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
    ablation: str = "resample"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable; NaN stays NaN)."""
        return asdict(self)


def normalized_faithfulness(m_circuit: float, m_full: float, m_empty: float) -> float:
    """``(m(C) - m(∅)) / (m(M) - m(∅))``; NaN when ``m(M) == m(∅)`` (undefined)."""
    gap = m_full - m_empty
    return float("nan") if gap == 0 else (m_circuit - m_empty) / gap


def _engine(model_or_engine: Any, ablation: Ablation | str | None) -> tuple[PatchingEngine, Ablation]:
    """The engine to run on and the ablation to use (``None``: the engine's own)."""
    if isinstance(model_or_engine, PatchingEngine):
        engine = model_or_engine
    else:
        engine = PatchingEngine(model_or_engine, ablation=ablation)
    return engine, engine.ablation if ablation is None else Ablation.parse(ablation)


def evaluate(model: Any, circuit: Circuit, data: TaskData, batch_size: int | None = None,
             ablation: Ablation | str | None = None) -> FaithfulnessReport:
    """Evaluate a circuit's faithfulness and KL divergence on task data.

    The circuit, the full model and the empty circuit run in one batched masked forward pass.

    Args:
        model: A ``TransformerBridge`` (from :func:`circuitfind.load_model`) or a
            :class:`PatchingEngine`.
        circuit: The circuit (its graph must match the model's).
        data: Task data (clean prompts are run; corrupted sender outputs replace removed edges).
        batch_size: Examples per pass (default: from the engine's memory budget).
        ablation: What removed edges carry (``resample``, ``zero``, ``mean``,
            ``mean_positional`` or an :class:`Ablation`; default: the engine's, i.e. resample
            unless an engine built with another ablation is passed).

    Returns:
        A :class:`FaithfulnessReport`.

    Raises:
        ConfigError: the circuit's graph does not match the model; an unknown ablation or one
            the data cannot supply (a mean over one example).

    References:
        Wang et al. (2022) §4 (faithfulness); Hanna, Pezzelle & Belinkov (2024) eq. 4
        (normalized faithfulness); Conmy et al. (2023) (KL divergence as a metric).
    """
    engine, spec = _engine(model, ablation)
    _check_graph(engine, circuit)
    g = engine.graph
    masks = torch.stack([circuit.kept.to(engine.dtype), g.full_mask(engine.dtype),
                         torch.zeros(g.n_senders, g.n_receivers, dtype=engine.dtype)])
    logits = engine.run(data, masks, batch_size=batch_size, ablation=spec)  # [3, N, P, V]
    metrics = engine.on_device(data).metric(logits).double().mean(-1).cpu()
    kl = float(kl_div(logits[1], logits[0]).double().mean())
    m_c, m_full, m_empty = (float(v) for v in metrics)
    return FaithfulnessReport(
        faithfulness=normalized_faithfulness(m_c, m_full, m_empty), metric_circuit=m_c,
        metric_full=m_full, metric_empty=m_empty, kl_div=kl, n_edges=circuit.n_edges,
        n_total_edges=g.n_edges, metric_unit=getattr(data.task, "metric_unit", ""),
        ablation=spec.kind)


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of top-k circuits over circuit sizes.

    Attributes:
        fractions: Circuit sizes as fractions of all edges, ascending.
        n_edges: Edges kept at each size (``round(fraction * E)``, at least 1).
        faithfulness: Normalized faithfulness at each size.
        metric: Mean metric m(C) at each size.
        cpr: Area under ``faithfulness`` over ``fractions`` (trapezoid; higher is better).
        cmd: Area under ``|1 - faithfulness|`` (trapezoid; lower is better).
        absolute: Top-k by |score| (True) or by signed score (False).
        metric_full, metric_empty: m(M) and m(∅).
        ablation: What removed edges carried.
    """

    fractions: list[float]
    n_edges: list[int]
    faithfulness: list[float]
    metric: list[float]
    cpr: float
    cmd: float
    absolute: bool
    metric_full: float
    metric_empty: float
    ablation: str = "resample"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)


def faithfulness_curve(model: Any, scores: Tensor, data: TaskData,
                       fractions: tuple[float, ...] | list[float] = DEFAULT_FRACTIONS,
                       absolute: bool = True, batch_size: int | None = None,
                       ablation: Ablation | str | None = None) -> FaithfulnessCurve:
    """Faithfulness of the top-k circuits at each size in ``fractions``; CPR and CMD.

    Args:
        model: A ``TransformerBridge`` or :class:`PatchingEngine`.
        scores: ``[S, R]`` edge scores (e.g. from an algorithm).
        data: Task data.
        fractions: Circuit sizes as fractions of all edges, each in (0, 1].
        absolute: Rank edges by |score| (True, the usual convention for EAP) or by signed score.
        batch_size: Examples per pass.
        ablation: What removed edges carry (as in :func:`evaluate`).

    Returns:
        A :class:`FaithfulnessCurve`.

    Raises:
        ConfigError: a fraction outside (0, 1], scores of the wrong shape, or a bad ablation.

    References:
        Mueller et al. (2025), "MIB: A Mechanistic Interpretability Benchmark", §3 (CPR, CMD).
    """
    engine, spec = _engine(model, ablation)
    g = engine.graph
    fr = sorted(float(f) for f in fractions)
    if not fr or fr[0] <= 0 or fr[-1] > 1:
        raise ConfigError(f"Fractions must lie in (0, 1]; got {fractions}.")
    if tuple(scores.shape) != (g.n_senders, g.n_receivers):
        raise ConfigError(f"Scores must have shape {(g.n_senders, g.n_receivers)}; "
                          f"got {tuple(scores.shape)}.")
    sizes = [max(1, round(f * g.n_edges)) for f in fr]
    masks = [select_top_n(g, scores, k, absolute=absolute).kept.to(engine.dtype) for k in sizes]
    masks += [g.full_mask(engine.dtype), torch.zeros_like(masks[0])]
    values = engine.evaluate(data, torch.stack(masks), batch_size=batch_size,
                             ablation=spec).tolist()
    m_full, m_empty = values[-2], values[-1]
    faith = [normalized_faithfulness(v, m_full, m_empty) for v in values[:-2]]
    x = np.asarray(fr)
    f = np.asarray(faith)
    cpr = float(trapezoid(f, x)) if len(x) > 1 else math.nan
    cmd = float(trapezoid(np.abs(1 - f), x)) if len(x) > 1 else math.nan
    return FaithfulnessCurve(fractions=fr, n_edges=sizes, faithfulness=faith, metric=values[:-2],
                             cpr=cpr, cmd=cmd, absolute=absolute, metric_full=m_full,
                             metric_empty=m_empty, ablation=spec.kind)


def _check_graph(engine: PatchingEngine, circuit: Circuit) -> None:
    if circuit.graph != engine.graph:
        raise ConfigError(f"The circuit's graph ({circuit.graph}) does not match the model's "
                          f"({engine.graph}); was it discovered on another model?")
