"""How alike are two circuits? Edge and node overlap, top-k agreement, rank correlation.

:func:`compare` takes two circuits over the same graph (from two algorithms, seeds, ablations or
tools: circuitfind JSON or MIB JSON) and reports the Jaccard index of their kept edges and of
their nodes, the overlap of their top-k edges at several k, and the Spearman rank correlation of
their scores on the edges both keep.

Importance order. Each circuit's edges are ranked in the order the circuit itself was chosen
in, read by :func:`importance_keys` from its metadata: its scores' meaning
(:func:`circuitfind.graphs.scores.score_meaning`) and its selection record
(``metadata["selection"]``, written by :func:`~circuitfind.graphs.selection.select_top_n` and
:func:`~circuitfind.graphs.selection.select_threshold`):

- importances (ACDC's KL effects): the score itself, larger is more important;
- metric changes selected with ``absolute=False``: the signed importance, ``-score`` for a
  higher-is-better metric and ``score`` for a lower-is-better one (most important first);
- other metric changes (selected by ``|score|``, the default of ``discover``, or of unknown
  selection, such as MIB files from other tools): ``|score|``, since an edge that moves the
  metric either way matters.

So circuits of different score kinds (an ACDC circuit against an EAP one) compare on one
scale: the top-k overlap asks whether the two methods put the same edges first, and the rank
correlation is Spearman's ρ of these keys on the edges both circuits keep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.scores import score_meaning

DEFAULT_KS = (10, 50, 100)


@dataclass(frozen=True)
class ComparisonResult:
    """Agreement of two circuits (A and B) over one graph.

    Attributes:
        n_edges_a, n_edges_b: Kept edges of each.
        shared_edges: Edges both keep.
        edge_jaccard: ``|A ∩ B| / |A ∪ B|`` over kept edges (1.0 when both are empty).
        node_jaccard: The same over the nodes the circuits touch.
        top_k: ``{k: overlap}``: the fraction of the top-k edges (importance order, see the
            module docstring) the two share, ``|top_k(A) ∩ top_k(B)| / k``; only for k up to
            the graph's edge count and where both circuits have scores.
        spearman: Spearman rank correlation of the importance keys on the shared edges
            (``None`` with fewer than 3 shared edges or a circuit without scores).
        score_kinds: The kind of each circuit's scores.
        n_graph_edges: Edges of the graph (the largest k with a top-k overlap).
        skipped_k: Requested sizes larger than the graph, without an overlap.
    """

    n_edges_a: int
    n_edges_b: int
    shared_edges: int
    edge_jaccard: float
    node_jaccard: float
    top_k: dict[int, float]
    spearman: float | None
    score_kinds: tuple[str, str]
    n_graph_edges: int = 0
    skipped_k: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)

    def lines(self) -> list[str]:
        """A short human-readable summary, one fact a line."""
        out = [f"edges: A {self.n_edges_a}, B {self.n_edges_b}, shared {self.shared_edges}; "
               f"edge Jaccard {self.edge_jaccard:.3f}, node Jaccard {self.node_jaccard:.3f}"]
        if self.top_k:
            out.append("top-k overlap: " + ", ".join(f"k={k}: {v:.2f}"
                                                     for k, v in self.top_k.items()))
        if self.skipped_k:
            out.append(f"top-k overlap not computed for k={', '.join(map(str, self.skipped_k))}: "
                       f"the graph has {self.n_graph_edges} edges")
        rho = "n/a (fewer than 3 shared scored edges)" if self.spearman is None else (
            f"{self.spearman:.3f}")
        out.append(f"Spearman correlation on shared edges: {rho} (scores: A "
                   f"{self.score_kinds[0]}, B {self.score_kinds[1]})")
        return out


def importance_keys(circuit: Circuit) -> Tensor | None:
    """Every real edge's importance key in the circuit's own order (module docstring).

    Args:
        circuit: A circuit with or without scores.

    Returns:
        ``[E]`` float32 keys aligned with ``circuit.graph.edge_names`` (larger = more
        important), or ``None`` when the circuit has no scores.
    """
    values = circuit.edge_values
    if values is None:
        return None
    meaning = score_meaning(circuit.metadata)
    selection = circuit.metadata.get("selection")
    signed = meaning.kind == "importance" or (
        isinstance(selection, dict) and selection.get("absolute") is False)
    return meaning.importance(values) if signed else values.abs()


def _jaccard(a: set[Any], b: set[Any]) -> float:
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def compare(a: Circuit, b: Circuit, ks: Sequence[int] = DEFAULT_KS) -> ComparisonResult:
    """Compare two circuits over the same graph (see the module docstring).

    Args:
        a, b: The circuits.
        ks: Sizes for the top-k overlap (each >= 1).

    Returns:
        A :class:`ComparisonResult`.

    Raises:
        ConfigError: circuits over different graphs, or a k < 1.
    """
    if a.graph != b.graph:
        def which(c: Circuit) -> str:
            return f"{c.metadata.get('model') or 'model not recorded'}, {c.graph!r}"

        raise ConfigError(f"The circuits are over different graphs: A ({which(a)}) vs B "
                          f"({which(b)}); compare circuits of the same model.")
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ConfigError(f"Top-k sizes must be integers >= 1; got {list(ks)}.")
    g = a.graph
    ea, eb = set(a.edge_ids.tolist()), set(b.edge_ids.tolist())
    ka, kb = importance_keys(a), importance_keys(b)
    top: dict[int, float] = {}
    rho = None
    if ka is not None and kb is not None:
        for k in sorted(set(ks)):
            if k > g.n_edges:
                continue
            ta = set(torch.sort(ka, descending=True, stable=True).indices[:k].tolist())
            tb = set(torch.sort(kb, descending=True, stable=True).indices[:k].tolist())
            top[k] = len(ta & tb) / k
        shared = sorted(ea & eb)
        if len(shared) >= 3:
            from scipy.stats import spearmanr

            value = spearmanr(ka[shared].double().numpy(), kb[shared].double().numpy())[0]
            rho = None if math.isnan(value) else float(value)  # NaN: constant keys
    return ComparisonResult(
        n_edges_a=len(ea), n_edges_b=len(eb), shared_edges=len(ea & eb),
        edge_jaccard=_jaccard(ea, eb), node_jaccard=_jaccard(set(a.nodes), set(b.nodes)),
        top_k=top, spearman=rho, n_graph_edges=g.n_edges,
        skipped_k=tuple(k for k in sorted(set(ks)) if k > g.n_edges),
        score_kinds=(score_meaning(a.metadata).kind, score_meaning(b.metadata).kind))


def load_any(path: Any) -> Circuit:
    """A circuit from circuitfind JSON/GraphML or MIB JSON (told apart by content).

    Raises:
        ConfigError: not a readable circuit file.
    """
    import json
    from pathlib import Path

    from circuitfind.graphs.mib import import_mib

    path = Path(path)
    if path.suffix.lower() == ".json" and path.is_file():
        try:
            head = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"Cannot read {str(path)!r} as JSON: {err}.") from err
        if isinstance(head, dict) and "cfg" in head and "edges" in head:
            return import_mib(path)
    return Circuit.load(path)
