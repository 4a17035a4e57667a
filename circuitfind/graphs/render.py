"""Drawing circuits for papers and reports: Graphviz when ``dot`` exists, matplotlib otherwise.

:func:`render` draws a :class:`~circuitfind.graphs.circuit.Circuit` to SVG, PDF, PNG or DOT.
Both renderers draw the same picture from one renderer-independent description (the *scene*,
:func:`scene`), so colours, pen widths, labels, filters and the legend are decided once:

- **layout**: one row per layer for the attention heads (always in head index order, left
  to right, in both renderers) and, below it, one row for the layer's MLP; ``input`` on top, ``logits`` at the bottom (``orientation="landscape"`` turns the
  picture so that layers run left to right);
- **edges**: one per kept edge from the sender to the node reading the receiver (a
  grouped-query k/v receiver is shared by the query heads of its key/value group: its edge is
  drawn into the heads of the group that lead on, i.e. have a drawn outgoing edge — all of
  them only when none does — so that no head shows inputs without outputs because of its
  group; collapsed q/k/v likewise); pen width ``0.5 + 4.5 * |score| / max |score|`` over the drawn
  edges (1.0 for every edge when the circuit has no scores or all scores are 0); colour by
  receiver kind (q blue, k bluish green, v vermillion, MLP reddish purple, logits black) or by
  the sign of the score (``edge_colour="sign"``: blue where the score marks an edge the
  behaviour relies on — one that helps the task's metric, or an important ACDC edge — and
  vermillion otherwise, as the circuit's score meaning reads it,
  :mod:`circuitfind.graphs.scores`), all from the colour-blind-safe Okabe–Ito palette;
- **nodes**: filled by kind (input, attention, MLP, logits; heads are ellipses, the rest boxes),
  or, when ``metadata["node_classes"]`` is set, by class (Okabe–Ito, classes in sorted order,
  cycling after seven; unclassified nodes light grey), with a legend;
- **options** (:class:`RenderOptions`): colour by sign, collapse q/k/v into one edge per sender
  and head (score = the sum of the q, k and v scores, the first-order effect of corrupting
  all three), hide edges below a |score| or keep the top N drawn edges (then what the
  hidden edges leave dangling is pruned, as :func:`~circuitfind.graphs.selection.
  prune_dangling` prunes a circuit, and the title says how many edges are drawn), label heads ``L.H``,
  portrait or landscape, no title, fixed node order (every head keeps its slot, every row is
  present, so drawings of different circuits of one model line up);
- **determinism**: the same circuit and options give the same bytes for every renderer and
  format. Graphviz: nodes in graph order, edges in canonical order, fixed number formats, the
  PDF ``/CreationDate`` replaced by a fixed date of the same length. matplotlib: its bundled
  DejaVu Sans font, a fixed SVG hash salt, no date in SVG/PDF metadata; SVG text stays text
  (``svg.fonttype = none``), so node names can be searched and edited in the SVG.

Renderers (:data:`RENDERERS`): ``graphviz`` needs the ``dot`` binary for SVG/PDF/PNG (the
Python package ``graphviz`` only writes DOT text); ``matplotlib`` needs only pip wheels. With
``renderer=None`` Graphviz is used when ``dot`` is on the PATH, matplotlib otherwise (said once
per process through the ``circuitfind`` logger). A ``.dot``/``.gv`` path always writes the DOT
source, whatever the renderer.
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitfind._files import atomic_write
from circuitfind.errors import CircuitFindError, ConfigError
from circuitfind.graphs.scores import meaning_known, score_meaning
from circuitfind.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    import graphviz
    from matplotlib.typing import RcKeyType

    from circuitfind.graphs.circuit import Circuit

__all__ = ["render", "scene", "layout", "NODE_HEIGHT", "format_of", "to_graphviz", "to_dot", "resolve_renderer", "RenderOptions",
           "RENDERERS", "FORMATS", "EDGE_COLOURS", "SIGN_COLOURS", "KIND_FILLS",
           "CLASS_PALETTE"]

LOGGER = logging.getLogger("circuitfind")

FORMATS: dict[str, str] = {".svg": "svg", ".pdf": "pdf", ".png": "png", ".dot": "dot",
                           ".gv": "dot"}
"""Path suffix -> output format."""

# Okabe & Ito (2008), "Color Universal Design": a palette distinguishable under the common
# colour-vision deficiencies.
_OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9",
              "bluish_green": "#009E73", "yellow": "#F0E442", "blue": "#0072B2",
              "vermillion": "#D55E00", "reddish_purple": "#CC79A7"}
OKABE_ITO: dict[str, str] = _OKABE_ITO
"""The Okabe–Ito palette by colour name (also used by the leaderboard's figures)."""

EDGE_COLOURS: dict[str, str] = {"q": _OKABE_ITO["blue"], "k": _OKABE_ITO["bluish_green"],
                                "v": _OKABE_ITO["vermillion"], "qkv": _OKABE_ITO["blue"],
                                "mlp": _OKABE_ITO["reddish_purple"],
                                "logits": _OKABE_ITO["black"]}
"""Edge colour by receiver kind (``qkv``: q/k/v collapsed into one edge)."""

SIGN_COLOURS: dict[str, str] = {"helps": _OKABE_ITO["blue"], "hurts": _OKABE_ITO["vermillion"],
                                "zero": "#999999"}
"""Edge colour by the effect of the edge on the metric (``edge_colour="sign"``)."""

KIND_FILLS: dict[str, str] = {"input": _OKABE_ITO["yellow"], "attention": _OKABE_ITO["sky_blue"],
                              "mlp": _OKABE_ITO["orange"], "logits": "#BBBBBB"}
"""Node fill by node kind (when the circuit has no node classes)."""

CLASS_PALETTE: tuple[str, ...] = tuple(_OKABE_ITO[k] for k in (
    "orange", "sky_blue", "bluish_green", "yellow", "blue", "vermillion", "reddish_purple"))
"""Node fill by class (in sorted class order, cycling)."""

_KIND_SHAPES = {"input": "box", "attention": "ellipse", "mlp": "box", "logits": "box"}
_EDGE_LABELS = {"q": "q input", "k": "k input", "v": "v input", "qkv": "q/k/v input",
                "mlp": "MLP input", "logits": "logits"}
_UNCLASSED_FILL = "#EEEEEE"
_MIN_WIDTH, _MAX_WIDTH = 0.5, 5.0
_DENSE_EDGES = 80  # drawn edges above which Graphviz packs ranks tighter
_GRAPHVIZ_HINT = ("Install the `dot` binary with your system's package manager (`apt-get install "
                  "graphviz`, `brew install graphviz`, `conda install -c conda-forge graphviz`)")

EDGE_COLOUR_MODES = ("receiver", "sign")
HEAD_LABELS = ("name", "layer.head")
ORIENTATIONS = ("portrait", "landscape")


# ------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class RenderOptions:
    """How to draw a circuit; the same options work for every renderer.

    Args:
        edge_colour: ``"receiver"`` (colour by q/k/v/MLP/logits receiver) or ``"sign"`` (by
            whether the edge helps or hurts the task's metric).
        collapse_qkv: Draw one edge per sender and head instead of one per q/k/v input; its
            score is the sum of the q, k and v scores.
        min_abs_score: Hide drawn edges with ``|score|`` below this (in the metric's unit).
        top_n: Keep only the ``top_n`` drawn edges by ``|score|`` (ties: canonical order).
        head_labels: ``"name"`` (``a3.h7``) or ``"layer.head"`` (``3.7``).
        orientation: ``"portrait"`` (layers top to bottom) or ``"landscape"`` (left to right).
        title: Draw the title line (model, task, algorithm, edge count).
        fixed_order: One slot per head of the model and every row present, so that drawings
            of different circuits of one model line up (heads are in index order either
            way; without it the drawn heads of a row stand side by side).

    Raises:
        ConfigError: a value outside the lists above, a negative ``min_abs_score`` or a
            ``top_n`` below 0.
    """

    edge_colour: str = "receiver"
    collapse_qkv: bool = False
    min_abs_score: float | None = None
    top_n: int | None = None
    head_labels: str = "name"
    orientation: str = "portrait"
    title: bool = True
    fixed_order: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("edge_colour", EDGE_COLOUR_MODES), ("head_labels", HEAD_LABELS),
                              ("orientation", ORIENTATIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"RenderOptions.{name} must be one of {list(allowed)}; got "
                                  f"{getattr(self, name)!r}.")
        value = self.min_abs_score
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value >= 0):
            raise ConfigError(f"RenderOptions.min_abs_score must be a number >= 0 or None; got "
                              f"{value!r}.")
        if self.top_n is not None and (isinstance(self.top_n, bool)
                                       or not isinstance(self.top_n, int) or self.top_n < 0):
            raise ConfigError(f"RenderOptions.top_n must be an int >= 0 or None; got "
                              f"{self.top_n!r}.")


# ------------------------------------------------------------------------------- the scene
@dataclass(frozen=True)
class SceneNode:
    """A node to draw: ``row`` counts from the top (input = 0), ``slot`` is its index in the
    row (heads: the head index) or ``None`` for a node alone in its row."""

    name: str
    label: str
    kind: str
    row: int
    slot: int | None
    fill: str
    shape: str
    tooltip: str


@dataclass(frozen=True)
class SceneEdge:
    """An edge to draw from ``sender`` to ``target`` (a node name).

    ``name`` is the circuit edge name (``a0.h1->a1.h0<q>``) or, for collapsed q/k/v edges,
    ``sender->head<qkv>``; ``key`` is the receiver kind (``q``, ``k``, ``v``, ``qkv``, ``mlp``,
    ``logits``); ``width`` is the pen width in points.
    """

    name: str
    sender: str
    target: str
    key: str
    score: float | None
    colour: str
    width: float


@dataclass(frozen=True)
class Scene:
    """Everything both renderers draw: title, nodes (graph order), the number of rows and
    which rows hold heads, slots per head row, edges (canonical order), and the legend entries
    ``(label, colour)`` for edges and node classes."""

    title: str | None
    nodes: tuple[SceneNode, ...]
    n_rows: int
    head_rows: frozenset[int]
    n_slots: int
    edges: tuple[SceneEdge, ...]
    edge_legend: tuple[tuple[str, str], ...]
    class_legend: tuple[tuple[str, str], ...]
    landscape: bool
    fixed_order: bool
    legend_title: str = field(default="pen width ∝ |score|")


def model_display_name(model: str) -> str:
    """A model's name for titles: a hub id (``gpt2``, ``meta-llama/Llama-3.2-1B``) or zoo name
    as it is, a local directory by its last part (``../shared/models/stories260k`` ->
    ``stories260k``), never a machine path."""
    text = str(model).rstrip("/\\")
    if text.startswith("zoo:"):
        return text
    local = (text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or "\\" in text
             or (len(text) > 1 and text[1] == ":"))
    return text.replace("\\", "/").rsplit("/", 1)[-1] if local else text


def _title(circuit: Circuit) -> str:
    meta = circuit.metadata
    parts = [f"{k}: {model_display_name(meta[k]) if k == 'model' else meta[k]}"
             for k in ("model", "task", "algorithm")
             if isinstance(meta.get(k), (str, int, float))]
    parts.append(f"{circuit.n_edges}/{circuit.graph.n_edges} edges")
    return " | ".join(parts)


def _live_targets(drawn: list[list[Any]], prune: bool) -> list[list[Any]]:
    """Drawn edges ``[name, sender, targets, key, value]`` with their targets narrowed to the
    heads that lead on: a grouped-query k/v edge is drawn into the query heads of its group
    that have a drawn outgoing edge, so no head shows inputs without outputs because of its
    group. When none has (an unpruned circuit), into those drawn anyway for their own q input,
    else into all of them, so that nothing is lost. With ``prune`` (after ``top_n`` /
    ``min_abs_score`` hid edges) the drawing is pruned like :func:`~circuitfind.graphs.
    selection.prune_dangling`: edges into nodes with no drawn way on to the logits, and out of
    nodes no drawn edge reaches (``input`` aside), go, until none is left."""
    items = [[name, sender, tuple(targets), key, value]
             for name, sender, targets, key, value in drawn]
    while True:
        senders = {it[1] for it in items}
        reached = {t for it in items for t in it[2]}
        own = {it[2][0] for it in items if len(it[2]) == 1}  # reached by an unshared input
        changed = False
        kept = []
        for it in items:
            alive = tuple(t for t in it[2] if t == "logits" or t in senders)
            if not alive and len(it[2]) > 1:  # no head of the group leads on (unpruned)
                alive = tuple(t for t in it[2] if t in own)
            if prune and (not alive or (it[1] != "input" and it[1] not in reached)):
                changed = True
                continue
            targets = alive or it[2]
            changed |= targets != it[2]
            kept.append([it[0], it[1], targets, it[3], it[4]])
        items = kept
        if not changed or not prune:
            return items


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def scene(circuit: Circuit, options: RenderOptions | None = None) -> Scene:
    """The renderer-independent description of a circuit's drawing (see the module docstring).

    Args:
        circuit: The circuit.
        options: Drawing options (default :class:`RenderOptions`).

    Returns:
        A :class:`Scene`; equal inputs give equal scenes.

    Raises:
        ConfigError: ``circuit`` is not a Circuit; a score filter (``min_abs_score``,
            ``top_n``) on a circuit without scores.
    """
    from circuitfind.graphs.circuit import Circuit

    if not isinstance(circuit, Circuit):
        raise ConfigError(f"render needs a Circuit; got {type(circuit).__name__}.")
    opts = options or RenderOptions()
    graph = circuit.graph
    filtering = opts.min_abs_score is not None or opts.top_n is not None
    if filtering and circuit.scores is None:
        raise ConfigError("min_abs_score / top_n need edge scores, and this circuit has none.")

    # ---- drawn edges ("items"): one per kept edge, or one per (sender, head) when collapsed
    ids = circuit.edge_ids
    pairs = graph.edge_pairs[ids].tolist()
    values: list[float | None]
    if circuit.scores is not None:
        values = graph.to_edges(circuit.scores)[ids].tolist()
    else:
        values = [None] * len(pairs)
    names = graph.edge_names
    # collapsed, a grouped-query k/v edge counts towards the heads of its group that lead on
    # in the circuit (all of them when none does), as _live_targets narrows uncollapsed ones
    leading = {graph.senders[s].name for s, _ in pairs}
    # (name, sender, targets, key, score) in canonical order of first appearance
    items: dict[tuple[str, ...], list[Any]] = {}
    for edge_id, (s, r), value in zip(ids.tolist(), pairs, values):
        receiver = graph.receivers[r]
        sender = graph.senders[s].name
        kind = receiver.qkv or receiver.kind
        if opts.collapse_qkv and kind in ("q", "k", "v"):
            heads = [t for t in receiver.nodes if t in leading] or receiver.nodes
            for target in heads:
                item = items.setdefault(("qkv", sender, target),
                                        [f"{sender}->{target}<qkv>", sender, (target,), "qkv",
                                         None])
                if value is not None:
                    item[4] = (item[4] or 0.0) + value
        else:
            items[("edge", names[edge_id])] = [names[edge_id], sender, receiver.nodes, kind,
                                               value]
    drawn = list(items.values())
    if opts.min_abs_score is not None:
        drawn = [it for it in drawn if _finite(it[4]) and abs(it[4]) >= opts.min_abs_score]
    if opts.top_n is not None:
        order = sorted(range(len(drawn)), key=lambda i: (
            -(abs(drawn[i][4]) if _finite(drawn[i][4]) else -1.0), i))
        keep = set(order[: opts.top_n])
        drawn = [it for i, it in enumerate(drawn) if i in keep]
    drawn = _live_targets(drawn, prune=filtering)

    # ---- widths and colours
    top = max((abs(it[4]) for it in drawn if _finite(it[4])), default=0.0)
    meaning = score_meaning(circuit.metadata)
    edges: list[SceneEdge] = []
    colour_keys: list[str] = []
    for name, sender, targets, key, value in drawn:
        if value is None or top == 0.0:
            width = 1.0
        elif not math.isfinite(value):
            width = _MIN_WIDTH
        else:
            width = _MIN_WIDTH + (_MAX_WIDTH - _MIN_WIDTH) * min(abs(value) / top, 1.0)
        if opts.edge_colour == "sign":
            # the scores' meaning says which sign marks an edge the behaviour relies on
            # (metric changes: negative when higher is better; importances: positive)
            if not _finite(value) or value == 0.0:
                colour_key = "zero"
            else:
                colour_key = "helps" if meaning.sign * value > 0 else "hurts"
            colour = SIGN_COLOURS[colour_key]
        else:
            colour_key, colour = key, EDGE_COLOURS[key]
        colour_keys.append(colour_key)
        for target in targets:
            edges.append(SceneEdge(name, sender, target, key, value, colour, round(width, 3)))
    if opts.edge_colour == "sign":
        helps, hurts = (meaning.sign_labels() if meaning_known(circuit.metadata)
                        else ("score < 0", "score > 0"))
        labels = {"helps": helps, "hurts": hurts}
        labels["zero"] = "score 0 / none"
        edge_legend = tuple((labels[k], SIGN_COLOURS[k]) for k in SIGN_COLOURS
                            if k in colour_keys)
    else:
        edge_legend = tuple((_EDGE_LABELS[k], EDGE_COLOURS[k]) for k in EDGE_COLOURS
                            if k in colour_keys)

    # ---- nodes: those the drawn edges touch, in graph order; rows and slots
    touched = {e.sender for e in edges} | {e.target for e in edges}
    classes = {n: str(c) for n, c in (circuit.metadata.get("node_classes") or {}).items()}
    node_list = [n for n in graph.nodes if n.name in touched]
    used = sorted({classes[n.name] for n in node_list if n.name in classes})
    class_fill = {c: CLASS_PALETTE[i % len(CLASS_PALETTE)] for i, c in enumerate(used)}
    sub_rows = 1 if graph.attn_only else 2

    def row_of(layer: int, kind: str) -> int:
        if layer < 0:
            return 0
        if layer >= graph.n_layers:
            return 1 + graph.n_layers * sub_rows
        return 1 + layer * sub_rows + (1 if kind == "mlp" else 0)

    nodes = []
    for node in node_list:
        if classes:
            fill = class_fill[classes[node.name]] if node.name in classes else _UNCLASSED_FILL
        else:
            fill = KIND_FILLS[node.kind]
        label = node.name
        if node.kind == "attention" and opts.head_labels == "layer.head":
            label = f"{node.layer}.{node.head}"
        tooltip = f"{node.name} ({node.kind})" + (
            f" [{classes[node.name]}]" if node.name in classes else "")
        nodes.append(SceneNode(node.name, label, node.kind, row_of(node.layer, node.kind),
                               node.head, fill, _KIND_SHAPES[node.kind], tooltip))
    if not opts.fixed_order:  # compact: only rows with nodes, renumbered from 0
        present = {row: i for i, row in enumerate(sorted({n.row for n in nodes}))}
        nodes = [SceneNode(n.name, n.label, n.kind, present[n.row], n.slot, n.fill, n.shape,
                           n.tooltip) for n in nodes]
        n_rows = len(present)
        head_rows = {n.row for n in nodes if n.kind == "attention"}
    else:
        n_rows = row_of(graph.n_layers, "logits") + 1
        head_rows = {row_of(layer, "attention") for layer in range(graph.n_layers)}
    title = _title(circuit) + (f" ({len(drawn)} drawn)" if filtering else "")
    return Scene(title=title if opts.title else None, nodes=tuple(nodes),
                 n_rows=n_rows, head_rows=frozenset(head_rows), n_slots=graph.n_heads,
                 edges=tuple(edges),
                 edge_legend=edge_legend,
                 class_legend=tuple((c, class_fill[c]) for c in used),
                 landscape=opts.orientation == "landscape", fixed_order=opts.fixed_order)


# ------------------------------------------------------------------------------- Graphviz
def _import(module: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise CircuitFindError(f"{purpose} needs the `{module}` Python package: `pip install "
                               f"{module}`.") from err


def _import_graphviz() -> Any:
    return _import("graphviz", "Writing DOT or drawing with Graphviz")


def to_graphviz(circuit: Circuit, options: RenderOptions | None = None) -> graphviz.Digraph:
    """Build the Graphviz digraph of a circuit (see the module docstring for the styling).

    Args:
        circuit: The circuit to draw.
        options: Drawing options (default :class:`RenderOptions`).

    Returns:
        A ``graphviz.Digraph``; its ``source`` is deterministic.

    Raises:
        CircuitFindError: the ``graphviz`` package is not installed.
        ConfigError: see :func:`scene`.
    """
    return _graphviz_from_scene(scene(circuit, options))


def _graphviz_from_scene(sc: Scene) -> graphviz.Digraph:
    gv = _import_graphviz()
    nohtml = gv.nohtml
    graph_attr = {"rankdir": "LR" if sc.landscape else "TB", "newrank": "true",
                  "fontname": "Helvetica"}
    # dot gives every edge crossing a rank a virtual node nodesep apart from the next: with
    # hundreds of long edges the default spacing makes a drawing ~6x wider than tall
    dense = len(sc.edges) > _DENSE_EDGES
    graph_attr.update(nodesep="0.05" if dense else "0.25", ranksep="1.0" if dense else "0.6")
    if sc.title is not None:
        graph_attr.update(labelloc="t", label=nohtml(sc.title))
    dot = gv.Digraph(name="circuit", graph_attr=graph_attr)
    dot.attr("node", style="filled", fontname="Helvetica", fontsize="11", penwidth="1")
    dot.attr("edge", arrowsize="0.6")

    # ---- nodes, one rank per row; fixed order adds an invisible placeholder per missing slot
    rows: dict[int, list[tuple[str, str | None]]] = {}
    for node in sc.nodes:
        dot.node(node.name, label=nohtml(node.label), shape=node.shape, fillcolor=node.fill,
                 tooltip=nohtml(node.tooltip))
        rows.setdefault(node.row, []).append((node.name, node.label))
    if sc.fixed_order:
        by_row: dict[int, dict[int | None, str]] = {}
        for node in sc.nodes:
            by_row.setdefault(node.row, {})[node.slot] = node.name
        width = max((len(n.label) for n in sc.nodes), default=5)
        columns: list[list[str]] = []
        for row in range(sc.n_rows):
            present = by_row.get(row, {})
            slots: list[int | None] = (list(range(sc.n_slots)) if row in sc.head_rows
                                       else [None])
            chain = []
            for slot in slots:
                if slot in present:
                    chain.append(present[slot])
                    continue
                name = f"slot.{row}.{slot if slot is not None else 'x'}"
                dot.node(name, label="x" * width, style="invis")
                rows.setdefault(row, []).append((name, None))
                chain.append(name)
            for left, right in zip(chain, chain[1:]):
                dot.edge(left, right, style="invis")
            columns.append(chain)
        # heavy invisible edges down each head slot (and the middle of lone rows) keep the
        # columns straight, so that a slot has the same place in every layer
        heads = [chain for chain in columns if len(chain) > 1]
        pairs = [pair for upper, lower in zip(heads, heads[1:]) for pair in zip(upper, lower)]
        pairs += [(upper[(len(upper) - 1) // 2], lower[(len(lower) - 1) // 2])
                  for upper, lower in zip(columns, columns[1:])
                  if len(upper) == 1 or len(lower) == 1]
        for a, b in pairs:
            dot.edge(a, b, style="invis", weight="100")
    else:  # heads in index order within their row (dot would reorder them to cut crossings)
        for members in rows.values():
            ordered = sorted((n for n in sc.nodes if n.name in {m for m, _ in members}),
                             key=lambda n: (n.slot is None, n.slot or 0, n.name))
            for a_node, b_node in zip(ordered, ordered[1:]):
                dot.edge(a_node.name, b_node.name, style="invis")
    # an invisible spine (one point per rank, chained) keeps later rows strictly below
    # earlier ones even when rows in between are absent
    spine: list[str] = []
    last = max(rows, default=0)
    for row in sorted(rows):
        rank = "source" if row == 0 else "sink" if row == last and row > 0 else "same"
        anchor = f"rank.{row}"
        with dot.subgraph(name=f"rank_{row}") as sg:
            sg.attr(rank=rank)
            sg.node(anchor, label="", shape="point", style="invis", width="0", height="0")
            for name, _ in rows[row]:
                sg.node(name)
        spine.append(anchor)
    for upper, lower in zip(spine, spine[1:]):
        dot.edge(upper, lower, style="invis")

    # ---- edges
    for edge in sc.edges:
        tooltip = edge.name if edge.score is None else f"{edge.name} score={edge.score:.6g}"
        dot.edge(edge.sender, edge.target, color=edge.colour, penwidth=f"{edge.width:.3f}",
                 tooltip=nohtml(tooltip))

    # ---- legend
    with dot.subgraph(name="cluster_legend") as legend:
        legend.attr(label=nohtml(f"legend ({sc.legend_title})"), fontname="Helvetica",
                    fontsize="10", style="dashed", color="#999999")
        previous = None
        # dot lays the cluster's components out right to left: emit them in reverse
        for i, (label, colour) in reversed(list(enumerate(sc.edge_legend))):
            a, b = f"legend.edge.{i}.a", f"legend.edge.{i}.b"
            legend.node(a, label="", shape="point", width="0.05", style="invis")
            legend.node(b, label=nohtml(label), shape="plaintext", style="", fontsize="10")
            legend.edge(a, b, color=colour, penwidth="2")
            previous = b
        for i, (label, fill) in enumerate(sc.class_legend):
            node_id = f"legend.class.{i}"
            legend.node(node_id, label=nohtml(label), shape="box", fillcolor=fill,
                        fontsize="10")
            if previous is not None:
                legend.edge(previous, node_id, style="invis")
            previous = node_id
    return dot


def to_dot(circuit: Circuit, options: RenderOptions | None = None) -> str:
    """The DOT source text of :func:`to_graphviz` (no ``dot`` binary needed)."""
    return to_graphviz(circuit, options).source


def _deterministic_pdf(data: bytes) -> bytes:
    # Cairo writes the current time as /CreationDate (and sometimes /ModDate); overwrite it with
    # a fixed date of the same length so that the xref offsets stay valid.
    def fixed(match: re.Match[bytes]) -> bytes:
        stamp = match.group(2)
        replacement = b"D:19700101000000Z"
        replacement = (replacement + b" " * len(stamp))[: len(stamp)]
        return match.group(1) + replacement + match.group(3)

    return re.sub(rb"(/(?:CreationDate|ModDate)\s*\()([^)]*)(\))", fixed, data)


def _draw_graphviz(sc: Scene, fmt: str) -> bytes:
    gv = _import_graphviz()
    dot = _graphviz_from_scene(sc)
    try:
        data = dot.pipe(format=fmt, quiet=True)
    except gv.ExecutableNotFound as err:
        raise CircuitFindError(f"The graphviz renderer needs the `dot` binary on the PATH. "
                               f"{_GRAPHVIZ_HINT}, or draw with renderer='matplotlib' "
                               "(`--renderer matplotlib`).") from err
    except gv.CalledProcessError as err:
        raise CircuitFindError(f"Graphviz `dot` failed: "
                               f"{(err.stderr or b'').decode(errors='replace').strip()}") from err
    return _deterministic_pdf(data) if fmt == "pdf" else data


def _graphviz_missing() -> str | None:
    if shutil.which("dot") is None:
        return (f"the Graphviz `dot` binary is not on the PATH. {_GRAPHVIZ_HINT}, or use the "
                "matplotlib renderer, which needs no system binary (`--renderer matplotlib`, "
                "renderer='matplotlib').")
    try:
        _import_graphviz()
    except CircuitFindError as err:
        return str(err)
    return None


# ------------------------------------------------------------------------------- matplotlib
_MPL_RC: dict[RcKeyType, Any] = {
    "svg.hashsalt": "circuitfind", "svg.fonttype": "none", "pdf.fonttype": 42,
    "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans"], "path.simplify": False,
    "svg.image_inline": True}
_MPL_METADATA = {"svg": {"Date": None, "Creator": None},
                 "pdf": {"CreationDate": None, "ModDate": None, "Creator": None,
                         "Producer": None},
                 "png": {"Software": None}}
MPL_RC, MPL_METADATA = _MPL_RC, _MPL_METADATA
"""matplotlib settings and per-format metadata for byte-reproducible figures."""
_CHAR_W, _NODE_H, _GAP_X, _GAP_Y = 0.075, 0.3, 0.14, 0.62  # inches
NODE_HEIGHT = _NODE_H
"""Height of a drawn node (inches)."""


def _import_matplotlib() -> Any:
    return _import("matplotlib", "The matplotlib renderer")


def _matplotlib_missing() -> str | None:
    try:
        _import_matplotlib()
    except CircuitFindError as err:
        return str(err)
    return None


def _row_orders(sc: Scene) -> dict[str, float]:
    """Position of each node along its row (in slots, row centred on 0).

    Heads always stand in head index order, as in the Graphviz drawing (a reader looks for
    ``a3.h7`` right of ``a3.h6``). Fixed order: heads at their index, with a slot for every
    head of the model, lone nodes in the middle; otherwise the drawn heads side by side.
    """
    if sc.fixed_order:
        middle = (sc.n_slots - 1) / 2
        return {n.name: float(n.slot) - middle if n.slot is not None else 0.0 for n in sc.nodes}
    rows: dict[int, list[Any]] = {}
    for node in sc.nodes:
        rows.setdefault(node.row, []).append(node)
    pos: dict[str, float] = {}
    for members in rows.values():
        members = sorted(members, key=lambda n: (n.slot is None, n.slot or 0, n.name))
        middle = (len(members) - 1) / 2
        for i, node in enumerate(members):
            pos[node.name] = i - middle
    return pos


def layout(sc: Scene) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Where the matplotlib renderer (and the HTML viewer, :mod:`circuitfind.view`) puts each
    node of a scene.

    Returns:
        ``(xy, node_width, slot_step)``: node centres ``{name: (x, y)}`` in inches (x to the
        right, y up: ``input`` on top in portrait), the width of a node and the distance
        between neighbouring slots of a row, in inches (nodes are :data:`NODE_HEIGHT` high).
    """
    node_w = max([len(n.label) for n in sc.nodes] + [4]) * _CHAR_W + 0.22
    if sc.landscape:  # rows run left to right, slots top to bottom
        step_row, step_slot = node_w + 0.7, _NODE_H + 0.16
    else:
        step_row, step_slot = _NODE_H + _GAP_Y, node_w + _GAP_X
    along = _row_orders(sc)
    xy: dict[str, tuple[float, float]] = {}
    for node in sc.nodes:
        r, s = node.row * step_row, along[node.name] * step_slot
        xy[node.name] = (r, -s) if sc.landscape else (s, -r)
    return xy, node_w, step_slot


def _boundary(centre: tuple[float, float], towards: tuple[float, float], a: float, b: float,
              shape: str) -> tuple[float, float]:
    """Where the ray from ``centre`` towards ``towards`` leaves an ellipse (semi-axes a, b) or
    a box (half-width a, half-height b)."""
    dx, dy = towards[0] - centre[0], towards[1] - centre[1]
    if dx == 0 and dy == 0:
        return centre
    if shape == "ellipse":
        t = 1.0 / math.sqrt((dx / a) ** 2 + (dy / b) ** 2)
    else:
        t = min(a / abs(dx) if dx else math.inf, b / abs(dy) if dy else math.inf)
    return centre[0] + t * dx, centre[1] + t * dy


class _Obstacles:
    """Chooses how much an edge bends so that it passes no node between its ends.

    Edges are matplotlib ``arc3`` curves: quadratic Béziers whose control point lies ``rad``
    chord lengths off the chord's midpoint, so the curve's middle lies ``rad / 2`` chord
    lengths off. Candidate offsets of the middle ``0, ±0.3, ±0.6, ... ±1.8`` slot widths (the
    side facing away from the middle of the drawing first) are tried in order; the first
    whose sampled points miss every other node wins, else the one hitting fewest nodes.
    """

    _STEPS = (0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8)

    def __init__(self, xy: dict[str, tuple[float, float]], half_w: float, half_h: float,
                 step: float) -> None:
        import numpy as np

        self.np = np
        self.names = list(xy)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.centres = np.array([xy[n] for n in self.names], dtype=float).reshape(-1, 2)
        self.half = np.array([half_w, half_h])
        self.middle = self.centres.mean(axis=0) if len(self.names) else np.zeros(2)
        self.step = step
        self.t = np.linspace(0.0, 1.0, 11)[:, None]

    def curve(self, sender: str, target: str, rad: float) -> Any:
        """``[11, 2]`` points along the edge's curve (centre to centre)."""
        np = self.np
        a, b = self.centres[self.index[sender]], self.centres[self.index[target]]
        control = (a + b) / 2 + rad * np.array([b[1] - a[1], -(b[0] - a[0])])
        t = self.t
        return (1 - t) ** 2 * a + 2 * (1 - t) * t * control + t ** 2 * b

    def bend(self, sender: str, target: str, offset: float) -> float:
        """The ``rad`` for the edge ``sender -> target`` (``offset`` separates parallel
        q/k/v edges)."""
        np = self.np
        i, j = self.index[sender], self.index[target]
        a, b = self.centres[i], self.centres[j]
        direction = b - a
        length = float(np.hypot(*direction)) or 1.0
        right = np.array([direction[1], -direction[0]])  # a positive rad bends this way
        outward = 1.0 if float(right @ ((a + b) / 2 - self.middle)) >= 0 else -1.0
        best, fewest = offset, None
        for size in self._STEPS:
            for sign in ((outward, -outward) if size else (1.0,)):
                rad = sign * 2 * size * self.step / length + offset
                points = self.curve(sender, target, rad)[1:-1]
                inside = (np.abs(points[:, None, :] - self.centres[None]) < self.half)
                hit = inside.all(-1).any(0)
                hit[[i, j]] = False
                hits = int(hit.sum())
                if hits == 0:
                    return rad
                if fewest is None or hits < fewest:
                    best, fewest = rad, hits
        return best


def _draw_matplotlib(sc: Scene, fmt: str) -> bytes:
    mpl = _import_matplotlib()
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Ellipse, FancyArrowPatch, FancyBboxPatch, Patch

    xy, node_w, step_slot = layout(sc)
    # bends first: the drawing must hold every curve
    offsets = {"q": -0.12, "k": 0.0, "v": 0.12}
    avoid = _Obstacles(xy, node_w / 2 + 0.04, _NODE_H / 2 + 0.04, step_slot)
    rads = [avoid.bend(e.sender, e.target, offsets.get(e.key, 0.0)) for e in sc.edges]
    points = [p for e, rad in zip(sc.edges, rads)
              for p in avoid.curve(e.sender, e.target, rad).tolist()] + list(xy.values())
    xs = [p[0] for p in points] or [0.0]
    ys = [p[1] for p in points] or [0.0]
    x0, x1 = min(xs) - node_w, max(xs) + node_w
    y0, y1 = min(ys) - _NODE_H * 1.5, max(ys) + _NODE_H * 1.5
    with mpl.rc_context(_MPL_RC):
        fig = Figure(figsize=(x1 - x0, y1 - y0), dpi=150)
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_axis_off()
        shapes = {n.name: n.shape for n in sc.nodes}
        for node in sc.nodes:
            x, y = xy[node.name]
            patch: Patch
            if node.shape == "ellipse":
                patch = Ellipse((x, y), node_w, _NODE_H)
            else:
                patch = FancyBboxPatch((x - node_w / 2, y - _NODE_H / 2), node_w, _NODE_H,
                                       boxstyle="round,pad=0,rounding_size=0.04")
            patch.set(facecolor=node.fill, edgecolor="black", linewidth=0.8, zorder=3,
                      gid=f"node.{node.name}")
            ax.add_patch(patch)
            ax.text(x, y, node.label, ha="center", va="center", fontsize=8, zorder=4,
                    gid=f"label.{node.name}")
        # thin edges first so that strong edges are drawn on top
        for i, edge in sorted(enumerate(sc.edges), key=lambda ie: (ie[1].width, ie[0])):
            (xa, ya), (xb, yb) = xy[edge.sender], xy[edge.target]
            rad = rads[i]
            # the curve leaves towards the arc's control point: clip it at the node outlines
            # (analytically; matplotlib's patch clipping costs ~15 ms per edge)
            cx, cy = (xa + xb) / 2 + rad * (yb - ya), (ya + yb) / 2 - rad * (xb - xa)
            start = _boundary((xa, ya), (cx, cy), node_w / 2, _NODE_H / 2, shapes[edge.sender])
            end = _boundary((xb, yb), (cx, cy), node_w / 2, _NODE_H / 2, shapes[edge.target])
            arrow = FancyArrowPatch(start, end, arrowstyle="-|>",
                                    connectionstyle=f"arc3,rad={rad:.2f}",
                                    mutation_scale=5 + edge.width, linewidth=edge.width * 0.8,
                                    color=edge.colour, alpha=0.85, shrinkA=0, shrinkB=0,
                                    zorder=2, gid=f"edge.{i}.{edge.name}")
            ax.add_patch(arrow)
        if sc.title is not None:
            ax.text((x0 + x1) / 2, y1, sc.title, ha="center", va="bottom", fontsize=9)
        handles: list[Artist] = [Line2D([], [], color=colour, linewidth=2, label=label)
                   for label, colour in sc.edge_legend]
        handles += [Patch(facecolor=fill, edgecolor="black", linewidth=0.8, label=label)
                    for label, fill in sc.class_legend]
        if handles:
            legend = ax.legend(handles=handles, title=sc.legend_title, fontsize=7,
                               title_fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                               frameon=True)
            legend.get_frame().set_linestyle("--")
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, bbox_inches="tight", pad_inches=0.05,
                    metadata=_MPL_METADATA[fmt])
    return buffer.getvalue()


# ------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Renderer:
    """A registered renderer: the formats it draws, a check that says what is missing
    (``None`` when usable), and the function drawing a :class:`Scene` to bytes."""

    name: str
    formats: tuple[str, ...]
    missing: Callable[[], str | None]
    draw: Callable[[Scene, str], bytes]


RENDERERS: Registry[Renderer] = Registry("renderer")
"""``graphviz`` and ``matplotlib``."""
RENDERERS.register("graphviz")(Renderer("graphviz", ("svg", "pdf", "png"), _graphviz_missing,
                                        _draw_graphviz))
RENDERERS.register("matplotlib")(Renderer("matplotlib", ("svg", "pdf", "png"),
                                          _matplotlib_missing, _draw_matplotlib))

_FALLBACK_SAID: list[bool] = []  # the automatic fallback is announced once per process


def resolve_renderer(renderer: str | None = None, announce: bool = True) -> str:
    """The renderer to draw with, checked to be usable.

    Args:
        renderer: ``"graphviz"``, ``"matplotlib"``, or ``None``/``"auto"``: Graphviz when the
            ``dot`` binary is on the PATH, matplotlib otherwise (logged once per process on the
            ``circuitfind`` logger when ``announce``: callers that only validate, before
            anything is drawn, pass ``False``).

    Returns:
        The registered name.

    Raises:
        UnknownNameError: an unknown renderer (the message lists the valid ones).
        CircuitFindError: the renderer cannot run here (e.g. ``graphviz`` without ``dot``);
            the message names what to install and the fallback.
    """
    if renderer is None or renderer == "auto":
        if _graphviz_missing() is None:
            return "graphviz"
        if announce and not _FALLBACK_SAID:
            _FALLBACK_SAID.append(True)
            LOGGER.warning("Graphviz `dot` not found on the PATH: drawing with matplotlib "
                           "(install Graphviz for its layered layout).")
        renderer = "matplotlib"
    chosen = RENDERERS.get(renderer)
    problem = chosen.missing()
    if problem is not None:
        raise CircuitFindError(f"Cannot draw with the {chosen.name} renderer: {problem}")
    return chosen.name


def format_of(path: Path, format: str | None) -> str:
    supported = sorted(set(FORMATS.values()))
    if format is None:
        suffix = path.suffix.lower()
        if suffix not in FORMATS:
            what = (f"Cannot tell the image format of {str(path)!r} from its suffix "
                    f"{suffix or '(none)'!r}; use one of {sorted(FORMATS)}")
            raise ConfigError(f"{what} or pass format= one of {supported}.",
                              cli=f"{what}.")
        return FORMATS[suffix]
    fmt = str(format).lower().lstrip(".")
    fmt = "dot" if fmt == "gv" else fmt
    if fmt not in supported:
        raise ConfigError(f"Unsupported render format {format!r}; use one of {supported}.")
    return fmt


def render(circuit: Circuit, path: str | os.PathLike[str], format: str | None = None,
           renderer: str | None = None, options: RenderOptions | None = None) -> Path:
    """Draw a circuit to a file (atomically).

    Args:
        circuit: The circuit.
        path: Destination; its suffix picks the format unless ``format`` is given: ``.svg``,
            ``.pdf``, ``.png``, ``.dot`` / ``.gv`` (the DOT source; no ``dot`` binary needed).
        format: ``"svg"``, ``"pdf"``, ``"png"`` or ``"dot"``, overriding the suffix.
        renderer: ``"graphviz"``, ``"matplotlib"`` or ``None`` (Graphviz when ``dot`` is on
            the PATH, else matplotlib); ignored for DOT.
        options: Drawing options (:class:`RenderOptions`).

    Returns:
        The path written.

    Raises:
        ConfigError: an unsupported suffix or format; the directory of ``path`` is missing or
            not writable; bad options (see :func:`scene`).
        UnknownNameError: an unknown renderer.
        CircuitFindError: the renderer cannot run here (``graphviz`` without ``dot``), or
            ``dot`` failed.
    """
    path = Path(path)
    fmt = format_of(path, format)
    directory = path.parent
    if not directory.is_dir():
        raise ConfigError(f"Cannot write {str(path)!r}: the directory {str(directory)!r} does "
                          "not exist; create it first (mkdir -p).")
    sc = scene(circuit, options)
    if fmt == "dot":
        data = _graphviz_from_scene(sc).source.encode("utf-8")
    else:
        data = RENDERERS.get(resolve_renderer(renderer)).draw(sc, fmt)
    try:
        return atomic_write(path, data)
    except OSError as err:
        raise ConfigError(f"Cannot write {str(path)!r}: {err.strerror or err}.") from err
