"""Selecting circuits from scores: top-n, threshold, and pruning dangling edges.

Pure functions that return a new :class:`~circuitfind.graphs.circuit.Circuit` (never mutate
one), vectorised over the ``[S, R]`` tensors: GPT-2 small has 32,491 edges, and nothing here
loops over edges in Python.

- :func:`select_top_n`: the ``n`` edges with the highest (absolute or signed) scores;
- :func:`select_threshold`: the edges whose score reaches a cut-off;
- :func:`prune_dangling`: remove kept edges that cannot change the circuit's output.

The selected circuit records how it was chosen in ``metadata["selection"]``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError
from circuitfind.graphs.circuit import Circuit, check_graph, check_scores
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.graphs.scores import ScoreMeaning, score_meaning

__all__ = ["select_top_n", "select_threshold", "prune_dangling"]


def select_top_n(graph: ComputeGraph, scores: Tensor, n: int, absolute: bool = True,
                 metadata: Mapping[str, Any] | None = None,
                 meaning: ScoreMeaning | None = None) -> Circuit:
    """The circuit of the ``n`` most important real edges.

    Ranks the edges by ``|score|`` (``absolute=True``, the usual convention for attribution
    scores whose sign says in which direction the edge moves the metric) or by signed
    importance (``absolute=False``): the scores as their meaning reads them, most important
    first — the most negative metric changes of a higher-is-better metric, the largest ACDC
    importances (:class:`~circuitfind.graphs.scores.ScoreMeaning`). Ties are broken by
    canonical edge order (lower edge id first), so the result is deterministic.

    Args:
        graph: The computational graph.
        scores: ``[S, R]`` per-edge scores (metric units); off-edge entries are ignored. Stored
            (as float32) in the returned circuit.
        n: Number of edges to keep, ``0 <= n <= graph.n_edges``.
        absolute: Rank by absolute value (True) or by signed importance (False).
        metadata: Metadata of the result; ``metadata["selection"]`` is set to
            ``{"method": "top_n", "n": n, "absolute": absolute}``.
        meaning: What the scores mean (default: ``metadata["scores"]``, else a metric change
            of a higher-is-better metric; see :func:`~circuitfind.graphs.scores.score_meaning`).

    Returns:
        A circuit with exactly ``n`` kept edges.

    Raises:
        ConfigError: ``n`` not an int in range, ``scores`` of the wrong shape, or NaN scores on
            real edges (their rank is undefined).

    References:
        Conmy et al. 2023, "Towards Automated Circuit Discovery" (ACDC), and Syed et al. 2023,
        "Attribution Patching Outperforms Automated Circuit Discovery" (top-n edges by |EAP|).
    """
    graph = check_graph(graph, "select_top_n")
    if isinstance(n, bool):
        raise ConfigError(f"n must be an int >= 0; got {n!r}.")
    try:
        n = operator.index(n)
    except TypeError:
        raise ConfigError(f"n must be an int >= 0; got {n!r}.") from None
    if not 0 <= n <= graph.n_edges:
        raise ConfigError(f"n must be between 0 and the graph's number of edges "
                          f"({graph.n_edges}); got {n}.")
    keys = _edge_keys(graph, scores, absolute, meaning or score_meaning(metadata))
    n_nan = int(torch.isnan(keys).sum())
    if n_nan:
        raise ConfigError(f"{n_nan} real edges have NaN scores; their rank is undefined. Fix the "
                          "scores (e.g. torch.nan_to_num) before selecting edges.")
    order = torch.sort(keys, descending=True, stable=True).indices[:n]
    return Circuit(graph, graph.mask_of(order), scores, _selection_metadata(
        metadata, {"method": "top_n", "n": n, "absolute": bool(absolute)}))


def select_threshold(graph: ComputeGraph, scores: Tensor, threshold: float,
                     absolute: bool = True, metadata: Mapping[str, Any] | None = None,
                     meaning: ScoreMeaning | None = None) -> Circuit:
    """The circuit of the real edges whose ``|score|`` (or signed importance) is ``>= threshold``.

    The number of kept edges never increases as ``threshold`` grows. NaN scores are never kept.

    Args:
        graph: The computational graph.
        scores: ``[S, R]`` per-edge scores (metric units); off-edge entries are ignored.
        threshold: Cut-off in the units of the scores (a real number, not NaN).
        absolute: Compare ``|score|`` (True) or the signed importance (False: the score as its
            meaning reads it, larger is more important).
        metadata: Metadata of the result; ``metadata["selection"]`` is set to
            ``{"method": "threshold", "threshold": threshold, "absolute": absolute}``.
        meaning: What the scores mean (as in :func:`select_top_n`).

    Returns:
        The circuit.

    Raises:
        ConfigError: ``threshold`` not a real number, or ``scores`` of the wrong shape.

    References:
        Conmy et al. 2023 (ACDC keeps an edge when its effect exceeds a threshold tau).
    """
    graph = check_graph(graph, "select_threshold")
    if isinstance(threshold, bool):
        raise ConfigError(f"threshold must be a real number; got {threshold!r}.")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be a real number; got {threshold!r}.") from None
    if math.isnan(threshold):
        raise ConfigError("threshold must be a real number; got NaN.")
    keys = _edge_keys(graph, scores, absolute, meaning or score_meaning(metadata))
    kept = graph.mask_of((keys >= threshold).nonzero().flatten())
    return Circuit(graph, kept, scores, _selection_metadata(
        metadata, {"method": "threshold", "threshold": threshold, "absolute": bool(absolute)}))


def prune_dangling(circuit: Circuit) -> Circuit:
    """Remove kept edges that cannot change the circuit's output, until nothing changes.

    Two rules, applied together and repeated to a fixed point:

    1. an edge whose sender (other than ``input``) has no kept incoming edge into any of its
       receivers (a head's q receiver and the k/v receivers it reads — for grouped-query
       attention, those of its key/value group; an MLP's input) is removed;
    2. an edge into a receiver none of whose reading nodes has a kept outgoing edge is removed
       (``logits`` is the sink and always counts as having one).

    Why this never changes the output, under circuitfind's patching semantics (a removed edge
    carries the *corrupted* sender output, see ``DESIGN.md`` §3): if every edge into a node is
    removed, the node reads exactly the corrupted residual stream and so produces exactly its
    corrupted output; a kept edge from it then carries the same activation as a removed one.
    If a node has no kept outgoing edge, every reader sees its corrupted output whatever it
    computes, so its inputs cannot reach ``logits``. Only kept edges are removed; the result is
    idempotent (``prune_dangling(prune_dangling(c)) == prune_dangling(c)``).

    Vectorised over the ``[S, R]`` mask: each round is two reductions and two small matrix
    products with the receiver-to-node incidence (``graph.nodes_reading`` and
    ``graph.receivers_read_by``); rounds are bounded by the graph's depth.

    Args:
        circuit: The circuit to prune.

    Returns:
        A new circuit with the same graph, scores and metadata, and a subset of the kept edges.

    Raises:
        ConfigError: ``circuit`` is not a :class:`Circuit`.

    References:
        Conmy et al. 2023 (ACDC removes nodes without a path to the output after pruning);
        Hanna et al. 2024, "Have Faith in Faithfulness" (EAP-IG prunes dangling nodes).
    """
    if not isinstance(circuit, Circuit):
        raise ConfigError(f"prune_dangling needs a Circuit; got {type(circuit).__name__}.")
    graph = circuit.graph
    n_senders = graph.n_senders
    kept = circuit.kept.clone()
    sink = torch.ones(1, dtype=torch.bool)
    while True:
        # node n has input iff some receiver it reads has a kept incoming edge
        has_in = graph.nodes_reading(kept.any(0))  # [N]
        has_in[0] = True  # input: the embeddings need no incoming edge
        # receiver r is alive iff some node reading it has a kept outgoing edge (logits: sink)
        alive = graph.receivers_read_by(torch.cat([kept.any(1), sink]))  # [R]
        new = kept & has_in[:n_senders, None] & alive[None, :]
        if torch.equal(new, kept):
            break
        kept = new
    if torch.equal(kept, circuit.kept):
        return circuit
    return circuit.replace(kept=kept)


def _edge_keys(graph: ComputeGraph, scores: Tensor, absolute: bool,
               meaning: ScoreMeaning) -> Tensor:
    """``[E]`` float32 ranking keys of the real edges: ``|score|``, or the signed importance
    (``meaning.importance``)."""
    values = graph.to_edges(check_scores(graph, scores))
    return values.abs() if absolute else meaning.importance(values)


def _selection_metadata(metadata: Mapping[str, Any] | None, selection: dict[str, Any]
                        ) -> dict[str, Any]:
    return {**dict(metadata or {}), "selection": selection}
