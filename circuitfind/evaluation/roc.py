"""ROC AUC and precision–recall of edge and node scores against a reference circuit.

The protocol of Conmy et al. (2023, §4.1): circuit discovery is read as binary classification
of the graph's edges (or nodes) into "in the reference circuit" and "not in it". A method that
scores edges is judged by how well its scores rank reference edges above the others (ROC AUC,
average precision); a method that returns one circuit per hyperparameter value (ACDC's
threshold) gives one (FPR, TPR) point per circuit, and the points trace a ROC curve.

Definitions used here (all vectorised with numpy/scipy; no scikit-learn):

- **Candidates.** Edge level: every real edge of the graph (``graph.edge_mask``; GPT-2 small:
  32,491), one per sender and q/k/v/MLP/logits receiver. Node level: every attention head and
  MLP (``input`` and ``logits`` are the fixed source and sink of every circuit, not components
  a method chooses, so they are not candidates).
- **Labels.** An edge is positive iff the reference keeps it. A node is positive iff it touches
  a reference edge (``reference.node_mask``: the edge's sender, or a node reading its receiver).
- **Keys.** The ranking key of an edge is ``|score|`` (``absolute=True``, the default: a large
  effect of either sign counts) or the signed importance (``absolute=False``): for a
  :class:`Circuit`, its score as the circuit's declared meaning reads it
  (:func:`~circuitfind.graphs.scores.score_meaning`: ``-score`` for metric changes of a
  higher-is-better metric, ``score`` for importances such as ACDC's KL effects), so the most
  important edges rank first whatever the algorithm; a bare tensor is ranked as given (larger
  first: pass importances). A node's key is the
  largest key over its incident real edges, incoming and outgoing (a node is as important as
  its most important edge). NaN scores are rejected.
- **collapse_qkv** (edge level, head-level comparison as in ACDC's plots): a sender's edges
  into the q, k and v inputs of an attention head merge into one ``sender -> head`` edge whose
  key is the largest of the merged keys and which is positive iff any merged edge is. A
  grouped-query k/v receiver (``a3.kv1<k>``) is read by every query head of its group, so its
  edge takes part in the merged edge of *each* of those heads. MLP and ``logits`` receivers are
  unchanged. (With ``absolute=False`` the merge takes the largest signed score.)
- **ROC curve.** Predict "positive" for ``key >= t``. Thresholds ``t`` are the distinct keys in
  decreasing order, preceded by ``+inf`` (the point (0, 0)); the last threshold is the smallest
  key, where every candidate is predicted positive (the point (1, 1)). Tied keys enter
  together: a tie between a positive and a negative moves the curve diagonally.
- **AUC** = the Mann–Whitney statistic ``U / (P · N)``: the probability that a random positive
  has a larger key than a random negative, ties counting one half. Computed from average
  ranks (``scipy.stats.rankdata``); it equals the trapezoid area under the ROC points above.
- **Precision–recall** at the same thresholds: ``precision = TP / (TP + FP)``,
  ``recall = TP / P``; at ``t = +inf`` recall is 0 and precision is defined as 1 (scikit-learn's
  convention). **Average precision** = ``sum_k (recall_k - recall_{k-1}) · precision_k`` over
  the thresholds (a step function, no interpolation; scikit-learn's definition).
- **Degenerate references.** A reference with no positive or no negative candidate (no edges,
  or every edge) leaves TPR or FPR — and hence AUC — undefined: :class:`ConfigError`.
- **Binary circuits** (:func:`circuit_confusion`): one confusion matrix over the same
  candidates, hence one (FPR, TPR) point. :func:`points_auc` integrates a sweep of such points
  as ACDC does: add (0, 0) and (1, 1), drop dominated points, and take the area under the
  pessimistic staircase (``sum_i (1 - fpr_i) · (tpr_i - tpr_{i-1})``) or, optionally, the
  trapezoid.

Scores and the reference must live on graphs of the same shape (the ``model_name`` may differ).

References:
    Conmy, Mavor-Parker, Lynch, Heimersheim, Garriga-Alonso. "Towards Automated Circuit
    Discovery for Mechanistic Interpretability." NeurIPS 2023, arXiv:2304.14997 (§4.1: ROC over
    edges and nodes against a ground-truth circuit; ``pessimistic_auc`` in their code).
    Mann & Whitney 1947; Hanley & McNeil 1982, "The meaning and use of the area under a ROC
    curve" (AUC = U / (P N), ties counted one half).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from circuitfind.errors import ConfigError
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.graphs.scores import score_meaning

__all__ = ["Confusion", "RocResult", "circuit_confusion", "edge_roc", "node_roc", "points_auc",
           "roc_from_labels", "sweep_auc"]


@dataclass(frozen=True, eq=False)
class RocResult:
    """ROC and precision–recall of a ranking against binary labels.

    Attributes:
        auc: Area under the ROC curve (Mann–Whitney, ties one half), in [0, 1].
        fpr: ``[K + 1]`` false-positive rates at :attr:`thresholds` (``fpr[0] = 0``).
        tpr: ``[K + 1]`` true-positive rates at :attr:`thresholds` (``tpr[0] = 0``).
        thresholds: ``[K + 1]`` decreasing: ``+inf`` then the K distinct keys (units of the
            scores: metric units, or their absolute value).
        precision: ``[K + 1]`` precision at :attr:`thresholds` (``precision[0] = 1`` by
            convention).
        recall: ``[K + 1]`` recall (= :attr:`tpr`).
        average_precision: Step-wise average precision, in [0, 1].
        n_positive: Number of positive candidates P.
        n_negative: Number of negative candidates N.
        level: ``"edge"``, ``"head_edge"`` (collapsed q/k/v), ``"node"`` or ``"labels"``.
        absolute: Whether keys were ``|score|``.
    """

    auc: float
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    average_precision: float
    n_positive: int
    n_negative: int
    level: str = "labels"
    absolute: bool = True

    def __repr__(self) -> str:
        return (f"RocResult(level={self.level!r}, auc={self.auc:.4f}, "
                f"average_precision={self.average_precision:.4f}, P={self.n_positive}, "
                f"N={self.n_negative}, points={len(self.fpr)})")


@dataclass(frozen=True)
class Confusion:
    """Confusion counts of a binary circuit against a reference over the candidates.

    Attributes:
        tp: Candidates in both. fp: In the circuit only. fn: In the reference only.
        tn: In neither.
        level: ``"edge"``, ``"head_edge"`` or ``"node"``.
    """

    tp: int
    fp: int
    fn: int
    tn: int
    level: str = "edge"

    @property
    def tpr(self) -> float:
        """True-positive rate (recall) ``TP / (TP + FN)``."""
        return self.tp / (self.tp + self.fn)

    @property
    def fpr(self) -> float:
        """False-positive rate ``FP / (FP + TN)``."""
        return self.fp / (self.fp + self.tn)

    @property
    def recall(self) -> float:
        """Same as :attr:`tpr`."""
        return self.tpr

    @property
    def precision(self) -> float | None:
        """``TP / (TP + FP)``, or ``None`` when the circuit keeps no candidate."""
        predicted = self.tp + self.fp
        return None if predicted == 0 else self.tp / predicted


# ---------------------------------------------------------------------------------- core
def roc_from_labels(keys: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool],
                    *, level: str = "labels", absolute: bool = False) -> RocResult:
    """ROC, AUC and precision–recall of ``keys`` ranking ``labels`` (higher key = positive).

    Args:
        keys: ``[n]`` real ranking keys (used as given).
        labels: ``[n]`` booleans, True for positives.
        level: Recorded in the result.
        absolute: Recorded in the result (whether the keys are absolute scores).

    Returns:
        The :class:`RocResult`; see the module docstring for thresholds and ties.

    Raises:
        ConfigError: shapes differ, NaN keys, or no positive or no negative (AUC undefined).

    References:
        Mann & Whitney 1947; Hanley & McNeil 1982 (AUC = U / (P N)).
    """
    keys = np.asarray(keys, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype != np.bool_:
        if not np.isin(labels, (0, 1)).all():
            raise ConfigError("labels must be booleans (or 0/1).")
        labels = labels.astype(bool)
    if keys.shape != labels.shape:
        raise ConfigError(f"keys and labels must have the same length; got {keys.size} and "
                          f"{labels.size}.")
    if np.isnan(keys).any():
        raise ConfigError(f"{int(np.isnan(keys).sum())} scores are NaN; ROC needs real scores "
                          "(replace or drop them first).")
    n_pos = int(labels.sum())
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        what = "no positive" if n_pos == 0 else "no negative"
        raise ConfigError(
            f"ROC AUC is undefined: the reference has {what} candidate ({n_pos} positive, "
            f"{n_neg} negative {level} candidates); TPR needs a positive and FPR a negative. "
            "A reference must keep some but not all candidates.")
    # AUC from average ranks (ties share their mean rank = count one half).
    ranks = rankdata(keys, method="average")
    u = float(ranks[labels].sum()) - n_pos * (n_pos + 1) / 2.0
    auc = u / (n_pos * n_neg)
    # Curve: sort by decreasing key, cumulative counts at the last index of each distinct key.
    order = np.argsort(-keys, kind="mergesort")
    sorted_keys = keys[order]
    sorted_labels = labels[order]
    last = np.r_[np.nonzero(sorted_keys[1:] != sorted_keys[:-1])[0], sorted_keys.size - 1]
    tps = np.cumsum(sorted_labels)[last].astype(np.float64)
    fps = (last + 1) - tps
    thresholds = np.r_[np.inf, sorted_keys[last]]
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    precision = np.r_[1.0, tps / (tps + fps)]
    recall = tpr
    average_precision = float(np.sum(np.diff(recall) * precision[1:]))
    return RocResult(auc=float(auc), fpr=fpr, tpr=tpr, thresholds=thresholds,
                     precision=precision, recall=recall.copy(),
                     average_precision=average_precision, n_positive=n_pos, n_negative=n_neg,
                     level=level, absolute=bool(absolute))


# ---------------------------------------------------------------------------------- helpers
def _check_reference(reference: object, graph: ComputeGraph | None, where: str) -> Circuit:
    if not isinstance(reference, Circuit):
        raise ConfigError(f"{where} needs the reference as a Circuit; got "
                          f"{type(reference).__name__}.")
    if graph is not None and graph != reference.graph:  # equal graphs: same shape
        raise ConfigError(f"{where}: the scores are over {graph!r} but the reference is over "
                          f"{reference.graph!r}; both must be on graphs of the same shape.")
    return reference


def _edge_keys(scores: Tensor | Circuit, reference: object, absolute: bool,
               where: str) -> tuple[np.ndarray, Circuit]:
    """``[S, R]`` float64 keys (NaN-checked on real edges) and the checked reference."""
    if isinstance(scores, Circuit):
        reference = _check_reference(reference, scores.graph, where)
        if scores.scores is None:
            raise ConfigError(f"{where}: the circuit has no scores (scores=None); ROC needs "
                              "per-edge scores (use circuit_confusion for a binary circuit).")
        dense = scores.scores
    else:
        reference = _check_reference(reference, None, where)
        graph = reference.graph
        if not isinstance(scores, Tensor):
            raise ConfigError(f"{where}: scores must be a [S, R] tensor or a Circuit; got "
                              f"{type(scores).__name__}.")
        dense = graph.check_edge_matrix(scores, f"{where}: scores", real=True)
    if isinstance(scores, Circuit) and not absolute:
        dense = score_meaning(scores.metadata).importance(dense)
    keys = dense.detach().to("cpu", torch.float64).numpy()
    if absolute:
        keys = np.abs(keys)
    mask = reference.graph.edge_mask.numpy()
    if np.isnan(keys[mask]).any():
        raise ConfigError(f"{where}: {int(np.isnan(keys[mask]).sum())} edge scores are NaN; "
                          "ROC needs real scores.")
    return keys, reference


def _reader_pairs(graph: ComputeGraph, attention_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """(receiver, node) index pairs, sorted by node: node reads receiver.

    With ``attention_only``, MLP and logits receivers are excluded.
    """
    rec, node = [], []
    for r, receiver in enumerate(graph.receivers):
        if attention_only and receiver.qkv is None:
            continue
        for name in receiver.nodes:
            rec.append(r)
            node.append(graph.node_index(name))
    rec_a, node_a = np.asarray(rec, dtype=np.int64), np.asarray(node, dtype=np.int64)
    order = np.argsort(node_a, kind="mergesort")
    return rec_a[order], node_a[order]


def _group_max(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max of ``values[..., j]`` over columns sharing ``groups[j]`` (sorted).

    Returns (unique groups, ``[..., G]`` maxima).
    """
    uniq, starts = np.unique(groups, return_index=True)
    return uniq, np.maximum.reduceat(values, starts, axis=-1)


def _collapsed(keys: np.ndarray, labels: np.ndarray, graph: ComputeGraph
               ) -> tuple[np.ndarray, np.ndarray]:
    """Merge q/k/v edges into sender -> head edges; returns flat (keys, labels) of candidates."""
    mask = graph.edge_mask.numpy()
    rec, node = _reader_pairs(graph, attention_only=True)
    neg_inf = np.where(mask, keys, -np.inf)
    _, head_keys = _group_max(neg_inf[:, rec], node)                       # [S, H_all]
    _, head_labels = _group_max((labels & mask)[:, rec].astype(np.int8), node)
    _, head_cand = _group_max(mask[:, rec].astype(np.int8), node)
    other = np.array([r.qkv is None for r in graph.receivers])            # MLP and logits
    cand_other = mask[:, other]
    keys_out = np.r_[head_keys[head_cand > 0], keys[:, other][cand_other]]
    labels_out = np.r_[head_labels[head_cand > 0] > 0, labels[:, other][cand_other]]
    return keys_out, labels_out


def _candidate_nodes(graph: ComputeGraph) -> np.ndarray:
    return np.array([n.kind in ("attention", "mlp") for n in graph.nodes])


def _node_keys(keys: np.ndarray, graph: ComputeGraph) -> np.ndarray:
    """``[N]`` max key over each node's incident real edges (-inf where none)."""
    mask = graph.edge_mask.numpy()
    masked = np.where(mask, keys, -np.inf)
    out = np.full(graph.n_nodes, -np.inf)
    out[: graph.n_senders] = masked.max(axis=1)                 # outgoing edges
    per_receiver = masked.max(axis=0)                           # [R] incoming, per receiver
    rec, node = _reader_pairs(graph, attention_only=False)
    uniq, incoming = _group_max(per_receiver[rec], node)
    out[uniq] = np.maximum(out[uniq], incoming)
    return out


# ---------------------------------------------------------------------------------- public
def edge_roc(scores: Tensor | Circuit, reference: Circuit, *, absolute: bool = True,
             collapse_qkv: bool = False) -> RocResult:
    """ROC AUC and precision–recall of edge scores against a reference circuit.

    Args:
        scores: ``[S, R]`` per-edge scores (metric units; only real edges are read) or a
            Circuit with scores (e.g. an attribution result).
        reference: The reference circuit; its kept edges are the positives. Must be on a graph
            of the same shape as the scores.
        absolute: Rank by ``|score|`` (default) or by the signed importance (a Circuit's
            scores as its metadata declares them, most important first; a tensor as given).
        collapse_qkv: Merge each sender's q/k/v edges into one edge per (sender, head), key =
            max key, positive if any merged edge is (GQA k/v receivers count for every query
            head of their group). See the module docstring.

    Returns:
        :class:`RocResult` over all real edges (``level="edge"``) or over the collapsed edges
        (``level="head_edge"``).

    Raises:
        ConfigError: wrong shapes, NaN scores, a circuit without scores, graphs of different
            shapes, or a reference with no edge or every edge (AUC undefined).

    References:
        Conmy et al. 2023, §4.1 (edge-level ROC against the ground-truth circuit).
    """
    keys, reference = _edge_keys(scores, reference, absolute, "edge_roc")
    graph = reference.graph
    labels = reference.kept.numpy()
    if collapse_qkv:
        flat_keys, flat_labels = _collapsed(keys, labels, graph)
        level = "head_edge"
    else:
        mask = graph.edge_mask.numpy()
        flat_keys, flat_labels = keys[mask], labels[mask]
        level = "edge"
    return roc_from_labels(flat_keys, flat_labels, level=level, absolute=absolute)


def node_roc(scores: Tensor | Circuit, reference: Circuit, *,
             absolute: bool = True) -> RocResult:
    """ROC AUC and precision–recall of node scores, derived from edge scores, vs a reference.

    A node's key is the largest key (``|score|`` or signed score) over its incident real edges,
    incoming (into any receiver it reads) and outgoing. Candidates are the attention heads and
    MLPs; a node is positive iff it touches a reference edge.

    Args:
        scores: ``[S, R]`` per-edge scores or a Circuit with scores.
        reference: The reference circuit (same graph shape).
        absolute: Rank by ``|score|`` (default) or by the signed importance (as
            :func:`edge_roc`).

    Returns:
        :class:`RocResult` with ``level="node"``.

    Raises:
        ConfigError: as :func:`edge_roc`; also when every or no head/MLP is in the reference.

    References:
        Conmy et al. 2023, §4.1 (node-level ROC).
    """
    keys, reference = _edge_keys(scores, reference, absolute, "node_roc")
    graph = reference.graph
    node_keys = _node_keys(keys, graph)
    cand = _candidate_nodes(graph)
    labels = reference.node_mask.numpy()
    return roc_from_labels(node_keys[cand], labels[cand], level="node", absolute=absolute)


def circuit_confusion(circuit: Circuit, reference: Circuit, *, level: str = "edge",
                      collapse_qkv: bool = False) -> Confusion:
    """Confusion counts (one ROC point) of a discovered circuit against a reference.

    Args:
        circuit: The discovered circuit (its kept edges are the predicted positives).
        reference: The reference circuit (same graph shape).
        level: ``"edge"`` (real edges; with ``collapse_qkv``, sender -> head edges, kept if any
            merged q/k/v edge is kept) or ``"node"`` (heads and MLPs touched by a kept edge).
        collapse_qkv: See :func:`edge_roc` (edge level only).

    Returns:
        :class:`Confusion`; ``.tpr`` and ``.fpr`` give the ROC point.

    Raises:
        ConfigError: not circuits, graphs of different shapes, an unknown level, or a reference
            with no or every candidate (TPR/FPR undefined).

    References:
        Conmy et al. 2023, §4.1 (TPR/FPR of a recovered circuit against the ground truth).
    """
    if not isinstance(circuit, Circuit):
        raise ConfigError(f"circuit_confusion needs a Circuit; got {type(circuit).__name__}.")
    reference = _check_reference(reference, circuit.graph, "circuit_confusion")
    graph = reference.graph
    if level == "node":
        cand = _candidate_nodes(graph)
        pred = circuit.node_mask.numpy()[cand]
        truth = reference.node_mask.numpy()[cand]
    elif level == "edge":
        pred_dense = circuit.kept.numpy()
        truth_dense = reference.kept.numpy()
        if collapse_qkv:
            _, pred = _collapsed(pred_dense.astype(np.float64), pred_dense, graph)
            _, truth = _collapsed(np.zeros(pred_dense.shape), truth_dense, graph)
            level = "head_edge"
        else:
            mask = graph.edge_mask.numpy()
            pred, truth = pred_dense[mask], truth_dense[mask]
    else:
        raise ConfigError(f"level must be 'edge' or 'node'; got {level!r}.")
    pred = pred.astype(bool)
    truth = truth.astype(bool)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        raise ConfigError(f"TPR/FPR are undefined: the reference has {n_pos} positive and "
                          f"{n_neg} negative {level} candidates; it must keep some but not all.")
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    return Confusion(tp=tp, fp=fp, fn=n_pos - tp, tn=n_neg - fp, level=level)


def points_auc(fpr: Sequence[float] | np.ndarray, tpr: Sequence[float] | np.ndarray, *,
               pessimistic: bool = True) -> float:
    """Area under a ROC curve given by (FPR, TPR) points of binary circuits (a sweep).

    The points (0, 0) and (1, 1) are added and sorted by FPR, then TPR; a point whose TPR is
    below that of an earlier point (a dominated circuit) is dropped, leaving a monotone curve
    (the curve of a threshold sweep is monotone already). It is integrated as the pessimistic
    staircase ``sum_i (1 - fpr_i) · (tpr_i - tpr_{i-1})`` (each
    TPR is reached only at its own FPR; ACDC's ``pessimistic_auc``) or, with
    ``pessimistic=False``, by the trapezoid rule.

    Args:
        fpr: ``[K]`` false-positive rates in [0, 1].
        tpr: ``[K]`` true-positive rates in [0, 1].
        pessimistic: Staircase (default) or trapezoid.

    Returns:
        The area, in [0, 1].

    Raises:
        ConfigError: lengths differ, or rates outside [0, 1] or NaN.

    References:
        Conmy et al. 2023, §4.1 and ``pessimistic_auc`` in their code.
    """
    x = np.asarray(fpr, dtype=np.float64).reshape(-1)
    y = np.asarray(tpr, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ConfigError(f"fpr and tpr must have the same length; got {x.size} and {y.size}.")
    if np.isnan(x).any() or np.isnan(y).any() or (x < 0).any() or (x > 1).any() \
            or (y < 0).any() or (y > 1).any():
        raise ConfigError("fpr and tpr must be rates in [0, 1] (no NaN).")
    x = np.r_[0.0, x, 1.0]
    y = np.r_[0.0, y, 1.0]
    order = np.lexsort((y, x))               # by FPR, then TPR, ascending
    x, y = x[order], y[order]
    best_before = np.r_[-np.inf, np.maximum.accumulate(y)[:-1]]
    keep = y >= best_before                  # drop points below the curve so far
    x, y = np.r_[0.0, x[keep]], np.r_[0.0, y[keep]]  # the curve starts at (0, 0)
    if pessimistic:
        return float(np.sum((1.0 - x[1:]) * np.diff(y)))
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def sweep_auc(circuits: Iterable[Circuit], reference: Circuit, *, level: str = "edge",
              collapse_qkv: bool = False, pessimistic: bool = True
              ) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC of a sweep of discovered circuits (e.g. ACDC over thresholds) against a reference.

    Args:
        circuits: The circuits, one per hyperparameter value.
        reference: The reference circuit.
        level: ``"edge"`` or ``"node"`` (see :func:`circuit_confusion`).
        collapse_qkv: See :func:`edge_roc`.
        pessimistic: See :func:`points_auc`.

    Returns:
        ``(auc, fpr [K], tpr [K])``, the points in the order of ``circuits``.

    Raises:
        ConfigError: see :func:`circuit_confusion`; also no circuits.

    References:
        Conmy et al. 2023, §4.1.
    """
    points = [circuit_confusion(c, reference, level=level, collapse_qkv=collapse_qkv)
              for c in circuits]
    if not points:
        raise ConfigError("sweep_auc needs at least one circuit.")
    fpr = np.array([p.fpr for p in points])
    tpr = np.array([p.tpr for p in points])
    return points_auc(fpr, tpr, pessimistic=pessimistic), fpr, tpr
