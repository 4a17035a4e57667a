"""Circuit codecs: JSON, GraphML, networkx and MIB — every way a circuit leaves or enters Python.

:class:`~circuitfind.graphs.circuit.Circuit` keeps thin methods that call these functions
(``circuit.to_json(path)``, ``Circuit.load(path)`` ...); this module is where the formats live.
The MIB circuit-track codec lives in :mod:`circuitfind.graphs.mib` (its graph mapping is a
subject of its own) and is re-exported here: :func:`export_mib`, :func:`import_mib`,
:func:`to_mib_dict`, :func:`from_mib_dict`.

Formats:

- networkx (:func:`to_networkx`): an ``nx.MultiDiGraph`` (q, k and v edges between the same two
  nodes are parallel edges). Node attributes ``layer``, ``kind``, ``head`` (attention heads
  only: GraphML cannot store ``None`` and the project never uses -1 for "unset", so the
  attribute is *absent* on ``input``, MLPs and ``logits``) and ``class`` (only for nodes named
  in ``metadata["node_classes"]``). One nx edge per kept edge, from the sender node to the node
  reading the receiver, keyed by the full edge name, with attributes ``name``, ``receiver``,
  ``qkv`` (``"q"``, ``"k"``, ``"v"``, or ``""`` for MLP and logits receivers) and ``score``
  (absent when the circuit has no scores). A grouped-query k/v receiver (``a3.kv1<k>``) is read
  by several query heads: its edge becomes one nx edge to *each* of them, all with the same
  key, name and score (``G.number_of_edges()`` can therefore exceed ``circuit.n_edges``).
- JSON (:func:`to_json`): ``format``, ``format_version``, the graph config, the kept edge names,
  the scores of *all* real edges as one list in canonical edge order (so a circuit file can be
  re-thresholded later), and the metadata. Scores are written as the shortest decimal that
  reads back to the same float32 (bit-exact round trip); non-finite scores use Python's JSON
  extension (``NaN``, ``Infinity``).
- GraphML (:func:`to_graphml`): the networkx graph, plus graph attributes ``format``,
  ``format_version``, ``graph_config`` and ``metadata`` (JSON strings) and ``scores_f32`` (the
  scores of all real edges, float32 little-endian, base64) so that the round trip is lossless.
  Edge ``score`` attributes are doubles that hold float32 values exactly.

All files are written with :func:`circuitfind._files.atomic_write`: a crash never leaves a
half-written circuit file.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from circuitfind._files import atomic_write, floats_for_json, read_bytes, read_json
from circuitfind.errors import CircuitFindError, ConfigError
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.graphs.mib import export_mib, from_mib_dict, import_mib, to_mib_dict

if TYPE_CHECKING:  # pragma: no cover
    import networkx as nx

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "to_dict", "from_dict", "to_json", "from_json",
           "to_networkx", "from_networkx", "to_graphml", "from_graphml", "save", "load",
           "export_mib", "import_mib", "to_mib_dict", "from_mib_dict"]

FORMAT_NAME = "circuitfind.circuit"
"""Value of the ``format`` field of circuit files."""

FORMAT_VERSION = 1
"""Version of the JSON / GraphML circuit file layout written by this module."""

_DATA_SUFFIXES = (".json", ".graphml")


# ---------------------------------------------------------------------------------- dict / JSON
def to_dict(circuit: Circuit) -> dict[str, Any]:
    """A JSON-serialisable dict (the content of :func:`to_json`).

    Args:
        circuit: The circuit.

    Returns:
        ``{"format", "format_version", "graph", "n_edges", "edges", "scores", "metadata"}``
        where ``graph`` is ``graph.config()``, ``edges`` the kept edge names (canonical
        order), and ``scores`` the float32 scores of *all* ``E`` real edges in canonical
        order (bit-exact as JSON numbers) or ``None``.
    """
    values = circuit.edge_values
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "graph": circuit.graph.config(),
        "n_edges": circuit.n_edges,
        "edges": circuit.edges,
        "scores": None if values is None else floats_for_json(values),
        "metadata": json.loads(json.dumps(circuit.metadata)),
    }


def from_dict(data: Mapping[str, Any]) -> Circuit:
    """Inverse of :func:`to_dict`.

    Args:
        data: A dict as written by :func:`to_dict` (format version up to
            :data:`FORMAT_VERSION`).

    Returns:
        The circuit.

    Raises:
        ConfigError: not a circuit dict, a newer format version, a bad graph config, an
            unknown edge name, or a scores list of the wrong length.
    """
    if not isinstance(data, Mapping) or data.get("format") != FORMAT_NAME:
        found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise ConfigError(f"Not a circuitfind circuit: expected format {FORMAT_NAME!r}, "
                          f"found {found!r}.")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"Bad circuit format_version {version!r}; expected an int >= 1.")
    if version > FORMAT_VERSION:
        raise ConfigError(f"The circuit was written in format version {version}; this "
                          f"circuitfind reads up to version {FORMAT_VERSION}. Upgrade "
                          "circuitfind to read it.")
    missing = [k for k in ("graph", "edges", "scores", "metadata") if k not in data]
    if missing:
        raise ConfigError(f"Circuit data lack the field(s) {missing}.")
    graph = _graph_from_config(data["graph"])
    edges = data["edges"]
    if not isinstance(edges, list) or not all(isinstance(e, str) for e in edges):
        raise ConfigError("Circuit 'edges' must be a list of edge names.")
    try:
        kept = graph.mask_of(graph.edge_ids_of(edges))
    except CircuitFindError as err:
        raise ConfigError(f"Circuit 'edges' do not fit the graph {graph!r}: {err}") from err
    if "n_edges" in data and data["n_edges"] != int(kept.sum()):
        raise ConfigError(f"Circuit 'n_edges' is {data['n_edges']!r} but 'edges' names "
                          f"{int(kept.sum())} distinct edges.")
    scores = data["scores"]
    if scores is not None:
        if not isinstance(scores, list) or len(scores) != graph.n_edges:
            n = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise ConfigError(f"Circuit 'scores' must be a list of {graph.n_edges} numbers "
                              f"(one per edge of {graph!r}, canonical order); got {n}.")
        try:
            values = torch.tensor(np.asarray(scores, dtype=np.float64).astype(np.float32))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"Circuit 'scores' must be numbers: {err}.") from err
        scores = graph.to_dense(values)
    return Circuit(graph, kept, scores, data["metadata"])


def to_json(circuit: Circuit, path: str | os.PathLike[str], indent: int | None = None) -> Path:
    """Write the circuit as JSON (atomically). See the module docstring for the layout.

    Args:
        circuit: The circuit.
        path: Destination file (conventionally ``*.json``).
        indent: ``json.dumps`` indent; ``None`` writes one compact line.

    Returns:
        The path written.

    Raises:
        OSError: the directory does not exist or is not writable.
    """
    text = json.dumps(to_dict(circuit), indent=indent) + "\n"
    return atomic_write(path, text.encode("utf-8"))


def from_json(path: str | os.PathLike[str]) -> Circuit:
    """Read a circuit written by :func:`to_json`.

    Raises:
        ConfigError: missing or unreadable file, invalid JSON, or bad content.
    """
    data = read_json(path, "circuit JSON")
    try:
        return from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{str(path)!r}: {err}") from err


# ---------------------------------------------------------------------------------- networkx
def to_networkx(circuit: Circuit) -> nx.MultiDiGraph:
    """The circuit as an ``nx.MultiDiGraph``.

    Nodes are ``circuit.nodes`` with attributes ``layer`` (int; ``input`` is -1, ``logits`` is
    ``n_layers``), ``kind``, ``head`` (attention heads only; absent elsewhere) and ``class``
    (str; only for nodes in ``metadata["node_classes"]``). Each kept edge gives one nx edge
    from its sender to each node reading its receiver (one node, except grouped-query k/v
    receivers, read by every query head sharing them), with key and ``name`` = the edge name
    and attributes ``receiver``, ``qkv`` (``"q"|"k"|"v"|""``) and ``score`` (float; absent
    when the circuit has no scores). Graph attributes: ``format``, ``format_version``,
    ``graph_config`` and ``metadata`` (JSON strings), ``n_edges``.

    Args:
        circuit: The circuit.

    Returns:
        The graph (nodes and edges in graph / canonical order).
    """
    import networkx as nx

    graph = circuit.graph
    g = nx.MultiDiGraph()
    g.graph.update(format=FORMAT_NAME, format_version=FORMAT_VERSION,
                   graph_config=json.dumps(graph.config(), sort_keys=True),
                   metadata=json.dumps(circuit.metadata, sort_keys=True),
                   n_edges=circuit.n_edges)
    classes = circuit.metadata.get("node_classes") or {}
    for name in circuit.nodes:
        node = graph.nodes[graph.node_index(name)]
        attrs: dict[str, Any] = {"layer": node.layer, "kind": node.kind}
        if node.head is not None:
            attrs["head"] = node.head
        if name in classes:
            attrs["class"] = str(classes[name])
        g.add_node(name, **attrs)
    ids = circuit.edge_ids
    pairs = graph.edge_pairs[ids].tolist()
    values = (graph.to_edges(circuit.scores)[ids].tolist()
              if circuit.scores is not None else [None] * len(pairs))
    names = graph.edge_names
    for edge_id, (s, r), value in zip(ids.tolist(), pairs, values):
        receiver = graph.receivers[r]
        attrs = {"name": names[edge_id], "receiver": receiver.name, "qkv": receiver.qkv or ""}
        if value is not None:
            attrs["score"] = float(value)
        for target in receiver.nodes:
            g.add_edge(graph.senders[s].name, target, key=names[edge_id], **attrs)
    return g


def from_networkx(g: Any) -> Circuit:
    """Inverse of :func:`to_networkx` (and of the graph read from :func:`to_graphml`).

    The kept edges come from the edges' ``name`` attributes. Scores come from the graph
    attribute ``scores_f32`` when present (all edges, as written by :func:`to_graphml`),
    else from the edges' ``score`` attributes (kept edges; others score 0), else ``None``.

    Args:
        g: A networkx graph carrying the graph attributes :func:`to_networkx` writes.

    Returns:
        The circuit.

    Raises:
        ConfigError: missing graph attributes, an edge without ``name``, or unknown names.
    """
    attrs = getattr(g, "graph", None)
    if not isinstance(attrs, Mapping) or "graph_config" not in attrs:
        raise ConfigError("Not a circuitfind circuit graph: the graph attribute "
                          "'graph_config' is missing (write it with Circuit.to_graphml).")
    version = attrs.get("format_version", FORMAT_VERSION)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ConfigError(f"The circuit was written in format version {version}; this "
                          f"circuitfind reads up to version {FORMAT_VERSION}.")
    graph = _graph_from_config(_json_attr(attrs, "graph_config"))
    metadata = _json_attr(attrs, "metadata") if "metadata" in attrs else {}
    names: dict[str, float | None] = {}
    for u, v, data in g.edges(data=True):
        name = data.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"Edge {u!r} -> {v!r} has no 'name' attribute; cannot tell "
                              "which circuit edge it is.")
        score = data.get("score")
        names[name] = None if score is None else float(score)
    try:
        ids = graph.edge_ids_of(list(names))
    except CircuitFindError as err:
        raise ConfigError(f"Circuit edges do not fit the graph {graph!r}: {err}") from err
    kept = graph.mask_of(ids)
    scores: Tensor | None = None
    if "scores_f32" in attrs:
        scores = graph.to_dense(_scores_from_b64(str(attrs["scores_f32"]), graph.n_edges))
    elif names and all(v is not None for v in names.values()):
        values = torch.zeros(graph.n_edges, dtype=torch.float32)
        values[ids] = torch.tensor(list(names.values()), dtype=torch.float64).to(torch.float32)
        scores = graph.to_dense(values)
    return Circuit(graph, kept, scores, metadata)


# ---------------------------------------------------------------------------------- GraphML
def to_graphml(circuit: Circuit, path: str | os.PathLike[str]) -> Path:
    """Write :func:`to_networkx` as GraphML (atomically), with all scores for a lossless trip.

    Args:
        circuit: The circuit.
        path: Destination file (conventionally ``*.graphml``).

    Returns:
        The path written.

    Raises:
        OSError: the directory does not exist or is not writable.
    """
    import networkx as nx

    g = to_networkx(circuit)
    edge_values = circuit.edge_values
    if edge_values is not None:
        g.graph["scores_f32"] = _scores_to_b64(edge_values)
    buffer = BytesIO()
    nx.write_graphml(g, buffer, encoding="utf-8", prettyprint=True)
    return atomic_write(path, buffer.getvalue())


def from_graphml(path: str | os.PathLike[str]) -> Circuit:
    """Read a circuit written by :func:`to_graphml`.

    Raises:
        ConfigError: missing or unreadable file, invalid GraphML, or bad content.
    """
    import xml.etree.ElementTree as ET

    import networkx as nx

    raw = read_bytes(path, "circuit GraphML")
    try:
        g = nx.read_graphml(BytesIO(raw), node_type=str, edge_key_type=str,
                            force_multigraph=True)
    except (ET.ParseError, nx.NetworkXError, ValueError, KeyError) as err:
        raise ConfigError(f"{str(path)!r} is not a valid GraphML file: {err}.") from err
    try:
        return from_networkx(g)
    except ConfigError as err:
        raise ConfigError(f"{str(path)!r}: {err}") from err


# ---------------------------------------------------------------------------------- by suffix
def save(circuit: Circuit, path: str | os.PathLike[str]) -> Path:
    """Write to ``path`` by suffix: ``.json`` (:func:`to_json`), ``.graphml``
    (:func:`to_graphml`).

    Returns:
        The path written.

    Raises:
        ConfigError: another suffix (images are written with ``Circuit.render``).
        OSError: the directory does not exist or is not writable.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return to_json(circuit, path)
    if suffix == ".graphml":
        return to_graphml(circuit, path)
    raise ConfigError(f"Cannot save a circuit as {suffix or 'a file without suffix'!r} "
                      f"({str(path)!r}); use one of {list(_DATA_SUFFIXES)}, or "
                      "Circuit.render for .svg/.pdf/.png/.dot.")


def load(path: str | os.PathLike[str]) -> Circuit:
    """Read a circuit file by suffix: ``.json`` or ``.graphml``.

    Raises:
        ConfigError: another suffix, or a bad file.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return from_json(path)
    if suffix == ".graphml":
        return from_graphml(path)
    raise ConfigError(f"Cannot load a circuit from {str(path)!r}: the suffix must be one "
                      f"of {list(_DATA_SUFFIXES)}.")


# ---------------------------------------------------------------------------------- helpers
def _graph_from_config(config: Any) -> ComputeGraph:
    if not isinstance(config, Mapping):
        raise ConfigError(f"The graph config must be a dict (ComputeGraph.config()); got "
                          f"{type(config).__name__}.")
    try:
        return ComputeGraph.from_config(dict(config))
    except TypeError as err:
        raise ConfigError(f"Bad graph config {dict(config)!r}: {err}.") from err


def _json_attr(attrs: Mapping[str, Any], key: str) -> Any:
    try:
        return json.loads(attrs[key])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Graph attribute {key!r} is not valid JSON: {err}.") from err


def _scores_to_b64(values: Tensor) -> str:
    arr = values.numpy().astype("<f4", copy=False)
    return base64.b64encode(arr.tobytes()).decode("ascii")


def _scores_from_b64(text: str, n_edges: int) -> Tensor:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as err:
        raise ConfigError(f"scores_f32 is not valid base64: {err}.") from err
    if len(raw) != 4 * n_edges:
        raise ConfigError(f"scores_f32 holds {len(raw) // 4} float32 values; the graph has "
                          f"{n_edges} edges.")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
