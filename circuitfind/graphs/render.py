"""Graphviz rendering of circuits (DOT, SVG, PDF, PNG).

:func:`render` draws a :class:`~circuitfind.graphs.circuit.Circuit` for papers and reports:

- **layout**: top to bottom; ``input`` on the top rank, ``logits`` on the bottom rank, and one
  ``rank=same`` row per layer for the attention heads and, below it, one for the layer's MLP
  (the MLP reads the heads of its own layer, so sharing their rank would draw flat edges);
- **edges**: one per kept edge from the sender to the node reading the receiver (a
  grouped-query k/v edge is drawn to every query head sharing the key/value head, as in
  :meth:`Circuit.to_networkx`); colour by receiver type with the colour-blind-safe Okabe–Ito
  palette (q blue, k bluish green, v vermillion, MLP reddish purple, logits black); pen width
  ``0.5 + 4.5 * |score| / max |score|`` over the circuit's kept edges (1.0 for every edge when
  the circuit has no scores or all scores are 0); the tooltip gives the edge name and score;
- **nodes**: filled by kind (input, attention, MLP, logits; shapes differ too), or, when
  ``metadata["node_classes"]`` is set, by class (Okabe–Ito, classes in sorted order, cycling
  after seven; unclassified nodes light grey) with a legend cluster;
- **determinism**: nodes in graph order, edges in canonical order, numbers formatted with fixed
  precision, no timestamps — the same circuit gives the same bytes. Cairo stamps a
  ``/CreationDate`` into PDFs; it is replaced by a fixed date of the same length.

The ``graphviz`` Python package is imported lazily, and the ``dot`` binary is only needed for
SVG/PDF/PNG (``.dot``/``.gv`` writes the source text). A missing package or binary raises
:class:`~circuitfind.errors.CircuitFindError` with an install hint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitfind.errors import CircuitFindError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import graphviz

    from circuitfind.graphs.circuit import Circuit

__all__ = ["render", "to_graphviz", "to_dot", "FORMATS", "EDGE_COLOURS", "KIND_FILLS",
           "CLASS_PALETTE"]

FORMATS: dict[str, str] = {".svg": "svg", ".pdf": "pdf", ".png": "png", ".dot": "dot",
                           ".gv": "dot"}
"""Path suffix -> output format."""

# Okabe & Ito (2008), "Color Universal Design": a palette distinguishable under the common
# colour-vision deficiencies.
_OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9",
              "bluish_green": "#009E73", "yellow": "#F0E442", "blue": "#0072B2",
              "vermillion": "#D55E00", "reddish_purple": "#CC79A7"}

EDGE_COLOURS: dict[str, str] = {"q": _OKABE_ITO["blue"], "k": _OKABE_ITO["bluish_green"],
                                "v": _OKABE_ITO["vermillion"], "mlp": _OKABE_ITO["reddish_purple"],
                                "logits": _OKABE_ITO["black"]}
"""Edge colour by receiver kind."""

KIND_FILLS: dict[str, str] = {"input": _OKABE_ITO["yellow"], "attention": _OKABE_ITO["sky_blue"],
                              "mlp": _OKABE_ITO["orange"], "logits": "#BBBBBB"}
"""Node fill by node kind (when the circuit has no node classes)."""

_KIND_SHAPES = {"input": "box", "attention": "ellipse", "mlp": "box", "logits": "box"}

CLASS_PALETTE: tuple[str, ...] = tuple(_OKABE_ITO[k] for k in (
    "orange", "sky_blue", "bluish_green", "yellow", "blue", "vermillion", "reddish_purple"))
"""Node fill by class (in sorted class order, cycling)."""

_UNCLASSED_FILL = "#EEEEEE"
_MIN_WIDTH, _MAX_WIDTH = 0.5, 5.0
_INSTALL_HINT = ("Install the Graphviz Python package with `pip install graphviz` and the `dot` "
                 "binary with your system's package manager (`apt-get install graphviz`, "
                 "`brew install graphviz`, `conda install -c conda-forge graphviz`).")


def _import_graphviz() -> Any:
    try:
        import graphviz
    except ImportError as err:
        raise CircuitFindError(f"Rendering circuits needs the `graphviz` package. "
                               f"{_INSTALL_HINT}") from err
    return graphviz


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _title(circuit: Circuit) -> str:
    meta = circuit.metadata
    parts = [f"{k}: {meta[k]}" for k in ("model", "task", "algorithm")
             if isinstance(meta.get(k), (str, int, float))]
    parts.append(f"{circuit.n_edges}/{circuit.graph.n_edges} edges")
    return " | ".join(parts)


def to_graphviz(circuit: Circuit) -> graphviz.Digraph:
    """Build the Graphviz digraph of a circuit (see the module docstring for the styling).

    Args:
        circuit: The circuit to draw.

    Returns:
        A ``graphviz.Digraph``; its ``source`` is deterministic.

    Raises:
        CircuitFindError: the ``graphviz`` package is not installed.
        ConfigError: ``circuit`` is not a Circuit.
    """
    from circuitfind.graphs.circuit import Circuit, _structure

    if not isinstance(circuit, Circuit):
        raise ConfigError(f"render needs a Circuit; got {type(circuit).__name__}.")
    gv = _import_graphviz()
    nohtml = gv.nohtml
    graph = circuit.graph

    dot = gv.Digraph(name="circuit", graph_attr={
        "rankdir": "TB", "newrank": "true", "nodesep": "0.25", "ranksep": "0.6",
        "fontname": "Helvetica", "labelloc": "t", "label": nohtml(_title(circuit))})
    dot.attr("node", style="filled", fontname="Helvetica", fontsize="11", penwidth="1")
    dot.attr("edge", arrowsize="0.6")

    # ---- nodes, grouped into ranks
    classes_raw = circuit.metadata.get("node_classes") or {}
    classes = {name: str(label) for name, label in classes_raw.items()}
    names = circuit.nodes
    used = sorted({classes[n] for n in names if n in classes})
    class_fill = {c: CLASS_PALETTE[i % len(CLASS_PALETTE)] for i, c in enumerate(used)}
    ranks: dict[tuple[int, int], list[str]] = {}
    for name in names:
        node = graph.nodes[graph.node_index(name)]
        if classes:
            fill = class_fill[classes[name]] if name in classes else _UNCLASSED_FILL
        else:
            fill = KIND_FILLS[node.kind]
        tooltip = f"{name} ({node.kind})" + (f" [{classes[name]}]" if name in classes else "")
        dot.node(name, label=nohtml(name), shape=_KIND_SHAPES[node.kind], fillcolor=fill,
                 tooltip=nohtml(tooltip))
        ranks.setdefault((node.layer, 1 if node.kind == "mlp" else 0), []).append(name)
    # an invisible spine (one point per rank, chained) keeps later layers strictly below
    # earlier ones even when the layers in between have no node in the circuit
    spine: list[str] = []
    for (layer, sub), members in sorted(ranks.items()):
        if layer < 0:
            rank = "source"
        elif layer >= graph.n_layers:
            rank = "sink"
        else:
            rank = "same"
        anchor = f"rank.{layer + 1}.{sub}"
        with dot.subgraph(name=f"rank_{layer + 1}_{sub}") as sg:
            sg.attr(rank=rank)
            sg.node(anchor, label="", shape="point", style="invis", width="0", height="0")
            for name in members:
                sg.node(name)
        spine.append(anchor)
    for upper, lower in zip(spine, spine[1:]):
        dot.edge(upper, lower, style="invis")

    # ---- edges
    ids = circuit.edge_ids
    pairs = graph.edge_pairs[ids].tolist()
    edge_names = graph.edge_names
    if circuit.scores is not None and len(ids):
        values = graph.to_edges(circuit.scores)[ids].tolist()
        finite = [abs(v) for v in values if v == v and abs(v) != float("inf")]
        top = max(finite, default=0.0)
    else:
        values, top = [None] * len(pairs), 0.0
    qkv = _structure(graph).qkv
    for edge_id, (s, r), value in zip(ids.tolist(), pairs, values):
        receiver = graph.receivers[r]
        kind = qkv[r] or receiver.kind
        if value is None or top == 0.0:
            width = 1.0
        elif value != value:  # NaN
            width = _MIN_WIDTH
        else:
            width = _MIN_WIDTH + (_MAX_WIDTH - _MIN_WIDTH) * min(abs(value) / top, 1.0)
        name = edge_names[edge_id]
        tooltip = name if value is None else f"{name} score={value:.6g}"
        for target in receiver.nodes:
            dot.edge(graph.senders[s].name, target, color=EDGE_COLOURS[kind],
                     penwidth=_fmt(width), tooltip=nohtml(tooltip))

    # ---- legend
    with dot.subgraph(name="cluster_legend") as legend:
        legend.attr(label=nohtml("legend (pen width ∝ |score|)"), fontname="Helvetica",
                    fontsize="10", style="dashed", color="#999999")
        kinds_present = sorted({qkv[r] or graph.receivers[r].kind for _, r in pairs},
                               key=list(EDGE_COLOURS).index)
        previous = None
        for kind in kinds_present:
            a, b = f"legend.edge.{kind}.a", f"legend.edge.{kind}.b"
            legend.node(a, label="", shape="point", width="0.05", style="invis")
            legend.node(b, label=nohtml(f"{kind} input" if kind in ("q", "k", "v") else kind),
                        shape="plaintext", style="", fontsize="10")
            legend.edge(a, b, color=EDGE_COLOURS[kind], penwidth="2")
            previous = b
        for label in used:
            node_id = f"legend.class.{used.index(label)}"
            legend.node(node_id, label=nohtml(label), shape="box", fillcolor=class_fill[label],
                        fontsize="10")
            if previous is not None:
                legend.edge(previous, node_id, style="invis")
            previous = node_id
    return dot


def to_dot(circuit: Circuit) -> str:
    """The DOT source text of :func:`to_graphviz` (no ``dot`` binary needed)."""
    return to_graphviz(circuit).source


def _deterministic_pdf(data: bytes) -> bytes:
    # Cairo writes the current time as /CreationDate (and sometimes /ModDate); overwrite it with
    # a fixed date of the same length so that the xref offsets stay valid.
    def fixed(match: re.Match[bytes]) -> bytes:
        stamp = match.group(2)
        replacement = b"D:19700101000000Z"
        replacement = (replacement + b" " * len(stamp))[: len(stamp)]
        return match.group(1) + replacement + match.group(3)

    return re.sub(rb"(/(?:CreationDate|ModDate)\s*\()([^)]*)(\))", fixed, data)


def render(circuit: Circuit, path: str | os.PathLike[str], format: str | None = None) -> Path:
    """Draw a circuit to a file (atomically).

    Args:
        circuit: The circuit.
        path: Destination; its suffix picks the format unless ``format`` is given: ``.svg``,
            ``.pdf``, ``.png``, ``.dot`` / ``.gv`` (the DOT source; no ``dot`` binary needed).
        format: ``"svg"``, ``"pdf"``, ``"png"`` or ``"dot"``, overriding the suffix.

    Returns:
        The path written.

    Raises:
        ConfigError: an unsupported suffix or format.
        CircuitFindError: the ``graphviz`` package or the ``dot`` binary is missing, or ``dot``
            failed.
    """
    from circuitfind.graphs.circuit import _atomic_write

    path = Path(path)
    supported = sorted(set(FORMATS.values()))
    if format is None:
        suffix = path.suffix.lower()
        if suffix not in FORMATS:
            raise ConfigError(f"Cannot tell the image format of {str(path)!r} from its suffix "
                              f"{suffix or '(none)'!r}; use one of {sorted(FORMATS)} or pass "
                              f"format= one of {supported}.")
        fmt = FORMATS[suffix]
    else:
        fmt = str(format).lower().lstrip(".")
        fmt = "dot" if fmt == "gv" else fmt
        if fmt not in supported:
            raise ConfigError(f"Unsupported render format {format!r}; use one of {supported}.")
    dot = to_graphviz(circuit)
    if fmt == "dot":
        return _atomic_write(path, dot.source.encode("utf-8"))
    gv = _import_graphviz()
    try:
        data = dot.pipe(format=fmt, quiet=True)
    except gv.ExecutableNotFound as err:
        raise CircuitFindError(f"Rendering {fmt.upper()} needs the Graphviz `dot` binary on the "
                               f"PATH. {_INSTALL_HINT} (Writing a .dot file needs no binary.)"
                               ) from err
    except gv.CalledProcessError as err:
        raise CircuitFindError(f"Graphviz `dot` failed to render {str(path)!r}: "
                               f"{(err.stderr or b'').decode(errors='replace').strip()}") from err
    if fmt == "pdf":
        data = _deterministic_pdf(data)
    return _atomic_write(path, data)
