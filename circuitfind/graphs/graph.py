"""The computational graph of a transformer: nodes, receivers, and dense edge indexing.

Nodes (senders write to the residual stream; ``logits`` only reads it):

- ``input``: token (+ position) embeddings, i.e. the residual stream entering block 0;
- ``a{L}.h{H}``: the output of attention head H of layer L (its slice of ``W_O``);
- ``m{L}``: the output of the MLP of layer L;
- ``logits``: the unembedding (reads the final residual stream through the final norm).

Receivers are the places a node reads the residual stream:

- ``a{L}.h{H}<q>``: the query input of head H;
- ``a{L}.h{H}<k>``, ``a{L}.h{H}<v>``: key and value inputs, one per head in multi-head attention;
- ``a{L}.kv{G}<k>``, ``a{L}.kv{G}<v>``: **grouped-query attention** (e.g. Llama, stories260k):
  keys and values are computed once per key/value head G and shared by the query heads
  ``G*r .. G*r + r - 1`` (``r = n_heads / n_kv_heads``). Patching the k input of query head H
  alone is not something the model computes, so the graph has one k and one v receiver per
  key/value head, exactly as the model does (transformer-lens' ``hook_k_input`` is
  ``[batch, pos, n_kv_heads, d_model]``). Nothing is approximated: an edge ``u->a3.kv1<k>``
  corrupts what key/value head 1 of layer 3 reads from ``u``, for all query heads sharing it.
- ``m{L}``: the MLP input; ``logits``: the final residual stream.

An edge ``sender->receiver`` exists for every sender upstream of the receiver: senders of earlier
layers and ``input`` for attention receivers; additionally the same layer's heads for the MLP
(unless attention and MLP run in parallel); every sender for ``logits``. Names follow EAP-IG:
``a0.h1->a3.h7<q>``, ``m2->m5``, ``input->a0.h0<v>``, ``a11.h0->logits``.

Dense indexing: senders ``0..S-1`` in forward order (``input``, then per layer its heads, then its
MLP), receivers ``0..R-1`` in forward order (per layer: q of each head, k of each kv head, v of
each kv head, the MLP; then ``logits``). Sender ``s`` feeds receiver ``r`` iff
``s < n_upstream[r]``, so scores and masks are ``[S, R]`` tensors with :attr:`edge_mask` marking
real edges. GPT-2 small (12 layers, 12 heads) has 158 nodes and 32,491 edges.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError, UnknownNameError


@dataclass(frozen=True)
class Node:
    """A node of the computational graph.

    Attributes:
        name: ``input``, ``a{L}.h{H}``, ``m{L}`` or ``logits``.
        kind: ``"input"``, ``"attention"``, ``"mlp"`` or ``"logits"``.
        layer: Block index; ``input`` is layer -1 and ``logits`` is layer ``n_layers``.
        head: Head index for attention nodes, else ``None``.
    """

    name: str
    kind: str
    layer: int
    head: int | None = None


@dataclass(frozen=True)
class Receiver:
    """A place where a node reads the residual stream.

    Attributes:
        name: ``a{L}.h{H}<q>``, ``a{L}.h{H}<k|v>`` (MHA), ``a{L}.kv{G}<k|v>`` (GQA), ``m{L}``,
            ``logits``.
        kind: ``"q"``, ``"k"``, ``"v"``, ``"mlp"`` or ``"logits"``.
        layer: Block index (``n_layers`` for ``logits``).
        head: Query head (q), key/value head (k, v) or ``None``.
        nodes: Names of the nodes that read through this receiver (several query heads for a
            grouped-query k/v receiver).
    """

    name: str
    kind: str
    layer: int
    head: int | None
    nodes: tuple[str, ...]

    @property
    def qkv(self) -> str | None:
        """``"q"``, ``"k"``, ``"v"`` for attention inputs, else ``None``."""
        return self.kind if self.kind in ("q", "k", "v") else None


_EDGE_RE = re.compile(r"^(?P<s>[^-<>]+)->(?P<r>[^-]+)$")


class ComputeGraph:
    """Nodes, receivers and edges of a transformer, built in closed form from its config.

    Args:
        n_layers: Number of blocks.
        n_heads: Query heads per layer.
        n_kv_heads: Key/value heads per layer (``None`` or ``n_heads`` for multi-head attention;
            fewer for grouped-query attention; must divide ``n_heads``).
        attn_only: The model has no MLPs.
        parallel_attn_mlp: Attention and MLP read the same residual (GPT-J, NeoX); then an MLP
            does not read its own layer's heads.
        model_name: Recorded for provenance.

    Raises:
        ConfigError: non-positive sizes or ``n_kv_heads`` not dividing ``n_heads``.
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int | None = None,
                 attn_only: bool = False, parallel_attn_mlp: bool = False,
                 model_name: str | None = None) -> None:
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_layers < 1 or n_heads < 1 or n_kv_heads < 1:
            raise ConfigError(f"Graph sizes must be >= 1; got n_layers={n_layers}, "
                              f"n_heads={n_heads}, n_kv_heads={n_kv_heads}.")
        if n_heads % n_kv_heads:
            raise ConfigError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads}).")
        self.n_layers = int(n_layers)
        self.n_heads = int(n_heads)
        self.n_kv_heads = int(n_kv_heads)
        self.attn_only = bool(attn_only)
        self.parallel_attn_mlp = bool(parallel_attn_mlp)
        self.model_name = model_name
        self._build()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: Any) -> ComputeGraph:
        """Build the graph of a ``TransformerBridge`` (or anything with a transformer-lens cfg)."""
        cfg = getattr(model, "cfg", model)
        try:
            n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
        except AttributeError as err:
            raise ConfigError("ComputeGraph.from_model needs a model with a transformer-lens cfg "
                              "(n_layers, n_heads); load it with circuitfind.load_model.") from err
        kv = getattr(cfg, "n_key_value_heads", None)
        return cls(n_layers, n_heads, kv if kv else None,
                   attn_only=bool(getattr(cfg, "attn_only", False)),
                   parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
                   model_name=getattr(cfg, "model_name", None))

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable), for saving and :meth:`from_config`."""
        return {"n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "attn_only": self.attn_only,
                "parallel_attn_mlp": self.parallel_attn_mlp, "model_name": self.model_name}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ComputeGraph:
        """Inverse of :meth:`config`."""
        return cls(**config)

    @property
    def is_grouped_query(self) -> bool:
        """True when k/v receivers are per key/value head (n_kv_heads < n_heads)."""
        return self.n_kv_heads != self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def _build(self) -> None:
        nodes: list[Node] = [Node("input", "input", -1)]
        receivers: list[Receiver] = []
        n_up: list[int] = []
        # sender slices per layer: heads [head_start[l], head_start[l]+H), mlp index mlp_index[l]
        self.head_start: list[int] = []
        self.mlp_index: list[int | None] = []
        # receiver slices per layer
        self.q_start: list[int] = []
        self.k_start: list[int] = []
        self.v_start: list[int] = []
        self.mlp_receiver: list[int | None] = []
        gqa = self.is_grouped_query
        for layer in range(self.n_layers):
            upstream = len(nodes)
            self.q_start.append(len(receivers))
            for h in range(self.n_heads):
                receivers.append(Receiver(f"a{layer}.h{h}<q>", "q", layer, h, (f"a{layer}.h{h}",)))
                n_up.append(upstream)
            for kind, starts in (("k", self.k_start), ("v", self.v_start)):
                starts.append(len(receivers))
                for g in range(self.n_kv_heads):
                    if gqa:
                        heads = range(g * self.group_size, (g + 1) * self.group_size)
                        receivers.append(Receiver(f"a{layer}.kv{g}<{kind}>", kind, layer, g,
                                                  tuple(f"a{layer}.h{h}" for h in heads)))
                    else:
                        receivers.append(Receiver(f"a{layer}.h{g}<{kind}>", kind, layer, g,
                                                  (f"a{layer}.h{g}",)))
                    n_up.append(upstream)
            self.head_start.append(len(nodes))
            for h in range(self.n_heads):
                nodes.append(Node(f"a{layer}.h{h}", "attention", layer, h))
            if self.attn_only:
                self.mlp_index.append(None)
                self.mlp_receiver.append(None)
                continue
            self.mlp_receiver.append(len(receivers))
            receivers.append(Receiver(f"m{layer}", "mlp", layer, None, (f"m{layer}",)))
            n_up.append(upstream if self.parallel_attn_mlp else len(nodes))
            self.mlp_index.append(len(nodes))
            nodes.append(Node(f"m{layer}", "mlp", layer))
        self.n_senders = len(nodes)
        receivers.append(Receiver("logits", "logits", self.n_layers, None, ("logits",)))
        n_up.append(self.n_senders)
        nodes.append(Node("logits", "logits", self.n_layers))
        self.nodes: tuple[Node, ...] = tuple(nodes)
        self.senders: tuple[Node, ...] = tuple(nodes[:-1])
        self.receivers: tuple[Receiver, ...] = tuple(receivers)
        self.n_receivers = len(receivers)
        self.n_upstream = torch.tensor(n_up, dtype=torch.long)
        self._node_index = {n.name: i for i, n in enumerate(self.nodes)}
        self._receiver_index = {r.name: i for i, r in enumerate(self.receivers)}

    # ------------------------------------------------------------------ edges
    @cached_property
    def edge_mask(self) -> Tensor:
        """``[S, R]`` bool: True where sender s feeds receiver r (a real edge)."""
        return torch.arange(self.n_senders)[:, None] < self.n_upstream[None, :]

    @property
    def n_nodes(self) -> int:
        """Number of nodes, ``logits`` included."""
        return len(self.nodes)

    @cached_property
    def n_edges(self) -> int:
        """Number of edges (real entries of :attr:`edge_mask`)."""
        return int(self.n_upstream.sum())

    @cached_property
    def edge_pairs(self) -> Tensor:
        """``[E, 2]`` (sender, receiver) indices of every edge, ordered by receiver then sender.

        This is the canonical edge order (edge id ``e`` is row ``e``).
        """
        r = torch.repeat_interleave(torch.arange(self.n_receivers), self.n_upstream)
        starts = torch.cumsum(self.n_upstream, 0) - self.n_upstream
        s = torch.arange(self.n_edges) - torch.repeat_interleave(starts, self.n_upstream)
        return torch.stack([s, r], 1)

    @cached_property
    def edge_names(self) -> tuple[str, ...]:
        """Every edge's name in canonical order (see :attr:`edge_pairs`)."""
        return tuple(f"{self.senders[s].name}->{self.receivers[r].name}"
                     for s, r in self.edge_pairs.tolist())

    @cached_property
    def _edge_id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.edge_names)}

    def node_index(self, name: str) -> int:
        """Index of node ``name`` in :attr:`nodes` (senders share it: sender s is node s).

        Raises:
            UnknownNameError: no such node.
        """
        try:
            return self._node_index[name]
        except KeyError:
            raise UnknownNameError(self._unknown("node", name, self._node_index)) from None

    def receiver_index(self, name: str) -> int:
        """Index of receiver ``name`` in :attr:`receivers`.

        Raises:
            UnknownNameError: no such receiver.
        """
        try:
            return self._receiver_index[name]
        except KeyError:
            raise UnknownNameError(self._unknown("receiver", name, self._receiver_index)) from None

    def edge_index(self, name: str) -> tuple[int, int]:
        """``(sender, receiver)`` indices of edge ``name`` (e.g. ``"a0.h1->a3.h7<q>"``).

        Raises:
            UnknownNameError: malformed name, unknown endpoint, or the sender is not upstream.
        """
        match = _EDGE_RE.match(name)
        if not match:
            raise UnknownNameError(f"{name!r} is not an edge name; edges look like "
                                   "'a0.h1->a3.h7<q>', 'm2->m5' or 'a11.h0->logits'.")
        s = self.node_index(match["s"])
        if s >= self.n_senders:
            raise UnknownNameError(f"{match['s']!r} cannot send: 'logits' has no output.")
        r = self.receiver_index(match["r"])
        if s >= int(self.n_upstream[r]):
            raise UnknownNameError(f"{name!r} is not an edge: {match['s']} is not upstream of "
                                   f"{match['r']}.")
        return s, r

    def edge_id(self, name: str) -> int:
        """Canonical edge id of ``name`` (row of :attr:`edge_pairs`).

        Raises:
            UnknownNameError: see :meth:`edge_index`.
        """
        if name not in self._edge_id:
            self.edge_index(name)  # raises the precise error
        return self._edge_id[name]

    def edge_ids_of(self, names: Iterable[str]) -> Tensor:
        """Canonical edge ids of ``names``, in the order given (duplicates repeat).

        Args:
            names: Edge names such as ``"a0.h1->a3.h7<q>"``.

        Returns:
            ``[len(names)]`` long tensor of edge ids (rows of :attr:`edge_pairs`).

        Raises:
            ConfigError: ``names`` is one string instead of a list of names.
            UnknownNameError: see :meth:`edge_index`.
        """
        if isinstance(names, str):
            raise ConfigError(f"Edge names must be a list of names, not one string ({names!r}).")
        return torch.tensor([self.edge_id(name) for name in names], dtype=torch.long)

    def edge_name(self, sender: int, receiver: int) -> str:
        """Name of the edge from sender index to receiver index.

        Raises:
            UnknownNameError: the pair is not an edge.
        """
        if not (0 <= receiver < self.n_receivers and 0 <= sender < int(self.n_upstream[receiver])):
            raise UnknownNameError(f"(sender={sender}, receiver={receiver}) is not an edge.")
        return f"{self.senders[sender].name}->{self.receivers[receiver].name}"

    # ------------------------------------------------------------------ tensors
    def to_dense(self, values: Tensor) -> Tensor:
        """Scatter per-edge values ``[..., E]`` (canonical order) into ``[..., S, R]`` (0 elsewhere)."""
        out = values.new_zeros(*values.shape[:-1], self.n_senders, self.n_receivers)
        out[..., self.edge_mask] = values[..., self._dense_order]
        return out

    def to_edges(self, dense: Tensor) -> Tensor:
        """Gather ``[..., S, R]`` values of the real edges into ``[..., E]`` (canonical order)."""
        s, r = self.edge_pairs[:, 0], self.edge_pairs[:, 1]
        return dense[..., s, r]

    @cached_property
    def _dense_order(self) -> Tensor:
        # edge_mask flattens row-major (sender-major); map to canonical (receiver-major) ids
        s, r = self.edge_pairs[:, 0], self.edge_pairs[:, 1]
        flat = s * self.n_receivers + r
        return torch.argsort(flat)

    def full_mask(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[S, R]`` mask keeping every edge (1 on real edges, 0 elsewhere)."""
        return self.edge_mask.to(dtype)

    def mask_of(self, ids: Tensor) -> Tensor:
        """``[S, R]`` bool mask, True exactly at the edges with canonical ids ``ids`` ``[n]``."""
        mask = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)
        pairs = self.edge_pairs[ids]
        mask[pairs[:, 0], pairs[:, 1]] = True
        return mask

    def check_edge_matrix(self, value: Any, what: str, *, batched: bool = False,
                          real: bool = False) -> Tensor:
        """Check that ``value`` is a dense per-edge tensor of this graph: ``[S, R]``.

        The one shape check for scores and keep-masks wherever they enter circuitfind (a
        circuit's kept mask and scores, selection, the engine's masks, ROC, faithfulness
        curves, algorithm conformance).

        Args:
            value: The tensor to check (any dtype and device unless ``real``).
            what: How the message names it (``"scores"``, ``"edge_roc: scores"``).
            batched: Also accept a stack ``[K, S, R]`` (K masks evaluated together).
            real: Also require real numbers (not complex, not bool).

        Returns:
            ``value``, unchanged.

        Raises:
            ConfigError: not a tensor; another shape (per-edge values ``[E]`` get a hint to
                :meth:`to_dense`); with ``real``, a complex or bool dtype.
        """
        s, r = self.n_senders, self.n_receivers
        want = f"[S, R] = [{s}, {r}]" + (f" or [K, S, R] = [K, {s}, {r}]" if batched else "")
        if not isinstance(value, Tensor):
            raise ConfigError(f"{what} must be a torch.Tensor of shape {want}; got "
                              f"{type(value).__name__}.")
        shape = tuple(value.shape)
        if not (shape == (s, r) or (batched and len(shape) == 3 and shape[1:] == (s, r))):
            hint = (" (per-edge values [E] in canonical order become [S, R] with graph.to_dense)"
                    if shape == (self.n_edges,) else "")
            raise ConfigError(f"{what} must have shape {want} for {self!r}; got "
                              f"{list(shape)}{hint}.")
        if real and (value.is_complex() or value.dtype == torch.bool):
            raise ConfigError(f"{what} must be real numbers (a floating tensor); got dtype "
                              f"{value.dtype}.")
        return value

    # ------------------------------------------------------------------ who reads what
    @cached_property
    def _reads(self) -> Tensor:
        """``[R, N]`` float32: 1 where node n reads receiver r (a grouped-query k/v receiver is
        read by every query head sharing it)."""
        reads = torch.zeros(self.n_receivers, self.n_nodes, dtype=torch.float32)
        for r, receiver in enumerate(self.receivers):
            for name in receiver.nodes:
                reads[r, self._node_index[name]] = 1.0
        return reads

    def nodes_reading(self, receivers: Tensor) -> Tensor:
        """The nodes that read at least one of the marked receivers.

        Args:
            receivers: ``[R]`` bool (or 0/1) mask over :attr:`receivers`.

        Returns:
            ``[N]`` bool mask over :attr:`nodes`.
        """
        return (receivers.to(torch.float32) @ self._reads) > 0

    def receivers_read_by(self, nodes: Tensor) -> Tensor:
        """The receivers that at least one of the marked nodes reads.

        Args:
            nodes: ``[N]`` bool (or 0/1) mask over :attr:`nodes`.

        Returns:
            ``[R]`` bool mask over :attr:`receivers`.
        """
        return (self._reads @ nodes.to(torch.float32)) > 0

    # ------------------------------------------------------------------ misc
    def _unknown(self, what: str, name: str, table: dict[str, int]) -> str:
        import difflib

        close = difflib.get_close_matches(name, list(table), n=3)
        hint = f" Closest: {', '.join(close)}." if close else ""
        return f"Unknown {what} {name!r} in this {self.n_layers}-layer graph.{hint}"

    def _structure(self) -> tuple[int, int, int, bool, bool]:
        # everything the graph's nodes, receivers and edges are built from (not model_name)
        return (self.n_layers, self.n_heads, self.n_kv_heads, self.attn_only,
                self.parallel_attn_mlp)

    def __eq__(self, other: object) -> bool:
        """Graphs are equal when their structure is (``model_name`` is provenance only).

        This is the check for "same shape": equal graphs have the same nodes, receivers and
        edges, so ``[S, R]`` tensors of one fit the other.
        """
        return isinstance(other, ComputeGraph) and self._structure() == other._structure()

    def __hash__(self) -> int:
        return hash(self._structure())

    def __repr__(self) -> str:
        return (f"ComputeGraph(n_layers={self.n_layers}, n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}, nodes={self.n_nodes}, edges={self.n_edges})")
