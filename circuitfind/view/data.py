"""What the HTML viewer's page reads: one JSON document built from one or two circuits.

Layout (the page's script reads nothing else):

- ``nodes``: every node of the graph, in graph order: ``name``, ``kind`` and its centre
  ``x``, ``y`` in pixels (72 per inch) from the matplotlib renderer's fixed-order layout
  (:func:`circuitfind.graphs.render.layout`: ``input`` on top, a row of heads and a row for the
  MLP per layer, ``logits`` at the bottom, every head in its slot), with ``node_w`` /
  ``node_h`` (pixels) and the fill per kind;
- ``receivers``: every receiver: ``name``, ``kind`` (``q``, ``k``, ``v``, ``mlp``,
  ``logits``) and the nodes reading it (several query heads for a grouped-query k/v input);
- ``edges``: the embedded edges in the slider's order (:func:`~circuitfind.view.order.
  view_order`; rank = position + 1): sender node ``s``, receiver ``r`` and ``score`` (the
  stored float32 score, written in its shortest round-trip form, or ``null``), and in a
  comparison ``rank`` per circuit (position in that circuit's order, ``-1`` when not in it)
  and ``score2`` (the second circuit's score);
- ``circuits``: per circuit its label, title, number of kept edges, score meaning (kind,
  unit, one sentence), the normalized faithfulness of the kept circuit and its stored curve
  (sizes in edges and faithfulness, from ``metadata["faithfulness_curve"]`` when it ranks
  edges in the viewer's order);
- ``colours``: edge colours by receiver kind, by sign, and for comparisons (shared, only in
  A, only in B), all Okabe–Ito as in the renderer.

One circuit: every edge with a finite score is embedded up to ``max_edges`` (at least the
kept ones), so the slider runs past the discovered circuit. Two circuits (of one graph): the
union of their kept edges, in the first circuit's order then the second's, each circuit
showing its top ``min(k, n_kept)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from circuitfind.errors import ConfigError
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.render import (EDGE_COLOURS, KIND_FILLS, NODE_HEIGHT, SIGN_COLOURS,
                                       RenderOptions, layout, model_display_name, scene)
from circuitfind.graphs.scores import meaning_known, score_meaning
from circuitfind.view.order import VIEW_RANKING, ranked_by_abs, view_order

__all__ = ["view_data", "COMPARE_COLOURS", "PIXELS_PER_INCH"]

PIXELS_PER_INCH = 72.0
COMPARE_COLOURS: dict[str, str] = {"shared": "#000000", "a": "#E69F00", "b": "#0072B2"}
"""Edge colours of a comparison: in both circuits (black), only in A (orange), only in B
(blue), from the Okabe–Ito palette."""

_INPUT_LABELS = {"q": "q input", "k": "k input", "v": "v input", "mlp": "MLP input",
                 "logits": "logits"}


def _short_float(value: float) -> float | None:
    """A float32 score as the shortest decimal that reads back to the same float32."""
    if not math.isfinite(value):
        return None
    return float(str(np.float32(value)))  # numpy prints the shortest round-trip form


def _title(circuit: Circuit) -> str:
    md = circuit.metadata
    parts = [f"{k}: {model_display_name(md[k]) if k == 'model' else md[k]}"
             for k in ("model", "task", "algorithm") if isinstance(md.get(k), (str, int, float))]
    parts.append(f"{circuit.n_edges}/{circuit.graph.n_edges} edges")
    return " | ".join(parts)


def _curve(circuit: Circuit) -> dict[str, Any] | None:
    """The stored curve over the viewer's order, plus the kept circuit's own faithfulness."""
    points: dict[int, float] = {}
    stored = circuit.metadata.get("faithfulness_curve")
    label = None
    if isinstance(stored, dict) and stored.get("ranking") == VIEW_RANKING:
        for size, value in zip(stored.get("n_edges") or [], stored.get("faithfulness") or []):
            if isinstance(value, (int, float)) and math.isfinite(value):
                points[int(size)] = float(value)
        label = stored.get("label")
    report = circuit.metadata.get("faithfulness")
    if isinstance(report, dict) and isinstance(report.get("faithfulness"), (int, float)) \
            and math.isfinite(report["faithfulness"]):
        points.setdefault(circuit.n_edges, float(report["faithfulness"]))
    if not points:
        return None
    sizes = sorted(points)
    return {"sizes": sizes, "faithfulness": [round(points[s], 6) for s in sizes],
            "label": label}


def _circuit_info(circuit: Circuit, label: str) -> dict[str, Any]:
    meaning = score_meaning(circuit.metadata)
    helps, hurts = (meaning.sign_labels() if meaning_known(circuit.metadata)
                    else ("score < 0", "score > 0"))
    absolute = ranked_by_abs(circuit)
    return {"label": label, "title": _title(circuit), "n_kept": circuit.n_edges,
            "has_scores": circuit.scores is not None,
            "kind": meaning.kind.replace("_", " "), "unit": meaning.unit,
            "describe": meaning.describe(), "sign": meaning.sign,
            "helps": helps, "hurts": hurts, "absolute": absolute,
            "key": "|score|" if absolute else "signed importance (sign × score)",
            "curve": _curve(circuit)}


def _layout(circuit: Circuit) -> dict[str, Any]:
    graph = circuit.graph
    # every sender's edge to the logits touches every node; fixed order gives every head its
    # slot, so the positions are those of any circuit of the model
    logits = graph.receiver_index("logits")
    kept = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    kept[:, logits] = graph.edge_mask[:, logits]
    sc = scene(Circuit(graph, kept), RenderOptions(fixed_order=True, title=False))
    xy, node_w, _ = layout(sc)
    x0 = min(x for x, _ in xy.values())
    y1 = max(y for _, y in xy.values())
    pad = node_w / 2 + 0.2
    names = [n.name for n in graph.nodes]
    return {"name": names, "kind": [n.kind for n in graph.nodes],
            "x": [round((xy[n][0] - x0 + pad) * PIXELS_PER_INCH, 2) for n in names],
            "y": [round((y1 - xy[n][1] + NODE_HEIGHT) * PIXELS_PER_INCH, 2) for n in names],
            "node_w": round(node_w * PIXELS_PER_INCH, 2),
            "node_h": round(NODE_HEIGHT * PIXELS_PER_INCH, 2)}


def view_data(circuit: Circuit, other: Circuit | None = None,
              labels: tuple[str, str] = ("A", "B"),
              max_edges: int | None = None) -> dict[str, Any]:
    """The JSON document the viewer's page reads (see the module docstring).

    Args:
        circuit: The circuit (A in a comparison).
        other: A second circuit over the same graph, to compare with (B), or ``None``.
        labels: Names of A and B in a comparison (file names, say).
        max_edges: One circuit: embed at most this many edges (never fewer than the kept
            ones; default: every edge with a finite score). Ignored in a comparison.

    Returns:
        A JSON-serialisable dict.

    Raises:
        ConfigError: not Circuits, graphs that differ, or ``max_edges`` below 0.
    """
    if not isinstance(circuit, Circuit) or (other is not None and not isinstance(other, Circuit)):
        raise ConfigError("view needs Circuit objects (Circuit.load(path), or "
                          "circuitfind.evaluation.compare.load_any for MIB JSON too).")
    if max_edges is not None and (isinstance(max_edges, bool) or not isinstance(max_edges, int)
                                  or max_edges < 0):
        raise ConfigError(f"max_edges must be an int >= 0 or None; got {max_edges!r}.")
    graph = circuit.graph
    if other is not None and other.graph != graph:
        raise ConfigError(f"The two circuits are over different graphs ({graph!r} and "
                          f"{other.graph!r}); compare circuits of one model.")
    pairs = graph.edge_pairs.tolist()
    node_index = {n.name: i for i, n in enumerate(graph.nodes)}
    receivers = {"name": [r.name for r in graph.receivers],
                 "kind": [r.kind for r in graph.receivers],
                 "input": [_INPUT_LABELS[r.kind] for r in graph.receivers],
                 "nodes": [[node_index[n] for n in r.nodes] for r in graph.receivers]}
    circuits = [circuit] if other is None else [circuit, other]
    orders = [view_order(c).tolist() for c in circuits]
    values = [None if v is None else v.tolist() for v in (c.edge_values for c in circuits)]
    if other is None:
        order = orders[0]
        if values[0] is None:
            limit = circuit.n_edges
        else:
            finite = sum(1 for v in values[0] if math.isfinite(v))
            limit = max(circuit.n_edges, min(finite, max_edges if max_edges is not None
                                             else finite))
        embedded = order[:limit]
        ranks = None
    else:
        seen: dict[int, None] = {}
        for c, o in zip(circuits, orders):
            for e in o[:c.n_edges]:
                seen.setdefault(e, None)
        embedded = list(seen)
        ranks = []
        for c, o in zip(circuits, orders):
            position = {e: i for i, e in enumerate(o[:c.n_edges])}
            ranks.append([position.get(e, -1) for e in embedded])
    edges: dict[str, Any] = {
        "s": [pairs[e][0] for e in embedded],
        "r": [pairs[e][1] for e in embedded],
        "score": [None if values[0] is None else _short_float(values[0][e]) for e in embedded]}
    if other is not None:
        edges["score2"] = [None if values[1] is None else _short_float(values[1][e])
                           for e in embedded]
        edges["rank"] = ranks
    infos = [_circuit_info(c, labels[i] if other is not None else "") for i, c in
             enumerate(circuits)]
    return {"version": 1, "mode": "single" if other is None else "compare",
            "n_graph_edges": graph.n_edges, "nodes": _layout(circuit),
            "receivers": receivers, "edges": edges, "circuits": infos,
            "colours": {"receiver": EDGE_COLOURS, "sign": SIGN_COLOURS,
                        "compare": COMPARE_COLOURS, "fill": KIND_FILLS}}
