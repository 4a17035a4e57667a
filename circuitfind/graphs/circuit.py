"""Circuits: a set of kept edges over a :class:`ComputeGraph`, with scores and metadata.

A :class:`Circuit` is an immutable value: the graph, a ``[S, R]`` boolean mask of kept edges
(only real edges of the graph may be kept), optional ``[S, R]`` float32 per-edge scores (the
signed estimate of the metric change when the edge is corrupted; 0 off-edge), and a
JSON-serialisable ``metadata`` dict (model, task, algorithm and its parameters, data seed,
versions, wall time, faithfulness ...; optionally ``node_classes: {node_name: class_label}``,
used to colour nodes in exports and renderings).

Selection is done by pure functions that return a new circuit — :func:`select_top_n`,
:func:`select_threshold`, :func:`prune_dangling` — vectorised over the ``[S, R]`` tensors
(GPT-2 small has 32,491 edges; nothing here loops over edges in Python except where edge
*names* are produced).

Exports:

- :meth:`Circuit.to_networkx`: an ``nx.MultiDiGraph`` (q, k and v edges between the same two
  nodes are parallel edges). Node attributes ``layer``, ``kind``, ``head`` (attention heads
  only: GraphML cannot store ``None`` and the project never uses -1 for "unset", so the
  attribute is *absent* on ``input``, MLPs and ``logits``) and ``class`` (only for nodes named
  in ``metadata["node_classes"]``). One nx edge per kept edge, from the sender node to the node
  reading the receiver, keyed by the full edge name, with attributes ``name``, ``receiver``,
  ``qkv`` (``"q"``, ``"k"``, ``"v"``, or ``""`` for MLP and logits receivers) and ``score``
  (absent when the circuit has no scores). A grouped-query k/v receiver (``a3.kv1<k>``) is read
  by several query heads: its edge becomes one nx edge to *each* of them, all with the same
  key, name and score (``G.number_of_edges()`` can therefore exceed :attr:`Circuit.n_edges`).
- JSON (:meth:`Circuit.to_json`): ``format``, ``format_version``, the graph config, the kept
  edge names, the scores of *all* real edges as one list in canonical edge order (so a circuit
  file can be re-thresholded later), and the metadata. Scores are written as the shortest
  decimal that reads back to the same float32 (bit-exact round trip); non-finite scores use
  Python's JSON extension (``NaN``, ``Infinity``).
- GraphML (:meth:`Circuit.to_graphml`): the networkx graph, plus graph attributes ``format``,
  ``format_version``, ``graph_config`` and ``metadata`` (JSON strings) and ``scores_f32`` (the
  scores of all real edges, float32 little-endian, base64) so that the round trip is lossless.
  Edge ``score`` attributes are doubles that hold float32 values exactly.

All files are written atomically (a temporary file in the target directory, then
``os.replace``): a crash never leaves a half-written circuit file.
"""

from __future__ import annotations

import base64
import json
import math
import operator
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from circuitfind.errors import CircuitFindError, ConfigError
from circuitfind.graphs.graph import ComputeGraph

if TYPE_CHECKING:  # pragma: no cover
    import networkx as nx

    from circuitfind.graphs.render import RenderOptions

__all__ = ["Circuit", "FORMAT_NAME", "FORMAT_VERSION", "select_top_n", "select_threshold",
           "prune_dangling"]

FORMAT_NAME = "circuitfind.circuit"
"""Value of the ``format`` field of circuit files."""

FORMAT_VERSION = 1
"""Version of the JSON / GraphML circuit file layout written by this module."""

_DATA_SUFFIXES = (".json", ".graphml")


# ---------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class _Structure:
    """Small index tensors of a graph used by the vectorised selection code.

    Attributes:
        reads: ``[R, N]`` float32, 1 where node n reads receiver r (a grouped-query k/v receiver
            is read by every query head sharing it).
        qkv: Per receiver, ``"q"``, ``"k"``, ``"v"`` or ``""``.
    """

    reads: Tensor
    qkv: tuple[str, ...]


@lru_cache(maxsize=16)
def _structure(graph: ComputeGraph) -> _Structure:
    # ComputeGraph hashes and compares by config, and its structure is a function of its config,
    # so equal graphs share one cached structure.
    reads = torch.zeros(graph.n_receivers, graph.n_nodes, dtype=torch.float32)
    for r, receiver in enumerate(graph.receivers):
        for name in receiver.nodes:
            reads[r, graph.node_index(name)] = 1.0
    qkv = tuple(receiver.qkv or "" for receiver in graph.receivers)
    return _Structure(reads=reads, qkv=qkv)


# ---------------------------------------------------------------------------------- validation
def _check_graph(graph: Any, where: str) -> ComputeGraph:
    if not isinstance(graph, ComputeGraph):
        raise ConfigError(f"{where} needs a ComputeGraph; got {type(graph).__name__}.")
    return graph


def _check_dense(graph: ComputeGraph, value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ConfigError(f"{what} must be a torch.Tensor of shape [S, R] = "
                          f"[{graph.n_senders}, {graph.n_receivers}]; got {type(value).__name__}.")
    shape = (graph.n_senders, graph.n_receivers)
    if tuple(value.shape) != shape:
        hint = (" (per-edge values [E] in canonical order become [S, R] with graph.to_dense)"
                if value.dim() == 1 and value.shape[0] == graph.n_edges else "")
        raise ConfigError(f"{what} must have shape [S, R] = {list(shape)} for {graph!r}; got "
                          f"{list(value.shape)}{hint}.")
    return value.detach().cpu()


def _check_kept(graph: ComputeGraph, kept: Any) -> Tensor:
    kept = _check_dense(graph, kept, "kept")
    if kept.dtype != torch.bool:
        if kept.is_complex() or not bool(((kept == 0) | (kept == 1)).all()):
            raise ConfigError("kept must be a boolean [S, R] mask (or hold only 0 and 1); got "
                              f"dtype {kept.dtype} with other values.")
        kept = kept != 0
    bad = kept & ~graph.edge_mask
    if bool(bad.any()):
        s, r = (int(i) for i in bad.nonzero()[0])
        raise ConfigError(f"kept marks {int(bad.sum())} entries that are not edges of {graph!r}, "
                          f"e.g. sender {graph.senders[s].name!r} -> receiver "
                          f"{graph.receivers[r].name!r} (the sender is not upstream). Only "
                          "entries where graph.edge_mask is True may be kept.")
    return kept.clone()


def _check_scores(graph: ComputeGraph, scores: Any) -> Tensor | None:
    if scores is None:
        return None
    scores = _check_dense(graph, scores, "scores")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ConfigError(f"scores must be a real floating tensor; got dtype {scores.dtype}.")
    scores = scores.to(torch.float32)
    return torch.where(graph.edge_mask, scores, torch.zeros((), dtype=torch.float32))


def _check_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ConfigError(f"metadata must be a dict; got {type(metadata).__name__}.")
    try:
        # normalise (tuples -> lists, ...) so that a JSON round trip gives an equal dict
        normalised = json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"metadata must be JSON-serialisable (str, numbers, bools, None, "
                          f"lists and dicts with str keys): {err}.") from err
    classes = normalised.get("node_classes")
    if classes is not None:
        if not isinstance(classes, dict) or not all(
                isinstance(v, (str, int, float, bool)) for v in classes.values()):
            raise ConfigError("metadata['node_classes'] must map node names to class labels "
                              "(strings or numbers), e.g. {'a9.h6': 'name mover'}; got "
                              f"{classes!r:.200}.")
    return normalised


def _edge_ids_from_names(graph: ComputeGraph, names: Iterable[str]) -> Tensor:
    if isinstance(names, str):
        raise ConfigError(f"Edge names must be a list of names, not one string ({names!r}).")
    ids = [graph.edge_id(name) for name in names]
    return torch.tensor(ids, dtype=torch.long)


def _mask_from_ids(graph: ComputeGraph, ids: Tensor) -> Tensor:
    kept = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    pairs = graph.edge_pairs[ids]
    kept[pairs[:, 0], pairs[:, 1]] = True
    return kept


def _bits_equal(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# ---------------------------------------------------------------------------------- float I/O
def _floats_for_json(values: Tensor) -> list[float]:
    """float32 values ``[E]`` as Python floats whose ``repr`` is short and reads back exactly.

    ``str(np.float32(x))`` is the shortest decimal that rounds to ``x`` as a float32; it is used
    when reading it as a double and rounding to float32 gives ``x`` bit for bit (checked for
    every value), else the exact double value of ``x`` is used.
    """
    arr = values.numpy().astype(np.float32, copy=False)
    short = np.array([float(str(v)) for v in arr], dtype=np.float64)
    exact = arr.astype(np.float64)
    same = short.astype(np.float32).view(np.uint32) == arr.view(np.uint32)
    return np.where(same, short, exact).tolist()


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


# ---------------------------------------------------------------------------------- file I/O
def _atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory + replace).

    Raises:
        OSError: the directory does not exist or is not writable.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _read_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"No {what} file at {str(path)!r}.") from None
    except OSError as err:
        raise ConfigError(f"Cannot read {what} file {str(path)!r}: {err}.") from err


def _read_json(path: str | os.PathLike[str], what: str) -> Any:
    """The parsed JSON of ``path``.

    Raises:
        ConfigError: a missing or unreadable file, or invalid UTF-8/JSON (naming ``what``).
    """
    raw = _read_bytes(path, what)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {err}.") from err


def _suffix(path: str | os.PathLike[str]) -> str:
    return Path(path).suffix.lower()


# ---------------------------------------------------------------------------------- Circuit
@dataclass(frozen=True, eq=False)
class Circuit:
    """A set of kept edges over a :class:`ComputeGraph`, with per-edge scores and metadata.

    Instances are immutable values (``dataclasses.replace``-style helpers return new circuits);
    the tensors are copied to CPU on construction. Two circuits are equal when their graphs,
    kept masks, scores (bit for bit) and metadata are equal.

    Args:
        graph: The computational graph.
        kept: ``[S, R]`` bool mask of kept edges (0/1 numeric masks are accepted and converted).
            Only real edges (``graph.edge_mask``) may be True.
        scores: ``[S, R]`` per-edge scores (signed estimate of the change of the task metric
            when the edge is corrupted, in metric units), or ``None``. Stored as float32, with
            0 off-edge (off-edge entries are overwritten).
        metadata: JSON-serialisable provenance (model, task, algorithm and parameters, seed,
            versions, wall time, faithfulness, ...), optionally ``node_classes:
            {node_name: class_label}``. Normalised through a JSON round trip.

    Raises:
        ConfigError: wrong shapes or dtypes, a kept entry that is not an edge, metadata that is
            not JSON-serialisable, or a malformed ``node_classes``.
    """

    graph: ComputeGraph
    kept: Tensor
    scores: Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        graph = _check_graph(self.graph, "Circuit")
        object.__setattr__(self, "kept", _check_kept(graph, self.kept))
        object.__setattr__(self, "scores", _check_scores(graph, self.scores))
        object.__setattr__(self, "metadata", _check_metadata(self.metadata))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_edges(cls, graph: ComputeGraph, names: Iterable[str],
                   scores: Tensor | Mapping[str, float] | None = None,
                   metadata: Mapping[str, Any] | None = None) -> Circuit:
        """The circuit keeping exactly the named edges.

        Args:
            graph: The computational graph.
            names: Edge names such as ``"a0.h1->a3.h7<q>"`` (duplicates are harmless).
            scores: ``[S, R]`` scores, or ``{edge_name: score}`` (unnamed edges score 0), or
                ``None``.
            metadata: See :class:`Circuit`.

        Returns:
            The circuit.

        Raises:
            UnknownNameError: an unknown or malformed edge name.
            ConfigError: see :class:`Circuit`.
        """
        graph = _check_graph(graph, "Circuit.from_edges")
        kept = _mask_from_ids(graph, _edge_ids_from_names(graph, names))
        if isinstance(scores, Mapping):
            dense = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float32)
            if scores:
                ids = _edge_ids_from_names(graph, list(scores))
                pairs = graph.edge_pairs[ids]
                dense[pairs[:, 0], pairs[:, 1]] = torch.tensor(
                    [float(v) for v in scores.values()], dtype=torch.float32)
            scores = dense
        return cls(graph, kept, scores, dict(metadata or {}))

    @classmethod
    def full(cls, graph: ComputeGraph, scores: Tensor | None = None,
             metadata: Mapping[str, Any] | None = None) -> Circuit:
        """The circuit keeping every edge of ``graph`` (the full model)."""
        graph = _check_graph(graph, "Circuit.full")
        return cls(graph, graph.edge_mask.clone(), scores, dict(metadata or {}))

    @classmethod
    def empty(cls, graph: ComputeGraph, scores: Tensor | None = None,
              metadata: Mapping[str, Any] | None = None) -> Circuit:
        """The circuit keeping no edge (every edge corrupted)."""
        graph = _check_graph(graph, "Circuit.empty")
        kept = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
        return cls(graph, kept, scores, dict(metadata or {}))

    def replace(self, *, kept: Tensor | None = None, scores: Tensor | None = None,
                metadata: Mapping[str, Any] | None = None) -> Circuit:
        """A new circuit with some fields replaced (the others are shared).

        Args:
            kept: New ``[S, R]`` kept mask, or ``None`` to keep this one.
            scores: New ``[S, R]`` scores, or ``None`` to keep these.
            metadata: New metadata (replaces, does not merge), or ``None`` to keep this one.

        Returns:
            The new circuit.
        """
        return Circuit(self.graph, self.kept if kept is None else kept,
                       self.scores if scores is None else scores,
                       self.metadata if metadata is None else dict(metadata))

    def with_metadata(self, **updates: Any) -> Circuit:
        """A new circuit whose metadata is this one's updated with ``updates``.

        Raises:
            ConfigError: the merged metadata is not JSON-serialisable.
        """
        return self.replace(metadata={**self.metadata, **updates})

    # ------------------------------------------------------------------ views
    @property
    def n_edges(self) -> int:
        """Number of kept edges."""
        return int(self.kept.sum())

    @property
    def edge_ids(self) -> Tensor:
        """``[n_edges]`` long: canonical ids (rows of ``graph.edge_pairs``) of the kept edges."""
        return self.graph.to_edges(self.kept).nonzero().flatten()

    @property
    def edges(self) -> list[str]:
        """Names of the kept edges, in canonical edge order."""
        names = self.graph.edge_names
        return [names[i] for i in self.edge_ids.tolist()]

    @property
    def node_mask(self) -> Tensor:
        """``[N]`` bool over ``graph.nodes``: the nodes touched by a kept edge.

        A kept edge touches its sender and every node reading its receiver (all query heads
        sharing a grouped-query k/v receiver).
        """
        graph = self.graph
        touched = torch.zeros(graph.n_nodes, dtype=torch.bool)
        touched[: graph.n_senders] = self.kept.any(1)
        reads = _structure(graph).reads
        touched |= (self.kept.any(0).to(torch.float32) @ reads) > 0
        return touched

    @property
    def nodes(self) -> list[str]:
        """Names of the nodes touched by kept edges, in graph order (see :attr:`node_mask`)."""
        nodes = self.graph.nodes
        return [nodes[i].name for i in self.node_mask.nonzero().flatten().tolist()]

    @property
    def edge_values(self) -> Tensor | None:
        """``[E]`` float32 scores of all real edges in canonical order, or ``None``."""
        return None if self.scores is None else self.graph.to_edges(self.scores)

    def edge_scores(self) -> dict[str, float]:
        """``{edge_name: score}`` for the kept edges, in canonical order.

        Raises:
            ConfigError: the circuit has no scores.
        """
        if self.scores is None:
            raise ConfigError("This circuit has no scores (scores=None); build it with scores, "
                              "e.g. Circuit.from_edges(graph, names, scores=...).")
        ids = self.edge_ids
        values = self.graph.to_edges(self.scores)[ids].tolist()
        names = self.graph.edge_names
        return {names[i]: v for i, v in zip(ids.tolist(), values)}

    def __len__(self) -> int:
        return self.n_edges

    def __contains__(self, edge: object) -> bool:
        if not isinstance(edge, str):
            return False
        try:
            s, r = self.graph.edge_index(edge)
        except CircuitFindError:
            return False
        return bool(self.kept[s, r])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Circuit):
            return NotImplemented
        return (self.graph == other.graph and torch.equal(self.kept, other.kept)
                and _bits_equal(self.scores, other.scores) and self.metadata == other.metadata)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        has_scores = "yes" if self.scores is not None else "no"
        return (f"Circuit({self.n_edges}/{self.graph.n_edges} edges, "
                f"{int(self.node_mask.sum())} nodes, scores={has_scores}, graph={self.graph!r})")

    # ------------------------------------------------------------------ dict / JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the content of :meth:`to_json`).

        Returns:
            ``{"format", "format_version", "graph", "n_edges", "edges", "scores", "metadata"}``
            where ``graph`` is ``graph.config()``, ``edges`` the kept edge names (canonical
            order), and ``scores`` the float32 scores of *all* ``E`` real edges in canonical
            order (bit-exact as JSON numbers) or ``None``.
        """
        values = self.edge_values
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "graph": self.graph.config(),
            "n_edges": self.n_edges,
            "edges": self.edges,
            "scores": None if values is None else _floats_for_json(values),
            "metadata": json.loads(json.dumps(self.metadata)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Circuit:
        """Inverse of :meth:`to_dict`.

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
            kept = _mask_from_ids(graph, _edge_ids_from_names(graph, edges))
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
        return cls(graph, kept, scores, data["metadata"])

    def to_json(self, path: str | os.PathLike[str], indent: int | None = None) -> Path:
        """Write the circuit as JSON (atomically). See the module docstring for the layout.

        Args:
            path: Destination file (conventionally ``*.json``).
            indent: ``json.dumps`` indent; ``None`` writes one compact line.

        Returns:
            The path written.
        """
        text = json.dumps(self.to_dict(), indent=indent) + "\n"
        return _atomic_write(path, text.encode("utf-8"))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Circuit:
        """Read a circuit written by :meth:`to_json`.

        Raises:
            ConfigError: missing or unreadable file, invalid JSON, or bad content.
        """
        data = _read_json(path, "circuit JSON")
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{str(path)!r}: {err}") from err

    # ------------------------------------------------------------------ networkx / GraphML
    def to_networkx(self) -> nx.MultiDiGraph:
        """The circuit as an ``nx.MultiDiGraph``.

        Nodes are :attr:`nodes` with attributes ``layer`` (int; ``input`` is -1, ``logits`` is
        ``n_layers``), ``kind``, ``head`` (attention heads only; absent elsewhere) and ``class``
        (str; only for nodes in ``metadata["node_classes"]``). Each kept edge gives one nx edge
        from its sender to each node reading its receiver (one node, except grouped-query k/v
        receivers, read by every query head sharing them), with key and ``name`` = the edge name
        and attributes ``receiver``, ``qkv`` (``"q"|"k"|"v"|""``) and ``score`` (float; absent
        when the circuit has no scores). Graph attributes: ``format``, ``format_version``,
        ``graph_config`` and ``metadata`` (JSON strings), ``n_edges``.

        Returns:
            The graph (nodes and edges in graph / canonical order).
        """
        import networkx as nx

        graph = self.graph
        g = nx.MultiDiGraph()
        g.graph.update(format=FORMAT_NAME, format_version=FORMAT_VERSION,
                       graph_config=json.dumps(graph.config(), sort_keys=True),
                       metadata=json.dumps(self.metadata, sort_keys=True),
                       n_edges=self.n_edges)
        classes = self.metadata.get("node_classes") or {}
        for name in self.nodes:
            node = graph.nodes[graph.node_index(name)]
            attrs: dict[str, Any] = {"layer": node.layer, "kind": node.kind}
            if node.head is not None:
                attrs["head"] = node.head
            if name in classes:
                attrs["class"] = str(classes[name])
            g.add_node(name, **attrs)
        ids = self.edge_ids
        pairs = graph.edge_pairs[ids].tolist()
        values = (self.graph.to_edges(self.scores)[ids].tolist()
                  if self.scores is not None else [None] * len(pairs))
        qkv = _structure(graph).qkv
        names = graph.edge_names
        for edge_id, (s, r), value in zip(ids.tolist(), pairs, values):
            receiver = graph.receivers[r]
            attrs = {"name": names[edge_id], "receiver": receiver.name, "qkv": qkv[r]}
            if value is not None:
                attrs["score"] = float(value)
            for target in receiver.nodes:
                g.add_edge(graph.senders[s].name, target, key=names[edge_id], **attrs)
        return g

    @classmethod
    def from_networkx(cls, g: Any) -> Circuit:
        """Inverse of :meth:`to_networkx` (and of the graph read from :meth:`to_graphml`).

        The kept edges come from the edges' ``name`` attributes. Scores come from the graph
        attribute ``scores_f32`` when present (all edges, as written by :meth:`to_graphml`),
        else from the edges' ``score`` attributes (kept edges; others score 0), else ``None``.

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
            ids = _edge_ids_from_names(graph, list(names))
        except CircuitFindError as err:
            raise ConfigError(f"Circuit edges do not fit the graph {graph!r}: {err}") from err
        kept = _mask_from_ids(graph, ids)
        scores: Tensor | None = None
        if "scores_f32" in attrs:
            scores = graph.to_dense(_scores_from_b64(str(attrs["scores_f32"]), graph.n_edges))
        elif names and all(v is not None for v in names.values()):
            values = torch.zeros(graph.n_edges, dtype=torch.float32)
            values[ids] = torch.tensor(list(names.values()), dtype=torch.float64).to(torch.float32)
            scores = graph.to_dense(values)
        return cls(graph, kept, scores, metadata)

    def to_graphml(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_networkx` as GraphML (atomically), with all scores for a lossless trip.

        Returns:
            The path written.
        """
        import io

        import networkx as nx

        g = self.to_networkx()
        if self.scores is not None:
            g.graph["scores_f32"] = _scores_to_b64(self.edge_values)
        buffer = io.BytesIO()
        nx.write_graphml(g, buffer, encoding="utf-8", prettyprint=True)
        return _atomic_write(path, buffer.getvalue())

    @classmethod
    def from_graphml(cls, path: str | os.PathLike[str]) -> Circuit:
        """Read a circuit written by :meth:`to_graphml`.

        Raises:
            ConfigError: missing or unreadable file, invalid GraphML, or bad content.
        """
        import io
        import xml.etree.ElementTree as ET

        import networkx as nx

        raw = _read_bytes(path, "circuit GraphML")
        try:
            g = nx.read_graphml(io.BytesIO(raw), node_type=str, edge_key_type=str,
                                force_multigraph=True)
        except (ET.ParseError, nx.NetworkXError, ValueError, KeyError) as err:
            raise ConfigError(f"{str(path)!r} is not a valid GraphML file: {err}.") from err
        try:
            return cls.from_networkx(g)
        except ConfigError as err:
            raise ConfigError(f"{str(path)!r}: {err}") from err

    # ------------------------------------------------------------------ dispatch
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path`` by suffix: ``.json`` (:meth:`to_json`), ``.graphml``
        (:meth:`to_graphml`).

        Raises:
            ConfigError: another suffix (images are written with :meth:`render`).
        """
        suffix = _suffix(path)
        if suffix == ".json":
            return self.to_json(path)
        if suffix == ".graphml":
            return self.to_graphml(path)
        raise ConfigError(f"Cannot save a circuit as {suffix or 'a file without suffix'!r} "
                          f"({str(path)!r}); use one of {list(_DATA_SUFFIXES)}, or "
                          "Circuit.render for .svg/.pdf/.png/.dot.")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Circuit:
        """Read a circuit file by suffix: ``.json`` or ``.graphml``.

        Raises:
            ConfigError: another suffix, or a bad file.
        """
        suffix = _suffix(path)
        if suffix == ".json":
            return cls.from_json(path)
        if suffix == ".graphml":
            return cls.from_graphml(path)
        raise ConfigError(f"Cannot load a circuit from {str(path)!r}: the suffix must be one "
                          f"of {list(_DATA_SUFFIXES)}.")

    def render(self, path: str | os.PathLike[str], format: str | None = None,
               renderer: str | None = None, options: RenderOptions | None = None) -> Path:
        """Draw the circuit (Graphviz when ``dot`` is on the PATH, else matplotlib); see
        :func:`circuitfind.graphs.render.render`."""
        from circuitfind.graphs.render import render

        return render(self, path, format=format, renderer=renderer, options=options)


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


# ---------------------------------------------------------------------------------- selection
def _edge_keys(graph: ComputeGraph, scores: Tensor, absolute: bool) -> Tensor:
    values = graph.to_edges(_check_scores(graph, scores))
    return values.abs() if absolute else values


def _selection_metadata(metadata: Mapping[str, Any] | None, selection: dict[str, Any]
                        ) -> dict[str, Any]:
    return {**dict(metadata or {}), "selection": selection}


def select_top_n(graph: ComputeGraph, scores: Tensor, n: int, absolute: bool = True,
                 metadata: Mapping[str, Any] | None = None) -> Circuit:
    """The circuit of the ``n`` real edges with the highest scores.

    Ranks the edges by ``|score|`` (``absolute=True``, the usual convention for attribution
    scores whose sign says in which direction the edge moves the metric) or by the signed score
    (``absolute=False``); ties are broken by canonical edge order (lower edge id first), so the
    result is deterministic.

    Args:
        graph: The computational graph.
        scores: ``[S, R]`` per-edge scores (metric units); off-edge entries are ignored. Stored
            (as float32) in the returned circuit.
        n: Number of edges to keep, ``0 <= n <= graph.n_edges``.
        absolute: Rank by absolute value (True) or signed value (False).
        metadata: Metadata of the result; ``metadata["selection"]`` is set to
            ``{"method": "top_n", "n": n, "absolute": absolute}``.

    Returns:
        A circuit with exactly ``n`` kept edges.

    Raises:
        ConfigError: ``n`` not an int in range, ``scores`` of the wrong shape, or NaN scores on
            real edges (their rank is undefined).

    References:
        Conmy et al. 2023, "Towards Automated Circuit Discovery" (ACDC), and Syed et al. 2023,
        "Attribution Patching Outperforms Automated Circuit Discovery" (top-n edges by |EAP|).
    """
    graph = _check_graph(graph, "select_top_n")
    if isinstance(n, bool):
        raise ConfigError(f"n must be an int >= 0; got {n!r}.")
    try:
        n = operator.index(n)
    except TypeError:
        raise ConfigError(f"n must be an int >= 0; got {n!r}.") from None
    if not 0 <= n <= graph.n_edges:
        raise ConfigError(f"n must be between 0 and the graph's number of edges "
                          f"({graph.n_edges}); got {n}.")
    keys = _edge_keys(graph, scores, absolute)
    n_nan = int(torch.isnan(keys).sum())
    if n_nan:
        raise ConfigError(f"{n_nan} real edges have NaN scores; their rank is undefined. Fix the "
                          "scores (e.g. torch.nan_to_num) before selecting edges.")
    order = torch.sort(keys, descending=True, stable=True).indices[:n]
    kept = _mask_from_ids(graph, order)
    return Circuit(graph, kept, scores, _selection_metadata(
        metadata, {"method": "top_n", "n": n, "absolute": bool(absolute)}))


def select_threshold(graph: ComputeGraph, scores: Tensor, threshold: float,
                     absolute: bool = True, metadata: Mapping[str, Any] | None = None) -> Circuit:
    """The circuit of the real edges whose score (or ``|score|``) is ``>= threshold``.

    The number of kept edges never increases as ``threshold`` grows. NaN scores are never kept.

    Args:
        graph: The computational graph.
        scores: ``[S, R]`` per-edge scores (metric units); off-edge entries are ignored.
        threshold: Cut-off in the units of the scores (a real number, not NaN).
        absolute: Compare ``|score|`` (True) or the signed score (False).
        metadata: Metadata of the result; ``metadata["selection"]`` is set to
            ``{"method": "threshold", "threshold": threshold, "absolute": absolute}``.

    Returns:
        The circuit.

    Raises:
        ConfigError: ``threshold`` not a real number, or ``scores`` of the wrong shape.

    References:
        Conmy et al. 2023 (ACDC keeps an edge when its effect exceeds a threshold tau).
    """
    graph = _check_graph(graph, "select_threshold")
    if isinstance(threshold, bool):
        raise ConfigError(f"threshold must be a real number; got {threshold!r}.")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be a real number; got {threshold!r}.") from None
    if math.isnan(threshold):
        raise ConfigError("threshold must be a real number; got NaN.")
    keys = _edge_keys(graph, scores, absolute)
    kept = _mask_from_ids(graph, (keys >= threshold).nonzero().flatten())
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
    products with the ``[R, N]`` receiver-to-node incidence; rounds are bounded by the graph's
    depth.

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
    reads = _structure(graph).reads  # [R, N]
    n_senders = graph.n_senders
    kept = circuit.kept.clone()
    sink = torch.ones(1, dtype=torch.bool)
    while True:
        # node n has input iff some receiver it reads has a kept incoming edge
        has_in = (kept.any(0).to(torch.float32) @ reads) > 0  # [N]
        has_in[0] = True  # input: the embeddings need no incoming edge
        # receiver r is alive iff some node reading it has a kept outgoing edge (logits: sink)
        has_out = torch.cat([kept.any(1), sink])  # [N]
        alive = (reads @ has_out.to(torch.float32)) > 0  # [R]
        new = kept & has_in[:n_senders, None] & alive[None, :]
        if torch.equal(new, kept):
            break
        kept = new
    if torch.equal(kept, circuit.kept):
        return circuit
    return circuit.replace(kept=kept)
