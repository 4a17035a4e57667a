"""Circuits: a set of kept edges over a :class:`ComputeGraph`, with scores and metadata.

A :class:`Circuit` is an immutable value: the graph, a ``[S, R]`` boolean mask of kept edges
(only real edges of the graph may be kept), optional ``[S, R]`` float32 per-edge scores (the
signed estimate of the metric change when the edge is corrupted; 0 off-edge), and a
JSON-serialisable ``metadata`` dict (model, task, algorithm and its parameters, data seed,
versions, wall time, faithfulness ...; optionally ``node_classes: {node_name: class_label}``,
used to colour nodes in exports and renderings).

This module holds the value type and its validation. The other jobs live next to it, and
:class:`Circuit` keeps thin methods that call them:

- :mod:`circuitfind.graphs.selection`: :func:`select_top_n`, :func:`select_threshold`,
  :func:`prune_dangling` (pure functions returning a new circuit);
- :mod:`circuitfind.graphs.io`: the JSON, GraphML, networkx and MIB codecs
  (``circuit.to_json``, ``Circuit.load``, ``circuit.to_networkx`` ...);
- :mod:`circuitfind.graphs.render`: drawings (``circuit.render``).

Those modules import :class:`Circuit`; the thin methods import them when called (the one
place the graphs package imports in both directions, kept to method bodies).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import Tensor

from circuitfind.errors import CircuitFindError, ConfigError
from circuitfind.graphs.graph import ComputeGraph

if TYPE_CHECKING:  # pragma: no cover
    import networkx as nx

    from circuitfind.graphs.render import RenderOptions

__all__ = ["Circuit", "check_graph", "check_scores"]

# ---------------------------------------------------------------------------------- validation
def check_graph(graph: Any, where: str) -> ComputeGraph:
    """``graph`` if it is a :class:`ComputeGraph`.

    Raises:
        ConfigError: it is not (the message names ``where``).
    """
    if not isinstance(graph, ComputeGraph):
        raise ConfigError(f"{where} needs a ComputeGraph; got {type(graph).__name__}.")
    return graph


def _check_kept(graph: ComputeGraph, kept: Any) -> Tensor:
    kept = graph.check_edge_matrix(kept, "kept").detach().cpu()
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


@overload
def check_scores(graph: ComputeGraph, scores: None) -> None: ...


@overload
def check_scores(graph: ComputeGraph, scores: Tensor) -> Tensor: ...


@overload
def check_scores(graph: ComputeGraph, scores: Any) -> Tensor | None: ...


def check_scores(graph: ComputeGraph, scores: Any) -> Tensor | None:
    """Per-edge scores as a circuit stores them.

    Args:
        graph: The graph the scores belong to.
        scores: ``[S, R]`` real-valued scores (any float or integer dtype, any device), or
            ``None``.

    Returns:
        ``[S, R]`` float32 on the CPU with 0 off the real edges (a copy), or ``None``.

    Raises:
        ConfigError: not a tensor, the wrong shape, or a complex or bool dtype.
    """
    if scores is None:
        return None
    scores = graph.check_edge_matrix(scores, "scores", real=True).detach().cpu()
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


def _bits_equal(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


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
        graph = check_graph(self.graph, "Circuit")
        object.__setattr__(self, "kept", _check_kept(graph, self.kept))
        object.__setattr__(self, "scores", check_scores(graph, self.scores))
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
        graph = check_graph(graph, "Circuit.from_edges")
        kept = graph.mask_of(graph.edge_ids_of(names))
        if isinstance(scores, Mapping):
            dense = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float32)
            if scores:
                ids = graph.edge_ids_of(list(scores))
                pairs = graph.edge_pairs[ids]
                dense[pairs[:, 0], pairs[:, 1]] = torch.tensor(
                    [float(v) for v in scores.values()], dtype=torch.float32)
            scores = dense
        return cls(graph, kept, scores, dict(metadata or {}))

    @classmethod
    def full(cls, graph: ComputeGraph, scores: Tensor | None = None,
             metadata: Mapping[str, Any] | None = None) -> Circuit:
        """The circuit keeping every edge of ``graph`` (the full model)."""
        graph = check_graph(graph, "Circuit.full")
        return cls(graph, graph.edge_mask.clone(), scores, dict(metadata or {}))

    @classmethod
    def empty(cls, graph: ComputeGraph, scores: Tensor | None = None,
              metadata: Mapping[str, Any] | None = None) -> Circuit:
        """The circuit keeping no edge (every edge corrupted)."""
        graph = check_graph(graph, "Circuit.empty")
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
        touched |= graph.nodes_reading(self.kept.any(0))
        return touched

    @property
    def nodes(self) -> list[str]:
        """Names of the nodes touched by kept edges, in graph order (see :attr:`node_mask`)."""
        nodes = self.graph.nodes
        return [nodes[i].name for i in self.node_mask.nonzero().flatten().tolist()]

    @property
    def edge_values(self) -> Tensor | None:
        """Every real edge's score, without the structural zeros of :attr:`scores`.

        :attr:`scores` is the dense ``[n_senders, n_receivers]`` matrix, whose entries that
        are not edges (a sender not upstream of the receiver) hold 0; this is the ``[E]`` vector
        of the ``E = graph.n_edges`` real edges, kept or not, in canonical order:
        ``edge_values[i]`` is the score of ``graph.edge_names[i]``. A zero in it is a real
        score of zero. What the scores mean (metric change or importance, unit, direction)
        is in ``metadata["scores"]``; :meth:`edge_scores` gives the kept edges by name.

        Returns:
            ``[E]`` tensor in the scores' dtype, or ``None`` for a circuit without
            scores.

        Example:
            >>> top = circuit.edge_values.abs().argsort(descending=True)[:10]
            >>> [circuit.graph.edge_names[i] for i in top]
        """
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

    # unhashable (it holds tensors); typeshed types object.__hash__ as a method only
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        has_scores = "yes" if self.scores is not None else "no"
        return (f"Circuit({self.n_edges}/{self.graph.n_edges} edges, "
                f"{int(self.node_mask.sum())} nodes, scores={has_scores}, graph={self.graph!r})")

    # ------------------------------------------------------------------ codecs (graphs/io.py)
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; see :func:`circuitfind.graphs.io.to_dict`."""
        from circuitfind.graphs import io

        return io.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Circuit:
        """Inverse of :meth:`to_dict`; see :func:`circuitfind.graphs.io.from_dict`.

        Raises:
            ConfigError: not a circuit dict, a newer format version, or bad content.
        """
        from circuitfind.graphs import io

        return io.from_dict(data)

    def to_json(self, path: str | os.PathLike[str], indent: int | None = None) -> Path:
        """Write the circuit as JSON (atomically); see :func:`circuitfind.graphs.io.to_json`.

        Returns:
            The path written.
        """
        from circuitfind.graphs import io

        return io.to_json(self, path, indent)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Circuit:
        """Read a circuit written by :meth:`to_json`; see
        :func:`circuitfind.graphs.io.from_json`.

        Raises:
            ConfigError: missing or unreadable file, invalid JSON, or bad content.
        """
        from circuitfind.graphs import io

        return io.from_json(path)

    def to_networkx(self) -> nx.MultiDiGraph:
        """The circuit as an ``nx.MultiDiGraph``; see :func:`circuitfind.graphs.io.to_networkx`
        for its nodes, edges and attributes."""
        from circuitfind.graphs import io

        return io.to_networkx(self)

    @classmethod
    def from_networkx(cls, g: Any) -> Circuit:
        """Inverse of :meth:`to_networkx`; see :func:`circuitfind.graphs.io.from_networkx`.

        Raises:
            ConfigError: missing graph attributes, an edge without ``name``, or unknown names.
        """
        from circuitfind.graphs import io

        return io.from_networkx(g)

    def to_graphml(self, path: str | os.PathLike[str]) -> Path:
        """Write GraphML (atomically, lossless); see :func:`circuitfind.graphs.io.to_graphml`.

        Returns:
            The path written.
        """
        from circuitfind.graphs import io

        return io.to_graphml(self, path)

    @classmethod
    def from_graphml(cls, path: str | os.PathLike[str]) -> Circuit:
        """Read a circuit written by :meth:`to_graphml`.

        Raises:
            ConfigError: missing or unreadable file, invalid GraphML, or bad content.
        """
        from circuitfind.graphs import io

        return io.from_graphml(path)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path`` by suffix: ``.json`` or ``.graphml``; see
        :func:`circuitfind.graphs.io.save`.

        Raises:
            ConfigError: another suffix (images are written with :meth:`render`).
        """
        from circuitfind.graphs import io

        return io.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Circuit:
        """Read a circuit file by suffix: ``.json`` or ``.graphml``; see
        :func:`circuitfind.graphs.io.load`.

        Raises:
            ConfigError: another suffix, or a bad file.
        """
        from circuitfind.graphs import io

        return io.load(path)

    def render(self, path: str | os.PathLike[str], format: str | None = None,
               renderer: str | None = None, options: RenderOptions | None = None) -> Path:
        """Draw the circuit (Graphviz when ``dot`` is on the PATH, else matplotlib); see
        :func:`circuitfind.graphs.render.render`."""
        from circuitfind.graphs.render import render

        return render(self, path, format=format, renderer=renderer, options=options)
