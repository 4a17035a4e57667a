"""ACDC's visiting order (the reference's reverse topological order), in closed form."""

from __future__ import annotations

from circuitfind.algorithms.acdc import sender_order, visiting_plan
from circuitfind.graphs.graph import ComputeGraph


def test_visiting_plan_follows_the_reference_hook_order():
    g = ComputeGraph(2, 2)
    names = [(s.kind, g.receivers[s.receiver].name) for s in visiting_plan(g)]
    attn1 = ["a1.h1<v>", "a1.h0<v>", "a1.h1<k>", "a1.h0<k>", "a1.h1<q>", "a1.h0<q>"]
    assert names[:2] == [("edges", "logits"), ("edges", "m1")]
    assert names[2:8] == [("node", n) for n in attn1]
    assert names[8:14] == [("edges", n) for n in attn1]
    assert names[14] == ("edges", "m0")
    assert len(names) == 1 + 2 * (1 + 6 + 6)
    no_nodes = visiting_plan(g, node_tests=False)
    assert all(s.kind == "edges" for s in no_nodes) and len(no_nodes) == g.n_receivers
    budget = visiting_plan(g, max_receivers=3)
    assert [g.receivers[s.receiver].name for s in budget if s.kind == "edges"] == [
        "logits", "m1", "a1.h1<v>"]


def test_grouped_query_kv_receivers_are_visited_per_kv_head():
    g = ComputeGraph(1, 4, n_kv_heads=2)
    names = [g.receivers[s.receiver].name for s in visiting_plan(g) if s.kind == "node"]
    assert names == ["a0.kv1<v>", "a0.kv0<v>", "a0.kv1<k>", "a0.kv0<k>",
                     "a0.h3<q>", "a0.h2<q>", "a0.h1<q>", "a0.h0<q>"]


def test_sender_order_latest_first_heads_by_reference_indices_mode():
    g = ComputeGraph(2, 3)
    r = g.receiver_index("a1.h0<q>")
    names = lambda order: [g.senders[s].name for s in order]  # noqa: E731
    assert names(sender_order(g, r)) == ["m0", "a0.h2", "a0.h1", "a0.h0", "input"]
    assert names(sender_order(g, r, "ascending")) == ["m0", "a0.h0", "a0.h1", "a0.h2", "input"]
    logits = g.n_receivers - 1
    assert names(sender_order(g, logits))[:5] == ["m1", "a1.h2", "a1.h1", "a1.h0", "m0"]
