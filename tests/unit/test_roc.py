"""ROC AUC / precision-recall against a reference circuit (circuitfind.evaluation.roc)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from circuitfind.errors import CircuitFindError, ConfigError
from circuitfind.evaluation.roc import (
    RocResult,
    circuit_confusion,
    edge_roc,
    node_roc,
    points_auc,
    roc_from_labels,
    sweep_auc,
)
from circuitfind.graphs import Circuit, ComputeGraph


def brute_auc(keys, labels) -> float:
    """Pairwise Mann-Whitney: P(key_pos > key_neg) + 0.5 P(tie)."""
    pos = [k for k, y in zip(keys, labels) if y]
    neg = [k for k, y in zip(keys, labels) if not y]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


# ---------------------------------------------------------------------------------- core
def test_hand_computed_auc_with_ties():
    # pairs: 3>2, 3>1, 2=2 (1/2), 2>1 -> 3.5 / 4
    r = roc_from_labels([3, 2, 2, 1], [1, 1, 0, 0])
    assert r.auc == pytest.approx(0.875)
    np.testing.assert_allclose(r.thresholds, [np.inf, 3, 2, 1])
    np.testing.assert_allclose(r.fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(r.tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(r.precision, [1, 1, 2 / 3, 0.5])
    np.testing.assert_allclose(r.recall, r.tpr)
    assert r.average_precision == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert (r.n_positive, r.n_negative) == (2, 2)
    # the trapezoid under the ROC points equals the Mann-Whitney AUC
    assert np.trapezoid(r.tpr, r.fpr) == pytest.approx(r.auc)


def test_hand_computed_auc_no_ties():
    # positives 0.9, 0.4; negatives 0.7, 0.1: pairs 0.9>0.7, 0.9>0.1, 0.4<0.7, 0.4>0.1 -> 3/4
    r = roc_from_labels([0.9, 0.7, 0.4, 0.1], [True, False, True, False])
    assert r.auc == pytest.approx(0.75)
    np.testing.assert_allclose(r.fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(r.tpr, [0, 0.5, 0.5, 1, 1])
    assert r.average_precision == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_perfect_separation_and_inverse():
    assert roc_from_labels([5, 4, 3, 1, 0], [1, 1, 1, 0, 0]).auc == 1.0
    assert roc_from_labels([5, 4, 3, 1, 0], [0, 0, 1, 1, 1]).auc == 0.0
    r = roc_from_labels([5, 4, 3, 1, 0], [1, 1, 1, 0, 0])
    assert r.average_precision == pytest.approx(1.0)


def test_constant_scores_give_one_half():
    r = roc_from_labels(np.zeros(10), [1, 0] * 5)
    assert r.auc == 0.5
    np.testing.assert_allclose(r.fpr, [0, 1])
    np.testing.assert_allclose(r.tpr, [0, 1])
    assert r.average_precision == pytest.approx(0.5)  # the positive rate


def test_infinite_scores_tie():
    r = roc_from_labels([np.inf, np.inf, 1.0], [1, 0, 0])
    assert r.auc == pytest.approx(0.75)
    assert len(r.thresholds) == 3  # +inf sentinel, inf, 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-4, 4), st.booleans()), min_size=2, max_size=40)
       .filter(lambda xs: any(y for _, y in xs) and not all(y for _, y in xs)),
       st.sampled_from([0.5, 1.0, 0.37]))
def test_matches_brute_force_mann_whitney(pairs, scale):
    keys = [k * scale for k, _ in pairs]  # small integers: many ties
    labels = [y for _, y in pairs]
    r = roc_from_labels(keys, labels)
    assert r.auc == pytest.approx(brute_auc(keys, labels), abs=1e-12)
    assert np.trapezoid(r.tpr, r.fpr) == pytest.approx(r.auc, abs=1e-12)
    assert np.all(np.diff(r.fpr) >= 0) and np.all(np.diff(r.tpr) >= 0)
    assert r.fpr[-1] == 1.0 and r.tpr[-1] == 1.0
    assert np.all(np.diff(r.thresholds) < 0)
    # ROC points at each distinct threshold: counts of key >= t
    k, y = np.array(keys), np.array(labels)
    for t, fpr, tpr in zip(r.thresholds[1:], r.fpr[1:], r.tpr[1:]):
        assert tpr == pytest.approx((k[y] >= t).sum() / y.sum())
        assert fpr == pytest.approx((k[~y] >= t).sum() / (~y).sum())
    # average precision: sum over positives of precision at their rank (ties resolved as groups)
    ap = sum((r.recall[i] - r.recall[i - 1]) * r.precision[i] for i in range(1, len(r.recall)))
    assert r.average_precision == pytest.approx(ap)


def test_degenerate_labels_raise():
    with pytest.raises(ConfigError, match="undefined"):
        roc_from_labels([1, 2, 3], [0, 0, 0])
    with pytest.raises(ConfigError, match="undefined"):
        roc_from_labels([1, 2, 3], [1, 1, 1])
    with pytest.raises(ConfigError, match="NaN"):
        roc_from_labels([1, np.nan], [1, 0])
    with pytest.raises(ConfigError, match="same length"):
        roc_from_labels([1, 2], [1, 0, 0])


# ---------------------------------------------------------------------------------- edges
@pytest.fixture()
def small():
    return ComputeGraph(2, 2)


def _ref(graph, names):
    return Circuit.from_edges(graph, names)


def test_edge_roc_perfect_and_constant(small):
    ref = _ref(small, ["input->a0.h0<q>", "a0.h0->m0", "m0->logits"])
    scores = ref.kept.to(torch.float32) * 2.0 - 1.0  # positives +1, negatives -1
    r = edge_roc(scores, ref, absolute=False)
    assert r.auc == 1.0 and r.level == "edge"
    assert r.n_positive == 3 and r.n_positive + r.n_negative == small.n_edges
    # with |score| every edge ties -> 1/2
    assert edge_roc(scores, ref, absolute=True).auc == 0.5
    assert edge_roc(torch.zeros(small.n_senders, small.n_receivers), ref).auc == 0.5


def test_edge_roc_ignores_off_edge_entries(small):
    ref = _ref(small, ["input->a0.h0<q>"])
    scores = torch.zeros(small.n_senders, small.n_receivers)
    scores[~small.edge_mask] = 100.0  # not edges: must not count
    s, r = small.edge_index("input->a0.h0<q>")
    scores[s, r] = 1.0
    assert edge_roc(scores, ref).auc == 1.0


def test_edge_roc_matches_brute_force_on_random_scores(small):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(small.n_senders, small.n_receivers, generator=gen).round(decimals=1)
    kept = (torch.rand(small.n_senders, small.n_receivers, generator=gen) < 0.3) & small.edge_mask
    ref = Circuit(small, kept)
    mask = small.edge_mask
    keys, labels = scores[mask].abs().double().tolist(), kept[mask].tolist()
    assert edge_roc(scores, ref).auc == pytest.approx(brute_auc(keys, labels))
    keys = scores[mask].double().tolist()
    assert edge_roc(scores, ref, absolute=False).auc == pytest.approx(brute_auc(keys, labels))


def test_edge_roc_accepts_circuit_with_scores(small):
    ref = _ref(small, ["a0.h1->a1.h0<k>", "a1.h0->logits"])
    scores = torch.where(ref.kept, 3.0, 0.5)
    scored = Circuit(ComputeGraph(2, 2, model_name="other"), small.edge_mask, scores)
    assert edge_roc(scored, ref).auc == 1.0
    with pytest.raises(ConfigError, match="no scores"):
        edge_roc(Circuit(small, small.edge_mask), ref)


def test_signed_roc_of_a_circuit_reads_its_declared_score_meaning(small):
    """absolute=False ranks a circuit's most important edges first, whatever its score kind:
    metric changes of a higher-is-better metric by -score, importances (ACDC) by score."""
    ref = _ref(small, ["a0.h1->a1.h0<k>", "a1.h0->logits"])
    importance = torch.where(ref.kept, 2.0, 0.5)  # reference edges are the important ones
    acdc = Circuit(small, small.edge_mask, importance,
                   metadata={"scores": {"kind": "importance", "unit": "nats"}})
    eap = Circuit(small, small.edge_mask, -importance,
                  metadata={"scores": {"kind": "metric_change", "unit": "logits",
                                       "higher_is_better": True}})
    kl_metric = Circuit(small, small.edge_mask, importance,
                        metadata={"scores": {"kind": "metric_change", "unit": "nats",
                                             "higher_is_better": False}})
    for circuit in (acdc, eap, kl_metric):
        assert edge_roc(circuit, ref, absolute=False).auc == 1.0
        assert node_roc(circuit, ref, absolute=False).auc == 1.0
    # a circuit saved before the field existed: read from its algorithm (ACDC's KL effects)
    old = Circuit(small, small.edge_mask, importance, metadata={"algorithm": "acdc"})
    assert edge_roc(old, ref, absolute=False).auc == 1.0
    # a bare tensor is ranked as given
    assert edge_roc(-importance, ref, absolute=False).auc == 0.0


def test_edge_roc_errors(small):
    ref = _ref(small, ["input->a0.h0<q>"])
    with pytest.raises(ConfigError, match="shape"):
        edge_roc(torch.zeros(3, 3), ref)
    other = Circuit(ComputeGraph(3, 2), ComputeGraph(3, 2).edge_mask,
                    torch.ones(ComputeGraph(3, 2).n_senders, ComputeGraph(3, 2).n_receivers))
    with pytest.raises(ConfigError, match="same shape"):
        edge_roc(other, ref)
    nan = torch.zeros(small.n_senders, small.n_receivers)
    nan[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        edge_roc(nan, ref)
    with pytest.raises(ConfigError, match="Circuit"):
        edge_roc(nan, "not a circuit")


def test_degenerate_references_raise(small):
    zeros = torch.zeros(small.n_senders, small.n_receivers)
    with pytest.raises(ConfigError, match="undefined") as err:
        edge_roc(zeros, Circuit.empty(small))
    assert isinstance(err.value, CircuitFindError)
    with pytest.raises(ConfigError, match="undefined"):
        edge_roc(zeros, Circuit.full(small))
    with pytest.raises(ConfigError, match="undefined"):
        circuit_confusion(Circuit.full(small), Circuit.empty(small))


# ---------------------------------------------------------------------------------- collapse
def test_collapse_qkv_mha(small):
    g = small
    ref = _ref(g, ["input->a1.h0<k>", "a0.h1->m1"])
    scores = torch.zeros(g.n_senders, g.n_receivers)
    for name, value in [("input->a1.h0<q>", 5.0), ("input->a1.h0<v>", -7.0),
                        ("input->a1.h1<q>", 6.0), ("a0.h1->m1", 4.0)]:
        s, r = g.edge_index(name)
        scores[s, r] = value
    r = edge_roc(scores, ref, collapse_qkv=True)
    assert r.level == "head_edge"
    # collapsed candidates: per head, senders upstream of it; plus MLP and logits edges
    n_head_edges = sum(g.head_start[n.layer] for n in g.nodes if n.kind == "attention")
    n_other = sum(int(g.n_upstream[i]) for i, rec in enumerate(g.receivers) if rec.qkv is None)
    assert r.n_positive + r.n_negative == n_head_edges + n_other
    assert r.n_positive == 2
    # input->a1.h0 key = max(|5|, |-7|, 0) = 7 (top); a0.h1->m1 = 4; input->a1.h1 = 6 beats it
    # positives {7, 4}; negatives {6, 0, ...}: 7 beats all; 4 beats all but 6
    n_neg = r.n_negative
    assert r.auc == pytest.approx((n_neg + (n_neg - 1)) / (2 * n_neg))
    # the uncollapsed ROC differs (input->a1.h0<k> itself scored 0)
    assert edge_roc(scores, ref).auc != pytest.approx(r.auc)


def test_collapse_qkv_gqa():
    g = ComputeGraph(3, 4, 2)
    assert g.is_grouped_query and g.group_size == 2
    # reference: one grouped k edge, read by query heads 2 and 3 of layer 1
    ref = _ref(g, ["a0.h0->a1.kv1<k>"])
    scores = torch.zeros(g.n_senders, g.n_receivers)
    s, r = g.edge_index("a0.h0->a1.kv1<k>")
    scores[s, r] = 1.0
    res = edge_roc(scores, ref, collapse_qkv=True)
    # positives: a0.h0 -> a1.h2 and a0.h0 -> a1.h3 (both read kv1), both with key 1
    assert res.n_positive == 2
    assert res.auc == 1.0
    # candidates: per query head, the senders upstream of its layer; plus MLP and logits edges
    n_heads = sum(g.head_start[layer] for layer in range(g.n_layers)) * g.n_heads
    n_other = sum(int(g.n_upstream[i]) for i, rec in enumerate(g.receivers) if rec.qkv is None)
    assert res.n_positive + res.n_negative == n_heads + n_other
    # a q edge into head 2 merges with the grouped k/v edges head 2 reads
    ref_q = _ref(g, ["a0.h0->a1.h2<q>"])
    res_q = edge_roc(scores, ref_q, collapse_qkv=True)
    assert res_q.n_positive == 1
    # head 2's merged edge has key 1 (from kv1<k>), head 3's too (negative): tie at the top
    n_neg = res_q.n_negative
    assert res_q.auc == pytest.approx((n_neg - 1 + 0.5) / n_neg)
    # binary: keeping the grouped edge counts as both heads kept
    conf = circuit_confusion(ref, ref_q, collapse_qkv=True)
    assert (conf.tp, conf.fp, conf.fn) == (1, 1, 0)
    assert conf.level == "head_edge"


# ---------------------------------------------------------------------------------- nodes
def test_node_roc_rule(small):
    g = small
    ref = _ref(g, ["input->a0.h1<q>", "a0.h1->logits"])  # reference nodes: a0.h1 (+ input, logits)
    scores = torch.zeros(g.n_senders, g.n_receivers)
    s, r = g.edge_index("a0.h1->a1.h0<v>")  # incident to a0.h1 (outgoing) and a1.h0 (incoming)
    scores[s, r] = -3.0
    s, r = g.edge_index("m0->m1")
    scores[s, r] = 2.0
    res = node_roc(scores, ref)
    assert res.level == "node"
    # candidates: 4 heads + 2 MLPs; positive: a0.h1
    assert (res.n_positive, res.n_negative) == (1, 5)
    # keys: a0.h1 = 3; negatives a1.h0 = 3 (tie), m0 = m1 = 2, a0.h0 = a1.h1 = 0 -> 4.5 / 5
    assert res.auc == pytest.approx((4 + 0.5) / 5)
    # signed: a0.h1's incident max is 0 (its -3 edge is below 0), m0/m1 = 2 beat it
    res_signed = node_roc(scores, ref, absolute=False)
    # a0.h1 key 0; negatives: a0.h0 0, a1.h0 0, a1.h1 0, m0 2, m1 2 -> 3 ties -> 1.5 / 5
    assert res_signed.auc == pytest.approx(1.5 / 5)


def test_node_roc_gqa_incoming_through_group():
    g = ComputeGraph(3, 4, 2)
    ref = _ref(g, ["a0.h0->a1.kv0<v>", "a1.h1->logits"])  # nodes a0.h0, a1.h0, a1.h1
    scores = torch.zeros(g.n_senders, g.n_receivers)
    s, r = g.edge_index("input->a1.kv0<k>")  # incoming to a1.h0 and a1.h1 only
    scores[s, r] = 1.0
    s, r = g.edge_index("a0.h0->m0")
    scores[s, r] = 1.0
    res = node_roc(scores, ref)
    assert res.n_positive == 3
    assert res.auc == pytest.approx(1 - (0.5 * 1 * 3) / (3 * res.n_negative))


# ---------------------------------------------------------------------------------- binary
def test_circuit_confusion(small):
    g = small
    ref = _ref(g, ["input->a0.h0<q>", "a0.h0->logits", "m1->logits"])
    found = _ref(g, ["input->a0.h0<q>", "a0.h0->logits", "a0.h1->logits"])
    conf = circuit_confusion(found, ref)
    assert (conf.tp, conf.fp, conf.fn) == (2, 1, 1)
    assert conf.tn == g.n_edges - 4
    assert conf.tpr == pytest.approx(2 / 3)
    assert conf.fpr == pytest.approx(1 / (g.n_edges - 3))
    assert conf.precision == pytest.approx(2 / 3)
    node = circuit_confusion(found, ref, level="node")
    # reference heads/MLPs: a0.h0, m1; found: a0.h0, a0.h1
    assert (node.tp, node.fp, node.fn, node.tn) == (1, 1, 1, 3)
    assert circuit_confusion(Circuit.empty(g), ref).precision is None
    with pytest.raises(ConfigError, match="level"):
        circuit_confusion(found, ref, level="heads")


def test_points_auc_matches_acdc_staircase():
    # the examples asserted next to ACDC's pessimistic_auc
    assert points_auc([], []) == 0.0
    assert points_auc([0.5], [0.5]) == 0.25
    assert points_auc([0.25], [0.25]) == pytest.approx(0.25 * 0.75)
    assert points_auc([0.25, 0.5], [0.25, 0.5]) == pytest.approx(5 / 16)
    assert points_auc([0.25, 0.75], [0.25, 0.5]) == pytest.approx(4 / 16)
    # dominated points are ignored; a vertical start counts
    assert points_auc([0.0, 0.5, 0.6], [0.5, 0.4, 0.5]) == pytest.approx(0.5)
    assert points_auc([0.5], [0.5], pessimistic=False) == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        points_auc([0.5, 2.0], [0.1, 0.2])


def test_sweep_auc_of_top_k_equals_score_roc_when_no_ties(small):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(small.n_senders, small.n_receivers, generator=gen)
    kept = (torch.rand(small.n_senders, small.n_receivers, generator=gen) < 0.4) & small.edge_mask
    ref = Circuit(small, kept)
    keys = scores.abs()[small.edge_mask]
    circuits = [Circuit(small, (scores.abs() >= t) & small.edge_mask) for t in keys.tolist()]
    expected = edge_roc(scores, ref).auc  # no ties: vertical/horizontal steps only
    auc, fpr, tpr = sweep_auc(circuits, ref, pessimistic=False)
    assert auc == pytest.approx(expected)
    assert sweep_auc(circuits, ref, pessimistic=True)[0] == pytest.approx(expected)
    assert fpr.shape == tpr.shape == (len(circuits),)
    assert isinstance(edge_roc(scores, ref), RocResult)
