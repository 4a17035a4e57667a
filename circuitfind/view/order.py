"""The order in which the HTML viewer's size slider adds edges, and the curve that goes with it.

The viewer's slider shows the top ``k`` edges of one ranking, :func:`view_order`: the
circuit's kept edges first, then the others, each group by the key the circuit was selected
with — ``|score|`` (``metadata["selection"]["absolute"]``, the default) or the signed importance
(``sign * score``, :mod:`circuitfind.graphs.scores`), larger first, ties in canonical edge
order, NaN scores last. So the slider at ``k = n_kept`` shows exactly the discovered circuit
(also after pruning, and for ACDC, whose kept set is no top-k of its scores), and a threshold
is a prefix of the order.

:func:`rank_scores` turns that order into scores whose ``|score|`` ranking is the order, so
that :func:`circuitfind.faithfulness_curve` (``convention="single"``: top ``round(p·E)`` edges,
not pruned, the slider's circuits) measures the faithfulness the slider shows;
:func:`circuitfind.discover` stores that curve in ``metadata["faithfulness_curve"]`` with
``"ranking": "view"`` (:data:`VIEW_RANKING`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.scores import score_meaning

__all__ = ["view_order", "rank_scores", "ranked_by_abs", "VIEW_RANKING"]

VIEW_RANKING = "view"
"""``metadata["faithfulness_curve"]["ranking"]`` of a curve over :func:`view_order`."""


def ranked_by_abs(circuit: Circuit) -> bool:
    """Whether the circuit was selected by ``|score|`` (True, also when it does not say) or by
    signed importance (``metadata["selection"]["absolute"] == False``)."""
    selection = circuit.metadata.get("selection")
    return not (isinstance(selection, dict) and selection.get("absolute") is False)


def view_order(circuit: Circuit) -> Tensor:
    """Every edge of the circuit's graph in the viewer's order (see the module docstring).

    Args:
        circuit: The circuit (with or without scores; without, each group is in canonical
            order).

    Returns:
        ``[E]`` long: canonical edge ids (rows of ``graph.edge_pairs``), kept edges first.
    """
    g = circuit.graph
    kept = g.to_edges(circuit.kept)
    values = circuit.edge_values
    if values is None:
        key = torch.zeros(g.n_edges, dtype=torch.float64)
    else:
        values = values.to(torch.float64)
        key = values.abs() if ranked_by_abs(circuit) else score_meaning(
            circuit.metadata).sign * values
        key = torch.where(torch.isnan(key), torch.full_like(key, -torch.inf), key)
    order = torch.argsort(-key, stable=True)  # larger first, ties in canonical order
    return order[torch.argsort((~kept[order]).to(torch.int8), stable=True)]


def rank_scores(circuit: Circuit) -> Tensor:
    """Scores whose ``|score|`` ranking (ties impossible) is :func:`view_order`.

    Returns:
        ``[S, R]`` float32: ``E`` for the first edge of the order down to ``1`` for the last
        (0 off-edge); exact in float32 for graphs of up to 2**24 edges.
    """
    g = circuit.graph
    order = view_order(circuit)
    values = torch.empty(g.n_edges, dtype=torch.float32)
    values[order] = torch.arange(g.n_edges, 0, -1, dtype=torch.float32)
    return g.to_dense(values)
