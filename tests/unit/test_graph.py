"""ComputeGraph sizes in closed form, naming round-trips, dense indexing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from circuitfind.errors import ConfigError, UnknownNameError
from circuitfind.graphs import ComputeGraph


def expected_edges(n_layers: int, n_heads: int, n_kv: int, attn_only: bool = False) -> int:
    """Closed form: attention receivers see input + earlier layers; MLPs also their own heads."""
    per_layer = n_heads + (0 if attn_only else 1)
    total = 0
    for layer in range(n_layers):
        upstream = 1 + layer * per_layer
        total += (n_heads + 2 * n_kv) * upstream
        if not attn_only:
            total += upstream + n_heads
    return total + 1 + n_layers * per_layer


def test_gpt2_small_sizes():
    g = ComputeGraph(12, 12)
    assert g.n_nodes == 158
    assert g.n_edges == 32_491
    assert len(g.edge_names) == len(set(g.edge_names)) == 32_491


def test_stories260k_gqa_sizes():
    g = ComputeGraph(5, 8, 4)
    assert g.n_nodes == 47
    assert g.n_edges == expected_edges(5, 8, 4) == 1701
    assert "a2.kv3<k>" in [r.name for r in g.receivers]
    rec = g.receivers[g.receiver_index("a2.kv3<v>")]
    assert rec.nodes == ("a2.h6", "a2.h7")
    assert "a0.h1->a3.kv0<k>" in g.edge_names and "a0.h1->a3.h0<q>" in g.edge_names


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 6), kv=st.integers(1, 4), group=st.integers(1, 3),
       attn_only=st.booleans())
def test_sizes_and_round_trips(layers, kv, group, attn_only):
    g = ComputeGraph(layers, kv * group, kv, attn_only=attn_only)
    assert g.n_edges == expected_edges(layers, kv * group, kv, attn_only)
    assert int(g.edge_mask.sum()) == g.n_edges
    for e in range(0, g.n_edges, max(1, g.n_edges // 50)):
        name = g.edge_names[e]
        s, r = g.edge_index(name)
        assert g.edge_name(s, r) == name and g.edge_id(name) == e
    values = torch.randn(g.n_edges)
    assert torch.equal(g.to_edges(g.to_dense(values)), values)
    assert g == ComputeGraph.from_config(g.config())


def test_edge_names_follow_eap_ig_convention():
    g = ComputeGraph(12, 12)
    for name in ("a0.h1->a3.h7<q>", "m2->m5", "input->a0.h0<v>", "a11.h0->logits", "a5.h3->m5"):
        g.edge_index(name)


@pytest.mark.parametrize("bad", ["a3.h7->a0.h1<q>", "m5->m5", "logits->m1", "a0.h1-a3.h7<q>",
                                 "a0.h99->logits", "a0.h1->a3.h7<x>"])
def test_bad_edge_names(bad):
    with pytest.raises(UnknownNameError):
        ComputeGraph(12, 12).edge_index(bad)


def test_bad_config():
    with pytest.raises(ConfigError):
        ComputeGraph(2, 6, 4)
    with pytest.raises(ConfigError):
        ComputeGraph(0, 4)


def test_check_edge_matrix():
    g = ComputeGraph(2, 4, 2)
    ok = torch.zeros(g.n_senders, g.n_receivers)
    assert g.check_edge_matrix(ok, "scores") is ok
    assert g.check_edge_matrix(ok[None].expand(3, -1, -1), "masks", batched=True).shape[0] == 3
    with pytest.raises(ConfigError, match=r"masks must have shape \[S, R\]"):
        g.check_edge_matrix(ok[None], "masks")
    with pytest.raises(ConfigError, match="graph.to_dense"):
        g.check_edge_matrix(torch.zeros(g.n_edges), "scores")
    with pytest.raises(ConfigError, match="torch.Tensor"):
        g.check_edge_matrix(ok.tolist(), "scores")
    with pytest.raises(ConfigError, match="real numbers"):
        g.check_edge_matrix(ok.bool(), "scores", real=True)
    assert g.check_edge_matrix(ok.bool(), "kept").dtype == torch.bool


def test_readers_of_receivers_and_ids_to_mask():
    g = ComputeGraph(2, 4, 2)  # grouped-query: a1.kv0<k> is read by a1.h0 and a1.h1
    receivers = torch.zeros(g.n_receivers, dtype=torch.bool)
    receivers[g.receiver_index("a1.kv0<k>")] = True
    readers = g.nodes_reading(receivers)
    assert [g.nodes[i].name for i in readers.nonzero().flatten()] == ["a1.h0", "a1.h1"]
    nodes = torch.zeros(g.n_nodes, dtype=torch.bool)
    nodes[g.node_index("a1.h1")] = True
    read = g.receivers_read_by(nodes)
    assert [g.receivers[i].name for i in read.nonzero().flatten()] == [
        "a1.h1<q>", "a1.kv0<k>", "a1.kv0<v>"]
    names = ["m0->m1", "input->a0.h0<q>"]
    ids = g.edge_ids_of(names)
    assert ids.tolist() == [g.edge_id(n) for n in names]
    mask = g.mask_of(ids)
    assert mask.sum() == 2 and all(bool(mask[g.edge_index(n)]) for n in names)
    with pytest.raises(ConfigError, match="not one string"):
        g.edge_ids_of("m0->m1")
